"""``create_app(settings)``: the Starlette application. The lifespan loads the models in the background
(/health answers 503 until they are ready) and closes them at shutdown. No module-level state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from edgellm.serve.engine.base import Engine
from edgellm.serve.errors import exception_handlers
from edgellm.serve.http import ServerState
from edgellm.serve.routes.generate import chat_completions, completions
from edgellm.serve.routes.info import health, list_models
from edgellm.serve.routes.rerank import rerank
from edgellm.serve.settings import ServeSettings

log = logging.getLogger(__name__)

EngineFactory = Callable[[ServeSettings], Engine]


def _default_engine_factory(settings: ServeSettings) -> Engine:
    from edgellm.serve.engine.factory import build_engine

    return build_engine(settings)


def _load_reranker(settings: ServeSettings) -> object | None:
    if settings.reranker is None:
        return None
    from edgellm.serve.engine.rerank import CrossEncoderReranker

    r = settings.reranker
    return CrossEncoderReranker(
        r.path,
        name=r.name,
        max_documents=r.max_documents,
        batch_size=r.batch_size,
        max_length=r.max_length,
        threads=r.threads,
    )


def create_app(settings: ServeSettings, engine_factory: EngineFactory | None = None) -> Starlette:
    """Build the app. ``engine_factory`` replaces the llama.cpp engine (unit tests use a fake one)."""
    factory = engine_factory or _default_engine_factory

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, ServerState]]:
        state = ServerState(settings=settings)

        async def load() -> None:
            try:
                state.engine = await asyncio.to_thread(factory, settings)
                names = ", ".join(m.name for m in state.engine.models())
                log.info("ready: serving %s on http://%s:%s", names, settings.host, settings.port)
            except Exception as e:
                log.exception("loading the models failed")
                state.load_error = str(e)
                return
            try:
                state.reranker = await asyncio.to_thread(_load_reranker, settings)
            except Exception as e:
                log.exception("loading the reranker failed")
                state.reranker_error = str(e)

        loader = asyncio.create_task(load())
        try:
            yield {"server": state}
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if state.engine is not None:
                await state.engine.close()
            if state.reranker is not None:
                await asyncio.to_thread(state.reranker.close)

    routes = [
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
