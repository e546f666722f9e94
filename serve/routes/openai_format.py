"""The JSON shapes OpenAI's API and llama.cpp's server emit, for chat and text completions."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from serve.engine.base import Finished


def usage(f: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    }


@dataclass
class ChatFormat:
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

    def final_chunk(self, f: Finished) -> dict[str, Any]:
        return self._chunk([{"index": 0, "delta": {}, "finish_reason": f.finish_reason}])

    def usage_chunk(self, f: Finished) -> dict[str, Any]:
        return self._chunk([], usage=usage(f), timings=f.timings.as_dict())

    def response(self, text: str, f: Finished) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "edgellm",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": f.finish_reason,
                }
            ],
            "usage": usage(f),
            "timings": f.timings.as_dict(),
        }


@dataclass
class CompletionFormat:
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

    def final_chunk(self, f: Finished) -> dict[str, Any]:
        return self._chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": f.finish_reason}])

    def usage_chunk(self, f: Finished) -> dict[str, Any]:
        return self._chunk([], usage=usage(f), timings=f.timings.as_dict())

    def response(self, text: str, f: Finished) -> dict[str, Any]:
        return self._chunk(
            [{"index": 0, "text": text, "logprobs": None, "finish_reason": f.finish_reason}],
            usage=usage(f),
            timings=f.timings.as_dict(),
        )
