"""Clients that go away early cost the server nothing: on a real 1-slot server, 100 streams whose client disconnects
once it has the response headers (before the first event: a completion's first event is its first token, after
the prompt) each free the slot at once, so a request sent after them starts promptly instead of waiting behind 100
answers of max_tokens."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from edgellm.serve.app import create_app
from edgellm.serve.engine.base import GenerationRequest, ModelInfo
from edgellm.serve.engine.stream import EventStream
from edgellm.serve.settings import ServeSettings
from tests.servers import running_server

# A long prompt: its evaluation takes a while, so the disconnect lands before the first token.
PROMPT = "The history of lighthouses, told in many small chapters. " * 40
MAX_TOKENS = 400  # with 1 slot, 100 generations of this running on would take many minutes


@pytest.fixture(scope="module")
def server(default_gguf: Path) -> Iterator[str]:
    with running_server(
        "--no-reranker", "--no-embedder", "--set", "slots=1", "--set", "models.0.n_ctx=1024",
        "--set", "models.0.n_threads=1",
    ) as url:
        yield url


def disconnect_after_headers(url: str) -> None:
    """POST a streamed completion over a raw socket, read the status line and headers, close."""
    u = urlparse(url)
    body = httpx.Request("POST", url, json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True}).read()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        s.sendall(head + body)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = s.recv(4096)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
        assert b"data:" not in received.split(b"\r\n\r\n", 1)[1], "the first event came with the headers"


def test_100_early_disconnects_then_a_request_starts_promptly(server: str) -> None:
    for _ in range(100):
        disconnect_after_headers(server)
    started = time.perf_counter()
    with httpx.Client(base_url=server, timeout=120) as c:
        with c.stream(
            "POST", "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8, "stream": True}
        ) as r:
            assert r.status_code == 200
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
    waited = time.perf_counter() - started
    print(f"\nfirst event {waited:.2f} s after 100 early disconnects: {first[:80]}")
    # 100 leaked generations of 400 tokens on one slot would hold it for many minutes; freed slots: about a second.
    assert waited < 60, waited


# --- the window itself, on the ASGI level ------------------------------------------------------------------------


class OpenEngine:
    """A fake engine whose generations never end by themselves; records which were closed (cancelled)."""

    def __init__(self) -> None:
        self.closed: list[bool] = []

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name="fake", path="fake.gguf", n_ctx=64, created=1)]

    def has_model(self, name: str) -> bool:
        return name == "fake"

    async def submit(self, request: GenerationRequest) -> EventStream:
        stream = EventStream(asyncio.get_running_loop(), prompt_tokens=3)
        index = len(self.closed)
        self.closed.append(False)
        stream.on_close(lambda: self.closed.__setitem__(index, True))
        return stream

    async def close(self) -> None:
        pass


async def _call(app: Any, state: dict[str, Any], body: bytes, send: Any, receive: Any) -> None:
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": dict(state),
    }
    await app(scope, receive, send)


def test_a_disconnect_before_the_stream_starts_cancels_the_generation() -> None:
    """The client is gone before the response has sent its headers (the ASGI server's send waits for the socket,
    as under back-pressure or on a slow link): sse-starlette's disconnect watcher ends the response before the body
    iterator has started, so the iterator's own clean-up never runs; the generation must still be cancelled."""
    engine = OpenEngine()
    settings = ServeSettings.model_validate({"models": [{"name": "fake", "path": "fake.gguf"}]})
    app = create_app(settings, engine_factory=lambda s: engine)

    async def run() -> None:
        state: dict[str, Any] = {}
        lifespan: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        started = asyncio.Event()

        async def lifespan_send(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.complete":
                started.set()

        await lifespan.put({"type": "lifespan.startup"})
        life = asyncio.create_task(
            app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}, lifespan.get, lifespan_send)
        )
        await started.wait()
        while state["server"].engine is None:
            await asyncio.sleep(0.01)

        body = json.dumps({"prompt": "hi", "stream": True}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                await asyncio.sleep(0.05)  # the socket is not writable yet

        await asyncio.wait_for(_call(app, state, body, send, receive), timeout=10)
        await lifespan.put({"type": "lifespan.shutdown"})
        await life
        assert engine.closed == [True]

    asyncio.run(run())
