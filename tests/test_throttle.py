"""Throttling on a laptop (serve/throttle.py): a fake reading of the machine (on battery, a busy CPU) drives the
throttle; the limits land on a REAL batched model (the default GGUF) and show in /metrics, first with the engine
in-process, then through a real uvicorn on a loopback port with the app's lifespan running the throttle task."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from edgellm.launch import free_port
from edgellm.serve.app import create_app
from edgellm.serve.engine.base import ChatMessage, Finished, GenerationRequest, SamplingParams
from edgellm.serve.engine.batched import BatchedEngine
from edgellm.serve.engine.specs import ModelSpec
from edgellm.serve.metrics import Metrics, pool_families
from edgellm.serve.settings import ServeSettings
from edgellm.serve.throttle import Reading, Throttle

MODEL = "smollm2-135m-instruct"


class FakeProbe:
    """The machine as a test says it is."""

    def __init__(self) -> None:
        self.reading = Reading(on_battery=False, others_cpu_percent=5.0)
        self.calls = 0

    def __call__(self) -> Reading:
        self.calls += 1
        return self.reading


def gauges(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_reasons_to_throttle() -> None:
    t = Throttle(Reading, lambda: [], on_battery=True, cpu_percent=60)
    assert t.why(Reading()) is None  # no battery, no CPU figure (psutil's first reading)
    assert t.why(Reading(on_battery=True)) == "on battery"
    assert t.why(Reading(on_battery=False, others_cpu_percent=59.0)) is None
    assert "61%" in (t.why(Reading(on_battery=False, others_cpu_percent=61.0)) or "")
    assert Throttle(Reading, lambda: [], on_battery=False).why(Reading(on_battery=True)) is None


def test_a_real_batched_model_is_throttled_and_restored(default_gguf: Path) -> None:
    async def answer(engine: BatchedEngine) -> None:
        request = GenerationRequest(model=MODEL, messages=(ChatMessage("user", "Hi"),),
                                    params=SamplingParams(max_tokens=3, temperature=0))
        events = [e async for e in await engine.submit(request)]
        assert isinstance(events[-1], Finished)

    async def run() -> None:
        engine = BatchedEngine([ModelSpec(name=MODEL, path=default_gguf, n_ctx=256, n_threads=2)], slots=2)
        try:
            probe = FakeProbe()
            throttle = Throttle(probe, engine.loaded_workers, threads=1, slots=1, cpu_percent=50)
            metrics = Metrics()
            metrics.sources["models"] = lambda: pool_families(engine)
            metrics.sources["throttle"] = throttle.families
            [model] = engine.loaded_workers()

            assert throttle.check() is False and model.limits == (2, 2)  # type: ignore[attr-defined]
            probe.reading = Reading(on_battery=True)
            assert throttle.check() is True
            await answer(engine)  # the thread count changes at the model's next step
            assert model.limits == (1, 1)  # type: ignore[attr-defined]
            parsed = gauges(metrics.render().decode())
            assert parsed[("edgellm:throttled", ())] == 1
            assert parsed[("edgellm:decode_threads", (("model", MODEL),))] == 1
            assert parsed[("edgellm:slots_open", (("model", MODEL),))] == 1
            assert parsed[("edgellm:on_battery", ())] == 1

            probe.reading = Reading(on_battery=False, others_cpu_percent=10.0)
            assert throttle.check() is False
            await answer(engine)
            assert model.limits == (2, 2)  # type: ignore[attr-defined]
            parsed = gauges(metrics.render().decode())
            assert parsed[("edgellm:throttled", ())] == 0
            assert parsed[("edgellm:decode_threads", (("model", MODEL),))] == 2

            probe.reading = Reading(on_battery=False, others_cpu_percent=90.0)  # the rest of the machine is busy
            assert throttle.check() is True and model.limits[1] == 1  # type: ignore[attr-defined]
            assert "90%" in (throttle.reason or "")
        finally:
            await engine.close()

    asyncio.run(run())


@contextmanager
def serving(app: object) -> Iterator[str]:
    """The app under a real uvicorn on a free loopback port, in a thread (so that the test holds its probe)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                pytest.fail("the server did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        server.should_exit = True
        thread.join(60)


def wait_for(url: str, name: str, value: float) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics once gauge ``name`` reads ``value`` (the throttle checks every 0.1 s)."""
    deadline = time.monotonic() + 30
    while True:
        parsed = gauges(httpx.get(f"{url}/metrics", timeout=30).text)
        if parsed.get((name, ())) == value or time.monotonic() > deadline:
            return parsed
        time.sleep(0.1)


def test_the_server_throttles_on_battery_and_shows_it_in_metrics(default_gguf: Path) -> None:
    settings = ServeSettings.model_validate({
        "models": [{"name": MODEL, "path": str(default_gguf), "n_ctx": 256, "n_threads": 2}],
        "slots": 2,
        "throttle": {"enabled": True, "interval": 0.1, "threads": 1, "slots": 1},
    })
    probe = FakeProbe()
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    with serving(create_app(settings, throttle_probe=probe)) as url:
        parsed = wait_for(url, "edgellm:throttled", 0)
        assert parsed[("edgellm:throttled", ())] == 0 and probe.calls > 0
        assert parsed[("edgellm:decode_threads", (("model", MODEL),))] == 2
        assert parsed[("edgellm:slots_open", (("model", MODEL),))] == 2

        probe.reading = Reading(on_battery=True)
        assert wait_for(url, "edgellm:throttled", 1)[("edgellm:throttled", ())] == 1
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120).status_code == 200
        parsed = gauges(httpx.get(f"{url}/metrics", timeout=30).text)
        assert parsed[("edgellm:decode_threads", (("model", MODEL),))] == 1
        assert parsed[("edgellm:slots_open", (("model", MODEL),))] == 1

        probe.reading = Reading(on_battery=False)  # plugged in again
        assert wait_for(url, "edgellm:throttled", 0)[("edgellm:throttled", ())] == 0
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120).status_code == 200
        parsed = gauges(httpx.get(f"{url}/metrics", timeout=30).text)
        assert parsed[("edgellm:decode_threads", (("model", MODEL),))] == 2
        assert parsed[("edgellm:slots_open", (("model", MODEL),))] == 2


def test_throttling_is_off_by_default_and_reported_as_0(default_gguf: Path) -> None:
    settings = ServeSettings.model_validate({"models": [{"name": MODEL, "path": str(default_gguf), "n_ctx": 256}]})
    assert settings.throttle.enabled is False
    probe = FakeProbe()
    probe.reading = Reading(on_battery=True)
    with serving(create_app(settings, throttle_probe=probe)) as url:
        parsed = gauges(httpx.get(f"{url}/metrics", timeout=30).text)
        assert parsed[("edgellm:throttled", ())] == 0 and probe.calls == 0  # never read: no task
