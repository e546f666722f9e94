"""`edgellm bench personas`: what serving personas as LoRA adapters on one base costs, against merged models.

Setup -> measure -> summarize -> save. With ``N`` GGUF LoRA adapters (``--adapters``, or every adapter of an
``adapters.json`` folder), each configuration is a real ``edgellm serve`` on a loopback port (``N`` slots), sent
``N`` concurrent greedy streams of ``max_tokens`` tokens (end of text banned, so that every stream runs as long as
the others) for ``rounds`` rounds:

- ``base``: every stream on the base model (no adapter): the reference;
- ``1 persona``: every stream on one persona (one adapter set: one batch per step, as the base);
- ``N personas``: one stream per persona, all on one base in memory (one batch per adapter set and step);
- ``N merged``: one stream per model, ``N`` separate GGUF files of the base's size. A merged persona GGUF has the
  base's exact tensors, shapes and quantization (only the values differ), so ``N`` copies of the base file cost what
  ``N`` merged files cost, in memory and in speed; the copies are made in a temporary folder.

Each configuration reports aggregate tok/s (completion tokens of all streams over the round's wall time, median of
the rounds) and the server's resident memory after the rounds. A Markdown table, ``personas.json`` and
``personas.png``. The machine is usually shared: read the ratios, and say what the load was (recorded).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgellm.bench.charts import save_png, subplots
from edgellm.bench.client import chat_body, stream_chat
from edgellm.bench.errors import BenchError
from edgellm.bench.servers import rss_mb, server_env, server_pid
from edgellm.bench.tables import markdown_table
from edgellm.fsutil import atomic_write_text
from edgellm.launch import running_server
from edgellm.manifest import load_adapter_manifest

log = logging.getLogger(__name__)

DEFAULT_BASE = Path("models/SmolLM2-135M-Instruct.Q4_1.gguf")
NO_END = {"0": -100, "2": -100}  # SmolLM2's end-of-text ids: every stream runs to max_tokens, as long as the others
PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Describe, in detail, how bread is made.",
    "Explain the water cycle to a child, at length.",
    "Write a long letter to a friend about a trip to the mountains.",
]


@dataclass
class ConfigResult:
    name: str
    streams: list[str]  # the model name each stream asked for
    tok_s: list[float] = field(default_factory=list)  # per round
    rss_mb: float = 0.0
    errors: int = 0

    @property
    def tok_s_median(self) -> float:
        return statistics.median(self.tok_s) if self.tok_s else 0.0


@dataclass
class PersonasResult:
    base: str
    adapters: list[str]
    adapter_mb: float  # all adapter files together
    base_mb: float
    rounds: int
    max_tokens: int
    threads: int
    configs: list[ConfigResult] = field(default_factory=list)
    load_average: list[float] = field(default_factory=list)  # before and after (1, 5, 15 min)
    files: dict[str, str] = field(default_factory=dict)


def adapters_from(paths: list[Path]) -> list[Path]:
    """The adapter files: GGUF files as given, or every adapter of an ``adapters.json`` folder."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            manifest = load_adapter_manifest(p)
            manifest.check_files()
            out += [a.absolute_path for a in manifest.adapters]
        elif p.is_file():
            out.append(p)
        else:
            raise BenchError(f"{p}: no such adapter file or adapters folder")
    if len(out) < 2:
        raise BenchError(f"need at least 2 adapters to compare personas, got {len(out)}")
    return out


def bench_personas(
    base: Path, adapters: list[Path], rounds: int = 3, max_tokens: int = 128, threads: int = 2, n_ctx: int = 512,
    out: Path | None = None,
) -> PersonasResult:
    if not base.is_file():
        raise BenchError(f"{base} does not exist; run `edgellm models pull default` or pass --base")
    if rounds < 1 or max_tokens < 8:
        raise BenchError(f"need at least 1 round and 8 tokens, got {rounds} and {max_tokens}")
    n = len(adapters)
    result = PersonasResult(
        base=str(base), adapters=[str(a) for a in adapters], adapter_mb=sum(a.stat().st_size for a in adapters) / 1e6,
        base_mb=base.stat().st_size / 1e6, rounds=rounds, max_tokens=max_tokens, threads=threads,
        load_average=list(os.getloadavg()),
    )
    personas = [f"p{i}" for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-personas-") as tmp:
        folder = Path(tmp)
        common = {"slots": n, "reranker": None, "embedder": None, "log_level": "warning"}
        model = {"n_ctx": n_ctx, "n_threads": threads}
        with_personas = {
            **common,
            "models": [{"name": "base", "path": str(base.absolute()), **model}],
            "personas": [{"name": p, "base": "base", "adapters": [{"path": str(a.absolute())}]}
                         for p, a in zip(personas, adapters, strict=True)],
        }
        copies: list[dict[str, Any]] = []
        for i in range(n):  # N files of the base's size: what N merged GGUFs cost
            copy = folder / f"merged{i}.gguf"
            shutil.copyfile(base, copy)
            copies.append({"name": f"merged{i}", "path": str(copy), **model})
        configs: list[tuple[str, dict[str, Any], list[str]]] = [
            ("base", with_personas, ["base"] * n),
            ("1 persona", with_personas, [personas[0]] * n),
            (f"{n} personas", with_personas, personas),
            (f"{n} merged", {**common, "models": copies}, [str(c["name"]) for c in copies]),
        ]
        for name, settings, streams in configs:
            log.info("bench personas: %s (%d streams)", name, n)
            result.configs.append(_run_config(folder, name, settings, streams, rounds, max_tokens))
    result.load_average += list(os.getloadavg())
    if out is not None:
        save(result, out)
    return result


def _run_config(
    folder: Path, name: str, settings: dict[str, Any], streams: list[str], rounds: int, max_tokens: int
) -> ConfigResult:
    import yaml

    path = folder / f"{name.replace(' ', '-')}.yaml"
    path.write_text(yaml.safe_dump(settings))
    r = ConfigResult(name=name, streams=streams)
    with running_server("--config", str(path), env=server_env(), timeout=300) as url:
        pid = server_pid(url)
        asyncio.run(_round(url, streams, 8))  # warm: every model and adapter set has decoded
        for _ in range(rounds):
            tok_s, errors = asyncio.run(_round(url, streams, max_tokens))
            r.tok_s.append(tok_s)
            r.errors += errors
        r.rss_mb = rss_mb(pid)
    return r


async def _round(url: str, streams: list[str], max_tokens: int) -> tuple[float, int]:
    """One round: a greedy stream per entry, all at once; aggregate tok/s and the number of failed streams."""
    import httpx

    async with httpx.AsyncClient(timeout=600) as http:
        bodies = [
            {**chat_body(model, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens, 0.0),
             "logit_bias": NO_END}
            for i, model in enumerate(streams)
        ]
        results = await asyncio.gather(*(stream_chat(http, url, body) for body in bodies))
    ok = [s for s in results if s.ok]
    if not ok:
        raise BenchError(f"every stream failed: {results[0].error} {results[0].detail}")
    wall = max(s.end for s in ok) - min(s.start for s in ok)
    return sum(s.completion_tokens for s in ok) / wall, len(results) - len(ok)


def table(r: PersonasResult) -> str:
    base = next((c for c in r.configs if c.name == "base"), None)
    lines = [
        f"base {Path(r.base).name} ({r.base_mb:.0f} MB), {len(r.adapters)} adapters ({r.adapter_mb:.1f} MB in all), "
        f"{r.threads} threads, {r.max_tokens} tokens per stream, median of {r.rounds} rounds; load average "
        f"{r.load_average[0]:.2f} before, {r.load_average[3]:.2f} after",
        "",
    ]
    rows = []
    for c in r.configs:
        ratio = c.tok_s_median / base.tok_s_median if base and base.tok_s_median else float("nan")
        rows.append([c.name, ", ".join(c.streams), f"{c.tok_s_median:.1f}", f"{ratio:.2f}x", f"{c.rss_mb:.0f}",
                     str(c.errors)])
    lines += markdown_table(
        ["configuration", "streams", "aggregate tok/s", "vs base", "server RSS MB", "failed streams"], "llrrrr", rows
    )
    return "\n".join(lines)


def chart(r: PersonasResult, path: Path) -> None:
    fig, axes = subplots(1, 2, figsize=(10, 4))
    names = [c.name for c in r.configs]
    for ax, values, title in ((axes[0], [c.tok_s_median for c in r.configs], "aggregate tok/s"),
                              (axes[1], [c.rss_mb for c in r.configs], "server RSS (MB)")):
        bars = ax.bar(names, values, color=["tab:gray", "tab:blue", "tab:green", "tab:orange"][: len(names)])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"edgellm bench personas: {len(r.adapters)} streams, LoRA on one base vs merged GGUFs")
    fig.tight_layout()
    save_png(fig, path)


def save(result: PersonasResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.files = {"json": str(out / "personas.json"), "table": str(out / "personas.md"),
                    "chart": str(out / "personas.png")}
    data = {**asdict(result), "tok_s_median": {c.name: c.tok_s_median for c in result.configs}}
    atomic_write_text(Path(result.files["json"]), json.dumps(data, indent=2) + "\n")
    atomic_write_text(Path(result.files["table"]), table(result) + "\n")
    chart(result, Path(result.files["chart"]))


def add_arguments(p: Any) -> None:
    """``edgellm bench personas``'s flags (bench/cli.py registers the subcommand)."""
    p.add_argument("--adapters", type=Path, nargs="+", required=True,
                   help="GGUF LoRA files, or an adapters.json folder (`edgellm convert --lora`); one stream each")
    p.add_argument("--base", type=Path, default=DEFAULT_BASE, help="the base GGUF (default: SmolLM2 Q4_1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per configuration (default: 3)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per stream (default: 128)")
    p.add_argument("--threads", type=int, default=2, help="decoding threads (default: 2)")
    p.add_argument("--n-ctx", type=int, default=512, help="context per slot (default: 512)")
    p.add_argument("--out", type=Path, default=None, help="folder for personas.json, personas.md and personas.png")
    p.set_defaults(func=main)


def main(args: Any) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result = bench_personas(args.base, adapters_from(args.adapters), rounds=args.rounds, max_tokens=args.max_tokens,
                            threads=args.threads, n_ctx=args.n_ctx, out=args.out)
    print(table(result))
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    return 0


__all__ = ["PersonasResult", "add_arguments", "adapters_from", "bench_personas", "table"]
