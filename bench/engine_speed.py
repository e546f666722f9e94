"""Engine speed in one run: raw llama.cpp decode vs the serial and batched engines, printed as a Markdown table.

    edgellm bench engines [--llama-server PATH] [--cold] [--out reports/engines]
    (or python -m bench.engine_speed with the same options)

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
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgellm.bench.variants import BenchError
from edgellm.fsutil import atomic_write_text
from edgellm.launch import free_port, running_process, running_server

log = logging.getLogger(__name__)

MODEL_NAME = "bench-model"
TOPICS = ["a dragon", "the sea", "a robot", "a lighthouse", "a market town", "a comet", "a violin", "a glacier"]


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
    from edgellm.bench.lowlevel import LlamaRunner, silence_llama_logs

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
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(raw_speed, (model_path, threads, n_gen, chat_tokens))


# -- one streamed request -----------------------------------------------------------------------------------------
@dataclass
class Result:
    ttft: float
    tokens: int
    first: float
    end: float
    start: float


async def stream_http(client: Any, url: str, model: str, i: int, n_tokens: int, cold: bool = False) -> Result:
    body = {
        "model": model,
        "messages": messages(i, cold),
        "max_tokens": n_tokens,
        "temperature": 0.8,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = 0.0
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if c["delta"].get("content") and not first:
                    first = time.perf_counter()
    end = time.perf_counter()
    return Result(ttft=first - start, tokens=tokens, first=first, end=end, start=start)


async def stream_engine(engine: Any, i: int, n_tokens: int, cold: bool = False) -> Result:
    from edgellm.serve.engine.base import ChatMessage, Finished, GenerationRequest, SamplingParams, TextDelta

    req = GenerationRequest(
        model=MODEL_NAME,
        messages=tuple(ChatMessage(m["role"], m["content"]) for m in messages(i, cold)),
        params=SamplingParams(max_tokens=n_tokens, temperature=0.8, seed=i),
    )
    start = time.perf_counter()
    first = 0.0
    tokens = 0
    gen = await engine.submit(req)
    async for ev in gen:
        if isinstance(ev, TextDelta) and ev.text and not first:
            first = time.perf_counter()
        elif isinstance(ev, Finished):
            tokens = ev.completion_tokens
    await gen.aclose()
    end = time.perf_counter()
    return Result(ttft=first - start, tokens=tokens, first=first, end=end, start=start)


@dataclass
class Level:
    streams: int
    aggregate: float
    per_stream: float
    ttft_p50: float
    ttft_p95: float
    tokens: int


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarize(n: int, results: list[Result], walls: list[float]) -> Level:
    total = sum(g.tokens for g in results)
    per = [(g.tokens - 1) / (g.end - g.first) for g in results if g.tokens > 1 and g.end > g.first]
    ttfts = [g.ttft * 1000 for g in results]
    return Level(
        streams=n,
        aggregate=total / sum(walls),
        per_stream=statistics.mean(per),
        ttft_p50=pct(ttfts, 0.5),
        ttft_p95=pct(ttfts, 0.95),
        tokens=total,
    )


async def run_rounds(ones: dict[str, Any], levels: list[int], rounds: int) -> dict[str, list[Level]]:
    """Each level's rounds, the engines taking turns round by round (in rotating order), so a machine that gets
    busier or quieter during the run weighs on every engine alike. ``ones[engine](i)`` streams request ``i``."""
    for one in ones.values():
        await one(0)  # warm up
    names = list(ones)
    out: dict[str, list[Level]] = {e: [] for e in names}
    for n in levels:
        results: dict[str, list[Result]] = {e: [] for e in names}
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
    args = [
        "--engine", engine, "--set", f"models.0.path={setup.model}", "--set", f"models.0.n_threads={setup.threads}",
        "--set", f"models.0.n_ctx={setup.n_ctx}", "--set", f"slots={setup.slots}", "--log-level", "warning",
        "--no-reranker",
    ]  # fmt: skip
    with running_server(*args) as url:
        yield url


@contextmanager
def llama_server(binary: Path, setup: Setup) -> Iterator[str]:
    """llama.cpp's server with the same model, threads, slots and per-slot context as ours."""
    port = free_port()
    cmd = [
        str(binary), "-m", str(setup.model), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(setup.threads), "-tb", str(setup.threads), "-np", str(setup.slots),
        "-c", str(setup.n_ctx * setup.slots), "--no-webui",
    ]  # fmt: skip
    with running_process(cmd, port) as url:
        yield url


def bench_http(engines: list[str], binary: Path | None, setup: Setup) -> dict[str, list[Level]]:
    """All servers up at once (idle ones cost nothing), driven by one client, engines taking turns per round."""
    import httpx

    with ExitStack() as stack:
        urls = {e: stack.enter_context(edgellm_server(e, setup)) for e in engines}
        if binary is not None:
            urls["llama-server"] = stack.enter_context(llama_server(binary, setup))
        names = {e: httpx.get(f"{u}/v1/models", timeout=10).json()["data"][0]["id"] for e, u in urls.items()}

        async def main() -> dict[str, list[Level]]:
            # a new connection per request: llama-server (cpp-httplib) closes a kept-alive connection after 5
            # requests, which a reused connection sees as a disconnect; a loopback connect costs well under a ms
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=300, trust_env=False, limits=limits) as client:

                def one(e: str) -> Any:
                    return lambda i: stream_http(client, urls[e], names[e], i, setup.n_tokens, setup.cold)

                return await run_rounds({e: one(e) for e in urls}, setup.levels, setup.rounds)

        return asyncio.run(main())


def bench_engine(engine: str, setup: Setup) -> list[Level]:
    from edgellm.serve.engine.specs import ModelSpec

    spec = ModelSpec(name=MODEL_NAME, path=setup.model, n_ctx=setup.n_ctx, n_threads=setup.threads)

    async def main() -> list[Level]:
        if engine == "batched":
            from edgellm.serve.engine.batched import BatchedEngine

            e: Any = await asyncio.to_thread(BatchedEngine, [spec], setup.slots)
        else:
            from edgellm.serve.engine.serial import SerialEngine

            e = await asyncio.to_thread(SerialEngine, [spec])
        try:
            ones = {engine: lambda i: stream_engine(e, i, setup.n_tokens, setup.cold)}
            return (await run_rounds(ones, setup.levels, setup.rounds))[engine]
        finally:
            await e.close()

    return asyncio.run(main())


def chat_prompt_tokens(model: Path, cold: bool) -> list[int]:
    """The tokens of request 0's chat prompt, rendered as the engines render it."""
    import llama_cpp as ll
    from llama_cpp._internals import LlamaModel

    from edgellm.serve.engine.base import ChatMessage
    from edgellm.serve.engine.prompt import ChatTemplate

    m = LlamaModel(path_model=str(model), params=ll.llama_model_default_params(), verbose=False)
    try:
        bos = m.token_get_text(m.token_bos()) if m.token_bos() >= 0 else ""
        eos = m.token_get_text(m.token_eos()) if m.token_eos() >= 0 else ""
        chat = [ChatMessage(x["role"], x["content"]) for x in messages(0, cold)]
        text = ChatTemplate.from_metadata(m.metadata(), bos, eos).render(chat)
        return list(m.tokenize(text.encode(), add_bos=True, special=True))
    finally:
        m.close()


@dataclass
class EngineComparison:
    """One run: raw llama.cpp before and after, and each engine's levels; numbers comparable within the run."""

    model: str
    threads: int
    n_tokens: int
    mode: str
    cold: bool
    prompt_tokens: int
    raw_before: dict[str, float]
    raw_after: dict[str, float]
    rows: dict[str, list[Level]]
    created_at: str
    files: dict[str, str] = field(default_factory=dict)

    @property
    def raw_tg(self) -> float:
        return (self.raw_before["tg"] + self.raw_after["tg"]) / 2

    @property
    def raw_prompt_ms(self) -> float:
        return (self.raw_before["pp_chat_ms"] + self.raw_after["pp_chat_ms"]) / 2

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


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
    if not model.is_file():
        raise BenchError(f"{model}: no such GGUF file (edgellm models pull default)")
    if llama_server is not None and not (llama_server.is_file() and os.access(llama_server, os.X_OK)):
        raise BenchError(f"{llama_server}: not an executable llama-server (see README, Benchmarks)")
    if llama_server is not None and mode != "http":
        raise BenchError("llama-server can only be compared over HTTP (mode http)")
    if not levels or min(levels) < 1 or rounds < 1 or n_tokens < 1:
        raise BenchError("levels, rounds and tokens must be >= 1")
    setup = Setup(model=model, threads=threads, levels=levels, rounds=rounds, n_tokens=n_tokens, cold=cold)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
        from edgellm.bench.report import engines_chart

        out.mkdir(parents=True, exist_ok=True)
        result.files = {k: str(out / f"engines.{k}") for k in ("json", "md", "png")}
        atomic_write_text(out / "engines.md", engines_table(result))
        engines_chart(result, out / "engines.png")
        atomic_write_text(out / "engines.json", result.to_json())
    return result


def engines_table(r: EngineComparison) -> str:
    tg, pp_ms = r.raw_tg, r.raw_prompt_ms
    lines = [
        f"model {Path(r.model).name}, {r.threads} threads, {r.n_tokens}-token answers, mode {r.mode}, "
        f"{'cold prompts' if r.cold else 'shared system prompt'}",
        "",
        f"raw batch-1 llama_decode: tg{r.n_tokens} {r.raw_before['tg']:.1f} tok/s before, {r.raw_after['tg']:.1f} "
        f"after (mean {tg:.1f}); pp512 {r.raw_before['pp512']:.0f} tok/s; the chat prompt ({r.prompt_tokens} "
        f"tokens) in {pp_ms:.1f} ms",
        "",
        "| engine | streams | aggregate tok/s | x raw tg | per-stream tok/s | TTFT p50 ms | TTFT p95 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| raw llama_decode | 1 | {tg:.1f} | 1.00 | {tg:.1f} | {pp_ms:.1f} | |",
    ]
    for engine, levels in r.rows.items():
        for x in levels:
            lines.append(
                f"| {engine} | {x.streams} | {x.aggregate:.1f} | {x.aggregate / tg:.2f} | {x.per_stream:.1f} "
                f"| {x.ttft_p50:.1f} | {x.ttft_p95:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.engine_speed ...`` is ``edgellm bench engines ...``."""
    from edgellm.cli import main as edgellm_main

    return edgellm_main(["bench", "engines", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
