"""The JSON shapes OpenAI's API and llama.cpp's server emit, for chat and text completions.

Streamed text deltas are the hot path (one per token): ``delta_json`` splices the JSON-escaped text into the
chunk rendered once per response, instead of building and serializing a dict per token. It gives the same bytes
as ``dumps(delta_chunk(text))`` (tested).

Tool calls stream as OpenAI's do: for each call a first ``delta.tool_calls`` entry with ``index``, ``id``,
``type: "function"``, ``function.name`` and empty ``arguments``, then entries with ``index`` and
``function.arguments`` fragments; the final chunk's ``finish_reason`` is ``tool_calls``. A non-streamed answer has
``message.tool_calls`` and ``content: null`` when it is only calls.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # type: ignore[attr-defined]  # json's C string encoder
from typing import Any

from edgellm.serve.engine.base import Finished, ToolCallDelta

_MARK = "\ue000edgellm-text\ue000"  # a private-use sentinel no tokenizer produces inside a chunk template


def dumps(data: dict[str, Any]) -> str:
    """Compact JSON with UTF-8 text as is (what both llama-server and OpenAI send)."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


class _Spliced:
    """A chunk's JSON split around its text field: ``head + json(text) + tail``."""

    def __init__(self, template: dict[str, Any]) -> None:
        rendered = dumps(template)
        self.head, self.tail = rendered.split(json.dumps(_MARK, ensure_ascii=False))

    def render(self, text: str) -> str:
        return self.head + encode_basestring(text) + self.tail


def usage(f: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    }


class _SplicedDeltas:
    """``delta_json(text)``: ``dumps(self.delta_chunk(text))`` from the chunk template, rendered once."""

    _delta: _Spliced | None = None

    def delta_chunk(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def delta_json(self, text: str) -> str:
        if self._delta is None:
            self._delta = _Spliced(self.delta_chunk(_MARK))
        return self._delta.render(text)


@dataclass
class ChatFormat(_SplicedDeltas):
    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "edgellm",
            "choices": choices,
            **extra,
        }

    def first_chunk(self) -> dict[str, Any] | None:
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def delta_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None}])

    def tool_call_chunk(self, d: ToolCallDelta) -> dict[str, Any]:
        call: dict[str, Any] = {"index": d.index}
        if d.id is not None:
            call.update(id=d.id, type="function", function={"name": d.name, "arguments": d.arguments})
        else:
            call["function"] = {"arguments": d.arguments}
        return self._chunk([{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}])

    def final_chunk(self, f: Finished) -> dict[str, Any]:
        return self._chunk([{"index": 0, "delta": {}, "finish_reason": f.finish_reason}])

    def usage_chunk(self, f: Finished) -> dict[str, Any]:
        return self._chunk([], usage=usage(f), timings=f.timings.as_dict())

    def response(self, text: str, f: Finished, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            message = {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "edgellm",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": f.finish_reason,
                }
            ],
            "usage": usage(f),
            "timings": f.timings.as_dict(),
        }


@dataclass
class CompletionFormat(_SplicedDeltas):
    model: str
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "edgellm",
            "choices": choices,
            **extra,
        }

    def first_chunk(self) -> dict[str, Any] | None:
        return None

    def delta_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])

    def tool_call_chunk(self, d: ToolCallDelta) -> dict[str, Any]:
        raise TypeError("text completions have no tool calls")

    def final_chunk(self, f: Finished) -> dict[str, Any]:
        return self._chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": f.finish_reason}])

    def usage_chunk(self, f: Finished) -> dict[str, Any]:
        return self._chunk([], usage=usage(f), timings=f.timings.as_dict())

    def response(self, text: str, f: Finished, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return self._chunk(
            [{"index": 0, "text": text, "logprobs": None, "finish_reason": f.finish_reason}],
            usage=usage(f),
            timings=f.timings.as_dict(),
        )
