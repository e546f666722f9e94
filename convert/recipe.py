"""`edgellm convert`: a Hugging Face causal-LM directory -> verified GGUF files and ``manifest.json``.

Reads top to bottom: inspect the source -> convert to 16-bit with llama.cpp's converter -> check the round trip
against the Hugging Face model -> quantize each requested type with llama.cpp's quantizer -> verify -> record.
Each output is written under a temporary name, verified, fsynced and renamed; the manifest is rewritten after each
output, so an interrupted run keeps what it finished and a rerun skips files whose recorded sha256 still matches.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgellm.convert.imatrix import Imatrix, compute_imatrix, read_calibration_text
from edgellm.convert.llamacpp import (
    QUANT_FTYPES,
    Converter,
    ConvertError,
    UnsupportedArchitectureError,
    binding_version,
    check_free,
    disk_full_error,
    ensure_converter,
    is_disk_full,
    llama_cpp_version,
    quantize,
    read_gguf,
    run_converter,
)
from edgellm.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    ManifestFile,
    SourceInfo,
    ToolVersions,
    Verification,
    load_manifest,
)
from edgellm.convert.verify import DEFAULT_PROMPTS, HFReference, hf_reference, verify_gguf
from edgellm.fsutil import atomic_path, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

DEFAULT_QUANTS = ("q4_k_m", "q8_0")
BASE_TYPES = ("f16", "bf16")
MAX_KL = 1e-3


@dataclass(frozen=True)
class Source:
    path: Path
    architecture: str
    n_params: int


def inspect_source(src: Path, converter: Converter) -> Source:
    """Check that ``src`` is a full-precision Hugging Face causal-LM directory llama.cpp can convert."""
    src = Path(src)
    if not src.is_dir():
        raise ConvertError(
            f"{src}: not a directory; pass a Hugging Face model directory (config.json + weights)"
        )
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{src}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConvertError(f"{config_path}:{e.lineno}: invalid JSON: {e.msg}") from None
    qc = config.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise ConvertError(
            f"{config_path}: has a {method} quantization_config (a 4/8-bit training checkpoint); convert the merged "
            "full-precision model instead (merge the adapter into the base weights and save without quantization_config)"
        )
    archs = config.get("architectures") or []
    if not archs:
        raise ConvertError(f"{config_path}: no 'architectures' entry; cannot tell which model this is")
    arch = archs[0]
    if arch not in converter.supported_architectures():
        raise UnsupportedArchitectureError(
            f"{src}: architecture {arch} is not supported by llama.cpp's converter ({converter.version}); "
            "see `python convert_hf_to_gguf.py --print-supported-models` in " + str(converter.root)
        )
    weights = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not weights:
        raise ConvertError(f"{src}: no weights (*.safetensors or pytorch_model*.bin)")
    return Source(path=src, architecture=arch, n_params=_count_params(weights))


def _count_params(weights: list[Path]) -> int:
    """Parameter count from safetensors headers (no tensor is read); file bytes / 4 for pickled checkpoints."""
    total = 0
    for w in weights:
        if w.suffix != ".safetensors":
            total += w.stat().st_size // 4
            continue
        with open(w, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for d in meta["shape"]:
                    count *= d
                total += count
    return total


def hash_directory(src: Path) -> str:
    """sha256 over the sorted lines ``relative/path\\0<sha256 of the file>`` of every non-hidden file."""
    h = hashlib.sha256()
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(f"{rel.as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def _previous(out: Path) -> Manifest | None:
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        return load_manifest(out / MANIFEST_NAME)
    except ManifestError as e:
        log.warning("ignoring the previous manifest: %s", e)
        return None


def _reusable(
    prev: Manifest | None, quant: str, source: SourceInfo, tools: ToolVersions, imatrix_sha: str | None = None
) -> ManifestFile | None:
    """The previous entry for ``quant`` if it came from the same source, tools and calibration text, and its file
    still matches its recorded sha256."""
    if prev is None or prev.source.sha256 != source.sha256 or prev.tools != tools:
        return None
    for f in (prev.reference, *prev.files):
        if (
            f.quant == quant
            and f.imatrix_text_sha256 == imatrix_sha
            and f.absolute_path.is_file()
            and sha256_file(f.absolute_path) == f.sha256
        ):
            return f
    return None


def _describe(path: Path, quant: str, verification: Verification, fallbacks: dict[str, int]) -> ManifestFile:
    info = read_gguf(path)
    if not info.has_tokenizer:
        raise ConvertError(f"{path.name} has no tokenizer inside")
    return ManifestFile(
        quant=quant,
        path=path.name,
        size=path.stat().st_size,
        sha256=sha256_file(path),
        n_params=info.n_params,
        bits_per_weight=info.bits_per_weight,
        tensor_types=info.tensor_types,
        fallbacks=fallbacks,
        architecture=info.architecture,
        context_length=info.context_length,
        has_chat_template=info.has_chat_template,
        verification=verification,
    )


def _write_output(final: Path, make: Callable[[Path], ManifestFile]) -> ManifestFile:
    """Make ``final`` under a temporary name (``make`` writes and verifies it), then fsync and rename it into place."""
    try:
        with atomic_path(final, suffix=".gguf") as tmp:
            entry = make(tmp)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(e, final) from e
        raise
    entry.path = final.name
    return entry


def convert_model(
    src: Path,
    out: Path,
    quants: Sequence[str] = DEFAULT_QUANTS,
    name: str | None = None,
    base_type: str = "f16",
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_kl: float = MAX_KL,
    threads: int | None = None,
    force: bool = False,
    imatrix_text: Path | None = None,
) -> Manifest:
    """Convert ``src`` into ``out/<name>-<quant>.gguf`` for each of ``quants`` and write ``out/manifest.json``.

    The 16-bit ``base_type`` file is always made first (the manifest's ``reference``) and must reproduce the Hugging
    Face model's next-token distributions (mean KL < ``max_kl``); the quantized files are made from it, with an
    importance matrix from ``imatrix_text`` (a text or .jsonl file run through the Hugging Face model) if given.
    """
    src, out = Path(src).resolve(), Path(out)
    name = name or out.resolve().name
    quants = list(dict.fromkeys(q.lower() for q in quants))
    unknown = [q for q in quants if q not in QUANT_FTYPES]
    if unknown or not quants:
        raise ConvertError(
            f"unknown quant type(s) {unknown or quants}; choose from {', '.join(QUANT_FTYPES)}"
        )
    if base_type not in BASE_TYPES:
        raise ConvertError(f"base_type must be one of {BASE_TYPES}, got {base_type!r}")
    nthread = threads or 0

    # 1. Setup: the converter, the source, the versions that make an output reusable.
    converter = ensure_converter()
    source = inspect_source(src, converter)
    log.info(
        "converting %s (%s, %.1fM parameters) into %s", src, source.architecture, source.n_params / 1e6, out
    )
    out.mkdir(parents=True, exist_ok=True)
    source_info = SourceInfo(
        path=str(src), sha256=hash_directory(src), architecture=source.architecture, n_params=source.n_params
    )
    tools = ToolVersions(
        llama_cpp_python=binding_version(),
        llama_cpp=llama_cpp_version(),
        gguf_py=converter.gguf_py_version,
        converter_sdist_sha256=converter.sdist_sha256,
    )
    for leftover in out.glob(f".{name}-*.gguf.*.tmp"):
        log.info("removing %s, left by an interrupted run", leftover.name)
        leftover.unlink()
    prev = None if force else _previous(out)
    reference_hf: HFReference | None = None

    def hf() -> HFReference:
        nonlocal reference_hf
        if reference_hf is None:
            log.info("computing Hugging Face reference distributions on %d prompts", len(prompts))
            reference_hf = hf_reference(src, prompts)
        return reference_hf

    # 2. The 16-bit reference: llama.cpp's converter, then the round-trip check against Hugging Face.
    base_path = out / f"{name}-{base_type}.gguf"
    reference = _reusable(prev, base_type, source_info, tools)
    if reference is not None:
        log.info("%s is up to date (sha256 matches the manifest); skipping", base_path.name)
    else:
        check_free(out, int(source.n_params * 2 * 1.05) + (16 << 20), base_path.name)

        def make_reference(tmp: Path) -> ManifestFile:
            vocab_bytes = sum(p.stat().st_size for p in src.glob("tokenizer*") if p.is_file())
            run_converter(
                converter, src, tmp, base_type, expected_bytes=source.n_params * 2 + vocab_bytes // 2
            )
            check = verify_gguf(tmp, hf(), kl_threshold=max_kl, n_threads=threads, label=base_path.name)
            return _describe(tmp, base_type, check, fallbacks={})

        reference = _write_output(base_path, make_reference)
    base_path = out / reference.path  # a reused reference keeps its recorded name

    # Decide what is reusable before anything is rewritten (an interrupted rerun must not forget finished files).
    calibration = read_calibration_text(imatrix_text) if imatrix_text else None
    imatrix_sha = hashlib.sha256(calibration.encode()).hexdigest() if calibration else None
    reusable = {
        q: reference if q == base_type else _reusable(prev, q, source_info, tools, imatrix_sha)
        for q in quants
    }
    imatrix: Imatrix | None = None
    manifest = Manifest(
        name=name,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        source=source_info,
        tools=tools,
        reference=reference,
        files=[],
    )

    def record(done: list[ManifestFile], pending: Sequence[str]) -> None:
        manifest.files = done + [e for q in pending if (e := reusable[q]) is not None]
        manifest.attach(out)
        atomic_write_text(out / MANIFEST_NAME, manifest.to_json())

    record([], quants)

    # 3. Each requested variant: quantize the reference, verify, record.
    done: list[ManifestFile] = []
    for i, quant in enumerate(quants):
        if (entry := reusable[quant]) is not None:
            if quant != base_type:
                log.info("%s-%s.gguf is up to date (sha256 matches the manifest); skipping", name, quant)
        else:
            if calibration is not None and imatrix is None:
                imatrix = compute_imatrix(src, calibration, reference.architecture)

            def make_variant(
                tmp: Path, quant: str = quant, imatrix: Imatrix | None = imatrix
            ) -> ManifestFile:
                values = imatrix.values if imatrix else None
                qlog = quantize(base_path, tmp, quant, source.n_params, nthread=nthread, imatrix=values)
                check = verify_gguf(
                    tmp, hf(), kl_threshold=None, n_threads=threads, label=f"{name}-{quant}.gguf"
                )
                entry = _describe(tmp, quant, check, fallbacks=qlog.fallbacks())
                if imatrix is not None:
                    entry.imatrix_text_sha256, entry.imatrix_tokens = imatrix.text_sha256, imatrix.n_tokens
                return entry

            entry = _write_output(out / f"{name}-{quant}.gguf", make_variant)
        done.append(entry)
        record(done, quants[i + 1 :])
        log.info(
            "%s:%s  %s  %.1f MB  %.2f bpw  %s",
            name,
            quant,
            entry.path,
            entry.size / 1e6,
            entry.bits_per_weight,
            entry.tensor_types,
        )

    stale = sorted(
        p.name
        for p in out.glob("*.gguf")
        if p.name not in {f.path for f in (manifest.reference, *manifest.files)}
    )
    if stale:
        log.info("not in the manifest (left in place): %s", ", ".join(stale))
    return manifest
