"""What every engine shares: a set of loaded models, one worker each, and the admission checks a request passes
before it is queued (known model, chat template, tokenization off the event loop, context size, max_tokens
clamped to the room left). Engines differ only in their workers' scheduling."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from edgellm.serve.engine.base import (
    ContextOverflowError,
    Generation,
    GenerationRequest,
    InvalidPromptError,
    ModelInfo,
    SamplingParams,
    UnknownModelError,
)
from edgellm.serve.engine.prompt import ChatTemplate
from edgellm.serve.engine.specs import ModelSpec
from edgellm.serve.engine.stream import EventStream

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """A request admitted to a model's worker: its prompt tokens, sampling, and where its events go."""

    tokens: list[int]
    params: SamplingParams
    stream: EventStream
    cancelled: threading.Event = field(default_factory=threading.Event)


class ModelWorker(Protocol):
    """One loaded model and the thread that generates for it."""

    spec: ModelSpec
    template: ChatTemplate
    created: int

    def tokenize(self, text: str) -> list[int]:
        """A raw (completion) prompt's ids."""
        ...

    def enqueue(self, job: Job) -> None: ...

    def close(self) -> None: ...


def prompt_tokens(model: ModelWorker, request: GenerationRequest) -> list[int]:
    """A request's prompt ids: messages (and tools) through the model's chat template, a raw prompt as llama-server
    tokenizes it (``tokens.py``). Blocking: called off the event loop."""
    if request.messages is not None:
        return model.template.tokens(request.messages, getattr(request, "tools", None))
    return model.tokenize(request.prompt or "")


class ModelPool:
    """An ``Engine`` over one worker per model; ``load`` builds a worker from a spec (blocking)."""

    def __init__(self, specs: list[ModelSpec], load: Callable[[ModelSpec], ModelWorker]) -> None:
        self._models: dict[str, ModelWorker] = {}
        try:
            for spec in specs:
                self._models[spec.name] = load(spec)
        except BaseException:
            for m in self._models.values():
                m.close()
            raise

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(name=n, path=str(m.spec.path), n_ctx=m.spec.n_ctx, created=m.created)
            for n, m in self._models.items()
        ]

    def has_model(self, name: str) -> bool:
        return name in self._models

    def _model(self, name: str) -> ModelWorker:
        try:
            return self._models[name]
        except KeyError:
            raise UnknownModelError(
                f"model {name!r} is not served here; available: {', '.join(self._models)}"
            ) from None

    async def submit(self, request: GenerationRequest) -> Generation:
        model = self._model(request.model)
        tokens = await asyncio.to_thread(prompt_tokens, model, request)
        if not tokens:
            raise InvalidPromptError("the prompt is empty")
        n_ctx = model.spec.n_ctx
        if len(tokens) + 1 > n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(tokens)} tokens but a request's context holds {n_ctx} (n_ctx); "
                "shorten the prompt or serve the model with a larger n_ctx",
                len(tokens),
                n_ctx,
            )
        params = request.params
        room = n_ctx - len(tokens)
        if params.max_tokens > room:
            params = replace(params, max_tokens=room)
        stream = EventStream(asyncio.get_running_loop(), prompt_tokens=len(tokens))
        job = Job(tokens=tokens, params=params, stream=stream)
        stream.on_close(job.cancelled.set)
        model.enqueue(job)
        return stream

    async def close(self) -> None:
        for m in self._models.values():
            await asyncio.to_thread(m.close)
        self._models.clear()
