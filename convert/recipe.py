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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgellm.convert.imatrix import Imatrix, compute_imatrix, read_calibration_text
from edgellm.convert.llamacpp import (
    Converter,
    ConvertError,
    UnsupportedArchitectureError,
    binding_version,
    check_free,
    disk_full_error,
    is_disk_full,
    llama_cpp_version,
    quantize,
    read_gguf,
    require_converter,
    run_converter,
)
from edgellm.convert.verify import DEFAULT_PROMPTS, HFReference, hf_reference, verify_gguf
from edgellm.fsutil import atomic_path, atomic_write_text, sha256_file
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
from edgellm.paths import resolve_input
from edgellm.quants import DEFAULT_QUANTS, ftypes

log = logging.getLogger(__name__)

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


def previous_manifest(out: Path) -> Manifest | None:
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


@contextmanager
def _output(final: Path) -> Iterator[Path]:
    """A temporary path for ``final``: written and verified in the block, then fsynced and renamed into place."""
    try:
        with atomic_path(final, suffix=".gguf") as tmp:
            yield tmp
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(e, final) from e
        raise


class LazyHFReference:
    """The Hugging Face model's next-token distributions on ``prompts``, computed on first use only (a rerun that
    finds every output up to date never loads the Hugging Face model)."""

    def __init__(self, src: Path, prompts: Sequence[str]) -> None:
        self.src, self.prompts = src, tuple(prompts)
        self._value: HFReference | None = None

    def get(self) -> HFReference:
        if self._value is None:
            log.info("computing Hugging Face reference distributions on %d prompts", len(self.prompts))
            self._value = hf_reference(self.src, self.prompts)
        return self._value


# ---------------------------------------------------------------------------------------------------------------------
# The recipe: setup -> the 16-bit reference (convert, verify) -> each variant (quantize, verify) -> the manifest


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
    Relative inputs are found with `edgellm.paths.resolve_input`; ``out`` is relative to the current directory.
    """
    # 1. Setup: what to make, the converter, the source, the versions that make an output reusable.
    src, out = resolve_input(src).resolve(), Path(out)
    name = name or out.resolve().name
    quants = requested_quants(quants, base_type)
    converter = require_converter()
    source = inspect_source(src, converter)
    log.info(
        "converting %s (%s, %.1fM parameters) into %s", src, source.architecture, source.n_params / 1e6, out
    )
    out.mkdir(parents=True, exist_ok=True)
    source_info = describe_source(source)
    tools = tool_versions(converter)
    remove_leftovers(out, name)
    prev = None if force else previous_manifest(out)
    hf = LazyHFReference(src, prompts)

    # 2. The 16-bit reference: llama.cpp's converter, then the round-trip check against Hugging Face.
    reference = make_reference(
        source,
        converter,
        final=out / f"{name}-{base_type}.gguf",
        base_type=base_type,
        hf=hf,
        max_kl=max_kl,
        threads=threads,
        reusable=_reusable(prev, base_type, source_info, tools),
    )

    # 3. Each requested variant: quantize the reference, verify, record (the manifest is rewritten after each).
    calibration = read_calibration_text(resolve_input(imatrix_text)) if imatrix_text else None
    manifest = Manifest(
        name=name,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        source=source_info,
        tools=tools,
        reference=reference,
        files=[],
    )
    make_variants(manifest, out, quants, source, hf=hf, threads=threads, calibration=calibration, prev=prev)

    # 4. What is in the folder but not in the manifest stays, and is named.
    report_stale(manifest, out)
    return manifest


def requested_quants(quants: Sequence[str], base_type: str) -> list[str]:
    """The requested types, lower-cased and deduplicated in order; each a llama.cpp type, the base 16-bit."""
    names = list(dict.fromkeys(q.lower() for q in quants))
    unknown = [q for q in names if q not in ftypes()]
    if unknown or not names:
        raise ConvertError(f"unknown quant type(s) {unknown or names}; choose from {', '.join(ftypes())}")
    if base_type not in BASE_TYPES:
        raise ConvertError(f"base_type must be one of {BASE_TYPES}, got {base_type!r}")
    return names


def describe_source(source: Source) -> SourceInfo:
    return SourceInfo(
        path=str(source.path),
        sha256=hash_directory(source.path),
        architecture=source.architecture,
        n_params=source.n_params,
    )


def tool_versions(converter: Converter) -> ToolVersions:
    return ToolVersions(
        llama_cpp_python=binding_version(),
        llama_cpp=llama_cpp_version(),
        gguf_py=converter.gguf_py_version,
        converter_sdist_sha256=converter.sdist_sha256,
    )


def remove_leftovers(out: Path, name: str) -> None:
    for leftover in out.glob(f".{name}-*.gguf.*.tmp"):
        log.info("removing %s, left by an interrupted run", leftover.name)
        leftover.unlink()


def make_reference(
    source: Source,
    converter: Converter,
    final: Path,
    base_type: str,
    hf: LazyHFReference,
    max_kl: float,
    threads: int | None,
    reusable: ManifestFile | None,
) -> ManifestFile:
    """The 16-bit file every variant is quantized from: reused if up to date, else converted and verified against
    the Hugging Face model (mean KL below ``max_kl``)."""
    if reusable is not None:
        log.info("%s is up to date (sha256 matches the manifest); skipping", final.name)
        return reusable
    check_free(final.parent, int(source.n_params * 2 * 1.05) + (16 << 20), final.name)
    vocab_bytes = sum(p.stat().st_size for p in source.path.glob("tokenizer*") if p.is_file())
    with _output(final) as tmp:
        run_converter(
            converter, source.path, tmp, base_type, expected_bytes=source.n_params * 2 + vocab_bytes // 2
        )
        check = verify_gguf(tmp, hf.get(), kl_threshold=max_kl, n_threads=threads, label=final.name)
        entry = _describe(tmp, base_type, check, fallbacks={})
    entry.path = final.name
    return entry


def make_variants(
    manifest: Manifest,
    out: Path,
    quants: list[str],
    source: Source,
    hf: LazyHFReference,
    threads: int | None,
    calibration: str | None,
    prev: Manifest | None,
) -> None:
    """Quantize the reference into each of ``quants`` not already up to date; ``manifest.files`` and
    ``manifest.json`` follow each finished file (an interrupted run keeps what it finished)."""
    reference, base_type = manifest.reference, manifest.reference.quant
    imatrix_sha = hashlib.sha256(calibration.encode()).hexdigest() if calibration else None
    # Decide what is reusable before anything is rewritten (an interrupted rerun must not forget finished files).
    reusable = {
        q: reference if q == base_type else _reusable(prev, q, manifest.source, manifest.tools, imatrix_sha)
        for q in quants
    }
    write_manifest(manifest, out, [], [e for q in quants if (e := reusable[q]) is not None])
    imatrix: Imatrix | None = None
    done: list[ManifestFile] = []
    for i, quant in enumerate(quants):
        entry = reusable[quant]
        if entry is None:
            if calibration is not None and imatrix is None:
                imatrix = compute_imatrix(source.path, calibration, reference.architecture)
            final = out / f"{manifest.name}-{quant}.gguf"
            entry = make_variant(out / reference.path, final, quant, source.n_params, hf, threads, imatrix)
        elif quant != base_type:
            log.info("%s-%s.gguf is up to date (sha256 matches the manifest); skipping", manifest.name, quant)
        done.append(entry)
        pending = [e for q in quants[i + 1 :] if (e := reusable[q]) is not None]
        write_manifest(manifest, out, done, pending)
        log.info(
            "%s:%s  %s  %.1f MB  %.2f bpw  %s",
            manifest.name,
            quant,
            entry.path,
            entry.size / 1e6,
            entry.bits_per_weight,
            entry.tensor_types,
        )


def make_variant(
    base_path: Path,
    final: Path,
    quant: str,
    n_params: int,
    hf: LazyHFReference,
    threads: int | None,
    imatrix: Imatrix | None,
) -> ManifestFile:
    """Quantize ``base_path`` to ``quant`` with llama.cpp's quantizer, verify it against Hugging Face (recorded,
    no gate), and describe it."""
    with _output(final) as tmp:
        qlog = quantize(
            base_path, tmp, quant, n_params, nthread=threads or 0, imatrix=imatrix.values if imatrix else None
        )
        check = verify_gguf(tmp, hf.get(), kl_threshold=None, n_threads=threads, label=final.name)
        entry = _describe(tmp, quant, check, fallbacks=qlog.fallbacks())
        if imatrix is not None:
            entry.imatrix_text_sha256, entry.imatrix_tokens = imatrix.text_sha256, imatrix.n_tokens
    entry.path = final.name
    return entry


def write_manifest(manifest: Manifest, out: Path, done: list[ManifestFile], pending: list[ManifestFile]) -> None:
    """Record the finished files and the up-to-date ones still to come in ``out/manifest.json``, atomically."""
    manifest.files = done + pending
    manifest.attach(out)
    atomic_write_text(out / MANIFEST_NAME, manifest.to_json())


def report_stale(manifest: Manifest, out: Path) -> None:
    stale = sorted(
        p.name
        for p in out.glob("*.gguf")
        if p.name not in {f.path for f in (manifest.reference, *manifest.files)}
    )
    if stale:
        log.info("not in the manifest (left in place): %s", ", ".join(stale))
