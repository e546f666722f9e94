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

Only loopback URLs are accepted (127.0.0.0/8, ::1, localhost): this is a tool for measuring your own server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from edgellm.bench.variants import BenchError
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


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    detail: str = ""
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    completion_tokens: int = 0
    tokens_from_usage: bool = False


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    ok: int
    errors: dict[str, int]
    error_examples: dict[str, str]
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    itl_p50_s: float | None
    itl_p95_s: float | None
    latency_p50_s: float | None
    latency_p95_s: float | None
    completion_tokens: int
    tokens_from_usage: int  # requests whose token count came from the usage chunk
    tokens_per_s: float
    wall_s: float


@dataclass
class ServeReport:
    url: str
    model: str
    requests: int
    max_tokens: int
    timeout_s: float
    max_seconds: float
    created_at: str
    levels: list[LevelResult] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @property
    def total_errors(self) -> int:
        return sum(sum(lv.errors.values()) for lv in self.levels)


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def _stream_chat(client: Any, base: str, model: str, prompt: str, max_tokens: int) -> RequestResult:
    """One streaming chat request; errors are returned as a result, never raised (except cancellation)."""
    import httpx

    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    res = RequestResult(ok=False)
    last: float | None = None
    content_chunks = 0
    usage_tokens: int | None = None
    done = False
    status: int | None = None
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
            status = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                res.error, res.detail = f"http_{resp.status_code}", text[:200]
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    res.error, res.detail = "bad_stream", data[:200]
                    return res
                if "error" in chunk:
                    res.error, res.detail = "bad_stream", json.dumps(chunk["error"])[:200]
                    return res
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            res.ttft_s = now - t0
                        else:
                            res.itl_s.append(now - last)
                        last = now
                        content_chunks += 1
    except httpx.ConnectError as e:
        res.error, res.detail = "connect", str(e)[:200]
        return res
    except httpx.TimeoutException as e:
        res.error, res.detail = "timeout", f"{type(e).__name__}: {e}"[:200]
        return res
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        # Before the status line the server hung up (often: it crashed); after it, the stream broke.
        res.error = "truncated" if status is not None else "disconnected"
        res.detail = f"{type(e).__name__}: {e}"[:200]
        return res
    except httpx.HTTPError as e:
        res.error, res.detail = type(e).__name__, str(e)[:200]
        return res
    res.latency_s = time.perf_counter() - t0
    if not done:
        res.error, res.detail = "truncated", f"stream ended without [DONE] after {content_chunks} content chunk(s)"
        return res
    res.ok = True
    res.tokens_from_usage = usage_tokens is not None
    res.completion_tokens = usage_tokens if usage_tokens is not None else content_chunks
    return res


async def _run_level(
    base: str, model: str, concurrency: int, n_requests: int, max_tokens: int, timeout: float, deadline: float
) -> LevelResult:
    import httpx

    results: list[RequestResult] = []
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # trust_env=False: no proxy from the environment may carry a loopback request elsewhere.
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits, trust_env=False) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < n_requests:
                i = next_index
                next_index += 1
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    results.append(RequestResult(ok=False, error="not_started", detail="the run's max_seconds had passed"))
                    continue
                prompt = PROMPTS[i % len(PROMPTS)]
                try:
                    async with asyncio.timeout(min(timeout, remaining)):
                        r = await _stream_chat(client, base, model, prompt, max_tokens)
                except TimeoutError:
                    if remaining < timeout:
                        r = RequestResult(ok=False, error="deadline", detail="cut off at the run's max_seconds")
                    else:
                        r = RequestResult(ok=False, error="timeout", detail=f"no complete response in {timeout:g} s")
                results.append(r)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0

    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in results:
        if not r.ok:
            kind = r.error or "unknown"
            errors[kind] = errors.get(kind, 0) + 1
            examples.setdefault(kind, r.detail)
    itls = [x for r in ok for x in r.itl_s]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    lat = [r.latency_s for r in ok]
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
    import httpx

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

    async def run() -> ServeReport:
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

    report = asyncio.run(run())
    if out is not None:
        from edgellm.bench.report import serve_chart, serve_table

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        report.files = {
            "json": str(out / "serve_results.json"),
            "table": str(out / "serve_results.md"),
            "chart": str(out / "serve_chart.png"),
        }
        atomic_write_text(out / "serve_results.md", serve_table(report))
        serve_chart(report, out / "serve_chart.png")
        atomic_write_text(out / "serve_results.json", report.to_json())
    return report
