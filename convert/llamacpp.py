"""llama.cpp's own tools, at the exact version of the installed llama-cpp-python.

- the converters (``convert_hf_to_gguf.py`` for models, ``convert_lora_to_gguf.py`` for PEFT LoRA adapters, with
  ``conversion/`` and ``gguf-py/``), taken from the binding's source distribution (``pip download --no-binary :all:
  --no-deps llama-cpp-python==<installed>``) into the cache by ``edgellm convert setup`` (the only step here that
  uses the network; a cache made before a script was kept is refreshed by it), and run as a subprocess with this
  Python;
- the quantizer (``llama_cpp.llama_model_quantize``), run in a child process (`convert.quantize_worker`) so that
  capturing its log does not change llama.cpp's process-wide log callback here;
- what a GGUF actually holds (tensor types, sizes, metadata), computed from `edgellm.gguf.read_header`.
"""

from __future__ import annotations

import ast
import errno
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from edgellm.errors import EdgeLLMError
from edgellm.fsutil import atomic_path, sha256_file
from edgellm.gguf import GGUFError, read_header
from edgellm.paths import cache_dir
from edgellm.quants import ftypes

log = logging.getLogger(__name__)

PACKAGE = "llama-cpp-python"
_VENDOR = "vendor/llama.cpp/"
_KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
# What a usable cache must hold; a cache written before a file was added here is refreshed by `setup_converter`.
_REQUIRED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py")
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
    root: Path  # holds convert_hf_to_gguf.py, convert_lora_to_gguf.py, conversion/, gguf-py/
    version: str  # llama-cpp-python version it came from
    sdist_sha256: str

    @property
    def script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def lora_script(self) -> Path:
        return self.root / "convert_lora_to_gguf.py"

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


def missing_files(root: Path) -> list[str]:
    """The files a usable converter cache needs that ``root`` lacks (all of them when it has no marker)."""
    if not (root / _MARKER).is_file():
        return [_MARKER, *_REQUIRED]
    return [name for name in _REQUIRED if not (root / name).is_file()]


def find_converter(version: str | None = None) -> Converter | None:
    """The cached converter for ``version``, or None when it is absent or incomplete (made by an older edgellm
    that did not keep every script); `setup_converter` fetches or refreshes it."""
    version = version or binding_version()
    root = converter_dir(version)
    if missing := missing_files(root):
        if (root / _MARKER).is_file():
            log.info("the converter cache %s lacks %s; `%s` refreshes it", root, ", ".join(missing), SETUP_COMMAND)
        return None
    info = json.loads((root / _MARKER).read_text(encoding="utf-8"))
    return Converter(root=root, version=info["version"], sdist_sha256=info["sdist_sha256"])


def setup_converter(version: str | None = None, force: bool = False, sdist: Path | None = None) -> Converter:
    """Fetch llama.cpp's converters from the ``llama-cpp-python==<version>`` sdist into the cache (idempotent: a
    complete cache is kept, an incomplete one refetched). ``sdist``: unpack this local source distribution instead
    of running ``pip download`` (an offline machine, a mirror)."""
    version = version or binding_version()
    if not force and (found := find_converter(version)):
        log.info("llama.cpp converter %s is present at %s", version, found.root)
        return found
    root = converter_dir(version)
    if (root / _MARKER).is_file() and not force:
        log.info("refreshing the converter cache %s (it lacks %s)", root, ", ".join(missing_files(root)))
    with tempfile.TemporaryDirectory(prefix="edgellm-sdist-") as tmp:
        sdist = sdist if sdist is not None else _download_sdist(version, Path(tmp))
        if not sdist.is_file():
            raise ConvertError(f"{sdist}: no such source distribution")
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
            names = {m.name for m in members}
            if lacking := [n for n in _REQUIRED if n not in names]:
                raise ConvertError(f"{sdist.name} has no {', '.join(_VENDOR + n for n in lacking)}")
            part.mkdir(parents=True)
            for m in tqdm(members, desc=f"unpack converter {version}", unit="file", file=sys.stderr):
                tar.extract(m, part, filter="data")
            info = {"version": version, "sdist": sdist.name, "sdist_sha256": digest}
            (part / _MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log.info("llama.cpp converter %s unpacked into %s", version, root)
    found = find_converter(version)
    assert found is not None
    return found


def _download_sdist(version: str, dest: Path) -> Path:
    """``pip download --no-binary :all: --no-deps llama-cpp-python==<version>`` into ``dest``: the package
    registry, through its ordinary client."""
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
        str(dest),
        f"{PACKAGE}=={version}",
    ]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        raise ConvertError(
            f"pip download {PACKAGE}=={version} failed (exit {proc.returncode}); is the registry reachable?"
        )
    sdists = sorted(dest.glob("*.tar.gz"))
    if not sdists:
        raise ConvertError(f"pip download {PACKAGE}=={version} produced no source distribution in {dest}")
    return sdists[0]


SETUP_COMMAND = "edgellm convert setup"


def require_converter() -> Converter:
    """The fetched converter for the installed llama-cpp-python; never downloads (``edgellm convert setup`` does)."""
    version = binding_version()
    found = find_converter(version)
    if found is None:
        root = converter_dir(version)
        if (root / _MARKER).is_file():
            raise ConvertError(
                f"the llama.cpp converter cache {root} lacks {', '.join(missing_files(root))} (made by an older "
                f"edgellm); refresh it with `{SETUP_COMMAND}`"
            )
        raise ConvertError(
            f"llama.cpp's converter for llama-cpp-python {version} is not in {root}; "
            f"fetch it once with `{SETUP_COMMAND}` (`make setup` runs it)"
        )
    return found


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
    converter: Converter,
    src: Path,
    dst: Path,
    outtype: str = "f16",
    expected_bytes: int = 0,
    module: str | None = None,
) -> None:
    """Run ``convert_hf_to_gguf.py src --outtype outtype --outfile dst`` with a progress bar on the bytes written.
    ``module``: run ``python -m module <converter root> ...`` instead, a wrapper that adjusts the converter's model
    classes before running its script (`convert.encoder_converter`)."""
    entry = ["-m", module, str(converter.root)] if module else [str(converter.script)]
    cmd = [sys.executable, *entry, str(src), "--outtype", outtype, "--outfile", str(dst)]
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


LORA_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def run_lora_converter(converter: Converter, adapter: Path, base_hf: Path, dst: Path, outtype: str = "f16") -> None:
    """Run ``convert_lora_to_gguf.py adapter --base base_hf --outtype outtype --outfile dst``, offline: the base's
    Hugging Face folder (its config.json) is always given, so the script never looks a base up on the hub."""
    if outtype not in LORA_OUTTYPES:
        raise ConvertError(f"LoRA outtype {outtype!r}: choose from {', '.join(LORA_OUTTYPES)}")
    cmd = [
        sys.executable,
        str(converter.lora_script),
        str(adapter),
        "--base",
        str(base_hf),
        "--outtype",
        outtype,
        "--outfile",
        str(dst),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env)
    log.debug("LoRA converter output:\n%s", proc.stdout + proc.stderr)
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        tail = "\n".join(output.strip().splitlines()[-12:])
        if "No space left on device" in output:
            raise DiskFullError(f"the disk filled up while converting {adapter} in {dst.parent}; free some space")
        raise ConvertError(f"llama.cpp's convert_lora_to_gguf.py failed on {adapter} (exit {proc.returncode}):\n{tail}")
    if not dst.is_file():
        raise ConvertError(f"llama.cpp's convert_lora_to_gguf.py wrote no file for {adapter} (expected {dst})")


# ---------------------------------------------------------------------------------------------------------------------
# The quantizer


def bits_guess(quant: str) -> float:
    """A generous bits-per-weight estimate of a quantization type, for disk-space checks only: the bit width in
    its name plus one for block scales and the tensors a mix keeps at higher precision (``q4_k_m`` -> 5,
    ``iq2_xxs`` -> 3, ``bf16`` -> 16.1)."""
    m = re.search(r"\d+", quant)
    bits = int(m.group()) if m else 16
    return bits + 0.1 if quant.lower().startswith(("f", "bf")) else bits + 1.0


def check_quant(quant: str) -> int:
    """The ``llama_ftype`` of a quantization type name (``q4_k_m`` -> 15), from llama.cpp's own constants."""
    try:
        return ftypes()[quant]
    except KeyError:
        raise ConvertError(f"unknown quant type {quant!r}; choose from {', '.join(ftypes())}") from None


_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")
_FALLBACK = re.compile(r"required for type\s+(\S+)\)\s.*?falling back to\s+(\S+)", re.S)
WORKER = "edgellm.convert.quantize_worker"


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


def quantize(
    src: Path,
    dst: Path,
    quant: str,
    n_params: int,
    nthread: int = 0,
    imatrix: Mapping[str, Any] | None = None,
) -> QuantizeLog:
    """``llama_model_quantize(src -> dst)`` with the default parameters, ``ftype`` for ``quant`` and, if given, an
    importance matrix (GGUF tensor name -> mean squared input activation per column).

    Runs in a child process (`convert.quantize_worker`) that reports llama.cpp's log as JSON lines: the per-tensor
    progress and the k-quant fallbacks come only through llama.cpp's global log callback, which this process leaves
    alone."""
    ftype = check_quant(quant)
    check_free(dst.parent, int(n_params * bits_guess(quant) / 8 * 1.1) + (1 << 20), f"the {quant} file")
    with tempfile.TemporaryDirectory(prefix="edgellm-quantize-") as tmp:
        spec: dict[str, Any] = {"src": str(src), "dst": str(dst), "ftype": ftype, "nthread": nthread}
        spec["imatrix"] = _save_imatrix(imatrix, Path(tmp) / "imatrix.npz") if imatrix else None
        qlog, code, stderr = _run_worker(spec, quant, Path(tmp) / "stderr.txt")
    if code != 0:
        tail = "\n".join([*qlog.lines[-10:], *stderr.strip().splitlines()[-5:]])
        if "No space left" in tail or shutil.disk_usage(dst.parent).free < _NEARLY_FULL:
            raise DiskFullError(
                f"the disk filled up while quantizing to {quant} in {dst.parent}; free some space and rerun"
            )
        raise ConvertError(f"llama.cpp failed to quantize {src.name} to {quant} (code {code}):\n{tail}")
    if fb := qlog.fallbacks():
        n = sum(fb.values())
        log.warning(
            "%s: %d tensor(s) fell back to other types (row width not a multiple of the block): %s",
            quant,
            n,
            fb,
        )
    return qlog


def _save_imatrix(imatrix: Mapping[str, Any], path: Path) -> str:
    import numpy as np

    arrays: dict[str, Any] = {k: np.asarray(v, dtype=np.float32) for k, v in imatrix.items()}
    np.savez(str(path), **arrays)
    return str(path)


def _run_worker(spec: dict[str, Any], quant: str, stderr_path: Path) -> tuple[QuantizeLog, int, str]:
    """Run the quantizer worker on ``spec``; its log lines (with a progress bar on the tensors), its result code
    (the worker's exit status if it died before reporting one) and what it wrote to stderr."""
    qlog = QuantizeLog()
    code: int | None = None
    with open(stderr_path, "w+", encoding="utf-8", errors="replace") as errlog:
        with subprocess.Popen(
            [sys.executable, "-m", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errlog,
            text=True,
            encoding="utf-8",
            errors="replace",
        ) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps(spec))
                proc.stdin.close()
                with tqdm(total=None, unit="tensor", desc=f"quantize -> {quant}", file=sys.stderr) as bar:
                    for raw in proc.stdout:
                        event = _worker_event(raw)
                        if event.get("event") == "result":
                            code = int(event["code"])
                            continue
                        line = str(event.get("text", ""))
                        qlog.lines.append(line)
                        if m := _PROGRESS.search(line):
                            done, total = int(m.group(1)), int(m.group(2))
                            if bar.total != total:
                                bar.reset(total=total)
                            bar.update(done - bar.n)
            finally:
                if proc.poll() is None and code is None:
                    proc.kill()  # interrupted (or the pipe broke): do not leave it running
        errlog.seek(0)
        stderr = errlog.read()
    if code is None or (code == 0 and proc.returncode != 0):  # it died before (or after) reporting
        code = proc.returncode or 1
    return qlog, code, stderr


def _worker_event(raw: str) -> dict[str, Any]:
    """One JSON line from the worker; anything else it printed (a C library writing to stdout) as a log line."""
    try:
        event = json.loads(raw)
    except json.JSONDecodeError:
        event = None
    return event if isinstance(event, dict) else {"event": "log", "text": raw.rstrip("\n")}


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


def read_gguf(path: Path) -> GGUFInfo:
    """Tensor-type histogram, parameter count, tensor bytes and the metadata edgellm records, from the header
    (`edgellm.gguf.read_header`; no tensor data is read)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        header = read_header(path)
    except GGUFError as e:
        raise ConvertError(str(e)) from None
    types: Counter[str] = Counter()
    n_params = n_bytes = 0
    for t in header.tensors:
        ttype = GGMLQuantizationType(t.type)
        block, size = GGML_QUANT_SIZES[ttype]
        types[ttype.name] += 1
        n_params += t.n_elements
        n_bytes += t.n_elements // block * size
    ctx = header.arch_value("context_length")
    return GGUFInfo(
        tensor_types=dict(sorted(types.items())),
        n_params=n_params,
        tensor_bytes=n_bytes,
        architecture=header.architecture,
        context_length=int(ctx) if isinstance(ctx, int) else None,
        has_tokenizer=bool(header.meta.get("tokenizer.ggml.tokens")),
        has_chat_template=bool(header.meta.get("tokenizer.chat_template")),
    )


def is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)
