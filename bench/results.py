"""What each benchmark measured: plain dataclasses that the benchmarks fill, ``report.py`` renders and
``to_json`` records. Data only: this module imports nothing from the rest of bench/."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


# -- bench quant ----------------------------------------------------------------------------------------------------
@dataclass
class VariantResult:
    label: str
    quant: str
    path: str
    is_reference: bool
    size_bytes: int
    bits_per_weight: float
    n_params: int
    load_s: float
    rss_before_load_mib: float
    peak_rss_mib: float
    pp: dict[str, Any]
    tg: dict[str, Any]
    quality: dict[str, Any]
    desc: str = ""


@dataclass
class QuantReport:
    model: str
    source: str
    reference: str
    reference_is_float: bool
    threads: int
    reps: int
    n_prompt: int
    n_gen: int
    n_ctx: int
    n_chunks: int
    n_text_tokens: int
    text: str
    repack: bool
    created_at: str
    system: dict[str, Any]
    variants: list[VariantResult] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


# -- bench serve ----------------------------------------------------------------------------------------------------
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


# -- bench engines --------------------------------------------------------------------------------------------------
@dataclass
class Level:
    """One engine at one number of concurrent streams."""

    streams: int
    aggregate: float
    per_stream: float
    ttft_p50: float
    ttft_p95: float
    tokens: int


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
