"""`edgellm bench rerank` / `bench embed`: the sentence-transformers and llama.cpp backends of /v1/rerank (or
/v1/embeddings) on the same inputs, each behind a real `edgellm serve` on a loopback port.

For each backend, one server process (the chat model and this one retrieval model, both with their configured
threads) is started and measured:

1. start-up to ready: process start -> the first 200 from the retrieval endpoint (chat loaded first, as the server
   does);
2. ``requests`` requests of ``batch`` documents (rerank: one query and 32 passages; embed: 32 passages), one at a
   time after two warm-up requests: documents/s over all of them, latency p50 and p95;
3. chat decode speed: a streamed chat answer of ``chat_tokens`` tokens alone, then the same answer while retrieval
   requests run back to back alongside (the OpenMP interference torch brings into the chat process);
4. peak RSS of the server process (``VmHWM``).

The documents are the general-domain held-out passages shipped in train/reranker_data/. Writes ``<kind>.json``,
``<kind>.md`` and ``<kind>.png`` to ``out``. The machine is shared and noisy: compare within one run.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from edgellm.bench.charts import save_png, subplots
from edgellm.bench.client import chat_body, stream_chat
from edgellm.bench.errors import BenchError
from edgellm.bench.stats import percentile
from edgellm.bench.tables import markdown_table
from edgellm.fsutil import atomic_write_text
from edgellm.launch import running_server

log = logging.getLogger(__name__)

Kind = Literal["rerank", "embed"]
Backend = Literal["llama.cpp", "sentence-transformers"]
CHAT_PROMPT = "Write a long story about a lighthouse keeper who learns to bake bread."


@dataclass
class BackendResult:
    backend: str
    model: str
    startup_s: float
    requests: int
    batch: int
    docs_per_s: float
    p50_ms: float
    p95_ms: float
    peak_rss_mb: float
    chat_tok_s_alone: float
    chat_tok_s_alongside: float
    retrieval_requests_alongside: int


@dataclass
class RetrievalBench:
    kind: str
    batch: int
    threads: int
    chat_model: str
    created_at: str
    rows: list[BackendResult]
    files: dict[str, str] = field(default_factory=dict)


def default_models(kind: Kind) -> dict[Backend, Path]:
    """The shipped defaults: the trained cross-encoder directory and its GGUF; the packaged all-MiniLM-L6-v2 and
    its GGUF."""
    from edgellm.paths import models_dir

    root = models_dir()
    if kind == "rerank":
        return {
            "sentence-transformers": root / "reranker-minilm-l6",
            "llama.cpp": root / "reranker-minilm-l6-gguf" / "reranker-minilm-l6-f16.gguf",
        }
    from edgellm.train.reranker import PACKAGED_ENCODER, encoder_dir

    return {
        "sentence-transformers": encoder_dir(PACKAGED_ENCODER),
        "llama.cpp": root / "all-minilm-l6-v2-gguf" / "all-minilm-l6-v2-f16.gguf",
    }


def bench_retrieval(
    kind: Kind,
    models: dict[Backend, Path] | None = None,
    chat_model: Path = Path("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    requests: int = 20,
    batch: int = 32,
    threads: int = 1,
    chat_tokens: int = 128,
    out: Path | None = None,
) -> RetrievalBench:
    """Measure each backend in ``models`` (default: `default_models`) behind its own server, one after another."""
    models = models or default_models(kind)
    for backend, path in models.items():
        if not path.exists():
            raise BenchError(f"{backend} model {path} does not exist; run `edgellm models pull` for it (see README)")
    if not chat_model.is_file():
        raise BenchError(f"chat model {chat_model} does not exist; run `edgellm models pull default`")
    query, documents = workload(batch)
    rows = [
        measure_backend(kind, backend, path, chat_model, query, documents, requests, threads, chat_tokens)
        for backend, path in models.items()
    ]
    result = RetrievalBench(
        kind=kind,
        batch=batch,
        threads=threads,
        chat_model=str(chat_model),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        rows=rows,
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        result.files = {"json": str(out / f"{kind}.json"), "table": str(out / f"{kind}.md"), "chart": str(out / f"{kind}.png")}
        atomic_write_text(Path(result.files["json"]), json.dumps(asdict(result), indent=2) + "\n")
        atomic_write_text(Path(result.files["table"]), table(result) + "\n")
        chart(result, Path(result.files["chart"]))
    return result


def workload(batch: int) -> tuple[str, list[str]]:
    """A query and ``batch`` passages from the general-domain held-out set (cycled if more are asked for)."""
    from edgellm.train.reranker import general_corpus, load_general_eval

    queries = load_general_eval()
    corpus, _ = general_corpus(queries)
    return queries[0].query, [corpus[i % len(corpus)] for i in range(batch)]


def measure_backend(
    kind: Kind,
    backend: Backend,
    path: Path,
    chat_model: Path,
    query: str,
    documents: list[str],
    requests: int,
    threads: int,
    chat_tokens: int,
) -> BackendResult:
    section = "reranker" if kind == "rerank" else "embedder"
    other = "--no-embedder" if kind == "rerank" else "--no-reranker"
    flag = "--reranker" if kind == "rerank" else "--embedder"
    args = [
        "--model", str(chat_model), "--set", "models.0.n_ctx=1024", "--set", "slots=1", other,
        flag, str(path), "--set", f"{section}.backend={backend}", "--set", f"{section}.threads={threads}",
    ]  # fmt: skip
    if kind == "rerank":
        args += ["--set", f"reranker.max_documents={max(len(documents), 1)}"]
    endpoint = "/v1/rerank" if kind == "rerank" else "/v1/embeddings"
    body: dict[str, Any] = (
        {"query": query, "documents": documents} if kind == "rerank" else {"input": documents}
    )
    log.info("%s %s: starting a server with %s", kind, backend, path)
    started = time.monotonic()
    with running_server(*args, timeout=600) as url, httpx.Client(base_url=url, timeout=300) as client:
        while client.post(endpoint, json=body).status_code == 503:
            if time.monotonic() - started > 600:
                raise BenchError(f"the {backend} {section} did not load within 600 s")
            time.sleep(0.05)
        startup = time.monotonic() - started
        for _ in range(2):
            _post(client, endpoint, body)
        latencies = [_post(client, endpoint, body) for _ in range(requests)]
        alone = _chat_speed(url, chat_tokens)
        with _background(client, endpoint, body) as count:
            alongside = _chat_speed(url, chat_tokens)
        peak = _peak_rss_mb(url)
    return BackendResult(
        backend=backend,
        model=str(path),
        startup_s=startup,
        requests=requests,
        batch=len(documents),
        docs_per_s=len(documents) * len(latencies) / sum(latencies),
        p50_ms=percentile(latencies, 50) * 1000,
        p95_ms=percentile(latencies, 95) * 1000,
        peak_rss_mb=peak,
        chat_tok_s_alone=alone,
        chat_tok_s_alongside=alongside,
        retrieval_requests_alongside=count[0],
    )


def _post(client: httpx.Client, endpoint: str, body: dict[str, Any]) -> float:
    t = time.perf_counter()
    r = client.post(endpoint, json=body)
    elapsed = time.perf_counter() - t
    if r.status_code != 200:
        raise BenchError(f"{endpoint} answered {r.status_code}: {r.text[:300]}")
    return elapsed


@contextmanager
def _background(client: httpx.Client, endpoint: str, body: dict[str, Any]) -> Iterator[list[int]]:
    """Retrieval requests back to back in a thread for the duration of the block; yields [requests done]."""
    stop = threading.Event()
    count = [0]

    def loop() -> None:
        while not stop.is_set():
            _post(client, endpoint, body)
            count[0] += 1

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    time.sleep(0.2)  # let the first request start
    try:
        yield count
    finally:
        stop.set()
        worker.join(timeout=300)


def _chat_speed(url: str, tokens: int, model: str | None = None) -> float:
    """Decode tokens/s of one streamed chat answer: tokens after the first over the time after the first."""

    async def run() -> float:
        async with httpx.AsyncClient(timeout=300) as client:
            body = chat_body(model or "", [{"role": "user", "content": CHAT_PROMPT}], tokens, temperature=0.0)
            result = await stream_chat(client, url, body)
        if not result.ok or result.ttft is None or result.completion_tokens < 2:
            raise BenchError(f"the chat stream failed: {result.error or 'no tokens'}")
        decode_s = result.latency - result.ttft
        return (result.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0

    return asyncio.run(run())


def _peak_rss_mb(url: str) -> float:
    """VmHWM of the server process listening on ``url``'s port (one of this process's children)."""
    from edgellm.bench.servers import server_pid

    pid = server_pid(url)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


def table(result: RetrievalBench) -> str:
    what = "documents" if result.kind == "rerank" else "inputs"
    lines = [
        f"`bench {result.kind}`: {result.batch} {what} per request, {result.threads} thread(s) per backend, chat model "
        f"{Path(result.chat_model).name}",
        "",
        *markdown_table(
            ["backend", f"{what}/s", "p50 ms", "p95 ms", "peak RSS MB", "start-up to ready s", "chat tok/s alone",
             "chat tok/s alongside"],
            "l" + "r" * 7,
            (
                [r.backend, f"{r.docs_per_s:.0f}", f"{r.p50_ms:.0f}", f"{r.p95_ms:.0f}", f"{r.peak_rss_mb:.0f}",
                 f"{r.startup_s:.1f}", f"{r.chat_tok_s_alone:.1f}", f"{r.chat_tok_s_alongside:.1f}"]
                for r in result.rows
            ),
        ),
    ]
    return "\n".join(lines)


def chart(result: RetrievalBench, path: Path) -> None:
    """Four panels, one bar per backend: throughput, latency (p50 bar, p95 whisker), peak RSS and start-up, chat
    decode speed alone and alongside."""
    names = [r.backend for r in result.rows]
    xs = list(range(len(names)))
    fig, axes = subplots(1, 4, figsize=(15, 4))
    axes[0].bar(xs, [r.docs_per_s for r in result.rows], color="tab:blue")
    axes[0].set_title(f"{'documents' if result.kind == 'rerank' else 'inputs'}/s")
    p50 = [r.p50_ms for r in result.rows]
    axes[1].bar(xs, p50, color="tab:orange")
    axes[1].errorbar(xs, p50, yerr=[[0] * len(p50), [r.p95_ms - r.p50_ms for r in result.rows]], fmt="none",
                     ecolor="black", capsize=4)  # fmt: skip
    axes[1].set_title(f"latency of {result.batch}, ms (p50, whisker p95)")
    axes[2].bar([x - 0.2 for x in xs], [r.peak_rss_mb for r in result.rows], 0.4, label="peak RSS MB")
    twin = axes[2].twinx()
    twin.bar([x + 0.2 for x in xs], [r.startup_s for r in result.rows], 0.4, color="tab:green", label="start-up s")
    axes[2].set_title("peak RSS MB (left) / start-up s (right)")
    axes[3].bar([x - 0.2 for x in xs], [r.chat_tok_s_alone for r in result.rows], 0.4, label="alone")
    axes[3].bar([x + 0.2 for x in xs], [r.chat_tok_s_alongside for r in result.rows], 0.4, label=f"{result.kind} alongside")
    axes[3].set_title("chat decode tok/s")
    axes[3].legend()
    for ax in axes:
        ax.set_xticks(xs, names)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"edgellm bench {result.kind}: sentence-transformers vs llama.cpp behind edgellm serve")
    fig.tight_layout()
    save_png(fig, path)
