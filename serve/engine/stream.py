"""A thread-to-event-loop bridge: an engine thread emits events; a request's coroutine iterates them.

``EventStream`` is the ``Generation`` every engine returns. Closing it (client gone) runs the engine's
cancel callbacks, so the engine can free the model at its next step.

The engine thread appends to a deque and wakes the event loop only when no wake-up is already pending, so a
consumer that falls behind (many streams on one loop) costs one wake-up per batch, not one per token. Text
deltas of one choice already waiting are handed over as one delta: a slow client gets bigger chunks, never a
backlog. A generation of ``n_choices`` ends after as many ``Finished`` events.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from edgellm.serve.engine.base import Event, Finished, TextDelta


class EventStream:
    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_tokens: int, n_choices: int = 1) -> None:
        self.prompt_tokens = prompt_tokens
        self._unfinished = n_choices
        self._loop = loop
        self._items: deque[Event | BaseException] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._wake_pending = False
        self._on_close: list[Callable[[], None]] = []
        self._done = False

    # -- engine side (any thread) ----------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        """Queue an event; raises RuntimeError if the event loop is closed (nobody is listening)."""
        self._put(event)

    def fail(self, exc: BaseException) -> None:
        self._put(exc)

    def _put(self, item: Event | BaseException) -> None:
        self._items.append(item)  # deque.append is atomic
        if self._wake_pending:
            if self._loop.is_closed():
                raise RuntimeError("Event loop is closed")
        else:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:
                self._wake_pending = False
                raise

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    # -- request side (event loop) ---------------------------------------------------------------------------
    def _wake(self) -> None:
        self._wake_pending = False  # cleared before the consumer drains: a later append schedules a new wake
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        items = self._items
        while not items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = items.popleft()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, TextDelta) and items and isinstance(items[0], TextDelta) and items[0].choice == item.choice:
            parts = [item.text]
            logprobs = list(item.logprobs)
            while items and isinstance(items[0], TextDelta) and items[0].choice == item.choice:
                more = items.popleft()
                assert isinstance(more, TextDelta)
                parts.append(more.text)
                logprobs.extend(more.logprobs)
            return TextDelta("".join(parts), item.choice, tuple(logprobs))
        if isinstance(item, Finished):
            self._unfinished -= 1
            if self._unfinished <= 0:
                self._done = True
        return item

    async def aclose(self) -> None:
        """Stop listening; the engine is told to cancel if the generation has not finished."""
        self._done = True
        callbacks, self._on_close = self._on_close, []
        for cb in callbacks:
            cb()
