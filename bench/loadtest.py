"""`edgellm bench serve`: a bounded load test of an OpenAI-compatible chat server on this machine.

Works against ours (`edgellm serve`), llama.cpp's ``llama-server`` and the llama-cpp-python server: streaming
``POST /v1/chat/completions`` with ``stream_options.include_usage``. For each concurrency level, ``requests``
requests are sent by ``concurrency`` workers; we record time to first token (first content chunk), the gaps
between content chunks (inter-token latency), completion tokens (the usage chunk, else content chunks) and
errors by kind:

- ``connect``: connection refused or unreachable;  ``timeout``: a request took longer than ``timeout`` seconds;
- ``http_<status>``: an error status;  ``truncated``: the stream ended or broke before ``[DONE]``;
- ``disconnected``: the server closed the connection before answering (it may have crashed);
- ``bad_stream``: a chunk that is not JSON, or an ``error`` object inside the stream;
- ``deadline``: cut off by the run's overall time limit (``max_seconds``); ``not_started``: never sent because of it.

Every request goes through the benchmarks' one streaming client (``bench/client.py``).

Only loopback URLs are accepted (127.0.0.0/8, ::1, localhost): this is a tool for measuring your own server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from edgellm.bench.client import StreamResult, chat_body, stream_chat
from edgellm.bench.errors import BenchError
from edgellm.bench.report import serve_chart, serve_table
from edgellm.bench.results import LevelResult, ServeReport
from edgellm.bench.stats import percentile
from edgellm.fsutil import atomic_write_text

log = logging.getLogger(__name__)

PROMPTS = (
    "Explain in three sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "List five uses for a paper clip.",
    "What is the difference between a list and a tuple in Python?",
    "Give me a recipe for a simple tomato soup.",
    "Summarize the plot of a detective story in a paragraph.",
    "How does a bicycle stay upright?",
    "Describe a quiet morning in a small harbor town.",
)


def check_loopback(url: str) -> str:
    """Return the base URL (scheme://host:port, no trailing ``/v1``) if it points at this machine; else raise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BenchError(f"{url!r}: expected an http(s) URL such as http://127.0.0.1:8000")
    host = parts.hostname
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback:
        raise BenchError(
            f"{url!r}: refusing to load-test {host}; `bench serve` only sends requests to this machine "
            "(127.0.0.0/8, ::1 or localhost)"
        )
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def _pct(values: list[float], q: float) -> float | None:
    return percentile(values, q) if values else None


async def _request(
    client: httpx.AsyncClient, base: str, model: str, i: int, max_tokens: int, timeout: float, deadline: float
) -> StreamResult:
    """Request ``i``, cut off after ``timeout`` s or at the run's ``deadline``, whichever comes first."""
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        return _failed("not_started", "the run's max_seconds had passed")
    body = chat_body(model, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens, temperature=0.0)
    try:
        async with asyncio.timeout(min(timeout, remaining)):
            return await stream_chat(client, base, body)
    except TimeoutError:
        if remaining < timeout:
            return _failed("deadline", "cut off at the run's max_seconds")
        return _failed("timeout", f"no complete response in {timeout:g} s")


def _failed(error: str, detail: str) -> StreamResult:
    return StreamResult(start=time.perf_counter(), error=error, detail=detail)


async def _run_level(
    base: str, model: str, concurrency: int, n_requests: int, max_tokens: int, timeout: float, deadline: float
) -> LevelResult:
    results: list[StreamResult] = []
    pending = iter(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # trust_env=False: no proxy from the environment may carry a loopback request elsewhere.
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits, trust_env=False) as client:

        async def worker() -> None:  # ``concurrency`` of these share the pending requests
            for i in pending:
                results.append(await _request(client, base, model, i, max_tokens, timeout, deadline))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize_level(concurrency, results, wall)


def summarize_level(concurrency: int, results: list[StreamResult], wall: float) -> LevelResult:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in results:
        if not r.ok:
            kind = r.error or "unknown"
            errors[kind] = errors.get(kind, 0) + 1
            examples.setdefault(kind, r.detail)
    itls = [x for r in ok for x in r.itl]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    lat = [r.latency for r in ok]
    tokens = sum(r.completion_tokens for r in ok)
    return LevelResult(
        concurrency=concurrency,
        requests=len(results),
        ok=len(ok),
        errors=errors,
        error_examples=examples,
        ttft_p50_s=_pct(ttfts, 50),
        ttft_p95_s=_pct(ttfts, 95),
        itl_p50_s=_pct(itls, 50),
        itl_p95_s=_pct(itls, 95),
        latency_p50_s=_pct(lat, 50),
        latency_p95_s=_pct(lat, 95),
        completion_tokens=tokens,
        tokens_from_usage=sum(r.tokens_from_usage for r in ok),
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        wall_s=wall,
    )


async def _discover_model(base: str, timeout: float) -> str | None:
    """The first id of ``GET /v1/models``, or None when the server does not answer it."""
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(min(timeout, 10.0)), trust_env=False) as client:
            resp = await client.get(f"{base}/v1/models")
            if resp.status_code == 200:
                data = resp.json().get("data") or []
                if data and isinstance(data[0], dict) and data[0].get("id"):
                    return str(data[0]["id"])
    except (httpx.HTTPError, ValueError) as e:
        log.debug("GET %s/v1/models failed: %s", base, e)
    return None


def bench_serve(
    url: str,
    concurrency: list[int],
    requests: int,
    max_tokens: int = 64,
    timeout: float = 60.0,
    max_seconds: float = 600.0,
    model: str | None = None,
    out: Path | None = None,
) -> ServeReport:
    """Load-test the OpenAI-compatible server at ``url`` (loopback only) at each concurrency level.

    ``requests`` requests per level; each is cut off after ``timeout`` s and the whole run after ``max_seconds``.
    ``model`` defaults to the first id of the server's ``/v1/models`` (else ``"default"``). With ``out``, writes
    ``serve_results.json``, ``serve_results.md`` and ``serve_chart.png`` there.
    """
    base = check_loopback(url)
    if not concurrency or any(c < 1 for c in concurrency):
        raise BenchError(f"concurrency levels must be >= 1, got {concurrency}")
    if requests < 1 or max_tokens < 1 or timeout <= 0 or max_seconds <= 0:
        raise BenchError("requests and max_tokens must be >= 1, timeout and max_seconds > 0")
    report = asyncio.run(run_levels(base, concurrency, requests, max_tokens, timeout, max_seconds, model))
    if out is not None:
        save_report(report, Path(out))
    return report


async def run_levels(
    base: str,
    concurrency: list[int],
    requests: int,
    max_tokens: int,
    timeout: float,
    max_seconds: float,
    model: str | None,
) -> ServeReport:
    """Every concurrency level in turn, all within ``max_seconds`` of the start."""
    deadline = time.perf_counter() + max_seconds
    chosen = model or await _discover_model(base, timeout) or "default"
    report = ServeReport(
        url=base,
        model=chosen,
        requests=requests,
        max_tokens=max_tokens,
        timeout_s=timeout,
        max_seconds=max_seconds,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    for c in concurrency:
        log.info("concurrency %d: %d request(s) to %s", c, requests, base)
        level = await _run_level(base, chosen, c, requests, max_tokens, timeout, deadline)
        if level.errors:
            log.warning("concurrency %d: errors %s (e.g. %s)", c, level.errors, level.error_examples)
        report.levels.append(level)
    return report


def save_report(report: ServeReport, out: Path) -> None:
    """``serve_results.md``, ``serve_chart.png`` and ``serve_results.json`` in ``out``; ``report.files`` says where."""
    out.mkdir(parents=True, exist_ok=True)
    report.files = {
        "json": str(out / "serve_results.json"),
        "table": str(out / "serve_results.md"),
        "chart": str(out / "serve_chart.png"),
    }
    atomic_write_text(out / "serve_results.md", serve_table(report))
    serve_chart(report, out / "serve_chart.png")
    atomic_write_text(out / "serve_results.json", report.to_json())
