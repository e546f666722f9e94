"""The JSON shapes OpenAI's API and llama.cpp's server emit, for chat and text completions.

Streamed text deltas are the hot path (one per token): ``delta_json`` splices the JSON-escaped text into the
chunk rendered once per response (and choice), instead of building and serializing a dict per token. It gives the
same bytes as ``dumps(delta_chunk(text))`` (tested).

Tool calls stream as OpenAI's do: for each call a first ``delta.tool_calls`` entry with ``index``, ``id``,
``type: "function"``, ``function.name`` and empty ``arguments``, then entries with ``index`` and
``function.arguments`` fragments; the final chunk's ``finish_reason`` is ``tool_calls``. A non-streamed answer has
``message.tool_calls`` and ``content: null`` when it is only calls.

``n`` choices: each streamed chunk carries one choice's ``index`` (the first chat chunk has every choice's role);
the usage chunk comes after the last choice's final chunk; ``usage.completion_tokens`` counts every choice's tokens,
``prompt_tokens`` the prompt once. Logprobs: chat's ``choices[].logprobs.content[]`` (``token``, ``logprob``,
``bytes``, ``top_logprobs``), completions' legacy ``{tokens, token_logprobs, top_logprobs, text_offset}`` (its
``top_logprobs`` maps token text to logprob and includes the sampled token, as OpenAI's; ``text_offset`` counts
characters of the choice's text), on each chunk for its delta's tokens and on a non-streamed choice for all.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # type: ignore[attr-defined]  # json's C string encoder
from typing import Any

from edgellm.serve.engine.base import Event, Finished, TextDelta, Timings, TokenLogprob, ToolCallDelta

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


def _usage(finished: list[Finished]) -> dict[str, int]:
    prompt = finished[0].prompt_tokens if finished else 0
    completion = sum(f.completion_tokens for f in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _timings(finished: list[Finished]) -> dict[str, float | int]:
    """One response's timings over its choices: the prompt (read once) and every choice's tokens."""
    t = [f.timings for f in finished]
    return Timings(
        prompt_n=sum(x.prompt_n for x in t),
        prompt_ms=max((x.prompt_ms for x in t), default=0.0),
        predicted_n=sum(x.predicted_n for x in t),
        predicted_ms=max((x.predicted_ms for x in t), default=0.0),
        cache_n=sum(x.cache_n for x in t),
        draft_n=sum(x.draft_n for x in t),
        draft_n_accepted=sum(x.draft_n_accepted for x in t),
    ).as_dict()


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI chat's ``logprobs`` object."""
    return {
        "content": [
            {
                "token": _text(e.piece),
                "logprob": e.logprob,
                "bytes": list(e.piece),
                "top_logprobs": [{"token": _text(t.piece), "logprob": t.logprob, "bytes": list(t.piece)} for t in e.top],
            }
            for e in entries
        ]
    }


def completion_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI completions' legacy ``logprobs`` object."""
    top: list[dict[str, float]] = []
    for e in entries:
        alternatives = {_text(t.piece): t.logprob for t in e.top}
        alternatives.setdefault(_text(e.piece), e.logprob)
        top.append(alternatives)
    return {
        "tokens": [_text(e.piece) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": top,
        "text_offset": [e.offset for e in entries],
    }


@dataclass
class _Choice:
    parts: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: Finished | None = None


class Answer:
    """A whole (non-streamed) answer of ``n`` choices, gathered from the generation's events."""

    def __init__(self, n: int = 1) -> None:
        self.choices = [_Choice() for _ in range(n)]

    def add(self, event: Event) -> None:
        c = self.choices[event.choice]
        if isinstance(event, TextDelta):
            c.parts.append(event.text)
            c.logprobs.extend(event.logprobs)
        elif isinstance(event, ToolCallDelta):
            if event.id is not None:
                c.calls.append({"id": event.id, "type": "function", "function": {"name": event.name, "arguments": ""}})
            c.calls[-1]["function"]["arguments"] += event.arguments
        elif isinstance(event, Finished):
            c.finished = event

    @property
    def complete(self) -> bool:
        return all(c.finished is not None for c in self.choices)

    def finished(self) -> list[Finished]:
        return [c.finished for c in self.choices if c.finished is not None]


class _Format:
    """What chat and completions share: the response's identity, its ``n`` choices, whether they carry logprobs,
    and the choices finished so far (for the usage chunk)."""

    object_chunk = ""

    def __init__(self, model: str, n: int = 1, logprobs: bool = False, id: str = "", created: int = 0) -> None:
        self.model = model
        self.n = n
        self.logprobs = logprobs
        self.id = id
        self.created = created or int(time.time())
        self._finished: list[Finished] = []
        self._spliced: dict[int, _Spliced] = {}

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object_chunk,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "edgellm",
            "choices": choices,
            **extra,
        }

    def delta_chunk(self, text: str, choice: int = 0, logprobs: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
        raise NotImplementedError

    def delta_json(self, text: str, choice: int = 0) -> str:
        """``dumps(self.delta_chunk(text, choice))`` from the choice's chunk template, rendered once."""
        spliced = self._spliced.get(choice)
        if spliced is None:
            spliced = self._spliced[choice] = _Spliced(self.delta_chunk(_MARK, choice))
        return spliced.render(text)

    def text_json(self, d: TextDelta) -> str:
        """A text delta's chunk."""
        if not self.logprobs:
            return self.delta_json(d.text, d.choice)
        return dumps(self.delta_chunk(d.text, d.choice, d.logprobs))

    def final_chunk(self, f: Finished) -> dict[str, Any]:
        self._finished.append(f)
        return self._chunk([self._final_choice(f)])

    def _final_choice(self, f: Finished) -> dict[str, Any]:
        raise NotImplementedError

    def done(self) -> bool:
        """Every choice has had its final chunk."""
        return len(self._finished) >= self.n

    def usage_chunk(self) -> dict[str, Any]:
        return self._chunk([], usage=_usage(self._finished), timings=self.timings())

    def timings(self) -> dict[str, float | int]:
        """The response's timings (llama-server's), once every choice has finished."""
        return _timings(self._finished)


class ChatFormat(_Format):
    object_chunk = "chat.completion.chunk"

    def __init__(self, model: str, n: int = 1, logprobs: bool = False) -> None:
        super().__init__(model, n, logprobs, id=f"chatcmpl-{uuid.uuid4().hex}")

    def first_chunk(self) -> dict[str, Any] | None:
        return self._chunk(
            [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(self.n)]
        )

    def delta_chunk(self, text: str, choice: int = 0, logprobs: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
        c: dict[str, Any] = {"index": choice, "delta": {"content": text}, "finish_reason": None}
        if self.logprobs:
            c = {"index": choice, "delta": {"content": text}, "logprobs": chat_logprobs(logprobs), "finish_reason": None}
        return self._chunk([c])

    def tool_call_chunk(self, d: ToolCallDelta) -> dict[str, Any]:
        call: dict[str, Any] = {"index": d.index}
        if d.id is not None:
            call.update(id=d.id, type="function", function={"name": d.name, "arguments": d.arguments})
        else:
            call["function"] = {"arguments": d.arguments}
        return self._chunk([{"index": d.choice, "delta": {"tool_calls": [call]}, "finish_reason": None}])

    def _final_choice(self, f: Finished) -> dict[str, Any]:
        return {"index": f.choice, "delta": {}, "finish_reason": f.finish_reason}

    def response(self, answer: Answer) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(answer.choices):
            assert c.finished is not None
            text = "".join(c.parts)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if c.calls:
                message = {"role": "assistant", "content": text or None, "tool_calls": c.calls}
            choices.append({
                "index": i,
                "message": message,
                "logprobs": chat_logprobs(c.logprobs) if self.logprobs else None,
                "finish_reason": c.finished.finish_reason,
            })
        finished = answer.finished()
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "edgellm",
            "choices": choices,
            "usage": _usage(finished),
            "timings": _timings(finished),
        }


class CompletionFormat(_Format):
    object_chunk = "text_completion"

    def __init__(self, model: str, n: int = 1, logprobs: bool = False) -> None:
        super().__init__(model, n, logprobs, id=f"cmpl-{uuid.uuid4().hex}")

    def first_chunk(self) -> dict[str, Any] | None:
        return None

    def delta_chunk(self, text: str, choice: int = 0, logprobs: tuple[TokenLogprob, ...] = ()) -> dict[str, Any]:
        lp = completion_logprobs(logprobs) if self.logprobs else None
        return self._chunk([{"index": choice, "text": text, "logprobs": lp, "finish_reason": None}])

    def tool_call_chunk(self, d: ToolCallDelta) -> dict[str, Any]:
        raise TypeError("text completions have no tool calls")

    def _final_choice(self, f: Finished) -> dict[str, Any]:
        lp = completion_logprobs(()) if self.logprobs else None
        return {"index": f.choice, "text": "", "logprobs": lp, "finish_reason": f.finish_reason}

    def response(self, answer: Answer) -> dict[str, Any]:
        choices = []
        for i, c in enumerate(answer.choices):
            assert c.finished is not None
            choices.append({
                "index": i,
                "text": "".join(c.parts),
                "logprobs": completion_logprobs(c.logprobs) if self.logprobs else None,
                "finish_reason": c.finished.finish_reason,
            })
        finished = answer.finished()
        return self._chunk(choices, usage=_usage(finished), timings=_timings(finished))
