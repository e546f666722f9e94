"""`edgellm bench ondemand`: what loading models on demand costs, on a real server over a folder of two GGUFs.

Setup -> measure -> summarize -> save:

1. a models folder (a temporary one) holding the *streamer* (the default SmolLM2 GGUF) and the *loaded* model
   (``models/gemma-3-270m-q4_k_m.gguf``, or the SmolLM2 file again under another name when that is missing), and
   ``edgellm serve --models-dir`` over it on a loopback port (1 slot per model, ``keep_alive`` forever: the bench
   unloads by hand);
2. for ``rounds`` rounds:
   - **cold start**: the loaded model unloaded (``POST /models/unload``), a streamed request to it: time to its first
     token (the load included), then the same request again, warm;
   - **decode beside a load**: a long streamed answer of the streamer (end of text forbidden, ``tokens`` tokens),
     alone; then the same answer while ``POST /models/load`` loads the other model after the first
     ``LOAD_AFTER`` tokens: tok/s over the tokens that arrived during the load against tok/s over the same part
     of the answer alone;
3. **memory**: the server's RSS (psutil) with the streamer alone, with both models loaded and used, and after
   Ollama's ``POST /api/generate {"model": ..., "keep_alive": 0}`` unloaded the second (set against ``/api/ps``'s
   estimated ``size``);
4. the summary (medians), a Markdown table, ``ondemand.json`` and ``ondemand.png``.

The machine is usually shared: read the ratio, not the absolute speeds, and run it twice when it matters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgellm.bench.charts import save_png, subplots
from edgellm.bench.errors import BenchError
from edgellm.bench.servers import rss_mb as _rss_mb
from edgellm.bench.servers import server_pid
from edgellm.bench.tables import markdown_table
from edgellm.fsutil import atomic_write_text
from edgellm.launch import running_server

log = logging.getLogger(__name__)

STREAMER = "streamer"
LOADED = "loaded"
DEFAULT_STREAMER = Path("models/SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_LOADED = Path("models/gemma-3-270m-q4_k_m.gguf")
LOAD_AFTER = 4  # tokens of the streamer's answer before the load starts
NO_END = {"0": -100, "2": -100}  # SmolLM2's end-of-text ids: its answer runs to max_tokens
PROMPT = [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]
MB = 1e6


@dataclass
class OnDemandResult:
    streamer: str  # the GGUF files behind the two model names
    loaded: str
    rounds: int
    tokens: int
    n_ctx: int
    threads: int | None
    cold_ttft_s: list[float] = field(default_factory=list)  # request to a model not loaded -> first token
    warm_ttft_s: list[float] = field(default_factory=list)  # the same request, the model loaded
    load_s: list[float] = field(default_factory=list)  # POST /models/load beside the stream
    alone_tps: list[float] = field(default_factory=list)  # streamer decode tok/s, nothing loading
    during_load_tps: list[float] = field(default_factory=list)  # streamer decode tok/s while the other loads
    tokens_during_load: list[int] = field(default_factory=list)
    rss_one_mb: float = 0.0  # the streamer alone loaded
    rss_two_mb: float = 0.0  # both loaded (and each answered once)
    rss_after_unload_mb: float = 0.0  # after keep_alive 0 unloaded the second
    estimate_mb: float = 0.0  # /api/ps size of the second: file + KV cache
    load_average: list[float] = field(default_factory=list)  # os.getloadavg() at the start and the end
    files: dict[str, str] = field(default_factory=dict)

    @property
    def decode_ratio(self) -> float | None:
        """Median tok/s during a load over median tok/s alone (1.0: a load costs the stream nothing)."""
        if not self.alone_tps or not self.during_load_tps:
            return None
        return statistics.median(self.during_load_tps) / statistics.median(self.alone_tps)


def bench_ondemand(
    streamer: Path = DEFAULT_STREAMER,
    loaded: Path | None = None,
    rounds: int = 3,
    tokens: int = 256,
    n_ctx: int = 512,
    threads: int | None = None,
    out: Path | None = None,
) -> OnDemandResult:
    """Run the benchmark (see the module) against a server started here; write the report to ``out``."""
    loaded = loaded if loaded is not None else (DEFAULT_LOADED if DEFAULT_LOADED.is_file() else streamer)
    for path in (streamer, loaded):
        if not path.is_file():
            raise BenchError(f"{path} does not exist; run `edgellm models pull default` or pass another GGUF")
    if rounds < 1 or tokens < LOAD_AFTER + 8:
        raise BenchError(f"need at least 1 round and {LOAD_AFTER + 8} tokens, got {rounds} and {tokens}")
    result = OnDemandResult(str(streamer), str(loaded), rounds, tokens, n_ctx, threads)
    result.load_average = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="edgellm-ondemand-") as tmp:
        folder = Path(tmp)
        (folder / f"{STREAMER}.gguf").symlink_to(streamer.resolve())
        (folder / f"{LOADED}.gguf").symlink_to(loaded.resolve())
        args = ["--models-dir", str(folder), "--no-reranker", "--no-embedder", "--set", "slots=1",
                "--set", f"model_defaults.n_ctx={n_ctx}", "--set", "keep_alive=-1", "--set", "max_loaded_models=2"]
        if threads is not None:
            args += ["--set", f"model_defaults.n_threads={threads}"]
        with running_server(*args, timeout=180) as url:
            asyncio.run(_measure(url, server_pid(url), result))
    result.load_average += list(os.getloadavg())
    if out is not None:
        save(result, out)
    return result




async def _measure(url: str, pid: int, result: OnDemandResult) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=300) as http:
        await _post(http, url, "/models/load", {"model": STREAMER})
        for i in range(result.rounds):
            log.info("round %d of %d", i + 1, result.rounds)
            await _unload(http, url, LOADED)
            result.cold_ttft_s.append(await _ttft(http, url, LOADED))
            result.warm_ttft_s.append(await _ttft(http, url, LOADED))
            await _unload(http, url, LOADED)
            alone, _ = await _stream_beside(http, url, result.tokens, load=False)
            during, (load_s, n) = await _stream_beside(http, url, result.tokens, load=True)
            result.alone_tps.append(alone)
            result.during_load_tps.append(during)
            result.load_s.append(load_s)
            result.tokens_during_load.append(n)
        await _unload(http, url, LOADED)
        await asyncio.sleep(1.0)
        result.rss_one_mb = _rss_mb(pid)
        await _post(http, url, "/api/generate", {"model": LOADED, "prompt": "Hi", "stream": False,
                                                 "options": {"num_predict": 8}})
        ps = (await http.get(f"{url}/api/ps")).json()["models"]
        result.estimate_mb = next(m["size"] for m in ps if m["name"] == LOADED) / MB
        await asyncio.sleep(1.0)
        result.rss_two_mb = _rss_mb(pid)
        answer = await _post(http, url, "/api/generate", {"model": LOADED, "keep_alive": 0})
        if answer.get("done_reason") != "unload":
            raise BenchError(f"keep_alive 0 did not unload {LOADED}: {answer}")
        deadline = time.monotonic() + 60
        while any(m["name"] == LOADED for m in (await http.get(f"{url}/api/ps")).json()["models"]):
            if time.monotonic() > deadline:
                raise BenchError(f"{LOADED} was still loaded 60 s after keep_alive 0")
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        result.rss_after_unload_mb = _rss_mb(pid)


async def _post(http: Any, url: str, route: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await http.post(f"{url}{route}", json=body)
    if r.status_code != 200:
        raise BenchError(f"POST {route} {body} answered {r.status_code}: {r.text[:300]}")
    out: dict[str, Any] = r.json()
    return out


async def _unload(http: Any, url: str, model: str) -> None:
    """``POST /models/unload``, retried while the model is still finishing its last answer (503)."""
    deadline = time.monotonic() + 30
    while (r := await http.post(f"{url}/models/unload", json={"model": model})).status_code == 503:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    if r.status_code != 200:
        raise BenchError(f"POST /models/unload {model} answered {r.status_code}: {r.text[:300]}")


async def _ttft(http: Any, url: str, model: str) -> float:
    from edgellm.bench.client import chat_body, stream_chat

    res = await stream_chat(http, url, chat_body(model, [{"role": "user", "content": "Say hello."}], 8, 0.0))
    if not res.ok or res.ttft is None:
        raise BenchError(f"streaming from {model} failed: {res.error} {res.detail}")
    return res.ttft


async def _stream_beside(http: Any, url: str, tokens: int, load: bool) -> tuple[float, tuple[float, int]]:
    """The streamer's answer of ``tokens`` tokens; with ``load``, the other model loads once ``LOAD_AFTER`` tokens
    have arrived. Returns tok/s over the tokens during the load (alone: over the same part of the answer, from
    token ``LOAD_AFTER`` on) and (load seconds, tokens during the load)."""
    from edgellm.bench.client import chat_body, stream_chat

    body = {**chat_body(STREAMER, PROMPT, tokens, 0.0), "logit_bias": NO_END}
    task = asyncio.create_task(stream_chat(http, url, body))
    window: tuple[float, float] | None = None
    if load:
        while not task.done() and await _decoded(http, url, STREAMER) < LOAD_AFTER:
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        await _post(http, url, "/models/load", {"model": LOADED})
        window = (started, time.perf_counter())
    res = await task
    if not res.ok:
        raise BenchError(f"the streamer's answer failed: {res.error} {res.detail}")
    times = res.chunk_times[LOAD_AFTER:]
    if window is None:
        return (len(times) - 1) / (times[-1] - times[0]), (0.0, 0)
    start, end = window
    inside = [t for t in times if start <= t <= end]
    span = min(end, times[-1]) - start
    if len(inside) < 2 or span <= 0:
        log.warning("only %d tokens arrived during the %.2f s load; use more --tokens", len(inside), end - start)
        return float("nan"), (end - start, len(inside))
    return len(inside) / span, (end - start, len(inside))


async def _decoded(http: Any, url: str, model: str) -> int:
    """Tokens decoded so far by ``model``'s running request, from ``GET /slots``."""
    slots = (await http.get(f"{url}/slots", params={"model": model})).json()
    return max((s["next_token"][0]["n_decoded"] for s in slots if s["is_processing"]), default=0)


# --- report --------------------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else None


def _f(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def table(r: OnDemandResult) -> str:
    ratio = r.decode_ratio
    freed = r.rss_two_mb - r.rss_after_unload_mb
    lines = [
        f"edgellm bench ondemand: streamer {Path(r.streamer).name}, loaded {Path(r.loaded).name}; {r.rounds} rounds, "
        f"{r.tokens} tokens, n_ctx {r.n_ctx}, threads {r.threads or 'default'}; load average "
        f"{' / '.join(f'{x:.2f}' for x in r.load_average)} (1/5/15 min at start, then at end)",
        "",
        *markdown_table(
            ["figure", "median", "all rounds"],
            "lrl",
            [
                ["time to first token, model not loaded (s)", _f(_median(r.cold_ttft_s), ".2f"),
                 ", ".join(f"{x:.2f}" for x in r.cold_ttft_s)],
                ["time to first token, model loaded (s)", _f(_median(r.warm_ttft_s), ".3f"),
                 ", ".join(f"{x:.3f}" for x in r.warm_ttft_s)],
                ["load of the other model beside the stream (s)", _f(_median(r.load_s), ".2f"),
                 ", ".join(f"{x:.2f}" for x in r.load_s)],
                ["streamer decode alone (tok/s)", _f(_median(r.alone_tps), ".1f"),
                 ", ".join(f"{x:.1f}" for x in r.alone_tps)],
                ["streamer decode while the other loads (tok/s)", _f(_median(r.during_load_tps), ".1f"),
                 f"{', '.join(f'{x:.1f}' for x in r.during_load_tps)} "
                 f"({', '.join(map(str, r.tokens_during_load))} tokens)"],
                ["ratio during load / alone", _f(ratio, ".2f"), None],
            ],
        ),
        "",
        *markdown_table(
            ["server RSS", "MB"],
            "lr",
            [
                ["streamer alone loaded", f"{r.rss_one_mb:.1f}"],
                ["both loaded", f"{r.rss_two_mb:.1f}"],
                ["after keep_alive 0 unloaded the second", f"{r.rss_after_unload_mb:.1f}"],
                ["freed by the unload", f"{freed:.1f} (estimate of the model: {r.estimate_mb:.1f})"],
            ],
        ),
    ]
    return "\n".join(lines)


def chart(r: OnDemandResult, path: Path) -> None:
    """Three panels: time to first token cold and warm, decode tok/s alone and during a load, RSS by stage."""
    fig, axes = subplots(1, 3, figsize=(15, 4))
    panels: tuple[tuple[list[str], list[float | None], str], ...] = (
        (["not loaded", "loaded"], [_median(r.cold_ttft_s), _median(r.warm_ttft_s)], "time to first token, s"),
        (["alone", "beside a load"], [_median(r.alone_tps), _median(r.during_load_tps)], "streamer decode, tok/s"),
        (["one model", "two models", "after keep_alive 0"], [r.rss_one_mb, r.rss_two_mb, r.rss_after_unload_mb],
         "server RSS, MB"),
    )
    for ax, (labels, values, title) in zip(axes, panels, strict=True):
        heights = [v or 0.0 for v in values]
        bars = ax.bar(labels, heights, color=["tab:blue", "tab:orange", "tab:green"][: len(labels)])
        ax.bar_label(bars, fmt="%.2f" if max(heights, default=0) < 10 else "%.0f")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"edgellm bench ondemand ({r.rounds} rounds; decode ratio during a load "
                 f"{_f(r.decode_ratio, '.2f')})")
    fig.tight_layout()
    save_png(fig, path)


def save(result: OnDemandResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.files = {"json": str(out / "ondemand.json"), "table": str(out / "ondemand.md"),
                    "chart": str(out / "ondemand.png")}
    data = {**asdict(result), "decode_ratio": result.decode_ratio}
    atomic_write_text(Path(result.files["json"]), json.dumps(data, indent=2) + "\n")
    atomic_write_text(Path(result.files["table"]), table(result) + "\n")
    chart(result, Path(result.files["chart"]))


def add_arguments(p: Any) -> None:
    """``edgellm bench ondemand``'s flags (bench/cli.py registers the subcommand)."""
    p.add_argument("--streamer", type=Path, default=DEFAULT_STREAMER, help="the GGUF that streams (default: SmolLM2)")
    p.add_argument("--loaded", type=Path, default=None,
                   help="the GGUF loaded on demand (default: models/gemma-3-270m-q4_k_m.gguf, else the streamer again)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each measurement (default: 3)")
    p.add_argument("--tokens", type=int, default=256, help="tokens of the streamed answer (default: 256)")
    p.add_argument("--n-ctx", type=int, default=512, help="context per model (default: 512)")
    p.add_argument("--threads", type=int, default=None, help="decoding threads per model (default: physical cores)")
    p.add_argument("--out", type=Path, default=None, help="folder for ondemand.json, ondemand.md and ondemand.png")
    p.set_defaults(func=main)


def main(args: Any) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result = bench_ondemand(streamer=args.streamer, loaded=args.loaded, rounds=args.rounds, tokens=args.tokens,
                            n_ctx=args.n_ctx, threads=args.threads, out=args.out)
    print(table(result))
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    return 0


__all__ = ["OnDemandResult", "add_arguments", "bench_ondemand", "table"]
