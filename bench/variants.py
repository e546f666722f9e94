"""Which GGUF files to compare, and which one is the reference.

Sources, in order: a ``manifest.json`` written by `edgellm convert` (its ``reference`` is the 16-bit file, its
``files`` the variants), else a folder of ``*.gguf`` files, whose quant type is read from each file's
``general.file_type`` (falling back to the file name). Without a manifest, the reference is the float file
(F32 > BF16 > F16) or, when the folder has none, the largest file -- and the report says it is not a float one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edgellm.bench.errors import BenchError
from edgellm.gguf import GGUFError, read_header
from edgellm.manifest import ManifestFile, load_manifest
from edgellm.quants import FLOAT_TYPES, ftype_name, quant_in_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    label: str  # unique in one run: the manifest's quant, else the file stem
    quant: str  # upper-case llama.cpp type name: "Q4_K_M", "Q8_0", "F16"
    path: Path
    size_bytes: int

    @property
    def is_float(self) -> bool:
        return self.quant in FLOAT_TYPES


@dataclass(frozen=True)
class VariantSet:
    name: str
    variants: tuple[Variant, ...]  # reference first, then by size, largest first
    reference: Variant
    source: str  # "manifest" or "directory"

    @property
    def reference_is_float(self) -> bool:
        return self.reference.is_float


def quant_of(path: Path) -> str:
    """The GGUF's ``general.file_type`` as a llama.cpp type name, or the quant suffix of its file name."""
    try:
        file_type = read_header(path, with_tensors=False).file_type
    except (OSError, GGUFError) as e:  # unreadable metadata: the file name is the next best source
        log.debug("cannot read general.file_type of %s: %s", path, e)
        file_type = None
    name = ftype_name(file_type) if file_type is not None else None
    return name or quant_in_name(path) or "unknown"


def _manifest_variant(f: ManifestFile) -> Variant:
    return Variant(label=f.quant, quant=f.quant.upper(), path=f.absolute_path, size_bytes=f.size)


def _from_manifest(manifest_path: Path) -> VariantSet:
    manifest = load_manifest(manifest_path)
    manifest.check_files()
    reference = _manifest_variant(manifest.reference)
    others = sorted(
        (_manifest_variant(f) for f in manifest.files if f.quant != manifest.reference.quant), key=lambda v: -v.size_bytes
    )
    return VariantSet(name=manifest.name, variants=(reference, *others), reference=reference, source="manifest")


def _from_directory(folder: Path, files: list[Path], reference: str | None) -> VariantSet:
    variants = [Variant(label=p.stem, quant=quant_of(p), path=p.resolve(), size_bytes=p.stat().st_size) for p in files]
    if reference:
        wanted = reference.lower()
        matches = [v for v in variants if wanted in (v.label.lower(), v.quant.lower(), v.path.name.lower())]
        if len(matches) != 1:
            found = "none" if not matches else ", ".join(v.label for v in matches)
            raise BenchError(
                f"--reference {reference!r} must match exactly one variant (label, quant or file name); matched {found}; "
                f"variants: {', '.join(f'{v.label} ({v.quant})' for v in variants)}"
            )
        ref = matches[0]
    else:
        floats = sorted((v for v in variants if v.is_float), key=lambda v: FLOAT_TYPES.index(v.quant))
        ref = floats[0] if floats else max(variants, key=lambda v: v.size_bytes)
    if not ref.is_float:
        log.warning(
            "reference %s is %s, not a float (F32/BF16/F16) file: quality numbers are relative to it, not to the "
            "unquantized model",
            ref.label,
            ref.quant,
        )
    others = sorted((v for v in variants if v is not ref), key=lambda v: -v.size_bytes)
    return VariantSet(name=folder.resolve().name, variants=(ref, *others), reference=ref, source="directory")


def find_variants(src: Path, reference: str | None = None) -> VariantSet:
    """The variants under ``src``: a manifest (file or folder holding ``manifest.json``) or a folder of GGUFs.

    ``reference`` picks the reference in a folder without a manifest (a label, quant type or file name).
    """
    src = Path(src)
    if not src.exists():
        raise BenchError(f"{src}: no such file or folder; pass models/<name>/ (with manifest.json) or a folder of .gguf files")
    if src.is_file() and src.name.endswith(".json"):
        return _from_manifest(src)
    if src.is_dir() and (src / "manifest.json").is_file():
        if reference:
            log.warning("--reference is ignored: %s has a manifest, whose 16-bit file is the reference", src)
        return _from_manifest(src / "manifest.json")
    if src.is_file() and src.suffix == ".gguf":
        raise BenchError(f"{src}: one file is nothing to compare; pass the folder that holds the variants")
    files = sorted(src.glob("*.gguf"))
    if len(files) < 2:
        raise BenchError(
            f"{src}: found {len(files)} .gguf file(s) and no manifest.json; need a reference and at least one variant"
        )
    return _from_directory(src, files, reference)
