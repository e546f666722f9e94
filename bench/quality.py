"""Quality of a quantized variant against a reference, by the method of ``llama-perplexity --kl-divergence``.

The text is cut into chunks of ``n_ctx`` tokens (the first token of a chunk becomes BOS when the model adds one);
each chunk is decoded from an empty cache and only its second half is scored, so every scored token has at
least ``n_ctx/2`` tokens of context. For each scored position we compare the next-token distributions:

- perplexity ``exp(mean NLL)`` of the actual next token, for the variant and for the reference;
- KL divergence ``sum_v p_ref(v) * (log p_ref(v) - log p_q(v))`` (mean with its standard error, median, p99, max);
- top-1 agreement: how often the variant's most likely token is the reference's.

Differences from llama.cpp, on purpose: the reference log-probabilities are kept as float32 (llama.cpp packs
them into uint16 and skips ``p_ref < e^-16``), so a model against itself gives exactly 0.
Percentiles interpolate linearly between sorted values, as llama.cpp's do (``bench/stats.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgellm.bench.stats import percentile


def chunk_tokens(tokens: list[int], n_ctx: int, max_chunks: int | None = None) -> np.ndarray:
    """``(n_chunks, n_ctx)`` int32 from the front of ``tokens``; the tail that does not fill a chunk is dropped."""
    n_chunks = len(tokens) // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    return np.asarray(tokens[: n_chunks * n_ctx], dtype=np.int32).reshape(n_chunks, n_ctx)


def scored_span(n_ctx: int) -> tuple[int, int]:
    """Positions whose logits are scored: ``first .. n_ctx-2`` (each predicts the token after it)."""
    first = n_ctx // 2
    return first, n_ctx - 1 - first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, computed in float64 and returned as float32 (the precision we store)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x.astype(np.float32)


@dataclass
class ChunkScores:
    """Per-position values for one chunk."""

    nll: np.ndarray
    nll_ref: np.ndarray
    kld: np.ndarray
    same_top: np.ndarray


def score_chunk(logp: np.ndarray, logp_ref: np.ndarray, next_tokens: np.ndarray, block: int = 64) -> ChunkScores:
    """Compare ``(n, V)`` float32 log-probs of a variant with the reference's at the same positions."""
    n = logp.shape[0]
    rows = np.arange(n)
    kld = np.empty(n, dtype=np.float64)
    for start in range(0, n, block):
        q = logp[start : start + block].astype(np.float64)
        r = logp_ref[start : start + block].astype(np.float64)
        kld[start : start + block] = (np.exp(r) * (r - q)).sum(axis=1)
    return ChunkScores(
        nll=-logp[rows, next_tokens].astype(np.float64),
        nll_ref=-logp_ref[rows, next_tokens].astype(np.float64),
        kld=kld,
        same_top=logp.argmax(axis=1) == logp_ref.argmax(axis=1),
    )


def nll_only(logp: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
    return -logp[np.arange(logp.shape[0]), next_tokens].astype(np.float64)


def _mean_and_sem(values: np.ndarray) -> tuple[float, float]:
    n = values.size
    mean = float(values.mean())
    sem = float(values.std(ddof=1) / math.sqrt(n)) if n > 10 else 0.0
    return mean, sem


@dataclass
class QualityStats:
    n_scored: int
    ppl: float
    ppl_unc: float
    ppl_ref: float | None = None
    ln_ppl_ratio: float | None = None
    kld_mean: float | None = None
    kld_mean_unc: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None


def perplexity_stats(nll: np.ndarray) -> QualityStats:
    """Perplexity alone (the reference row, which is not compared with itself)."""
    mean, sem = _mean_and_sem(nll)
    ppl = math.exp(mean)
    return QualityStats(n_scored=int(nll.size), ppl=ppl, ppl_unc=ppl * sem)


def quality_stats(chunks: list[ChunkScores]) -> QualityStats:
    nll = np.concatenate([c.nll for c in chunks])
    nll_ref = np.concatenate([c.nll_ref for c in chunks])
    kld = np.concatenate([c.kld for c in chunks])
    same_top = np.concatenate([c.same_top for c in chunks])
    mean, sem = _mean_and_sem(nll)
    ppl = math.exp(mean)
    kld_mean, kld_sem = _mean_and_sem(kld)
    return QualityStats(
        n_scored=int(nll.size),
        ppl=ppl,
        ppl_unc=ppl * sem,
        ppl_ref=math.exp(float(nll_ref.mean())),
        ln_ppl_ratio=float(nll.mean() - nll_ref.mean()),
        kld_mean=kld_mean,
        kld_mean_unc=kld_sem,
        kld_median=float(np.median(kld)),
        kld_p99=percentile(kld, 99.0),
        kld_max=float(kld.max()),
        top1_agreement=float(same_top.mean()),
    )
