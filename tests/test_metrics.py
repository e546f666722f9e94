"""/metrics: the Prometheus exposition, read back with prometheus_client's own parser.

Unit level: ``Metrics`` fed a scripted generation (its clock is controlled), so every number can be checked exactly.
The real server's /metrics is tested at the end of this file, on the real model, with counts moving as requests
are served."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgellm.serve.engine.base import EngineStats, Event, Finished, TextDelta, Timings
from edgellm.serve.metrics import Histogram, Metrics
from tests.servers import running_server

MODEL = "smollm2-135m-instruct"


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed[(name, tuple(sorted(labels.items())))]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Scripted:
    """A generation whose events arrive at scripted clock times."""

    def __init__(self, clock: Clock, script: list[tuple[float, Event]]) -> None:
        self.clock, self.script = clock, script
        self.prompt_tokens = 7
        self.closed = False

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._run()

    async def _run(self) -> AsyncIterator[Event]:
        for t, event in self.script:
            self.clock.t = t
            yield event

    async def aclose(self) -> None:
        self.closed = True


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert h.count == 4 and h.sum == pytest.approx(3.65)


def test_a_generation_is_counted_with_llama_server_names() -> None:
    clock = Clock()
    metrics = Metrics(clock=clock)
    timings = Timings(prompt_n=5, prompt_ms=200.0, predicted_n=3, predicted_ms=60.0, cache_n=2)
    script: list[tuple[float, Event]] = [
        (100.5, TextDelta("a")),  # TTFT 0.5 s: 0.2 s of prompt, so 0.3 s waiting
        (100.52, TextDelta("b")),
        (100.56, TextDelta("c")),
        (100.56, Finished("stop", prompt_tokens=7, completion_tokens=3, timings=timings)),
    ]
    inner = Scripted(clock, script)

    async def read() -> list[Event]:
        generation = metrics.observe_generation(MODEL, inner, started=100.0)
        assert metrics.model(MODEL).in_flight == 1
        events = [e async for e in generation]
        await generation.aclose()
        return events

    assert len(asyncio.run(read())) == 4 and inner.closed
    parsed = samples(metrics.render([EngineStats(MODEL, slots_total=4, slots_busy=1, waiting=2, n_decode=9,
                                                    busy_slots_per_decode=1.5, kv_tokens=100, kv_capacity=400)],
                                   models_loaded=1))
    assert value(parsed, "llamacpp:prompt_tokens_total", model=MODEL) == 5
    assert value(parsed, "llamacpp:prompt_tokens_cached_total", model=MODEL) == 2
    assert value(parsed, "llamacpp:tokens_predicted_total", model=MODEL) == 3
    assert value(parsed, "llamacpp:prompt_seconds_total", model=MODEL) == pytest.approx(0.2)
    assert value(parsed, "llamacpp:predicted_tokens_seconds", model=MODEL) == pytest.approx(50.0)
    assert value(parsed, "llamacpp:n_tokens_max_total", model=MODEL) == 10
    assert value(parsed, "llamacpp:requests_processing", model=MODEL) == 1
    assert value(parsed, "llamacpp:requests_deferred", model=MODEL) == 2
    assert value(parsed, "llamacpp:n_decode_total", model=MODEL) == 9
    assert value(parsed, "edgellm:kv_cache_usage_ratio", model=MODEL) == 0.25
    assert value(parsed, "edgellm:slots", model=MODEL, state="idle") == 3
    assert value(parsed, "edgellm:time_to_first_token_seconds_count", model=MODEL) == 1
    assert value(parsed, "edgellm:time_to_first_token_seconds_sum", model=MODEL) == pytest.approx(0.5)
    assert value(parsed, "edgellm:time_to_first_token_seconds_bucket", model=MODEL, le="0.25") == 0
    assert value(parsed, "edgellm:time_to_first_token_seconds_bucket", model=MODEL, le="0.5") == 1
    assert value(parsed, "edgellm:inter_token_latency_seconds_count", model=MODEL) == 2
    assert value(parsed, "edgellm:queue_wait_seconds_sum", model=MODEL) == pytest.approx(0.3)
    assert value(parsed, "edgellm:request_duration_seconds_sum", model=MODEL) == pytest.approx(0.56)
    assert value(parsed, "edgellm:requests_finished_total", model=MODEL, reason="stop") == 1
    assert value(parsed, "edgellm:models_loaded") == 1
    assert metrics.model(MODEL).in_flight == 0


def test_a_cancelled_generation_is_not_counted_as_served() -> None:
    clock = Clock()
    metrics = Metrics(clock=clock)
    inner = Scripted(clock, [(100.1, TextDelta("a")), (100.2, TextDelta("b"))])

    async def read_one_and_leave() -> None:
        generation = metrics.observe_generation(MODEL, inner, started=100.0)
        async for _ in generation:
            break
        await generation.aclose()

    asyncio.run(read_one_and_leave())
    parsed = samples(metrics.render())
    assert value(parsed, "edgellm:requests_finished_total", model=MODEL, reason="cancelled") == 1
    assert value(parsed, "llamacpp:tokens_predicted_total", model=MODEL) == 0
    assert value(parsed, "llamacpp:requests_processing", model=MODEL) == 0


def test_retrieval_and_http_counters() -> None:
    metrics = Metrics()
    metrics.observe_retrieval("rerank", 0.03, items=8)
    metrics.observe_retrieval("rerank", 0.2, items=2)
    metrics.observe_http("/v1/rerank", 200)
    metrics.observe_http("/v1/rerank", 400)
    metrics.observe_http("/v1/rerank", 200)
    parsed = samples(metrics.render())
    assert value(parsed, "edgellm:retrieval_request_seconds_count", endpoint="rerank") == 2
    assert value(parsed, "edgellm:retrieval_items_total", endpoint="rerank") == 10
    assert value(parsed, "edgellm:http_requests_total", route="/v1/rerank", status="200") == 2
    assert value(parsed, "edgellm:http_requests_total", route="/v1/rerank", status="400") == 1


# -- the real server ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(default_gguf: Path) -> Iterator[str]:
    with running_server("--set", "models.0.n_ctx=1024", "--no-reranker") as url:
        yield url


def scrape(url: str, **kw: object) -> dict:
    r = httpx.get(f"{url}/metrics", timeout=30, **kw)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(r.content)


def test_counts_move_as_the_real_server_serves(server: str) -> None:
    before = scrape(server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0}
    answers = [httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120).json() for _ in range(2)]
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        list(r.iter_lines())
    embed = httpx.post(f"{server}/v1/embeddings", json={"input": ["one", "two", "three"]}, timeout=120)
    assert embed.status_code == 200, embed.text
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - before.get((name, tuple(sorted(labels.items()))), 0.0)

    predicted = sum(a["usage"]["completion_tokens"] for a in answers)
    assert moved("llamacpp:tokens_predicted_total", model=MODEL) >= predicted + 1
    prompt = moved("llamacpp:prompt_tokens_total", model=MODEL) + moved("llamacpp:prompt_tokens_cached_total", model=MODEL)
    assert prompt == 3 * answers[0]["usage"]["prompt_tokens"]
    assert moved("llamacpp:prompt_tokens_cached_total", model=MODEL) > 0, "the repeated prompt was reused"
    assert moved("edgellm:time_to_first_token_seconds_count", model=MODEL) == 3
    assert moved("edgellm:request_duration_seconds_count", model=MODEL) == 3
    assert moved("edgellm:retrieval_request_seconds_count", endpoint="embeddings") == 1
    assert moved("edgellm:retrieval_items_total", endpoint="embeddings") == 3
    assert moved("edgellm:http_requests_total", route="/v1/chat/completions", status="200") == 3
    assert value(after, "llamacpp:requests_processing", model=MODEL) == 0
    assert value(after, "llamacpp:requests_deferred", model=MODEL) == 0
    assert value(after, "edgellm:slots", model=MODEL, state="idle") == 4
    assert moved("llamacpp:n_decode_total", model=MODEL) >= predicted
    assert value(after, "edgellm:models_loaded") == 1


def test_metrics_need_the_api_key_when_one_is_set(default_gguf: Path) -> None:
    with running_server("--set", "models.0.n_ctx=512", "--no-reranker", "--no-embedder",
                        "--set", "api_key=sekret") as url:
        assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401
        scrape(url, headers={"Authorization": "Bearer sekret"})


def test_slots_show_progress_without_text(server: str) -> None:
    """/slots while a stream runs: one slot processing with its progress; the prompt's text is nowhere."""
    secret = "a-prompt-word-that-must-not-leak"
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell a long story about {secret}."}],
            "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        events = 0
        while events < 3:  # the role chunk, then two deltas: tokens have been decoded
            events += next(lines).startswith("data: {")
        during = httpx.get(f"{server}/slots", timeout=30)
    assert during.status_code == 200, during.text
    assert secret not in during.text
    slots = during.json()
    assert len(slots) == 4 and {s["model"] for s in slots} == {MODEL}
    busy = [s for s in slots if s["is_processing"]]
    assert len(busy) == 1 and busy[0]["n_prompt_tokens"] > 0
    progress = busy[0]["next_token"][0]
    assert progress["n_decoded"] >= 1 and progress["n_decoded"] + progress["n_remain"] <= 200
    assert httpx.get(f"{server}/slots", params={"model": MODEL}, timeout=30).json()[0]["n_ctx"] == 1024
    missing = httpx.get(f"{server}/slots", params={"model": "nope"}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_pool_gauges_report_the_estimates_and_the_budget() -> None:
    """``pool_families`` as a source of ``Metrics``: each loaded model's estimated memory and the budget (fake
    workers: the arithmetic only; the real server's figures are checked in tests/test_models_dir.py)."""
    from edgellm.serve.metrics import pool_families
    from tests.test_models_dir import fake_pool

    async def run() -> None:
        pool, _ = fake_pool({"a": 100, "b": 50}, budget_mb=400)
        await pool.load_model("a")
        await pool.load_model("b")
        metrics = Metrics()
        metrics.sources["models"] = lambda: pool_families(pool)
        parsed = samples(metrics.render())
        assert value(parsed, "edgellm:model_memory_bytes", model="a") == 100_000_000
        assert value(parsed, "edgellm:model_memory_bytes", model="b") == 50_000_000
        assert value(parsed, "edgellm:memory_budget_bytes") == 400_000_000
        assert value(parsed, "edgellm:models_memory_bytes") == 150_000_000
        await pool.close()

    asyncio.run(run())
