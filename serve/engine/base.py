"""The engine interface the HTTP routes talk to, and the values that cross it.

An engine owns its models and its scheduling. Routes build a ``GenerationRequest`` and call
``await engine.submit(request)``, which validates and tokenizes the prompt and queues it (raising a typed
``EngineError`` before anything is queued), then iterate the returned ``Generation`` for ``TextDelta`` events and
one final ``Finished``. Closing the generation early (client disconnect) cancels it; the engine frees the model
for the next request within a step.

A request with ``n > 1`` has ``n`` choices: its events carry ``choice`` (0..n-1), interleaved, and the generation ends
after the ``n``-th ``Finished``. With ``params.logprobs`` set, each ``TextDelta`` carries the ``TokenLogprob`` of the
tokens whose text it completes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length", "tool_calls"]


class EngineError(Exception):
    """Base of the errors an engine raises for a request; each maps to one HTTP status in serve.errors."""


class UnknownModelError(EngineError):
    """The request names a model this engine does not serve (404)."""


class ContextOverflowError(EngineError):
    """The prompt (plus at least one generated token) does not fit the context (400 exceed_context_size_error)."""

    def __init__(self, message: str, n_prompt_tokens: int, n_ctx: int) -> None:
        super().__init__(message)
        self.n_prompt_tokens = n_prompt_tokens
        self.n_ctx = n_ctx


class InvalidPromptError(EngineError):
    """The prompt cannot be rendered or tokenized (e.g. the chat template rejects the messages) (400)."""


class InvalidRequestError(EngineError):
    """The request asks for output the engine cannot produce as asked: a schema keyword it cannot enforce, a
    grammar llama.cpp does not parse, a tool choice naming no tool (400). ``field`` names the request field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class EngineOverloadedError(EngineError):
    """The wait queue is full (503 unavailable_error, with Retry-After)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailableError(EngineError):
    """The engine is not ready (still loading, or shutting down) (503)."""


@dataclass(frozen=True)
class Grammar:
    """A GBNF grammar (root rule ``root``) that a request's output must match, for llama.cpp's grammar sampler.

    ``lazy``: unconstrained until a trigger: one of ``trigger_tokens`` is sampled, or the text generated so far
    matches one of ``trigger_patterns`` (std::regex, ECMAScript; ``^...$``: the whole text, else searched; the
    grammar applies from the pattern's first capture group on). ``json``: the language is JSON documents (maybe
    wrapped in fixed text): near the end of ``max_tokens`` the sampler steers to the document's end, keeping
    ``tail_tokens`` for the fixed text after a document and, between documents (tool calls), ``restart_tokens``
    for a whole short one."""

    gbnf: str
    json: bool = False
    tail_tokens: int = 0
    restart_tokens: int = 0
    lazy: bool = False
    trigger_patterns: tuple[str, ...] = ()
    trigger_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, with llama.cpp's semantics. ``temperature <= 0`` is greedy. ``grammar`` constrains
    the output; ``preserved_tokens`` are special tokens whose text is part of the output (tool-call markers such
    as ``[TOOL_CALLS]``, as llama-server's ``preserved_tokens``).

    ``logprobs``: None, or report each sampled token's log-probability and its ``logprobs`` likeliest alternatives
    (0: none), from the model's distribution before sampling (the raw logits' log-softmax, as llama-server).
    ``logit_bias``: ``(token id, bias)`` pairs added to the logits before sampling (``-inf``: banned).
    ``max_words`` and ``forbidden_phrases`` are set by a persona (``serve/personas.py``), not by clients."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: Grammar | None = None
    preserved_tokens: frozenset[int] = frozenset()
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    max_words: int | None = None  # a persona's cap: the answer stops at a word boundary (finish_reason "length")
    forbidden_phrases: tuple[str, ...] = ()  # a persona's filter: removed from the answer as it streams


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat, in OpenAI's shape. ``tool_calls`` (assistant): OpenAI tool calls,
    ``{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}``; ``tool_call_id`` (role
    ``tool``): the call this message answers; ``name``: the function's name on a tool message (optional)."""

    role: str
    content: str | None = None
    tool_calls: tuple[dict[str, Any], ...] | None = None
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class NamedTool:
    """``tool_choice`` naming one function: the answer is a call of it."""

    name: str


ToolChoice = Literal["none", "auto", "required"] | NamedTool


@dataclass(frozen=True)
class GenerationRequest:
    """Either ``prompt`` (raw text, completions) or ``messages`` (rendered with the model's chat template).

    Structured output (at most one of): ``json_schema``, the answer is a JSON document valid against it
    (``{"type": "object"}``: any JSON object); ``grammar``, raw GBNF the answer matches.
    Tools (chat only): ``tools`` in OpenAI's shape (``{"type": "function", "function": {"name", "description",
    "parameters"}}``); with ``tool_choice`` ``auto`` the model may answer or call tools, ``required`` or a
    ``NamedTool`` make the answer calls (several only with ``parallel_tool_calls``), ``none`` never calls. Calls
    come back as ``ToolCallDelta`` events and ``Finished.finish_reason == "tool_calls"``.
    ``n``: choices to generate from the one prompt (evaluated once); choice ``i`` samples with seed ``seed + i``.
    ``lora``: which of the model's LoRA adapters (``ModelSpec.loras``, by index) apply, at what scale (llama-server's
    per-request ``lora``); requests with different adapter sets are decoded in separate batches."""

    model: str
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    tools: tuple[dict[str, Any], ...] | None = None
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    json_schema: Any = None
    grammar: str | None = None
    n: int = 1
    lora: tuple[tuple[int, float], ...] = ()  # (adapter id, scale): the model's LoRA adapters applied (batched engine)


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its bytes, its log-probability and (for a sampled token) its likeliest alternatives, best first.
    ``offset``: where the token's text starts in its choice's text (characters)."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[TokenLogprob, ...] = ()
    offset: int = 0


@dataclass(frozen=True)
class TextDelta:
    text: str
    choice: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Timings:
    """llama-server's per-response timings."""

    prompt_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    cache_n: int = 0
    draft_n: int = 0  # tokens drafted (speculative decoding), and how many of them were accepted
    draft_n_accepted: int = 0

    def as_dict(self) -> dict[str, float | int]:
        extra: dict[str, float | int] = (
            {"draft_n": self.draft_n, "draft_n_accepted": self.draft_n_accepted} if self.draft_n else {}
        )
        return extra | {
            "cache_n": self.cache_n,
            "prompt_n": self.prompt_n,
            "prompt_ms": round(self.prompt_ms, 3),
            "prompt_per_second": round(self.prompt_n / (self.prompt_ms / 1000), 3) if self.prompt_ms > 0 else 0.0,
            "predicted_n": self.predicted_n,
            "predicted_ms": round(self.predicted_ms, 3),
            "predicted_per_second": (
                round(self.predicted_n / (self.predicted_ms / 1000), 3) if self.predicted_ms > 0 else 0.0
            ),
        }


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    choice: int = 0


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of tool call ``index`` (0, 1, ... in the answer): its first delta has ``id`` and ``name``, the
    following ones fragments of ``arguments`` (a JSON object's text, complete once all have arrived)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    choice: int = 0


Event = TextDelta | ToolCallDelta | Finished


class Generation(Protocol):
    """A queued or running generation: an async iterator of events; ``aclose()`` cancels it."""

    prompt_tokens: int

    def __aiter__(self) -> AsyncIterator[Event]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    n_ctx: int
    created: int


@dataclass(frozen=True)
class EngineStats:
    """A model's live state, for /metrics (``None``: this engine does not track it)."""

    model: str
    slots_total: int | None = None
    slots_busy: int | None = None
    waiting: int | None = None  # queued, not yet in a slot (llama-server's "deferred")
    n_decode: int | None = None  # llama_decode calls so far
    busy_slots_per_decode: float | None = None  # sequences per llama_decode call, on average
    kv_tokens: int | None = None  # tokens whose KV the slots hold
    kv_capacity: int | None = None
    draft_n: int | None = None  # speculative decoding: draft tokens verified, and accepted, so far
    draft_n_accepted: int | None = None


@dataclass(frozen=True)
class SlotInfo:
    """One slot of a model, as llama-server's /slots reports it (no prompt text)."""

    model: str
    id: int
    n_ctx: int
    is_processing: bool
    n_cached: int  # tokens whose KV the slot holds (kept after its request, for prefix reuse)
    n_prompt: int = 0  # the current request's prompt tokens
    n_decoded: int = 0
    n_remain: int = 0  # tokens the current request may still generate
    choice: int = 0


class Engine(Protocol):
    """What the routes need from an engine. Implementations own their threads and scheduling."""

    def models(self) -> list[ModelInfo]: ...

    def stats(self) -> list[EngineStats]:
        """Each model's live state (cheap, lock-free reads: a snapshot for /metrics)."""
        ...

    def slots(self) -> list[SlotInfo]:
        """Every model's slots (for /slots)."""
        ...

    def has_model(self, name: str) -> bool: ...

    async def submit(self, request: GenerationRequest) -> Generation: ...

    async def close(self) -> None: ...
