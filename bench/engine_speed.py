"""Engine speed in one run: raw llama.cpp decode vs the serial and batched engines, printed as a Markdown table.

    edgellm bench engines [--llama-server PATH] [--cold] [--out reports/engines]

1. Raw: plain batch-1 ``llama_decode`` in a loop (llama-bench's tg128: one token per call, no sampling), and the
   prompt-processing time of the benchmark's own chat prompt in one ``llama_decode`` (TTFT's floor), plus pp512.
2. For each engine (serial, batched): a real ``edgellm serve`` on a loopback port (by default; ``--mode engine``
   drives the engine in-process instead), streamed chat completions of ``--tokens`` tokens, 1, 2 and 4 at a time.
   All servers run at once and take turns round by round, so drift in the machine's load weighs on all alike.
   Aggregate tok/s = completion tokens of all streams / wall time of the round; per-stream tok/s = tokens after
   the first / time after the first; TTFT = request sent -> first non-empty text chunk.
3. With ``--llama-server PATH``: llama.cpp's own server (built from the same llama.cpp as llama-cpp-python, see the
   README) with the same model, threads, slots and per-slot context, driven by the same client in the same run.

Every request shares the chat template's system prompt, so a server with prompt caching evaluates only the user
turn; ``--cold`` starts every request with its own system prompt, so TTFT is the whole prompt's processing.

The numbers are only comparable within one run: the machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import multiprocessing
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import httpx

from edgellm.bench import servers
from edgellm.bench.client import StreamResult, chat_body, stream_chat
from edgellm.bench.errors import BenchError
from edgellm.bench.lowlevel import LlamaRunner, silence_llama_logs
from edgellm.bench.report import engines_chart, engines_table
from edgellm.bench.results import EngineComparison, Level
from edgellm.bench.stats import percentile
from edgellm.fsutil import atomic_write_text
from edgellm.serve.engine import (
    ChatMessage,
    ChatTemplate,
    Engine,
    EngineKind,
    Finished,
    GenerationRequest,
    ModelSpec,
    SamplingParams,
    TextDelta,
    build_engine,
)

log = logging.getLogger(__name__)

MODEL_NAME = "bench-model"
ENGINES = get_args(EngineKind)  # ("serial", "batched")
TOPICS = ["a dragon", "the sea", "a robot", "a lighthouse", "a market town", "a comet", "a violin", "a glacier"]

# Streams request ``i`` and returns how it went; one per engine.
StreamOne = Callable[[int], Awaitable[StreamResult]]


def prompt(i: int) -> str:
    return f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."


def messages(i: int, cold: bool) -> list[dict[str, str]]:
    """Request ``i``'s chat; with ``cold`` its own system prompt, so no server can reuse another's prefix."""
    turn = [{"role": "user", "content": prompt(i)}]
    if cold:
        return [{"role": "system", "content": f"Session {i:05d}. You are a helpful AI assistant."}, *turn]
    return turn


# -- raw llama.cpp --------------------------------------------------------------------------------------------------
def raw_speed(model_path: Path, threads: int, n_gen: int, chat_tokens: list[int], reps: int = 3) -> dict[str, float]:
    silence_llama_logs()
    out: dict[str, list[float]] = {"tg": [], "pp512": [], "pp_chat_ms": []}
    with LlamaRunner(model_path, n_ctx=1024, n_batch=512, n_threads=threads) as r:
        r.decode([1])  # warm up
        for _ in range(reps):
            r.clear()
            t0 = time.perf_counter()
            r.decode([(i * 7919) % r.n_vocab for i in range(512)])
            out["pp512"].append(512 / (time.perf_counter() - t0))
            r.clear()
            t0 = time.perf_counter()
            r.decode(chat_tokens)
            out["pp_chat_ms"].append((time.perf_counter() - t0) * 1000)
            r.clear()
            r.decode([1])
            t0 = time.perf_counter()
            for i in range(n_gen):
                r.decode([(i * 31 + 7) % r.n_vocab], i + 1)
            out["tg"].append(n_gen / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in out.items()}


def raw_speed_apart(model_path: Path, threads: int, n_gen: int, chat_tokens: list[int]) -> dict[str, float]:
    """``raw_speed`` in a fresh process: llama.cpp's OpenMP threads belong to the thread that first decoded, and a
    second decoding thread in the same process (``--mode engine``'s scheduler) would compete with them."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(raw_speed, (model_path, threads, n_gen, chat_tokens))


# -- one streamed request -----------------------------------------------------------------------------------------
async def stream_http(
    client: httpx.AsyncClient, url: str, model: str, n_tokens: int, cold: bool, i: int
) -> StreamResult:
    """Request ``i`` to the server at ``url``; a failed request stops the benchmark."""
    body = chat_body(model, messages(i, cold), max_tokens=n_tokens, temperature=0.8, seed=i)
    res = await stream_chat(client, url, body)
    if not res.ok:
        raise BenchError(f"{url}: request {i} failed ({res.error}): {res.detail}")
    return res


async def stream_engine(engine: Engine, n_tokens: int, cold: bool, i: int) -> StreamResult:
    """Request ``i`` to ``engine`` in this process, timed as ``stream_http`` times a server."""
    req = GenerationRequest(
        model=MODEL_NAME,
        messages=tuple(ChatMessage(m["role"], m["content"]) for m in messages(i, cold)),
        params=SamplingParams(max_tokens=n_tokens, temperature=0.8, seed=i),
    )
    res = StreamResult(start=time.perf_counter())
    gen = await engine.submit(req)
    async for ev in gen:
        if isinstance(ev, TextDelta) and ev.text:
            res.chunk_times.append(time.perf_counter())
        elif isinstance(ev, Finished):
            res.usage_tokens = ev.completion_tokens
    await gen.aclose()
    res.end = time.perf_counter()
    return res


def summarize(n: int, results: list[StreamResult], walls: list[float]) -> Level:
    total = sum(g.completion_tokens for g in results)
    per = [
        (g.completion_tokens - 1) / (g.end - g.chunk_times[0])
        for g in results
        if g.completion_tokens > 1 and g.chunk_times and g.end > g.chunk_times[0]
    ]
    ttfts = [1000 * g.ttft for g in results if g.ttft is not None]
    if not ttfts:
        raise BenchError(f"{n} stream(s): no request produced any text")
    return Level(
        streams=n,
        aggregate=total / sum(walls),
        per_stream=statistics.mean(per),
        ttft_p50=percentile(ttfts, 50),
        ttft_p95=percentile(ttfts, 95),
        tokens=total,
    )


async def run_rounds(ones: dict[str, StreamOne], levels: list[int], rounds: int) -> dict[str, list[Level]]:
    """Each level's rounds, the engines taking turns round by round (in rotating order), so a machine that gets
    busier or quieter during the run weighs on every engine alike. ``ones[engine](i)`` streams request ``i``."""
    for one in ones.values():
        await one(0)  # warm up
    names = list(ones)
    out: dict[str, list[Level]] = {e: [] for e in names}
    for n in levels:
        results: dict[str, list[StreamResult]] = {e: [] for e in names}
        walls: dict[str, list[float]] = {e: [] for e in names}
        for r in range(rounds if n > 1 else rounds * 2):
            for e in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                got = await asyncio.gather(*(ones[e](r * n + k) for k in range(n)))
                walls[e].append(time.perf_counter() - t0)
                results[e].extend(got)
        for e in names:
            level = summarize(n, results[e], walls[e])
            log.info("%s, %d stream(s): %.1f tok/s aggregate", e, n, level.aggregate)
            out[e].append(level)
    return out


# -- engines --------------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    model: Path
    threads: int
    levels: list[int]
    rounds: int
    n_tokens: int
    cold: bool
    slots: int = 4
    n_ctx: int = 1024  # per slot


@contextmanager
def edgellm_server(engine: str, setup: Setup) -> Iterator[str]:
    with servers.edgellm_server(setup.model, setup.threads, setup.slots, setup.n_ctx, engine=engine) as url:
        yield url


@contextmanager
def llama_server(binary: Path, setup: Setup) -> Iterator[str]:
    """llama.cpp's server with the same model, threads, slots and per-slot context as ours."""
    with servers.llama_server(binary, setup.model, setup.threads, setup.slots, setup.n_ctx) as url:
        yield url


async def drive_servers(urls: dict[str, str], names: dict[str, str], setup: Setup) -> dict[str, list[Level]]:
    """One client for every server; ``names[e]`` is the model id server ``e`` serves."""
    # a new connection per request: llama-server (cpp-httplib) closes a kept-alive connection after 5
    # requests, which a reused connection sees as a disconnect; a loopback connect costs well under a ms
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=300, trust_env=False, limits=limits) as client:
        ones: dict[str, StreamOne] = {
            e: functools.partial(stream_http, client, urls[e], names[e], setup.n_tokens, setup.cold) for e in urls
        }
        return await run_rounds(ones, setup.levels, setup.rounds)


def bench_http(engines: list[str], binary: Path | None, setup: Setup) -> dict[str, list[Level]]:
    """All servers up at once (idle ones cost nothing), driven by one client, engines taking turns per round."""
    with ExitStack() as stack:
        urls = {e: stack.enter_context(edgellm_server(e, setup)) for e in engines}
        if binary is not None:
            urls["llama-server"] = stack.enter_context(llama_server(binary, setup))
        names = {e: httpx.get(f"{u}/v1/models", timeout=10).json()["data"][0]["id"] for e, u in urls.items()}
        return asyncio.run(drive_servers(urls, names, setup))


def load_engine(engine: str, setup: Setup) -> Engine:
    """One of our engines with the benchmark's model, in this process (blocking: call it off the event loop)."""
    spec = ModelSpec(name=MODEL_NAME, path=setup.model, n_ctx=setup.n_ctx, n_threads=setup.threads)
    kind: EngineKind = "batched" if engine == "batched" else "serial"
    return build_engine(kind, [spec], slots=setup.slots)


async def drive_engine(engine: str, setup: Setup) -> list[Level]:
    e = await asyncio.to_thread(load_engine, engine, setup)
    try:
        one: StreamOne = functools.partial(stream_engine, e, setup.n_tokens, setup.cold)
        return (await run_rounds({engine: one}, setup.levels, setup.rounds))[engine]
    finally:
        await e.close()


def bench_engine(engine: str, setup: Setup) -> list[Level]:
    return asyncio.run(drive_engine(engine, setup))


def chat_prompt_tokens(model: Path, cold: bool) -> list[int]:
    """The tokens of request 0's chat prompt, rendered as the engines render it."""
    import llama_cpp as ll
    from llama_cpp._internals import LlamaModel

    m = LlamaModel(path_model=str(model), params=ll.llama_model_default_params(), verbose=False)
    try:
        bos = m.token_get_text(m.token_bos()) if m.token_bos() >= 0 else ""
        eos = m.token_get_text(m.token_eos()) if m.token_eos() >= 0 else ""
        chat = [ChatMessage(x["role"], x["content"]) for x in messages(0, cold)]
        text = ChatTemplate.from_metadata(m.metadata(), bos, eos).render(chat)
        return list(m.tokenize(text.encode(), add_bos=True, special=True))
    finally:
        m.close()


def compare_engines(
    model: Path,
    engines: list[str],
    levels: list[int],
    threads: int = 2,
    n_tokens: int = 128,
    rounds: int = 3,
    mode: str = "http",
    cold: bool = False,
    llama_server: Path | None = None,
    out: Path | None = None,
) -> EngineComparison:
    """Raw decode speed, then each engine (and ``llama_server``, a llama-server binary) at each level of concurrent
    streams, then raw again. With ``out``: ``engines.json``, ``engines.md`` and ``engines.png`` written there."""
    if mode not in ("http", "engine"):
        raise BenchError(f"mode must be http or engine, not {mode!r}")
    if not engines or any(e not in ENGINES for e in engines):
        raise BenchError(f"engines must be some of {', '.join(ENGINES)}, not {','.join(engines) or 'none'}")
    if not model.is_file():
        raise BenchError(f"{model}: no such GGUF file (edgellm models pull default)")
    if llama_server is not None and not (llama_server.is_file() and os.access(llama_server, os.X_OK)):
        raise BenchError(f"{llama_server}: not an executable llama-server (see README, Benchmarks)")
    if llama_server is not None and mode != "http":
        raise BenchError("llama-server can only be compared over HTTP (mode http)")
    if not levels or min(levels) < 1 or rounds < 1 or n_tokens < 1:
        raise BenchError("levels, rounds and tokens must be >= 1")
    setup = Setup(model=model, threads=threads, levels=levels, rounds=rounds, n_tokens=n_tokens, cold=cold)

    chat_tokens = chat_prompt_tokens(model, cold)
    log.info("raw llama.cpp decode speed")
    raw_before = raw_speed_apart(model, threads, n_tokens, chat_tokens)
    if mode == "http":
        rows = bench_http(engines, llama_server, setup)
    else:
        rows = {e: bench_engine(e, setup) for e in engines}
    log.info("raw llama.cpp decode speed, again")
    raw_after = raw_speed_apart(model, threads, n_tokens, chat_tokens)
    result = EngineComparison(
        model=str(model),
        threads=threads,
        n_tokens=n_tokens,
        mode=mode,
        cold=cold,
        prompt_tokens=len(chat_tokens),
        raw_before=raw_before,
        raw_after=raw_after,
        rows=rows,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    if out is not None:
        save_comparison(result, out)
    return result


def save_comparison(result: EngineComparison, out: Path) -> None:
    """``engines.md``, ``engines.png`` and ``engines.json`` in ``out``; ``result.files`` says where."""
    out.mkdir(parents=True, exist_ok=True)
    result.files = {k: str(out / f"engines.{k}") for k in ("json", "md", "png")}
    atomic_write_text(out / "engines.md", engines_table(result))
    engines_chart(result, out / "engines.png")
    atomic_write_text(out / "engines.json", result.to_json())
