"""Measure one GGUF variant in its own process: ``python -m edgellm.bench.worker < spec.json``.

A fresh process per variant keeps peak resident memory honest (peaks of different models never mix) and keeps
a llama.cpp crash from taking the whole benchmark down. The process reads a JSON spec on stdin and writes
JSON lines on stdout: ``{"event": "progress", "step": ...}`` after each unit of work, then one
``{"event": "result", ...}``. llama.cpp's own log is silenced.

Order of work: load (timed) -> tokenize the text -> speed (llama-bench protocol) -> read peak RSS -> quality (chunks of held-out
text, reading or writing the reference log-probabilities).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.bench import quality


@dataclass
class WorkerSpec:
    path: str
    threads: int
    reps: int
    n_prompt: int
    n_gen: int
    n_ctx: int
    text_path: str
    max_chunks: int | None
    ref_dir: str
    ref_mode: str  # "write": this is the reference; "read": compare with it
    repack: bool = True
    seed: int = 42


@dataclass
class SpeedStats:
    """Tokens per second over ``reps`` repetitions (llama-bench reports mean ± stdev; we add the median)."""

    test: str
    n_tokens: int
    reps: int
    samples_ts: list[float]
    median_ts: float
    mean_ts: float
    stdev_ts: float


def speed_stats(test: str, n_tokens: int, seconds: list[float]) -> SpeedStats:
    ts = [n_tokens / s for s in seconds]
    return SpeedStats(
        test=test,
        n_tokens=n_tokens,
        reps=len(ts),
        samples_ts=ts,
        median_ts=statistics.median(ts),
        mean_ts=statistics.fmean(ts),
        stdev_ts=statistics.stdev(ts) if len(ts) > 1 else 0.0,
    )


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mib() -> float:
    try:
        import resource
    except ImportError:  # not POSIX: the current RSS is the best we have
        return _rss_mib()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run(spec: WorkerSpec) -> dict[str, Any]:
    from edgellm.bench.lowlevel import LlamaRunner, silence_llama_logs  # llama.cpp loads in this process only

    silence_llama_logs()
    rng = np.random.default_rng(spec.seed)
    rss_before = _rss_mib()

    # -- load ----------------------------------------------------------------------------------------------
    runner = LlamaRunner(
        Path(spec.path),
        n_ctx=max(spec.n_prompt + spec.n_gen, spec.n_ctx),
        n_batch=max(spec.n_prompt, spec.n_ctx),
        n_threads=spec.threads,
        repack=spec.repack,
    )
    _emit("progress", step="load")
    with runner:
        # The text first: a text too short for one chunk fails before minutes of speed tests.
        text = Path(spec.text_path).read_text(encoding="utf-8")
        tokens = runner.tokenize(text)
        chunks = quality.chunk_tokens(tokens, spec.n_ctx, spec.max_chunks)
        if chunks.shape[0] == 0:
            raise ValueError(
                f"{spec.text_path} has {len(tokens)} tokens; the quality test needs at least n_ctx={spec.n_ctx}"
            )
        first_token = runner.bos if runner.add_bos else None

        def random_tokens(n: int) -> list[int]:
            toks = [int(t) for t in rng.integers(0, runner.n_vocab, n)]
            if first_token is not None:
                toks[0] = first_token
            return toks

        def test_prompt() -> float:
            runner.clear()
            toks = random_tokens(spec.n_prompt)
            t0 = time.perf_counter_ns()
            runner.decode(toks)
            return (time.perf_counter_ns() - t0) / 1e9

        def test_gen(n_gen: int) -> float:
            runner.clear()
            toks = random_tokens(n_gen)
            t0 = time.perf_counter_ns()
            for pos, tok in enumerate(toks):
                runner.decode_one(tok, pos)
            return (time.perf_counter_ns() - t0) / 1e9

        # -- speed: warm-up, then reps of pp and of tg, each from an empty cache --------------------------
        test_prompt()
        test_gen(1)
        _emit("progress", step="warmup")
        pp_s, tg_s = [], []
        for i in range(spec.reps):
            pp_s.append(test_prompt())
            _emit("progress", step=f"pp{spec.n_prompt} {i + 1}/{spec.reps}")
        for i in range(spec.reps):
            tg_s.append(test_gen(spec.n_gen))
            _emit("progress", step=f"tg{spec.n_gen} {i + 1}/{spec.reps}")
        peak_rss = _peak_rss_mib()

        # -- quality ------------------------------------------------------------------------------------------
        first, n_scored = quality.scored_span(spec.n_ctx)
        outputs = [first <= p < first + n_scored for p in range(spec.n_ctx)]
        ref_dir = Path(spec.ref_dir)
        if spec.ref_mode == "write":
            np.save(ref_dir / "tokens.npy", chunks)
            ref = np.lib.format.open_memmap(
                ref_dir / "logprobs.npy", mode="w+", dtype=np.float32, shape=(chunks.shape[0], n_scored, runner.n_vocab)
            )
        else:
            ref_tokens = np.load(ref_dir / "tokens.npy")
            if ref_tokens.shape != chunks.shape or not np.array_equal(ref_tokens, chunks):
                raise ValueError(
                    f"{spec.path} tokenizes the text differently from the reference; KL divergence needs one vocabulary"
                )
            ref = np.load(ref_dir / "logprobs.npy", mmap_mode="r")
            if ref.shape[2] != runner.n_vocab:
                raise ValueError(f"{spec.path} has {runner.n_vocab} tokens in its vocabulary, the reference {ref.shape[2]}")

        scores: list[quality.ChunkScores] = []
        nlls: list[np.ndarray] = []
        for c, chunk in enumerate(chunks):
            toks = [int(t) for t in chunk]
            if runner.add_bos:
                toks[0] = runner.bos
            runner.clear()
            runner.decode(toks, outputs=outputs)
            logp = quality.log_softmax(runner.logits(n_scored))
            next_tokens = chunk[first + 1 : first + 1 + n_scored]
            if spec.ref_mode == "write":
                ref[c] = logp
                nlls.append(quality.nll_only(logp, next_tokens))
            else:
                scores.append(quality.score_chunk(logp, np.asarray(ref[c]), next_tokens))
            _emit("progress", step=f"quality {c + 1}/{chunks.shape[0]}")
        if spec.ref_mode == "write":
            ref.flush()
            stats = quality.perplexity_stats(np.concatenate(nlls))
        else:
            stats = quality.quality_stats(scores)

        return {
            "desc": runner.desc(),
            "n_params": runner.n_params(),
            "tensor_bytes": runner.tensor_bytes(),
            "n_vocab": runner.n_vocab,
            "load_s": runner.load_seconds,
            "rss_before_load_mib": rss_before,
            "peak_rss_mib": peak_rss,
            "pp": asdict(speed_stats(f"pp{spec.n_prompt}", spec.n_prompt, pp_s)),
            "tg": asdict(speed_stats(f"tg{spec.n_gen}", spec.n_gen, tg_s)),
            "n_chunks": int(chunks.shape[0]),
            "n_text_tokens": len(tokens),
            "quality": asdict(stats),
        }


def main() -> int:
    spec = WorkerSpec(**json.loads(sys.stdin.read()))
    try:
        result = run(spec)
    except Exception as e:  # reported to the parent, which raises a user-facing error
        _emit("error", kind=type(e).__name__, message=str(e))
        return 1
    _emit("result", **result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
