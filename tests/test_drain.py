"""Graceful drain on a real `edgellm serve` (uvicorn, the default GGUF): SIGTERM while clients stream.

- in-flight streams finish on their own when they can within ``shutdown_timeout``; meanwhile /health is 503
  ``draining``, /livez 200 and new requests 503 with Retry-After;
- streams still running at ``shutdown_timeout`` end with a final chunk (``finish_reason: "length"``) and
  ``data: [DONE]``;
- the process exits 0 either way.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from edgellm.launch import free_port

REPO = Path(__file__).resolve().parents[1]
STORY = "Write a very long story about a lighthouse keeper and a storm. Use at least 500 words."


@contextmanager
def server(tmp_path: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "edgellm", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-reranker",
           "--no-embedder", "--set", "models.0.n_ctx=1024", "--set", "models.0.n_threads=1", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        print(log.read_text()[-3000:])


@dataclass
class Stream:
    chunks: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    last: str = ""  # the last line before [DONE]


async def stream_chat(client: httpx.AsyncClient, url: str, max_tokens: int, first: asyncio.Event) -> Stream:
    s = Stream()
    body = {
        "messages": [{"role": "user", "content": STORY}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                s.done = True
                continue
            assert not s.done, "an event after [DONE]"
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            s.last = data
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    s.chunks += 1
                    first.set()
                if choice["finish_reason"] is not None:
                    s.finish_reason = choice["finish_reason"]
            if chunk.get("usage"):
                s.usage = chunk["usage"]
    return s


async def sigterm_during(
    url: str, proc: subprocess.Popen[bytes], n: int, max_tokens: int
) -> tuple[list[Stream], dict[str, Any]]:
    """``n`` streams and one non-streamed request; once each stream has sent text, SIGTERM; then what /health,
    /livez and a new request answer, and what the non-streamed request got."""
    async with httpx.AsyncClient(timeout=120) as client:
        firsts = [asyncio.Event() for _ in range(n)]
        tasks = [asyncio.create_task(stream_chat(client, url, max_tokens, e)) for e in firsts]
        plain = asyncio.create_task(
            client.post(
                f"{url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": STORY}], "max_tokens": max_tokens, "temperature": 0},
            )
        )
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), timeout=120)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(timeout=10) as probe:
            health = await probe.get(f"{url}/health")
            live = await probe.get(f"{url}/livez")
            new = await probe.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        streams = list(await asyncio.gather(*tasks))
        answer = await plain
        seen = {
            "health": (health.status_code, health.json()),
            "livez": live.status_code,
            "new": (new.status_code, new.headers.get("retry-after"), new.json()),
            "plain": (answer.status_code, answer.json()),
        }
        return streams, seen


def check_draining(seen: dict[str, Any]) -> None:
    status, body = seen["health"]
    assert status == 503 and body["status"] == "draining", seen
    assert seen["livez"] == 200
    status, retry_after, body = seen["new"]
    assert status == 503 and int(retry_after) >= 1 and body["error"]["type"] == "unavailable_error", seen


def test_sigterm_during_four_streams_ends_each_with_a_final_chunk_and_exits_0(tmp_path: Path) -> None:
    with server(tmp_path, "--shutdown-timeout", "3", "--set", "slots=5") as (url, proc):  # 4 streams + 1 plain
        streams, seen = asyncio.run(sigterm_during(url, proc, n=4, max_tokens=900))
        assert proc.wait(timeout=60) == 0
    print("\n" + "; ".join(f"{s.finish_reason} after {s.chunks} chunks, usage {s.usage}" for s in streams))
    check_draining(seen)
    for s in streams:
        assert s.done and s.finish_reason == "length", s
        assert 0 < s.usage["completion_tokens"] < 900, s  # cut by the drain, not by max_tokens
    status, answer = seen["plain"]  # a non-streamed request in flight: the text so far
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length", answer
    assert answer["usage"]["completion_tokens"] < 900


def test_streams_that_finish_within_the_timeout_finish_whole(tmp_path: Path) -> None:
    with server(tmp_path, "--shutdown-timeout", "120", "--set", "slots=3") as (url, proc):
        started = time.monotonic()
        streams, seen = asyncio.run(sigterm_during(url, proc, n=2, max_tokens=48))
        assert proc.wait(timeout=100) == 0
        waited = time.monotonic() - started
    check_draining(seen)
    status, answer = seen["plain"]
    assert status == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
    for s in streams:
        assert s.done and s.finish_reason in ("stop", "length"), s
        if s.finish_reason == "length":
            assert s.usage["completion_tokens"] == 48, s  # every token, not cut
    assert waited < 100  # the drain ended when the streams did, not at shutdown_timeout


def test_compose_gives_every_service_a_stop_grace_period_above_shutdown_timeout() -> None:
    import yaml

    from edgellm.serve.settings import ServeSettings

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    timeout = ServeSettings.model_fields["shutdown_timeout"].default
    for name, svc in compose["services"].items():
        grace = svc.get("stop_grace_period", "10s")
        assert grace.endswith("s") and float(grace[:-1]) >= timeout + 10, (name, grace)
