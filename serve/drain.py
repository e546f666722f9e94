"""Graceful drain: what the server does between SIGTERM (or SIGINT) and its exit.

uvicorn alone, on SIGTERM, stops listening at once, waits for open connections, cancels what is still running
after ``timeout_graceful_shutdown`` and only then runs the lifespan's shutdown: a load balancer's health check
gets "connection refused" rather than a 503, and a stream still running at the deadline is cut without its final
chunk. ``DrainingServer`` (a uvicorn ``Server``) puts a drain in front of that:

1. the first signal starts the drain (``Drain.run``): the server keeps listening; ``/health`` answers 503
   ``{"status": "draining"}`` (a balancer or a readiness probe takes the replica out); new POST requests get 503
   with Retry-After and ``Connection: close`` (``DrainMiddleware``; a balancer retries them elsewhere); requests
   in flight go on;
2. once the last request in flight has finished, or ``shutdown_timeout`` seconds have passed, the drain expires:
   every generation still running ends with ``Finished(finish_reason="length")`` (``Drain.watch``: a stream gets
   its final chunk and ``data: [DONE]``, a non-streamed answer the text so far) and is cancelled in the engine;
3. then uvicorn's own shutdown runs: it stops listening, closes idle connections, waits for the last responses
   and runs the lifespan's shutdown, which closes the engine; the process exits 0.

A second signal ends the drain at once (step 2 now); a third stops without waiting (uvicorn's force exit).
The ``Drain`` itself is plain asyncio: tests drive it without signals.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import AsyncIterator
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from edgellm.serve.engine.base import Event, Finished, Generation, Timings
from edgellm.serve.errors import UNAVAILABLE, error_response

log = logging.getLogger(__name__)

FLUSH_S = 5.0  # after the drain expires: time for the ended streams to send their last chunks
POLL_S = 0.05


class Drain:
    """The server's drain state: whether it is draining, the requests in flight, the generations to end when the
    drain expires. One per app, made by ``create_app``; used on the event loop only."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.draining = False
        self.expired = False
        self.in_flight = 0
        self._deadline: float | None = None  # time.monotonic() at which the drain expires
        self._watched: set[DrainedGeneration] = set()

    # -- the drain -----------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Drain: stop taking requests, wait for those in flight (at most ``timeout`` s), end the generations still
        running, give them ``FLUSH_S`` to send their last chunk. Returns when uvicorn may shut down."""
        self.begin()
        log.info(
            "draining: %d request(s) in flight; new requests get 503; in-flight ones may run %.0f s more",
            self.in_flight,
            self.timeout,
        )
        while self.in_flight and not self.expired and time.monotonic() < self.deadline():
            await asyncio.sleep(POLL_S)
        if self.in_flight:
            log.warning("drain: ending %d request(s) still running after %.0f s", self.in_flight, self.timeout)
        self.expire()
        flush_until = time.monotonic() + FLUSH_S
        while self.in_flight and time.monotonic() < flush_until:
            await asyncio.sleep(POLL_S)
        log.info("drained (%d request(s) left)", self.in_flight)

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            self._deadline = time.monotonic() + self.timeout

    def deadline(self) -> float:
        return self._deadline if self._deadline is not None else math.inf

    def retry_after(self) -> int:
        """Seconds a client should wait before it tries this address again: until this process is gone."""
        return max(1, math.ceil(min(self.deadline() - time.monotonic(), 3600) + FLUSH_S))

    def expire(self) -> None:
        """End every watched generation now (and any watched from now on)."""
        self.begin()
        self.expired = True
        for g in list(self._watched):
            g.cut()

    # -- generations ---------------------------------------------------------------------------------------------
    def watch(self, generation: Generation, n: int = 1) -> Generation:
        """``generation`` (of ``n`` choices), each choice ended with ``Finished(finish_reason="length")`` if the
        drain expires before it ends."""
        return DrainedGeneration(generation, self, n)

    def _add(self, g: DrainedGeneration) -> None:
        self._watched.add(g)

    def _remove(self, g: DrainedGeneration) -> None:
        self._watched.discard(g)


class DrainedGeneration:
    """A generation that the drain can end: each wait for the next event can be cut short (an ``asyncio.timeout``
    moved to now), and each of its ``n`` choices not yet finished then ends with a ``Finished`` of reason
    ``length``. That usage counts the events the choice sent (each at least one token): a lower bound."""

    def __init__(self, inner: Generation, drain: Drain, n: int = 1) -> None:
        self.prompt_tokens = inner.prompt_tokens
        self._inner = inner
        self._iter: AsyncIterator[Event] = inner.__aiter__()
        self._drain = drain
        self._timeout: asyncio.Timeout | None = None
        self._unfinished = set(range(n))
        self._events = [0] * n
        self._started = time.perf_counter()
        self._cut: list[Finished] | None = None  # the Finished events still to hand out after the cut
        drain._add(self)

    def __aiter__(self) -> DrainedGeneration:
        return self

    async def __anext__(self) -> Event:
        if self._cut is None and self._drain.expired:
            self._cut = self._cutoff()
        if self._cut is not None:
            if self._cut:
                return self._cut.pop(0)
            raise StopAsyncIteration
        timeout = asyncio.timeout(None)
        self._timeout = timeout
        try:
            async with timeout:
                event = await self._iter.__anext__()
        except BaseException as e:
            if isinstance(e, TimeoutError) and timeout.expired():
                self._cut = self._cutoff()
                return await self.__anext__()
            self._drain._remove(self)
            raise
        finally:
            self._timeout = None
        choice = getattr(event, "choice", 0)
        if isinstance(event, Finished):
            self._unfinished.discard(choice)
        elif 0 <= choice < len(self._events):
            self._events[choice] += 1
        return event

    def cut(self) -> None:
        """Called by the drain on expiry: wake the waiting ``__anext__`` now."""
        if self._timeout is not None:
            self._timeout.reschedule(asyncio.get_running_loop().time())

    async def aclose(self) -> None:
        self._drain._remove(self)
        await self._inner.aclose()

    def _cutoff(self) -> list[Finished]:
        self._drain._remove(self)
        elapsed_ms = (time.perf_counter() - self._started) * 1000
        return [
            Finished(
                finish_reason="length",
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self._events[c],
                timings=Timings(
                    prompt_n=self.prompt_tokens, prompt_ms=0.0, predicted_n=self._events[c], predicted_ms=elapsed_ms
                ),
                choice=c,
            )
            for c in sorted(self._unfinished)
        ]


class DrainMiddleware:
    """Counts the requests in flight; while draining, answers every new POST with 503 (Retry-After, and
    ``Connection: close`` so that the client's next request opens a new connection, to another replica)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        drain = self.drain
        if drain.draining and scope["method"] == "POST":
            response = error_response(
                503,
                "the server is shutting down; send the request to another replica, or retry after the restart",
                UNAVAILABLE,
                {"Retry-After": str(drain.retry_after()), "Connection": "close"},
            )
            await response(scope, receive, send)
            return
        drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain before its shutdown (see the module docstring). The process exits 0 after
    a drain: the signal is handled, not raised again once the server has stopped (as uvicorn does)."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        self._draining: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler (main thread, between two steps of the event loop): hand over to the loop."""
        self._signals += 1
        if self._loop is None or self._loop.is_closed():
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._on_signal, self._signals)

    def _on_signal(self, n: int) -> None:
        if n == 1:
            self._draining = asyncio.get_running_loop().create_task(self._drain_then_exit())
        elif n == 2:
            log.info("second signal: ending the requests in flight now")
            self.drain.expire()
        else:
            log.warning("third signal: stopping without waiting")
            self.should_exit = True
            self.force_exit = True

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run()
        finally:
            self.should_exit = True
