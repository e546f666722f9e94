"""Decode speed with a JSON-schema grammar vs the same requests without one: ``edgellm bench grammar``.

    edgellm bench grammar [--streams 1,4] [--rounds 3] [--tokens 96] [--out reports/grammar]

The batched engine in this process, the default model. Three variants of the same chat requests (same prompts,
seeds and ``max_tokens``): ``none`` (no grammar), ``small`` (a 4-property schema) and ``large`` (a schema of about
60 properties with nested objects, arrays of objects and long enums, ~100 grammar rules, the kind on which
llama.cpp's grammar sampler is known to be slow). Each level of concurrency runs ``rounds`` rounds; in each round
the variants take turns in rotating order, so the machine's drift weighs on all alike.

Decode tok/s is the engine's own measure (``Finished.timings``: generated tokens after the first, over the time
after the first), so prompt processing and schema conversion are left out; their one-time cost is reported apart
(``first_submit_ms``: the first ``submit`` of each variant, which converts the schema and has llama.cpp parse the
grammar, against ``none``'s). The ratio is each grammar variant's tok/s over ``none``'s at the same level.
Writes ``grammar.json``, ``grammar.md`` and ``grammar.png`` with ``--out``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgellm.bench.charts import save_png, subplots
from edgellm.bench.tables import markdown_table
from edgellm.fsutil import atomic_write_text
from edgellm.serve.engine import (
    ChatMessage,
    Engine,
    Finished,
    GenerationRequest,
    ModelSpec,
    SamplingParams,
    build_engine,
)

log = logging.getLogger(__name__)

MODEL_NAME = "bench-model"
VARIANTS = ("none", "small", "large")
SUBJECTS = ["a lighthouse keeper", "a bakery", "a space probe", "a jazz club", "a glacier", "a market town"]

SMALL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "year": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "summary": {"type": "string"},
    },
    "required": ["name", "year", "tags", "summary"],
    "additionalProperties": False,
}


def large_schema() -> dict[str, Any]:
    """About 60 properties: scalars with bounds, 40-value enums, nested objects and arrays of objects."""
    colours = [f"colour-{i:02d}" for i in range(40)]
    person = {
        "type": "object",
        "properties": {
            "first": {"type": "string", "maxLength": 30},
            "last": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["owner", "staff", "visitor", "supplier", "inspector"]},
        },
        "required": ["first", "last", "age", "role"],
        "additionalProperties": False,
    }
    props: dict[str, Any] = {}
    for i in range(12):
        props[f"text_{i}"] = {"type": "string", "maxLength": 60}
        props[f"count_{i}"] = {"type": "integer", "minimum": 0, "maximum": 10_000}
        props[f"flag_{i}"] = {"type": "boolean"}
        props[f"colour_{i}"] = {"enum": colours}
    props["address"] = {
        "type": "object",
        "properties": {
            "street": {"type": "string"},
            "city": {"type": "string"},
            "zip": {"type": "string", "minLength": 4, "maxLength": 10},
            "country": {"enum": ["FR", "DE", "IT", "ES", "PT", "NL", "BE", "CH", "AT", "SE"]},
        },
        "required": ["street", "city", "zip", "country"],
        "additionalProperties": False,
    }
    props["people"] = {"type": "array", "items": {"$ref": "#/$defs/person"}, "minItems": 1, "maxItems": 8}
    props["notes"] = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    return {
        "$defs": {"person": person},
        "type": "object",
        "properties": props,
        "required": list(props)[:20] + ["address", "people"],
        "additionalProperties": False,
    }


@dataclass
class Cell:
    """One variant at one level: decode tok/s (mean of the requests' own), and what was generated."""

    variant: str
    streams: int
    decode_tps: float
    tokens: int
    requests: int
    ratio: float = 1.0  # decode_tps / none's at the same level


@dataclass
class GrammarSpeed:
    model: str
    threads: int
    n_tokens: int
    rounds: int
    first_submit_ms: dict[str, float]
    cells: list[Cell]
    created_at: str
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def schema_of(variant: str) -> dict[str, Any] | None:
    return {"none": None, "small": SMALL_SCHEMA, "large": large_schema()}[variant]


def request(variant: str, i: int, n_tokens: int) -> GenerationRequest:
    subject = SUBJECTS[i % len(SUBJECTS)]
    return GenerationRequest(
        model=MODEL_NAME,
        messages=(ChatMessage("user", f"Describe {subject} in detail, as JSON."),),
        params=SamplingParams(max_tokens=n_tokens, temperature=0.8, seed=i),
        json_schema=schema_of(variant),
    )


async def one(engine: Engine, req: GenerationRequest) -> Finished:
    gen = await engine.submit(req)
    finished: Finished | None = None
    async for ev in gen:
        if isinstance(ev, Finished):
            finished = ev
    await gen.aclose()
    assert finished is not None
    return finished


async def first_submits(engine: Engine) -> dict[str, float]:
    """Milliseconds of each variant's first ``submit`` (schema -> GBNF, llama.cpp's parse, tokenizing, queueing)."""
    ms: dict[str, float] = {}
    for v in VARIANTS:
        t0 = time.perf_counter()
        gen = await engine.submit(request(v, 0, 4))
        ms[v] = (time.perf_counter() - t0) * 1000
        async for _ in gen:
            pass
        await gen.aclose()
    return ms


async def measure(
    engine: Engine, streams: list[int], rounds: int, n_tokens: int
) -> tuple[dict[str, float], list[Cell]]:
    submit_ms = await first_submits(engine)  # also the warm-up
    cells: list[Cell] = []
    for n in streams:
        done: dict[str, list[Finished]] = {v: [] for v in VARIANTS}
        for r in range(rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                batch = [one(engine, request(v, r * n + k, n_tokens)) for k in range(n)]
                done[v] += await asyncio.gather(*batch)
        for v in VARIANTS:
            t = [f.timings for f in done[v] if f.timings.predicted_ms > 0]
            tps = statistics.mean(x.predicted_n / (x.predicted_ms / 1000) for x in t)
            cells.append(Cell(v, n, tps, sum(f.completion_tokens for f in done[v]), len(done[v])))
            log.info("%s, %d stream(s): %.1f decode tok/s", v, n, cells[-1].decode_tps)
    for c in cells:
        base = next(x for x in cells if x.streams == c.streams and x.variant == "none")
        c.ratio = c.decode_tps / base.decode_tps
    return submit_ms, cells


def compare_grammar_speed(
    model: Path,
    threads: int = 2,
    n_tokens: int = 96,
    rounds: int = 3,
    streams: list[int] | None = None,
    out: Path | None = None,
) -> GrammarSpeed:
    """Run the comparison (see the module docstring); with ``out``, write JSON, Markdown and a chart."""
    streams = streams or [1, 4]
    engine = build_engine(
        "batched", [ModelSpec(name=MODEL_NAME, path=model, n_ctx=1024, n_threads=threads)], slots=max(streams)
    )
    try:
        submit_ms, cells = asyncio.run(measure(engine, streams, rounds, n_tokens))
    finally:
        asyncio.run(engine.close())
    result = GrammarSpeed(
        model=str(model),
        threads=threads,
        n_tokens=n_tokens,
        rounds=rounds,
        first_submit_ms=submit_ms,
        cells=cells,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "grammar.json", result.to_json())
        atomic_write_text(out / "grammar.md", grammar_table(result))
        grammar_chart(result, out / "grammar.png")
        result.files = {"json": str(out / "grammar.json"), "table": str(out / "grammar.md"),
                        "chart": str(out / "grammar.png")}
    return result


def grammar_table(r: GrammarSpeed) -> str:
    lines = [
        f"Decode speed with a JSON-schema grammar ({Path(r.model).name}, {r.threads} threads, up to {r.n_tokens} "
        f"tokens, {r.rounds} rounds per level)",
        "",
        *markdown_table(
            ["streams", "grammar", "decode tok/s", "vs none", "tokens"],
            "rlrrr",
            ([str(c.streams), c.variant, f"{c.decode_tps:.1f}", f"{c.ratio:.2f}", str(c.tokens)] for c in r.cells),
        ),
        "",
    ]
    firsts = ", ".join(f"{v} {ms:.0f} ms" for v, ms in r.first_submit_ms.items())
    lines.append(f"First submit of each (schema -> grammar, llama.cpp's parse, tokenizing): {firsts}")
    return "\n".join(lines) + "\n"


def grammar_chart(r: GrammarSpeed, path: Path) -> None:
    """Decode tok/s per variant, grouped by level of concurrency, with each grammar's ratio to none on its bar."""
    fig, ax = subplots(figsize=(7, 4.2))
    levels = sorted({c.streams for c in r.cells})
    width = 0.8 / len(VARIANTS)
    for k, v in enumerate(VARIANTS):
        cells = [next(c for c in r.cells if c.streams == n and c.variant == v) for n in levels]
        xs = [i + (k - 1) * width for i in range(len(levels))]
        bars = ax.bar(xs, [c.decode_tps for c in cells], width, label=v)
        if v != "none":
            ax.bar_label(bars, [f"{c.ratio:.2f}x" for c in cells], fontsize=8)
    ax.set_xticks(range(len(levels)), [str(n) for n in levels])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("decode tokens/s per stream")
    ax.set_title(f"{Path(r.model).name}: JSON-schema grammar vs none")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(title="grammar")
    fig.tight_layout()
    save_png(fig, path, dpi=120)


__all__ = ["GrammarSpeed", "compare_grammar_speed", "grammar_chart", "grammar_table", "large_schema"]
