"""Reading a GGUF file's header: the one reader every stage uses (convert's manifest, bench's variants, serve).

Stdlib only and fast: arrays of scalars (the tokenizer's scores and token types) are skipped, not parsed, and
string arrays (the vocabulary) are kept only when asked for. gguf-py's ``GGUFReader`` parses every tokenizer
entry into its own numpy array, which takes seconds for a 49k-token vocabulary.

    header = read_header(Path("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    header.meta["general.architecture"]           # "llama"
    header.meta["tokenizer.ggml.tokens"]          # 49152 (the count: arrays are skipped unless keep_arrays)
    header.tensors[0]                             # TensorInfo(name="token_embd.weight", dims=(576, 49152), type=3)
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError

MAGIC = b"GGUF"

# GGUF metadata value types (gguf.GGUFValueType) -> struct format of a scalar; 8 = string, 9 = array.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFError(EdgeLLMError):
    """A file is not a GGUF file this reader understands; the message says what was found and where."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    type: int  # ggml_type (gguf.GGMLQuantizationType)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    meta: dict[str, Any]  # arrays are their length unless read with keep_arrays
    tensors: tuple[TensorInfo, ...]

    @property
    def architecture(self) -> str:
        return str(self.meta.get("general.architecture", ""))

    @property
    def file_type(self) -> int | None:
        """``general.file_type`` (a ``llama_ftype``), or None when the converter did not write it."""
        value = self.meta.get("general.file_type")
        return int(value) if isinstance(value, int) else None

    def arch_value(self, key: str) -> Any:
        """``<architecture>.<key>``, e.g. ``arch_value("context_length")``."""
        return self.meta.get(f"{self.architecture}.{key}")


class _Cursor:
    """A little-endian reader over a memory view, with the position kept for error messages."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def read(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.read("Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string past the end of the file")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALAR:
            return self.read(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.read("I"), self.read("Q")
            if etype in _SCALAR and not keep:
                self.pos += count * struct.calcsize("<" + _SCALAR[etype])
                return count
            items = [self.value(etype, keep) for _ in range(count)]
            return items if keep else count
        raise GGUFError(f"unknown GGUF value type {vtype} at byte {self.pos}")


def _parse(path: Path, c: _Cursor, keep_arrays: bool | frozenset[str], with_tensors: bool) -> GGUFHeader:
    magic = bytes(c.buf[:4])
    if magic != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    c.pos = 4
    version, n_tensors, n_kv = c.read("I"), c.read("Q"), c.read("Q")
    if version < 2:
        raise GGUFError(f"{path}: GGUF version {version} is too old (edgellm reads version 2 and later)")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string()
        keep = keep_arrays if isinstance(keep_arrays, bool) else key in keep_arrays
        meta[key] = c.value(c.read("I"), keep=keep)
    tensors: list[TensorInfo] = []
    if with_tensors:
        for _ in range(n_tensors):
            name = c.string()
            dims = tuple(int(c.read("Q")) for _ in range(c.read("I")))
            ttype = int(c.read("I"))
            c.read("Q")  # offset of the data
            tensors.append(TensorInfo(name, dims, ttype))
    return GGUFHeader(version=int(version), meta=meta, tensors=tuple(tensors))


def read_header(
    path: Path, keep_arrays: bool | frozenset[str] = False, with_tensors: bool = True
) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file.

    ``keep_arrays``: False keeps arrays as their length (fast), True keeps all, a set keeps the named keys.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return _parse(path, _Cursor(view), keep_arrays, with_tensors)
            finally:
                view.release()
    except struct.error:
        raise GGUFError(f"{path}: truncated GGUF header") from None
    except ValueError as e:  # mmap of an empty file
        raise GGUFError(f"{path}: not a GGUF file ({e})") from None
