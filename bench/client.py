"""The one streaming chat client of every benchmark: ``POST /v1/chat/completions`` with ``stream`` and
``stream_options.include_usage``, read as server-sent events and timed chunk by chunk.

It speaks to any OpenAI-compatible server (ours, llama.cpp's ``llama-server``, the llama-cpp-python server).
Failures come back in the result as a kind, never raised (except cancellation):

- ``connect``: connection refused or unreachable;  ``timeout``: httpx's own timeout;
- ``http_<status>``: an error status;  ``truncated``: the stream ended or broke before ``[DONE]``;
- ``disconnected``: the server closed the connection before answering (it may have crashed);
- ``bad_stream``: a chunk that is not JSON, or an ``error`` object inside the stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class StreamResult:
    """One streamed answer, timed with ``time.perf_counter()`` from just before the request was sent."""

    start: float
    end: float = 0.0  # when the stream ended, or broke
    chunk_times: list[float] = field(default_factory=list)  # when each non-empty text chunk arrived
    usage_tokens: int | None = None  # completion tokens as the server counted them (its usage chunk)
    text: str = ""  # the answer's content, as streamed
    timings: dict[str, Any] | None = None  # llama-server's (and ours) per-response timings, when the server sends them
    error: str | None = None  # the kind of failure (see the module's docstring); None: a complete answer
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        """Time to first token: request sent -> first non-empty text chunk."""
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies: the gaps between text chunks."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def tokens_from_usage(self) -> bool:
        return self.usage_tokens is not None

    @property
    def completion_tokens(self) -> int:
        """The server's count when it sent one, else the text chunks."""
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunk_times)


def chat_body(
    model: str, messages: Sequence[dict[str, str]], max_tokens: int, temperature: float, seed: int | None = None
) -> dict[str, Any]:
    """A streaming chat request that asks for the usage chunk."""
    body: dict[str, Any] = {
        "model": model,
        "messages": list(messages),
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    if seed is not None:
        body["seed"] = seed
    return {**body, "stream": True, "stream_options": {"include_usage": True}}


async def stream_chat(client: httpx.AsyncClient, base: str, body: dict[str, Any]) -> StreamResult:
    """Send ``body`` to ``{base}/v1/chat/completions`` and read the stream to ``[DONE]``."""
    res = StreamResult(start=time.perf_counter())
    status: int | None = None
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
            status = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                res.error, res.detail = f"http_{resp.status_code}", text[:200]
                return res
            await _read_events(resp, res)
    except httpx.ConnectError as e:
        res.error, res.detail = "connect", str(e)[:200]
    except httpx.TimeoutException as e:
        res.error, res.detail = "timeout", f"{type(e).__name__}: {e}"[:200]
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        # Before the status line the server hung up (often: it crashed); after it, the stream broke.
        res.error = "truncated" if status is not None else "disconnected"
        res.detail = f"{type(e).__name__}: {e}"[:200]
    except httpx.HTTPError as e:
        res.error, res.detail = type(e).__name__, str(e)[:200]
    finally:
        res.end = time.perf_counter()
    return res


async def _read_events(resp: httpx.Response, res: StreamResult) -> None:
    """Fill ``res`` from the ``data:`` lines of an open 200 response; a missing ``[DONE]`` is ``truncated``."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            res.error, res.detail = "bad_stream", data[:200]
            return
        if "error" in chunk:
            res.error, res.detail = "bad_stream", json.dumps(chunk["error"])[:200]
            return
        if chunk.get("usage"):
            res.usage_tokens = chunk["usage"].get("completion_tokens")
        if chunk.get("timings"):
            res.timings = chunk["timings"]
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                res.chunk_times.append(time.perf_counter())
                res.text += content
    res.error = "truncated"
    res.detail = f"stream ended without [DONE] after {len(res.chunk_times)} content chunk(s)"
