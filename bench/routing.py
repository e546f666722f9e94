"""Routing accuracy on a labelled set: ``edgellm bench routing``.

    edgellm bench routing --config configs/train/personas.yaml [--data bench/data/routing.jsonl] [--out reports/routing]
    edgellm bench routing --config models/personas          # an adapters folder (adapters.json)
    edgellm bench routing --config configs/serve.yaml       # a serve config's personas and its first router

Each message of the set (``{"text", "persona", "kind"}`` lines; the shipped one is ``bench/data/routing.jsonl``) is
routed by each method the personas allow: ``keywords`` always; ``embeddings`` and ``hybrid`` when an embedder GGUF
is there (default: the packaged all-MiniLM-L6-v2, ``models/all-minilm-l6-v2-gguf/``; never downloaded here). For
each method: accuracy (overall and per ``kind``), the confusion table (rows: the label, columns: the choice), how
often the default answered for lack of a match, and the routing latency per message (p50 / p95, in ms; for
embeddings it includes embedding the message). The baseline is always answering with the default persona.

The personas' triggers and descriptions come from ``--config``: a train recipe (each dataset's ``persona:``
block), an adapters folder (the profiles `edgellm convert --lora` copied into adapters.json) or a serve YAML (its
``personas`` and first ``routers`` entry; only those keys are read, checked by the same contract models the server
uses). The default persona is ``--default``, else the serve config's router's, else the first persona.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgellm.bench.stats import percentile
from edgellm.bench.tables import markdown_table
from edgellm.config import read_yaml
from edgellm.errors import ConfigError
from edgellm.fsutil import atomic_write_text
from edgellm.manifest import ADAPTERS_NAME, PersonaProfile, load_adapter_manifest
from edgellm.paths import models_dir, resolve_input
from edgellm.routing import RouteMethod, RouteProfile, Router, TextEmbedder

log = logging.getLogger(__name__)

DEFAULT_DATA = "bench/data/routing.jsonl"
METHODS: tuple[RouteMethod, ...] = ("keywords", "embeddings", "hybrid")


@dataclass(frozen=True)
class Labelled:
    text: str
    persona: str
    kind: str = "clear"


@dataclass(frozen=True)
class RoutingSetup:
    """The personas a router chooses from, and its default."""

    profiles: tuple[RouteProfile, ...]
    default: str
    threshold: float | None = None  # a serve config router's own threshold (for its own method only)
    method: str | None = None
    source: str = ""


@dataclass
class MethodResult:
    method: str
    threshold: float
    n: int
    correct: int
    accuracy: float
    accuracy_by_kind: dict[str, float]
    fallbacks: int
    confusion: dict[str, dict[str, int]]  # label -> chosen -> count
    latency_ms_p50: float
    latency_ms_p95: float
    misrouted: list[dict[str, str]] = field(default_factory=list)


@dataclass
class RoutingBench:
    data: str
    config: str
    personas: list[str]
    default: str
    embedder: str | None
    created_at: str
    baseline_accuracy: float  # always the default persona
    methods: list[MethodResult]
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.method == name:
                return m
        raise KeyError(f"no {name!r} results; methods run: {[m.method for m in self.methods]}")


# ---------------------------------------------------------------------------------------------------------------------
# Setup: the labelled set, the personas, the embedder


def load_routing_set(path: Path) -> list[Labelled]:
    """The labelled messages of a JSONL file (``text``, ``persona``, optional ``kind``)."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append(Labelled(str(row["text"]), str(row["persona"]), str(row.get("kind", "clear"))))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}:{number}: expected a JSON object with 'text' and 'persona' ({e})") from None
    if not rows:
        raise ConfigError(f"{path}: no labelled messages")
    return rows


def routing_setup(config: Path, default: str | None = None) -> RoutingSetup:
    """The personas' routing profiles from a train recipe, an adapters folder or a serve YAML."""
    config = resolve_input(config)
    if config.is_dir() or config.name == ADAPTERS_NAME:
        return _from_adapters(config, default)
    data, _ = read_yaml(config)
    if "datasets" in data:
        return _from_recipe(config, default)
    return _from_serve_yaml(config, data, default)


def _from_adapters(folder: Path, default: str | None) -> RoutingSetup:
    manifest = load_adapter_manifest(folder)
    profiles = [_profile(a.name, a.persona) for a in manifest.adapters]
    return _setup(profiles, default, source=str(manifest.root / ADAPTERS_NAME))


def _from_recipe(path: Path, default: str | None) -> RoutingSetup:
    from edgellm.train.config import load_train_config

    recipe = load_train_config(path)
    profiles = [_profile(d.name, d.persona) for d in recipe.datasets if d.persona is not None]
    return _setup(profiles, default, source=str(path))


def _from_serve_yaml(path: Path, data: dict[str, Any], default: str | None) -> RoutingSetup:
    """A serve config's ``personas`` (name, triggers, description) and first ``routers`` entry."""
    entries = data.get("personas") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("name") for e in entries):
        raise ConfigError(f"{path}: personas: expected a list of mappings with a name")
    profiles = [_profile(str(e["name"]), PersonaProfile.model_validate(e)) for e in entries]
    router = (data.get("routers") or [{}])[0]
    if router.get("personas"):
        profiles = [p for p in profiles if p.name in router["personas"]]
    return _setup(
        profiles, default or router.get("default"), router.get("threshold"), router.get("method"), str(path)
    )


def _profile(name: str, persona: PersonaProfile | None) -> RouteProfile:
    if persona is None:
        return RouteProfile(name)
    return RouteProfile(name, tuple(persona.triggers), persona.description)


def _setup(
    profiles: list[RouteProfile],
    default: str | None,
    threshold: float | None = None,
    method: str | None = None,
    source: str = "",
) -> RoutingSetup:
    if not profiles:
        raise ConfigError(f"{source}: no personas with a profile to route to")
    return RoutingSetup(tuple(profiles), default or profiles[0].name, threshold, method, source)


def default_embedder() -> Path:
    """The packaged all-MiniLM-L6-v2 GGUF (`edgellm models pull embedder`)."""
    return models_dir() / "all-minilm-l6-v2-gguf" / "all-minilm-l6-v2-f16.gguf"


# ---------------------------------------------------------------------------------------------------------------------
# Measure


def measure(router: Router, rows: Sequence[Labelled], warmup: int = 3) -> MethodResult:
    """Route every message once (after ``warmup`` untimed ones); accuracy, confusion and latency."""
    router.warm()
    for row in rows[:warmup]:
        router.route(row.text)
    names = [p.name for p in router.profiles]
    confusion = {label: dict.fromkeys(names, 0) for label in names}
    latencies, correct, fallbacks = [], 0, 0
    by_kind: Counter[str] = Counter()
    right_by_kind: Counter[str] = Counter()
    misrouted = []
    for row in rows:
        start = time.perf_counter()
        decision = router.route(row.text)
        latencies.append((time.perf_counter() - start) * 1000)
        confusion.setdefault(row.persona, dict.fromkeys(names, 0))[decision.persona] += 1
        by_kind[row.kind] += 1
        fallbacks += decision.fallback
        if decision.persona == row.persona:
            correct += 1
            right_by_kind[row.kind] += 1
        else:
            misrouted.append({"text": row.text, "label": row.persona, "chosen": decision.persona,
                              "reason": decision.reason})
    return MethodResult(
        method=router.method,
        threshold=router.threshold,
        n=len(rows),
        correct=correct,
        accuracy=correct / len(rows),
        accuracy_by_kind={k: right_by_kind[k] / n for k, n in sorted(by_kind.items())},
        fallbacks=fallbacks,
        confusion=confusion,
        latency_ms_p50=percentile(latencies, 50),
        latency_ms_p95=percentile(latencies, 95),
        misrouted=misrouted,
    )


def bench_routing(
    config: Path,
    data: Path | None = None,
    embedder: Path | None = None,
    use_embedder: bool = True,
    default: str | None = None,
    threads: int = 1,
    out: Path | None = None,
) -> RoutingBench:
    """Route the labelled set with each method; ``out`` gets routing.json and routing.md."""
    setup = routing_setup(config, default)
    rows = load_routing_set(resolve_input(data or DEFAULT_DATA))
    names = {p.name for p in setup.profiles}
    unknown = sorted({r.persona for r in rows} - names)
    if unknown:
        raise ConfigError(f"the labelled set names personas {unknown} that {setup.source} does not have ({sorted(names)})")

    model = _open_embedder(embedder, use_embedder, threads)
    try:
        results = []
        for method in METHODS if model is not None else METHODS[:1]:
            threshold = setup.threshold if setup.method == method else None
            router = Router("bench", setup.profiles, setup.default, threshold, method, model)
            results.append(measure(router, rows))
            log.info("%s: accuracy %.3f", method, results[-1].accuracy)
    finally:
        if model is not None:
            model.close()

    result = RoutingBench(
        data=str(resolve_input(data or DEFAULT_DATA)),
        config=setup.source,
        personas=[p.name for p in setup.profiles],
        default=setup.default,
        embedder=str(embedder or default_embedder()) if model is not None else None,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        baseline_accuracy=sum(r.persona == setup.default for r in rows) / len(rows),
        methods=results,
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        result.files = {"json": str(out / "routing.json"), "table": str(out / "routing.md")}
        atomic_write_text(out / "routing.json", result.to_json())
        atomic_write_text(out / "routing.md", table(result))
    return result


class _ClosableEmbedder(TextEmbedder, Protocol):
    def close(self) -> None: ...


def _open_embedder(path: Path | None, use: bool, threads: int) -> _ClosableEmbedder | None:
    if not use:
        return None
    path = path or default_embedder()
    if not path.is_file():
        if path == default_embedder():
            log.warning("no embedder at %s (`edgellm models pull embedder`); keywords only", path)
            return None
        raise ConfigError(f"--embedder {path}: no such file")
    from edgellm.serve.engine import load_embedder

    model: _ClosableEmbedder = load_embedder(None, path, name=path.stem, threads=threads)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Report


def table(r: RoutingBench) -> str:
    kinds = list(r.methods[0].accuracy_by_kind)
    lines = [
        f"Routing {Path(r.data).name} ({r.methods[0].n} messages) to {', '.join(r.personas)} (default {r.default}; "
        f"always-default baseline {r.baseline_accuracy:.1%})",
        "",
        *markdown_table(
            ["method", "threshold", "accuracy", *kinds, "fallbacks", "p50 ms", "p95 ms"],
            "l" + "r" * (len(kinds) + 5),
            (
                [m.method, f"{m.threshold:g}", f"{m.accuracy:.1%} ({m.correct}/{m.n})",
                 *(f"{v:.0%}" for v in m.accuracy_by_kind.values()), str(m.fallbacks),
                 f"{m.latency_ms_p50:.3f}", f"{m.latency_ms_p95:.3f}"]
                for m in r.methods
            ),
            right="---:",
        ),
    ]  # fmt: skip
    for m in r.methods:
        names = list(next(iter(m.confusion.values())))
        lines += ["", f"{m.method}: label (rows) vs chosen (columns)", ""]
        lines += markdown_table(
            ["label", *names],
            "l" + "r" * len(names),
            ([label, *(str(row[n]) for n in names)] for label, row in m.confusion.items()),
            right="---:",
        )
    return "\n".join(lines) + "\n"
