"""A thread-to-event-loop bridge: an engine thread emits events; a request's coroutine iterates them.

``EventStream`` is the ``Generation`` every engine returns. Closing it (client gone) runs the engine's
cancel callbacks, so the engine can free the model at its next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from serve.engine.base import Event, Finished


class EventStream:
    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self._loop = loop
        self._queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self._on_close: list[Callable[[], None]] = []
        self._done = False

    # -- engine side (any thread) ----------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def fail(self, exc: BaseException) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, exc)

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    # -- request side (event loop) ---------------------------------------------------------------------------
    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, Finished):
            self._done = True
        return item

    async def aclose(self) -> None:
        """Stop listening; the engine is told to cancel if the generation has not finished."""
        self._done = True
        callbacks, self._on_close = self._on_close, []
        for cb in callbacks:
            cb()
