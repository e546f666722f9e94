"""`edgellm bench soak`: minutes of mixed traffic against one server, watching its memory and file descriptors.

Setup -> run -> summarize -> save:

1. a server on loopback: ``url`` (and the server's ``pid``, found from its listening port when not given), or one
   started here (``edgellm serve`` with the chat model and the configured reranker and embedder, as
   bench/retrieval_speed.py starts one);
2. ``concurrency`` clients send requests back to back for ``minutes``, their kinds dealt from a shuffled (seeded)
   deck in ``MIX``'s proportions, each deck starting with one card of every kind: streamed chats, non-streamed chats, streams dropped after their first token (client disconnects),
   malformed bodies (must be 4xx, never 5xx), rerank and embeddings requests (when the server has them);
3. every ``sample_s`` seconds, the server's resident memory (``VmRSS`` in /proc/<pid>/status), open file
   descriptors (/proc/<pid>/fd) and threads;
4. the summary: outcomes by kind (``ok``, ``http_<status>``, ``timeout``, ...), latency p50/p95 of each kind's
   successes, and RSS growth after warm-up (the first ``warmup`` fraction of the run): the last sample against the
   first one after warm-up, in percent; the file descriptors at the start and the end.

Writes ``soak.json``, ``soak.md`` and ``soak.png`` to ``out``. A leak shows as RSS or descriptors that keep
climbing after warm-up; the machine is shared and noisy, so judge the trend, not one sample.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from edgellm.bench.charts import save_png, subplots
from edgellm.bench.client import chat_body, stream_chat
from edgellm.bench.errors import BenchError
from edgellm.bench.loadtest import check_loopback
from edgellm.bench.stats import percentile
from edgellm.bench.tables import markdown_table
from edgellm.fsutil import atomic_write_text
from edgellm.launch import running_server

log = logging.getLogger(__name__)

# Kinds of request and their weights in the mix.
MIX: dict[str, int] = {"stream": 4, "plain": 2, "disconnect": 2, "bad": 2, "rerank": 1, "embed": 1}
PROMPTS = [
    "Write a haiku about the sea.",
    "Explain what a lighthouse does in two sentences.",
    "List three uses of a paperclip.",
    "What is the capital of France? Answer in one word.",
]
BAD_BODIES: list[bytes] = [
    b"{",
    b"[" * 5000,
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"messages": "not a list"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}',
    b'{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}',
    b"\xff\xfe\x00",
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000000000000000000000}',
]
DOCUMENTS = [
    "shutil.copytree copies a directory tree.",
    "json.dumps serializes an object to a JSON string.",
    "The Eiffel Tower is 330 metres tall.",
    "math.gcd returns the greatest common divisor.",
    "A lighthouse guides ships at night.",
    "Bread rises because yeast makes gas.",
    "os.walk yields the files of a directory tree.",
    "Paris is the capital of France.",
]


@dataclass
class Sample:
    t_s: float  # seconds since the traffic started
    rss_mb: float
    fds: int
    threads: int
    requests: int  # requests finished by then


@dataclass
class KindSummary:
    kind: str
    requests: int
    outcomes: dict[str, int]
    p50_ms: float | None
    p95_ms: float | None


@dataclass
class SoakResult:
    url: str
    pid: int | None
    minutes: float
    concurrency: int
    warmup: float
    created_at: str
    requests: int
    kinds: list[KindSummary]
    samples: list[Sample]
    rss_after_warmup_mb: float | None
    rss_end_mb: float | None
    rss_growth_pct: float | None
    fds_start: int | None
    fds_end: int | None
    server_errors: int  # 5xx answers and dropped connections: the failures that are the server's fault
    healthy_after: bool
    p95_ms: float | None
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class _Outcome:
    kind: str
    outcome: str
    latency_s: float


def bench_soak(
    minutes: float = 20.0,
    url: str | None = None,
    pid: int | None = None,
    chat_model: Path = Path("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    threads: int | None = None,
    concurrency: int = 4,
    max_tokens: int = 32,
    sample_s: float = 5.0,
    warmup: float = 0.2,
    seed: int = 0,
    out: Path | None = None,
) -> SoakResult:
    """Soak one server with mixed traffic for ``minutes`` (see the module docstring); start one on loopback when no
    ``url`` is given (``chat_model`` with ``threads`` decoding threads, default: the physical cores)."""
    if not 0 <= warmup < 1:
        raise BenchError(f"warmup is a fraction of the run, 0 <= warmup < 1; got {warmup}")
    with _server(url, pid, chat_model, threads) as (base, server_pid):
        kinds = _available_kinds(base)
        log.info("soak: %.1f min against %s (pid %s), kinds %s", minutes, base, server_pid, ", ".join(kinds))
        outcomes, samples = asyncio.run(
            _soak(base, server_pid, kinds, minutes * 60, concurrency, max_tokens, sample_s, seed)
        )
        healthy = _healthy(base)
    result = summarize(base, server_pid, minutes, concurrency, warmup, outcomes, samples, healthy)
    if out is not None:
        save(result, out)
    return result


# -- setup ---------------------------------------------------------------------------------------------------------
@contextmanager
def _server(
    url: str | None, pid: int | None, chat_model: Path, threads: int | None
) -> Iterator[tuple[str, int | None]]:
    if url is not None:
        base = check_loopback(url)
        yield base, pid if pid is not None else _listening_pid(base)
        return
    if not chat_model.is_file():
        raise BenchError(f"chat model {chat_model} does not exist; run `edgellm models pull default`")
    args = ["--model", str(chat_model), "--set", "models.0.n_ctx=1024", "--set", "shutdown_timeout=5"]
    if threads is not None:
        args += ["--set", f"models.0.n_threads={threads}"]
    with running_server(*args, timeout=600) as base:
        yield base, _listening_pid(base)


def _listening_pid(base: str) -> int | None:
    """The process listening on ``base``'s port on this machine, if it can be seen."""
    import psutil

    parts = urlsplit(base)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    except psutil.AccessDenied:
        pass
    log.warning("no process found listening on port %d: no RSS or descriptor samples (pass --pid)", port)
    return None


def _available_kinds(base: str) -> list[str]:
    """The kinds of ``MIX`` this server can answer (rerank and embeddings only when it has those models)."""
    with httpx.Client(base_url=base, timeout=60, trust_env=False) as c:
        kinds = [k for k in MIX if k not in ("rerank", "embed")]
        if c.post("/v1/rerank", json={"query": "q", "documents": ["d"]}).status_code == 200:
            kinds.append("rerank")
        if c.post("/v1/embeddings", json={"input": "x"}).status_code == 200:
            kinds.append("embed")
    return kinds


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=10, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


# -- run -----------------------------------------------------------------------------------------------------------
async def _soak(
    base: str,
    pid: int | None,
    kinds: list[str],
    seconds: float,
    concurrency: int,
    max_tokens: int,
    sample_s: float,
    seed: int,
) -> tuple[list[_Outcome], list[Sample]]:
    outcomes: list[_Outcome] = []
    samples: list[Sample] = []
    started = time.monotonic()
    deadline = started + seconds
    rng = random.Random(seed)
    deck: list[str] = []

    def deal() -> str:
        if not deck:  # one of each kind first (a short run still sends every kind), then the rest, shuffled
            first, rest = list(kinds), [k for k in kinds for _ in range(MIX[k] - 1)]
            rng.shuffle(first)
            rng.shuffle(rest)
            deck.extend(reversed(first + rest))
        return deck.pop()

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            kind = deal()
            t0 = time.perf_counter()
            outcome = await _request(http, base, kind, rng, max_tokens)
            outcomes.append(_Outcome(kind, outcome, time.perf_counter() - t0))

    async def sampler() -> None:
        while True:
            if pid is not None:
                sample = _sample(pid, time.monotonic() - started, len(outcomes))
                if sample is not None:
                    samples.append(sample)
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(min(sample_s, max(0.0, deadline - time.monotonic())))

    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as http:
        await asyncio.gather(sampler(), *(client(http) for _ in range(concurrency)))
    return outcomes, samples


async def _request(http: httpx.AsyncClient, base: str, kind: str, rng: random.Random, max_tokens: int) -> str:
    """One request of ``kind``; its outcome: ``ok`` or what went wrong."""
    messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
    try:
        if kind == "stream":
            res = await stream_chat(http, base, chat_body("", messages, max_tokens, temperature=0.7))
            return "ok" if res.ok else (res.error or "failed")
        if kind == "disconnect":
            body = chat_body("", messages, max_tokens * 4, temperature=0.7)
            async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return f"http_{r.status_code}"
                async for line in r.aiter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        return "ok"  # the first token: hang up now
            return "truncated"
        if kind == "plain":
            r = await http.post(f"{base}/v1/chat/completions", json={"messages": messages, "max_tokens": max_tokens})
        elif kind == "bad":
            path = rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/rerank", "/v1/embeddings", "/tokenize"])
            r = await http.post(f"{base}{path}", content=rng.choice(BAD_BODIES), headers={"content-type": "application/json"})
            return "ok" if 400 <= r.status_code < 500 and "error" in r.json() else f"http_{r.status_code}"
        elif kind == "rerank":
            docs = rng.sample(DOCUMENTS, 6)
            r = await http.post(f"{base}/v1/rerank", json={"query": messages[0]["content"], "documents": docs})
        else:
            r = await http.post(f"{base}/v1/embeddings", json={"input": rng.sample(DOCUMENTS, 4)})
        return "ok" if r.status_code == 200 else f"http_{r.status_code}"
    except httpx.ConnectError:
        return "connect"
    except httpx.TimeoutException:
        return "timeout"
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return "dropped"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return type(e).__name__


def _sample(pid: int, t_s: float, requests: int) -> Sample | None:
    """The server's RSS, open descriptors and threads now (None once it is gone)."""
    proc = Path(f"/proc/{pid}")
    try:
        status = (proc / "status").read_text()
        fds = sum(1 for _ in (proc / "fd").iterdir())
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb = int(fields["VmRSS"].split()[0])
    return Sample(t_s=t_s, rss_mb=rss_kb / 1024, fds=fds, threads=int(fields["Threads"]), requests=requests)


# -- summary -------------------------------------------------------------------------------------------------------
def summarize(
    url: str,
    pid: int | None,
    minutes: float,
    concurrency: int,
    warmup: float,
    outcomes: list[_Outcome],
    samples: list[Sample],
    healthy_after: bool,
) -> SoakResult:
    kinds = []
    for kind in MIX:
        mine = [o for o in outcomes if o.kind == kind]
        if not mine:
            continue
        counts: dict[str, int] = {}
        for o in mine:
            counts[o.outcome] = counts.get(o.outcome, 0) + 1
        ok = [o.latency_s * 1000 for o in mine if o.outcome == "ok"]
        kinds.append(
            KindSummary(
                kind=kind,
                requests=len(mine),
                outcomes=dict(sorted(counts.items())),
                p50_ms=percentile(ok, 50) if ok else None,
                p95_ms=percentile(ok, 95) if ok else None,
            )
        )
    warm = [s for s in samples if s.t_s >= warmup * minutes * 60]
    rss_warm = warm[0].rss_mb if warm else None
    rss_end = samples[-1].rss_mb if samples else None
    growth = (rss_end - rss_warm) / rss_warm * 100 if rss_warm and rss_end is not None else None
    ok_all = [o.latency_s * 1000 for o in outcomes if o.outcome == "ok" and o.kind != "disconnect"]
    server_errors = sum(
        1 for o in outcomes if o.outcome.startswith("http_5") or o.outcome in ("dropped", "connect", "truncated")
    )
    return SoakResult(
        url=url,
        pid=pid,
        minutes=minutes,
        concurrency=concurrency,
        warmup=warmup,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        requests=len(outcomes),
        kinds=kinds,
        samples=samples,
        rss_after_warmup_mb=rss_warm,
        rss_end_mb=rss_end,
        rss_growth_pct=growth,
        fds_start=samples[0].fds if samples else None,
        fds_end=samples[-1].fds if samples else None,
        server_errors=server_errors,
        healthy_after=healthy_after,
        p95_ms=percentile(ok_all, 95) if ok_all else None,
    )


def _f(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def table(result: SoakResult) -> str:
    lines = [
        f"# Soak: {result.minutes:g} min of mixed traffic, {result.concurrency} clients, {result.url}",
        "",
        f"{result.requests} requests; server errors (5xx, dropped connections): {result.server_errors}; healthy "
        f"after: {'yes' if result.healthy_after else 'NO'}; p95 latency of completed requests "
        f"{_f(result.p95_ms, '.0f')} ms.",
        "",
        f"RSS after warm-up (first {result.warmup:.0%} of the run) {_f(result.rss_after_warmup_mb, '.1f')} MB, at the "
        f"end {_f(result.rss_end_mb, '.1f')} MB: **{_f(result.rss_growth_pct, '+.2f')}%**; open file descriptors "
        f"{result.fds_start} at the start, {result.fds_end} at the end.",
        "",
        *markdown_table(
            ["kind", "requests", "outcomes", "p50 ms", "p95 ms"],
            "lrlrr",
            (
                [k.kind, str(k.requests), ", ".join(f"{name} {n}" for name, n in k.outcomes.items()),
                 _f(k.p50_ms, ".0f"), _f(k.p95_ms, ".0f")]
                for k in result.kinds
            ),
        ),
    ]
    return "\n".join(lines)


def chart(result: SoakResult, path: Path) -> None:
    """RSS, open descriptors and requests done over time; the warm-up shaded."""
    t = [s.t_s / 60 for s in result.samples]
    fig, axes = subplots(1, 3, figsize=(15, 4))
    panels = (
        ([s.rss_mb for s in result.samples], "resident memory, MB"),
        ([s.fds for s in result.samples], "open file descriptors"),
        ([s.requests for s in result.samples], "requests done"),
    )
    for ax, (values, title) in zip(axes, panels, strict=True):
        ax.plot(t, values, marker=".", color="tab:blue")
        ax.axvspan(0, result.warmup * result.minutes, color="grey", alpha=0.2, label="warm-up")
        ax.set_title(title)
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        f"edgellm bench soak: {result.requests} requests, RSS growth after warm-up "
        f"{_f(result.rss_growth_pct, '+.2f')}%, {result.server_errors} server errors"
    )
    fig.tight_layout()
    save_png(fig, path)


def save(result: SoakResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.files = {"json": str(out / "soak.json"), "table": str(out / "soak.md"), "chart": str(out / "soak.png")}
    atomic_write_text(Path(result.files["json"]), json.dumps(asdict(result), indent=2) + "\n")
    atomic_write_text(Path(result.files["table"]), table(result) + "\n")
    chart(result, Path(result.files["chart"]))


__all__ = ["MIX", "SoakResult", "bench_soak", "table"]
