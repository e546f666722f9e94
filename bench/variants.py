"""Which GGUF files to compare, and which one is the reference.

Sources, in order: a ``manifest.json`` written by `edgellm convert` (its ``reference`` is the 16-bit file, its
``files`` the variants), else a folder of ``*.gguf`` files, whose quant type is read from each file's
``general.file_type`` (falling back to the file name). Without a manifest, the reference is the float file
(F32 > BF16 > F16) or, when the folder has none, the largest file -- and the report says it is not a float one.
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from edgellm.errors import EdgeLLMError

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "BF16", "F16")
_NAME_QUANT = re.compile(r"(?i)(?:^|[-_.])(f32|bf16|f16|iq\d\w*|q\d(?:_[a-z0-9]+)*)$")


class BenchError(EdgeLLMError):
    """A benchmark cannot run; the message says why and what to do."""


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


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def gguf_file_type(path: Path) -> int | None:
    """``general.file_type`` from a GGUF header, or None when absent.

    A small reader that stops at the key: gguf-py's GGUFReader parses every tokenizer entry first (seconds per file).
    """

    def read(f: BinaryIO, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("unexpected end of file in the GGUF header")
        return struct.unpack(fmt, data)[0]

    def skip(f: BinaryIO, vtype: int) -> None:
        if vtype in _SCALAR:
            f.seek(struct.calcsize(_SCALAR[vtype]), 1)
        elif vtype == _STRING:
            f.seek(read(f, "<Q"), 1)
        elif vtype == _ARRAY:
            etype, count = read(f, "<I"), read(f, "<Q")
            if etype in _SCALAR:
                f.seek(struct.calcsize(_SCALAR[etype]) * count, 1)
            else:
                for _ in range(count):
                    skip(f, etype)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic)")
        version = read(f, "<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old")
        _n_tensors, n_kv = read(f, "<Q"), read(f, "<Q")
        for _ in range(n_kv):
            key = f.read(read(f, "<Q")).decode("utf-8", errors="replace")
            vtype = read(f, "<I")
            if key == "general.file_type" and vtype in _SCALAR:
                return int(read(f, _SCALAR[vtype]))
            skip(f, vtype)
    return None


def quant_of(path: Path) -> str:
    """The GGUF's ``general.file_type`` as a llama.cpp type name, or the quant suffix of its file name."""
    try:
        file_type = gguf_file_type(path)
        if file_type is not None:
            import llama_cpp

            names = {v: k for k, v in vars(llama_cpp).items() if k.startswith("LLAMA_FTYPE_") and isinstance(v, int)}
            if file_type in names:
                name = names[file_type].removeprefix("LLAMA_FTYPE_")
                return {"ALL_F32": "F32"}.get(name, name.removeprefix("MOSTLY_"))
    except (OSError, ValueError) as e:  # unreadable metadata: the file name is the next best source
        log.debug("cannot read general.file_type of %s: %s", path, e)
    if m := _NAME_QUANT.search(path.stem):
        return m.group(1).upper()
    return "unknown"


def _from_manifest(manifest_path: Path) -> VariantSet:
    from edgellm.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    manifest.check_files()

    def variant(f: object) -> Variant:
        return Variant(label=f.quant, quant=f.quant.upper(), path=f.absolute_path, size_bytes=f.size)  # type: ignore[attr-defined]

    reference = variant(manifest.reference)
    others = sorted((variant(f) for f in manifest.files if f.quant != manifest.reference.quant), key=lambda v: -v.size_bytes)
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
