"""The serial engine's worker survives what its requests do, and is never freed under a running decode (real GGUF)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgellm.serve.engine.base import Finished, SamplingParams, TextDelta
from edgellm.serve.engine.pool import Job
from edgellm.serve.engine.serial import SerialModel
from edgellm.serve.engine.specs import ModelSpec
from edgellm.serve.engine.stream import EventStream


@pytest.fixture
def model(default_gguf: Path) -> Iterator[SerialModel]:
    m = SerialModel(ModelSpec(name="m", path=default_gguf, n_ctx=256, n_threads=1), queue_size=4)
    yield m
    if not getattr(m, "stuck", False):
        m.close()


def job(model: SerialModel, loop: asyncio.AbstractEventLoop, max_tokens: int = 8) -> Job:
    tokens = model.tokenize("Once upon a time")
    return Job(tokens=tokens, params=SamplingParams(max_tokens=max_tokens, temperature=0.0), stream=EventStream(loop, len(tokens)))


def test_a_request_whose_event_loop_is_gone_does_not_stop_the_worker(model: SerialModel) -> None:
    """The first request's loop is closed (its server went away): emitting to it fails. The worker must go on
    and serve the next request."""
    dead = asyncio.new_event_loop()
    dead.close()
    orphan = job(model, dead)
    model.enqueue(orphan)

    async def next_request() -> str:
        j = job(model, asyncio.get_running_loop())
        model.enqueue(j)
        text = ""
        async for event in j.stream:
            if isinstance(event, TextDelta):
                text += event.text
            else:
                assert isinstance(event, Finished)
        return text

    assert asyncio.run(asyncio.wait_for(next_request(), timeout=120))
    assert orphan.cancelled.is_set()  # nobody listens: the orphan was cancelled, not run to max_tokens


def test_close_does_not_free_the_model_under_a_running_decode(model: SerialModel) -> None:
    """A decode that does not return within the join timeout: close() gives up waiting and leaves the model
    allocated (freeing it under llama_decode would crash the process)."""
    in_decode = threading.Event()
    release = threading.Event()

    def stuck_generate(job: Job) -> None:  # a decode that ignores cancellation until released
        in_decode.set()
        release.wait(60)

    model._generate = stuck_generate  # type: ignore[method-assign]
    freed: list[bool] = []
    real_close = model.llm.close
    model.llm.close = lambda: freed.append(True)  # type: ignore[method-assign]
    model.join_timeout_s = 0.5

    async def run() -> None:
        model.enqueue(job(model, asyncio.get_running_loop()))
        assert await asyncio.to_thread(in_decode.wait, 30)
        await asyncio.to_thread(model.close)

    asyncio.run(run())
    assert freed == [] and model.stuck
    release.set()  # the decode returns; the worker sees the close and stops: now the model can go
    model._thread.join(30)
    assert not model._thread.is_alive()
    real_close()
