"""``create_app(settings)``: the Starlette application. The lifespan builds the server's state, loads the models
(then the reranker) in the background (/health answers 503 until they are ready) and closes them at shutdown.
No module-level state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from edgellm.serve.engine import Engine, ModelSpec, build_engine
from edgellm.serve.errors import exception_handlers
from edgellm.serve.http import RerankerState, ServerState
from edgellm.serve.routes.generate import chat_completions, completions
from edgellm.serve.routes.info import health, list_models
from edgellm.serve.routes.page import chat_page
from edgellm.serve.routes.rerank import rerank
from edgellm.serve.settings import RerankerSettings, ServeSettings

if TYPE_CHECKING:
    from edgellm.serve.engine.rerank import CrossEncoderReranker

log = logging.getLogger(__name__)

EngineFactory = Callable[[ServeSettings], Engine]


def model_specs(settings: ServeSettings) -> list[ModelSpec]:
    """The configured models as the engine takes them: flat, typed, independent of the settings file."""
    return [
        ModelSpec(
            name=m.name,
            path=m.path,
            n_ctx=m.n_ctx,
            n_threads=m.n_threads,
            n_gpu_layers=m.n_gpu_layers,
            n_batch=m.n_batch,
        )
        for m in settings.models
    ]


def _default_engine_factory(settings: ServeSettings) -> Engine:
    return build_engine(
        settings.engine, model_specs(settings), slots=settings.slots, queue_size=settings.queue_size
    )


def _load_reranker(r: RerankerSettings) -> CrossEncoderReranker:
    """Load the configured cross-encoder (blocking; imports torch).

    torch's thread count (``reranker.threads``) is set here, by the server, not by the reranker: it is process-wide,
    and torch shares one OpenMP runtime with llama.cpp in this process (more OpenMP threads than cores makes it
    throttle, and chat decoding drops ~3x). The process that serves owns that setting."""
    from edgellm.serve.engine.rerank import CrossEncoderReranker

    if r.threads is not None:
        import torch

        torch.set_num_threads(r.threads)
    return CrossEncoderReranker(
        r.path,
        name=r.name,
        max_documents=r.max_documents,
        batch_size=r.batch_size,
        max_length=r.max_length,
    )


def create_app(settings: ServeSettings, engine_factory: EngineFactory | None = None) -> Starlette:
    """Build the app. ``engine_factory`` replaces the llama.cpp engine (unit tests use a fake one)."""
    factory = engine_factory or _default_engine_factory

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, ServerState]]:
        state = ServerState(settings=settings)
        if settings.reranker is not None:
            state.reranker = RerankerState(limiter=anyio.CapacityLimiter(1))

        async def load() -> None:
            try:
                state.engine = await asyncio.to_thread(factory, settings)
                names = ", ".join(m.name for m in state.engine.models())
                log.info("ready: serving %s on http://%s:%s", names, settings.host, settings.port)
            except Exception as e:
                log.exception("loading the models failed")
                state.load_error = str(e)
                return
            if state.reranker is None or settings.reranker is None:
                return
            try:
                state.reranker.model = await asyncio.to_thread(_load_reranker, settings.reranker)
            except Exception as e:
                log.exception("loading the reranker failed")
                state.reranker.error = str(e)

        loader = asyncio.create_task(load())
        try:
            yield {"server": state}
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if state.engine is not None:
                await state.engine.close()
            if state.reranker is not None and state.reranker.model is not None:
                await asyncio.to_thread(state.reranker.model.close)

    routes = [
        Route("/", chat_page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/rerank", rerank, methods=["POST"]),
        Route("/rerank", rerank, methods=["POST"]),
    ]
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
                allow_credentials=False,
            )
        )
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=exception_handlers(),  # type: ignore[arg-type]
        lifespan=lifespan,
    )
