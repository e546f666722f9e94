"""GET /metrics: what the server has done, in the Prometheus text format.

llama-server's counters and gauges under its names where the meaning is the same (``llamacpp:prompt_tokens_total``,
``llamacpp:tokens_predicted_total``, ``llamacpp:requests_processing``, ``llamacpp:requests_deferred``, ...), each
with a ``model`` label (llama-server serves one model per process), plus the histograms a dashboard needs under
``edgellm:``: time to first token, the gap between streamed deltas, request duration and queue wait per model, and
rerank / embedding request latency.

One ``Metrics`` per app (no process-wide registry): the routes record into it on the event loop, and ``render``
asks the engine for its live state (slots, waiting requests, decode calls) at scrape time. Further gauges come from
``sources`` the lifespan adds (each a function yielding metric families at scrape time): ``pool_families`` (each
loaded model's estimated memory, its decoding threads and open slots, the memory budget) and the throttle's.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgellm.serve.engine.base import (
    Engine,
    EngineStats,
    Event,
    Finished,
    Generation,
    TextDelta,
    ToolCallDelta,
)
from edgellm.serve.engine.pool import ModelPool

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Small models on small machines: TTFT from tens of ms (a cached prefix) to tens of s (a long prompt in
# a full queue); deltas from a few ms to a second.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DELTA_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Histogram:
    """Cumulative buckets, a sum and a count (observed on the event loop only)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, float(total)))
        return out


@dataclass
class ModelMetrics:
    """One served model's counters (llama-server's meanings) and latency histograms."""

    prompt_tokens: int = 0  # processed, not reused from a cached prefix
    prompt_tokens_cached: int = 0
    prompt_seconds: float = 0.0
    tokens_predicted: int = 0
    tokens_predicted_seconds: float = 0.0
    n_tokens_max: int = 0  # the longest sequence seen (prompt + generation)
    in_flight: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # by finish_reason; "error" and "cancelled" too
    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    delta_gap: Histogram = field(default_factory=lambda: Histogram(DELTA_BUCKETS))
    duration: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    queue_wait: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))


class Metrics:
    """Everything ``/metrics`` reports for one app."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.models: dict[str, ModelMetrics] = {}
        self.http: dict[tuple[str, int], int] = {}  # (route, status) -> requests
        self.retrieval: dict[str, Histogram] = {}  # "rerank" / "embeddings" -> request latency
        self.retrieval_items: dict[str, int] = {}  # documents reranked / inputs embedded
        self.started = time.time()
        self.sources: dict[str, Callable[[], Iterable[Metric]]] = {}  # more families, read at scrape time

    def model(self, name: str) -> ModelMetrics:
        m = self.models.get(name)
        if m is None:
            m = self.models[name] = ModelMetrics()
        return m

    def now(self) -> float:
        return self._clock()

    # -- recording -------------------------------------------------------------------------------------------------
    def observe_generation(self, model: str, generation: Generation, started: float) -> Generation:
        """``generation`` as it was, recording its latency and token counts as its events are read. ``started``:
        when the request arrived (``now()``), so that time to first token includes queueing and tokenization."""
        return _Observed(self, self.model(model), generation, started)

    def observe_http(self, route: str, status: int) -> None:
        key = (route, status)
        self.http[key] = self.http.get(key, 0) + 1

    def observe_retrieval(self, kind: str, seconds: float, items: int) -> None:
        hist = self.retrieval.get(kind)
        if hist is None:
            hist = self.retrieval[kind] = Histogram(LATENCY_BUCKETS)
        hist.observe(seconds)
        self.retrieval_items[kind] = self.retrieval_items.get(kind, 0) + items

    # -- exposition ------------------------------------------------------------------------------------------------
    def render(self, snapshots: Iterable[EngineStats] = (), models_loaded: int | None = None) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, list(snapshots), models_loaded))
        return generate_latest(registry)


class HTTPMetricsMiddleware:
    """Counts HTTP responses by route and status (pure ASGI: streamed bodies pass untouched). A path that is not
    one of the app's routes counts as ``other``, so that probes of random URLs cannot grow the label set."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: Iterable[str]) -> None:
        self.app, self.metrics, self.paths = app, metrics, frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.paths else "other"
        status = 500  # if the app fails before it answers, the server sends a 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.observe_http(route, status)


class _Observed:
    """A ``Generation`` that reports to ``ModelMetrics`` while it is read (see ``Metrics.observe_generation``)."""

    def __init__(self, metrics: Metrics, m: ModelMetrics, inner: Generation, started: float) -> None:
        self._metrics, self._m, self._inner, self._started = metrics, m, inner, started
        self.prompt_tokens = inner.prompt_tokens
        self._done = False
        m.in_flight += 1

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        m, now = self._m, self._metrics.now
        first: float | None = None
        last = self._started
        outcome = "cancelled"
        try:
            async for event in self._inner:
                t = now()
                if isinstance(event, TextDelta | ToolCallDelta):
                    if first is None:
                        first = t
                        m.ttft.observe(t - self._started)
                    else:
                        m.delta_gap.observe(t - last)
                    last = t
                elif isinstance(event, Finished):
                    outcome = event.finish_reason
                    self._record_finished(event, t, first)
                yield event
        except Exception:
            outcome = "error"
            raise
        finally:
            self._end(outcome)

    def _record_finished(self, event: Finished, t: float, first: float | None) -> None:
        m = self._m
        timings = event.timings
        if timings is not None:
            m.prompt_tokens += timings.prompt_n
            m.prompt_tokens_cached += timings.cache_n
            m.prompt_seconds += timings.prompt_ms / 1000
            m.tokens_predicted += timings.predicted_n
            m.tokens_predicted_seconds += timings.predicted_ms / 1000
            m.n_tokens_max = max(m.n_tokens_max, timings.cache_n + timings.prompt_n + timings.predicted_n)
            if first is not None:  # before the first token: waiting for a slot, then the prompt, then one decode
                m.queue_wait.observe(max(0.0, first - self._started - timings.prompt_ms / 1000))
        m.duration.observe(t - self._started)

    def _end(self, outcome: str) -> None:
        if self._done:
            return
        self._done = True
        self._m.in_flight -= 1
        self._m.finished[outcome] = self._m.finished.get(outcome, 0) + 1

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._end("cancelled")


class _Collector:
    """Builds the metric families from ``Metrics`` and the engine's snapshots at scrape time."""

    def __init__(self, metrics: Metrics, snapshots: list[EngineStats], models_loaded: int | None) -> None:
        self.metrics, self.snapshots, self.models_loaded = metrics, snapshots, models_loaded

    def collect(self) -> Iterable[Metric]:
        yield from self._llamacpp()
        yield from self._latency()
        yield from self._engine()
        yield from self._server()
        for source in list(self.metrics.sources.values()):
            yield from source()

    def _llamacpp(self) -> Iterable[Metric]:
        models = self.metrics.models
        counters = [
            ("prompt_tokens", "Number of prompt tokens processed, excluding cached tokens", lambda m: m.prompt_tokens),
            ("prompt_tokens_cached", "Number of prompt tokens reused from the cache", lambda m: m.prompt_tokens_cached),
            ("prompt_seconds", "Total time spent processing prompts", lambda m: m.prompt_seconds),
            ("tokens_predicted", "Number of generation tokens processed", lambda m: m.tokens_predicted),
            ("tokens_predicted_seconds", "Total time spent generating tokens", lambda m: m.tokens_predicted_seconds),
        ]
        for name, doc, value in counters:
            family = CounterMetricFamily(f"llamacpp:{name}", doc, labels=["model"])
            for model, m in sorted(models.items()):
                family.add_metric([model], float(value(m)))
            yield family
        # llama-server declares this one a counter although it is a high watermark; so do we, for its dashboards
        family = CounterMetricFamily("llamacpp:n_tokens_max", "Largest observed sequence length (prompt + generation)",
                                     labels=["model"])
        for model, m in sorted(models.items()):
            family.add_metric([model], float(m.n_tokens_max))
        yield family
        gauges = [
            ("prompt_tokens_seconds", "Average prompt throughput in tokens/s since start",
             lambda m: m.prompt_tokens / m.prompt_seconds if m.prompt_seconds else 0.0),
            ("predicted_tokens_seconds", "Average generation throughput in tokens/s since start",
             lambda m: m.tokens_predicted / m.tokens_predicted_seconds if m.tokens_predicted_seconds else 0.0),
        ]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(f"llamacpp:{name}", doc, labels=["model"])
            for model, m in sorted(models.items()):
                g.add_metric([model], float(value(m)))
            yield g
        by_model = {s.model: s for s in self.snapshots}
        processing = GaugeMetricFamily("llamacpp:requests_processing", "Number of requests processing", labels=["model"])
        deferred = GaugeMetricFamily("llamacpp:requests_deferred", "Number of requests deferred", labels=["model"])
        for model in sorted(set(models) | set(by_model)):
            snap = by_model.get(model)
            counted = models.get(model)
            in_flight = counted.in_flight if counted is not None else 0
            if snap is not None and snap.slots_busy is not None:
                processing.add_metric([model], float(snap.slots_busy))
                deferred.add_metric([model], float(snap.waiting or 0))
            else:  # an engine without a slot table: every request being read is processing
                processing.add_metric([model], float(in_flight))
                deferred.add_metric([model], 0.0)
        yield processing
        yield deferred
        decode = CounterMetricFamily("llamacpp:n_decode", "Total number of llama_decode() calls", labels=["model"])
        busy = GaugeMetricFamily("llamacpp:n_busy_slots_per_decode",
                                 "Average number of busy slots per llama_decode() call", labels=["model"])
        for snap in self.snapshots:
            if snap.n_decode is not None:
                decode.add_metric([snap.model], float(snap.n_decode))
            if snap.busy_slots_per_decode is not None:
                busy.add_metric([snap.model], snap.busy_slots_per_decode)
        yield decode
        yield busy
        drafted = CounterMetricFamily("llamacpp:n_draft_tokens", "Draft tokens verified (speculative decoding)",
                                      labels=["model"])
        accepted = CounterMetricFamily("llamacpp:n_draft_tokens_accepted", "Draft tokens accepted", labels=["model"])
        for snap in self.snapshots:
            if snap.draft_n is not None:
                drafted.add_metric([snap.model], float(snap.draft_n))
                accepted.add_metric([snap.model], float(snap.draft_n_accepted or 0))
        yield drafted
        yield accepted

    def _latency(self) -> Iterable[Metric]:
        models = self.metrics.models
        histograms = [
            ("time_to_first_token_seconds", "Request arrival to the first streamed token", lambda m: m.ttft),
            ("inter_token_latency_seconds", "Gap between consecutive streamed deltas", lambda m: m.delta_gap),
            ("request_duration_seconds", "Request arrival to its last token", lambda m: m.duration),
            ("queue_wait_seconds", "Time to first token minus prompt processing: waiting for a slot",
             lambda m: m.queue_wait),
        ]
        for name, doc, pick in histograms:
            family = HistogramMetricFamily(f"edgellm:{name}", doc, labels=["model"])
            for model, m in sorted(models.items()):
                h = pick(m)
                family.add_metric([model], h.cumulative(), sum_value=h.sum)
            yield family
        finished = CounterMetricFamily("edgellm:requests_finished", "Generations by how they ended (finish_reason, "
                                       "error, cancelled)", labels=["model", "reason"])
        for model, m in sorted(models.items()):
            for reason, n in sorted(m.finished.items()):
                finished.add_metric([model, reason], float(n))
        yield finished
        retrieval = HistogramMetricFamily("edgellm:retrieval_request_seconds", "Rerank and embedding request latency",
                                          labels=["endpoint"])
        items = CounterMetricFamily("edgellm:retrieval_items", "Documents reranked and inputs embedded",
                                    labels=["endpoint"])
        for kind, h in sorted(self.metrics.retrieval.items()):
            retrieval.add_metric([kind], h.cumulative(), sum_value=h.sum)
            items.add_metric([kind], float(self.metrics.retrieval_items.get(kind, 0)))
        yield retrieval
        yield items

    def _engine(self) -> Iterable[Metric]:
        slots = GaugeMetricFamily("edgellm:slots", "Slots per model, by state", labels=["model", "state"])
        kv = GaugeMetricFamily("edgellm:kv_cache_tokens", "Tokens held in the KV cache", labels=["model"])
        kv_ratio = GaugeMetricFamily("edgellm:kv_cache_usage_ratio", "KV cache use (tokens held / capacity)",
                                     labels=["model"])
        for s in self.snapshots:
            if s.slots_total is not None and s.slots_busy is not None:
                slots.add_metric([s.model, "busy"], float(s.slots_busy))
                slots.add_metric([s.model, "idle"], float(s.slots_total - s.slots_busy))
            if s.kv_tokens is not None:
                kv.add_metric([s.model], float(s.kv_tokens))
                if s.kv_capacity:
                    kv_ratio.add_metric([s.model], s.kv_tokens / s.kv_capacity)
        yield slots
        yield kv
        yield kv_ratio

    def _server(self) -> Iterable[Metric]:
        http = CounterMetricFamily("edgellm:http_requests", "HTTP requests by route and status",
                                   labels=["route", "status"])
        for (route, status), n in sorted(self.metrics.http.items()):
            http.add_metric([route, str(status)], float(n))
        yield http
        if self.models_loaded is not None:
            yield GaugeMetricFamily("edgellm:models_loaded", "Models loaded and serving", value=self.models_loaded)
        yield GaugeMetricFamily("edgellm:start_time_seconds", "Server start, Unix time", value=self.metrics.started)


def pool_families(engine: Engine | None) -> Iterable[Metric]:
    """Per loaded model: its estimated memory (file + KV cache), its decoding threads and the slots open to new
    requests (lower while throttled); the memory budget when one is set."""
    memory = GaugeMetricFamily("edgellm:model_memory_bytes", "Estimated RAM of a loaded model (GGUF file + KV cache)",
                               labels=["model"])
    threads = GaugeMetricFamily("edgellm:decode_threads", "Threads a model decodes with now", labels=["model"])
    slots = GaugeMetricFamily("edgellm:slots_open", "Slots new requests may fill now (fewer while throttled)",
                              labels=["model"])
    if isinstance(engine, ModelPool):
        loaded = engine.loaded_memory()
        for name, size in sorted(loaded.items()):
            memory.add_metric([name], float(size))
        yield memory
        if engine.memory_budget is not None:
            yield GaugeMetricFamily("edgellm:memory_budget_bytes", "memory_budget: RAM the models may take together",
                                    value=float(engine.memory_budget))
            yield GaugeMetricFamily("edgellm:models_memory_bytes", "Estimated RAM of every loaded model",
                                    value=float(sum(loaded.values())))
        for worker in engine.loaded_workers():
            limits = getattr(worker, "limits", None)
            if limits is not None:
                threads.add_metric([worker.spec.name], float(limits[0]))
                slots.add_metric([worker.spec.name], float(limits[1]))
    yield threads
    yield slots


__all__ = ["CONTENT_TYPE", "HTTPMetricsMiddleware", "Histogram", "Metrics", "ModelMetrics", "pool_families"]
