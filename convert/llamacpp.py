"""llama.cpp's own tools, at the exact version of the installed llama-cpp-python.

- the converter (``convert_hf_to_gguf.py`` with ``conversion/`` and ``gguf-py/``), taken from the binding's source
  distribution (``pip download --no-binary :all: --no-deps llama-cpp-python==<installed>``) into the cache and run
  as a subprocess with this Python;
- the quantizer (``llama_cpp.llama_model_quantize``);
- a reader for what a GGUF actually holds (tensor types, sizes, metadata).
"""

from __future__ import annotations

import ast
import ctypes
import errno
import importlib.metadata
import json
import logging
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from edgellm.errors import EdgeLLMError
from edgellm.fsutil import atomic_path, sha256_file
from edgellm.paths import cache_dir

log = logging.getLogger(__name__)

PACKAGE = "llama-cpp-python"
_VENDOR = "vendor/llama.cpp/"
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
_MARKER = "edgellm-converter.json"


class ConvertError(EdgeLLMError):
    """A conversion or quantization failed; the message says why and what to do."""


class UnsupportedArchitectureError(ConvertError):
    pass


class DiskFullError(ConvertError):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# The converter


def binding_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConvertError(
            f"{PACKAGE} is not installed; install the convert extra: pip install -e '.[convert]'"
        ) from None


def llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.llama_version().decode()


@dataclass(frozen=True)
class Converter:
    root: Path  # holds convert_hf_to_gguf.py, conversion/, gguf-py/
    version: str  # llama-cpp-python version it came from
    sdist_sha256: str

    @property
    def script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def gguf_py_version(self) -> str:
        text = (self.root / "gguf-py" / "pyproject.toml").read_text(encoding="utf-8")
        m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
        return m.group(1) if m else "unknown"

    def supported_architectures(self) -> frozenset[str]:
        """The Hugging Face ``architectures`` names the converter maps to a model class (read, not imported)."""
        tree = ast.parse((self.root / "conversion" / "__init__.py").read_text(encoding="utf-8"))
        for node in tree.body:
            target: ast.expr
            if isinstance(node, ast.AnnAssign) and node.value is not None:
                target, value = node.target, node.value
            elif isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            else:
                continue
            if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP":
                return frozenset(ast.literal_eval(value))
        raise ConvertError(
            f"{self.root}/conversion/__init__.py: no TEXT_MODEL_MAP; is this a llama.cpp converter?"
        )


def converter_dir(version: str) -> Path:
    return cache_dir() / f"llama.cpp-converter-{version}"


def find_converter(version: str | None = None) -> Converter | None:
    version = version or binding_version()
    root = converter_dir(version)
    marker = root / _MARKER
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text(encoding="utf-8"))
    return Converter(root=root, version=info["version"], sdist_sha256=info["sdist_sha256"])


def setup_converter(version: str | None = None, force: bool = False) -> Converter:
    """Fetch llama.cpp's converter from the ``llama-cpp-python==<version>`` sdist into the cache (idempotent)."""
    version = version or binding_version()
    if not force and (found := find_converter(version)):
        log.info("llama.cpp converter %s is present at %s", version, found.root)
        return found
    root = converter_dir(version)
    with tempfile.TemporaryDirectory(prefix="edgellm-sdist-") as tmp:
        log.info("downloading the %s==%s source distribution (pip download --no-binary)", PACKAGE, version)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-binary",
            ":all:",
            "--no-deps",
            "-d",
            tmp,
            f"{PACKAGE}=={version}",
        ]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode != 0:
            raise ConvertError(
                f"pip download {PACKAGE}=={version} failed (exit {proc.returncode}); is the registry reachable?"
            )
        sdists = sorted(Path(tmp).glob("*.tar.gz"))
        if not sdists:
            raise ConvertError(f"pip download {PACKAGE}=={version} produced no source distribution in {tmp}")
        sdist = sdists[0]
        digest = sha256_file(sdist)
        with atomic_path(root) as part, tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                _, _, rel = m.name.partition("/")
                if (
                    rel.startswith(_VENDOR)
                    and rel[len(_VENDOR) :].startswith(_KEEP)
                    and (m.isfile() or m.isdir())
                ):
                    m.name = rel[len(_VENDOR) :]
                    members.append(m)
            if not any(m.name == "convert_hf_to_gguf.py" for m in members):
                raise ConvertError(f"{sdist.name} has no {_VENDOR}convert_hf_to_gguf.py")
            part.mkdir(parents=True)
            for m in tqdm(members, desc=f"unpack converter {version}", unit="file", file=sys.stderr):
                tar.extract(m, part, filter="data")
            info = {"version": version, "sdist": sdist.name, "sdist_sha256": digest}
            (part / _MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log.info("llama.cpp converter %s unpacked into %s", version, root)
    found = find_converter(version)
    assert found is not None
    return found


def ensure_converter() -> Converter:
    return find_converter() or setup_converter()


_NEARLY_FULL = 16 << 20  # after a failed write, less free space than this means the disk filled up


def check_free(path: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(path).free
    if free < need:
        raise DiskFullError(
            f"not enough disk space for {what} in {path}: about {need / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free"
        )


def disk_full_error(e: OSError, where: Path) -> DiskFullError:
    return DiskFullError(
        f"the disk filled up while writing {where}: {e}; free some space and rerun (finished outputs are kept)"
    )


def run_converter(
    converter: Converter, src: Path, dst: Path, outtype: str = "f16", expected_bytes: int = 0
) -> None:
    """Run ``convert_hf_to_gguf.py src --outtype outtype --outfile dst`` with a progress bar on the bytes written."""
    cmd = [sys.executable, str(converter.script), str(src), "--outtype", outtype, "--outfile", str(dst)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # always use the gguf-py that ships with this converter
    log.debug("running %s", " ".join(cmd))
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as errlog:
        proc = subprocess.Popen(cmd, stdout=errlog, stderr=errlog, env=env)
        with tqdm(
            total=expected_bytes or None,
            unit="B",
            unit_scale=True,
            desc=f"convert -> {outtype}",
            file=sys.stderr,
        ) as bar:
            while proc.poll() is None:
                time.sleep(0.2)
                if dst.exists():
                    bar.update(dst.stat().st_size - bar.n)
            if dst.exists():
                bar.total = max(bar.total or 0, dst.stat().st_size)
                bar.update(dst.stat().st_size - bar.n)
        errlog.seek(0)
        output = errlog.read()
    log.debug("converter output:\n%s", output)
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        if "No space left on device" in output or shutil.disk_usage(dst.parent).free < _NEARLY_FULL:
            raise DiskFullError(
                f"the disk filled up while converting {src} to {outtype} in {dst.parent}; free some space and rerun"
            )
        if m := re.search(r"Model (\S+) is not supported", output):
            raise UnsupportedArchitectureError(
                f"{src}: llama.cpp's converter does not support architecture {m.group(1)}"
            )
        raise ConvertError(f"llama.cpp's converter failed on {src} (exit {proc.returncode}):\n{tail}")


# ---------------------------------------------------------------------------------------------------------------------
# The quantizer

# Requested name -> llama_ftype value (llama.h). 16-bit types come from the converter; these come from the quantizer.
QUANT_FTYPES: Mapping[str, int] = {
    "q4_0": 2,
    "q8_0": 7,
    "q4_k_m": 15,
    "q5_k_m": 17,
    "q6_k": 18,
    "f16": 1,
    "bf16": 32,
}
BITS_GUESS = {"q4_0": 4.6, "q8_0": 8.6, "q4_k_m": 5.0, "q5_k_m": 5.8, "q6_k": 6.7, "f16": 16.1, "bf16": 16.1}

_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")
_FALLBACK = re.compile(r"required for type\s+(\S+)\)\s.*?falling back to\s+(\S+)", re.S)


@dataclass
class QuantizeLog:
    lines: list[str] = field(default_factory=list)

    def fallbacks(self) -> dict[str, int]:
        """``{"q4_K->q5_0": n}`` from llama.cpp's per-tensor "falling back" warnings."""
        counts: Counter[str] = Counter()
        for line in self.lines:
            if m := _FALLBACK.search(line):
                counts[f"{m.group(1).upper()}->{m.group(2).upper()}"] += 1
        return dict(counts)


@contextmanager
def _capture_llama_log(bar: tqdm) -> Iterator[QuantizeLog]:
    """Route llama.cpp's log to a buffer (and the progress bar) for the duration; restore the binding's logger after."""
    import llama_cpp
    from llama_cpp import _logger

    captured = QuantizeLog()
    pending: list[str] = []
    lock = threading.Lock()

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        chunk = text.decode("utf-8", errors="replace")
        with lock:
            if m := _PROGRESS.search(chunk):
                done, total = int(m.group(1)), int(m.group(2))
                if bar.total != total:
                    bar.reset(total=total)
                bar.update(done - bar.n)
            pending.append(chunk)
            if chunk.endswith("\n"):
                captured.lines.append("".join(pending).rstrip("\n"))
                pending.clear()

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield captured
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        if pending:
            captured.lines.append("".join(pending))


def _imatrix_array(values: Mapping[str, Any]) -> tuple[Any, list[Any]]:
    """A NULL-name-terminated ``llama_model_imatrix_data`` array, and the buffers that must outlive the call."""
    import llama_cpp
    import numpy as np

    arr = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    keep = []
    for i, (name, v) in enumerate(sorted(values.items())):
        data = np.ascontiguousarray(v, dtype=np.float32)
        keep.append(data)
        arr[i].name = name.encode()
        arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = data.size
    arr[len(values)].name = None
    return ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), [arr, keep]


def quantize(
    src: Path,
    dst: Path,
    quant: str,
    n_params: int,
    nthread: int = 0,
    imatrix: Mapping[str, Any] | None = None,
) -> QuantizeLog:
    """``llama_model_quantize(src -> dst)`` with the default parameters, ``ftype`` for ``quant`` and, if given, an
    importance matrix (GGUF tensor name -> mean squared input activation per column)."""
    import llama_cpp

    if quant not in QUANT_FTYPES:
        raise ConvertError(f"unknown quant type {quant!r}; choose from {', '.join(QUANT_FTYPES)}")
    check_free(dst.parent, int(n_params * BITS_GUESS[quant] / 8 * 1.1) + (1 << 20), f"the {quant} file")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = nthread
    keep_alive = None
    if imatrix:
        params.imatrix, keep_alive = _imatrix_array(imatrix)
    with tqdm(total=None, unit="tensor", desc=f"quantize -> {quant}", file=sys.stderr) as bar:
        with _capture_llama_log(bar) as qlog:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep_alive
    if rc != 0:
        tail = "\n".join(qlog.lines[-10:])
        if "No space left" in tail or shutil.disk_usage(dst.parent).free < _NEARLY_FULL:
            raise DiskFullError(
                f"the disk filled up while quantizing to {quant} in {dst.parent}; free some space and rerun"
            )
        raise ConvertError(f"llama.cpp failed to quantize {src.name} to {quant} (code {rc}):\n{tail}")
    if fb := qlog.fallbacks():
        n = sum(fb.values())
        log.warning(
            "%s: %d tensor(s) fell back to other types (row width not a multiple of the block): %s",
            quant,
            n,
            fb,
        )
    return qlog


# ---------------------------------------------------------------------------------------------------------------------
# Reading what a GGUF holds


@dataclass(frozen=True)
class GGUFInfo:
    tensor_types: dict[str, int]
    n_params: int
    tensor_bytes: int
    architecture: str
    context_length: int | None
    has_tokenizer: bool
    has_chat_template: bool

    @property
    def bits_per_weight(self) -> float:
        return round(self.tensor_bytes * 8 / max(self.n_params, 1), 4)


# GGUF metadata value types (gguf.GGUFValueType) -> struct format of a scalar; 8 = string, 9 = array.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _Cursor:
    """A little-endian reader over a GGUF header (just enough to skip arrays fast; gguf.GGUFReader parses every
    tokenizer entry into its own numpy array, which takes seconds for a 49k-token vocabulary)."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def read(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.read("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALAR:
            return self.read(_SCALAR[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.read("I"), self.read("Q")
            if etype in _SCALAR and not keep:
                self.pos += count * struct.calcsize("<" + _SCALAR[etype])
                return count
            items = [self.value(etype, keep) for _ in range(count)]
            return items if keep else count
        raise ConvertError(f"unknown GGUF value type {vtype} at byte {self.pos}")


def _parse_header(
    path: Path, c: _Cursor, quant_sizes: Any, qtype: Any
) -> tuple[dict[str, Any], Counter[str], int, int]:
    try:
        if bytes(c.buf[:4]) != b"GGUF":
            raise ConvertError(f"{path}: not a GGUF file (magic {bytes(c.buf[:4])!r})")
        c.pos = 4
        version, n_tensors, n_kv = c.read("I"), c.read("Q"), c.read("Q")
        if version < 2:
            raise ConvertError(f"{path}: GGUF version {version} is too old")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.read("I"), keep=not key.startswith("tokenizer.ggml."))
        types: Counter[str] = Counter()
        n_params = n_bytes = 0
        for _ in range(n_tensors):
            c.string()
            dims = [c.read("Q") for _ in range(c.read("I"))]
            ttype = qtype(c.read("I"))
            c.read("Q")  # offset
            n = 1
            for d in dims:
                n *= d
            block, size = quant_sizes[ttype]
            types[ttype.name] += 1
            n_params += n
            n_bytes += n // block * size
    except struct.error:
        raise ConvertError(f"{path}: truncated GGUF header") from None
    return meta, types, n_params, n_bytes


def read_gguf(path: Path) -> GGUFInfo:
    """Tensor-type histogram, parameter count, tensor bytes and the metadata edgellm records, from the header."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            meta, types, n_params, n_bytes = _parse_header(
                path, _Cursor(view), GGML_QUANT_SIZES, GGMLQuantizationType
            )
        finally:
            view.release()
    arch = str(meta.get("general.architecture", ""))
    ctx = meta.get(f"{arch}.context_length")
    return GGUFInfo(
        tensor_types=dict(sorted(types.items())),
        n_params=n_params,
        tensor_bytes=n_bytes,
        architecture=arch,
        context_length=int(ctx) if isinstance(ctx, int) else None,
        has_tokenizer=bool(meta.get("tokenizer.ggml.tokens")),
        has_chat_template=bool(meta.get("tokenizer.chat_template")),
    )


def is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)
