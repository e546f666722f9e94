"""Unit logic of the streaming hot path: the engine-thread -> event-loop bridge and the spliced delta JSON."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from edgellm.serve.engine.base import Finished, TextDelta, Timings
from edgellm.serve.engine.stream import EventStream
from edgellm.serve.routes.openai_format import ChatFormat, CompletionFormat, dumps

TEXTS = ["", "a", ' "quoted" ', "back\\slash", "line\nbreak\ttab\r", "\x00\x1f\x7f", "猫と🐈‍⬛", "\u2028\u2029", "\ue000"]


@pytest.mark.parametrize("fmt", [ChatFormat("m\"o'del"), CompletionFormat("model/å")])
@pytest.mark.parametrize("text", TEXTS)
def test_spliced_delta_is_the_same_json_as_the_dict(fmt: ChatFormat | CompletionFormat, text: str) -> None:
    assert fmt.delta_json(text) == dumps(fmt.delta_chunk(text))
    assert json.loads(fmt.delta_json(text)) == fmt.delta_chunk(text)


def _finished() -> Finished:
    return Finished("stop", 3, 2, Timings(prompt_n=3, prompt_ms=1.0, predicted_n=2, predicted_ms=1.0))


async def _drain(stream: EventStream) -> list[object]:
    return [ev async for ev in stream]


def test_events_from_another_thread_arrive_in_order_and_whole() -> None:
    """10,000 deltas from an engine thread: nothing lost, nothing reordered, merged only when waiting."""

    async def main() -> tuple[list[object], int]:
        stream = EventStream(asyncio.get_running_loop(), prompt_tokens=3)

        def engine() -> None:
            for i in range(10_000):
                stream.emit(TextDelta(f"{i},"))
            stream.emit(_finished())

        t = threading.Thread(target=engine)
        t.start()
        events = await _drain(stream)
        t.join()
        return events, len(events)

    events, n = asyncio.run(main())
    assert isinstance(events[-1], Finished)
    text = "".join(e.text for e in events[:-1])  # type: ignore[attr-defined]
    assert text == "".join(f"{i}," for i in range(10_000))
    assert 2 <= n <= 10_001


def test_waiting_deltas_are_merged_but_not_across_the_end() -> None:
    async def main() -> list[object]:
        stream = EventStream(asyncio.get_running_loop(), prompt_tokens=1)
        for piece in ["Sq", "ue", "ak!"]:
            stream.emit(TextDelta(piece))
        stream.emit(_finished())
        stream.emit(TextDelta("after the end"))
        await asyncio.sleep(0)
        return await _drain(stream)

    events = asyncio.run(main())
    assert events[0] == TextDelta("Squeak!")
    assert isinstance(events[1], Finished)
    assert len(events) == 2


def test_an_error_is_raised_after_the_text_before_it() -> None:
    async def main() -> tuple[list[str], BaseException | None]:
        stream = EventStream(asyncio.get_running_loop(), prompt_tokens=1)
        stream.emit(TextDelta("partial"))
        stream.fail(RuntimeError("decode failed"))
        await asyncio.sleep(0)
        seen: list[str] = []
        try:
            async for ev in stream:
                seen.append(ev.text)  # type: ignore[union-attr]
        except RuntimeError as e:
            return seen, e
        return seen, None

    seen, err = asyncio.run(main())
    assert seen == ["partial"]
    assert err is not None and "decode failed" in str(err)


def test_emitting_to_a_closed_loop_raises() -> None:
    loop = asyncio.new_event_loop()
    stream = EventStream(loop, prompt_tokens=1)
    stream.emit(TextDelta("x"))  # a wake-up is now pending
    loop.close()
    with pytest.raises(RuntimeError):
        stream.emit(TextDelta("y"))
    fresh = EventStream(loop, prompt_tokens=1)
    with pytest.raises(RuntimeError):
        fresh.emit(TextDelta("z"))


def test_aclose_runs_the_cancel_callbacks_once() -> None:
    calls: list[int] = []

    async def main() -> None:
        stream = EventStream(asyncio.get_running_loop(), prompt_tokens=1)
        stream.on_close(lambda: calls.append(1))
        await stream.aclose()
        await stream.aclose()
        assert await _drain(stream) == []

    asyncio.run(main())
    assert calls == [1]
