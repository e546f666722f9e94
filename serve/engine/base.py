"""The engine interface the HTTP routes talk to, and the values that cross it.

An engine owns its models and its scheduling. Routes build a ``GenerationRequest`` and call
``await engine.submit(request)``, which validates and tokenizes the prompt and queues it (raising a typed
``EngineError`` before anything is queued), then iterate the returned ``Generation`` for ``TextDelta`` events and
one final ``Finished``. Closing the generation early (client disconnect) cancels it; the engine frees the model
for the next request within a step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]


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


class EngineOverloadedError(EngineError):
    """The wait queue is full (503 unavailable_error, with Retry-After)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailableError(EngineError):
    """The engine is not ready (still loading, or shutting down) (503)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, with llama.cpp's semantics. ``temperature <= 0`` is greedy."""

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


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """Either ``prompt`` (raw text, completions) or ``messages`` (rendered with the model's chat template)."""

    model: str
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Timings:
    """llama-server's per-response timings."""

    prompt_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    cache_n: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {
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


Event = TextDelta | Finished


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


class Engine(Protocol):
    """What the routes need from an engine. Implementations own their threads and scheduling."""

    def models(self) -> list[ModelInfo]: ...

    def has_model(self, name: str) -> bool: ...

    async def submit(self, request: GenerationRequest) -> Generation: ...

    async def close(self) -> None: ...
