"""``create_app(settings)``: the Starlette application. The lifespan builds the server's state, loads the models
(then the embedder, then the reranker) in the background (/health answers 503 until the chat models are ready; the
embeddings and rerank routes answer 503 until theirs are) and closes them at shutdown. No module-level state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from edgellm.serve.engine import Engine, ModelSpec, build_engine
from edgellm.serve.errors import exception_handlers
from edgellm.serve.http import EmbedderState, ModelState, RerankerState, ServerState
from edgellm.serve.routes.embeddings import embeddings
from edgellm.serve.routes.generate import chat_completions, completions
from edgellm.serve.routes.info import health, list_models
from edgellm.serve.routes.page import chat_page
from edgellm.serve.routes.rerank import rerank
from edgellm.serve.settings import EmbedderSettings, RerankerSettings, ServeSettings

if TYPE_CHECKING:
    from edgellm.serve.engine.embed import Embedder
    from edgellm.serve.engine.rerank import Reranker

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


def _load_reranker(r: RerankerSettings) -> Reranker:
    """Load the configured cross-encoder (blocking). A GGUF runs on llama.cpp with ``reranker.threads`` threads; a
    sentence-transformers directory imports torch.

    For sentence-transformers, torch's thread count (``reranker.threads``) is set here, by the server, not by the
    reranker: it is process-wide, and torch shares one OpenMP runtime with llama.cpp in this process (more OpenMP
    threads than cores makes it throttle, and chat decoding drops ~3x). The process that serves owns that setting."""
    from edgellm.serve.engine.rerank import load_reranker

    backend = r.resolved_backend()
    if backend == "sentence-transformers" and r.threads is not None:
        import torch

        torch.set_num_threads(r.threads)
    return load_reranker(
        backend,
        r.path,
        name=r.name,
        max_documents=r.max_documents,
        batch_size=r.batch_size,
        max_length=r.max_length,
        threads=r.threads or 1,
        n_batch=r.n_batch,
    )


def _load_embedder(e: EmbedderSettings) -> Embedder:
    """Load the configured embedding model (blocking): a GGUF on llama.cpp (no torch), or a sentence-transformers
    directory (imports torch; ``embedder.threads`` becomes torch's thread count, as for the reranker)."""
    from edgellm.serve.engine.embed import load_embedder

    backend = e.resolved_backend()
    if backend == "sentence-transformers":
        import torch

        torch.set_num_threads(e.threads)
    return load_embedder(
        backend,
        e.path,
        name=e.name,
        max_inputs=e.max_inputs,
        max_length=e.max_length,
        truncate=e.truncate,
        normalize=e.normalize,
        pooling=e.pooling,
        n_batch=e.n_batch,
        threads=e.threads,
        batch_size=e.batch_size,
    )


async def _load_into(state: ModelState[Any], what: str, load: Callable[[], Any]) -> None:
    try:
        state.model = await asyncio.to_thread(load)
    except Exception as e:
        log.exception("loading the %s failed", what)
        state.error = str(e)


def create_app(settings: ServeSettings, engine_factory: EngineFactory | None = None) -> Starlette:
    """Build the app. ``engine_factory`` replaces the llama.cpp engine (unit tests use a fake one)."""
    factory = engine_factory or _default_engine_factory

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, ServerState]]:
        state = ServerState(settings=settings)
        if settings.reranker is not None:
            state.reranker = RerankerState(limiter=anyio.CapacityLimiter(1))
        if settings.embedder is not None:
            state.embedder = EmbedderState(limiter=anyio.CapacityLimiter(1))

        async def load() -> None:
            try:
                state.engine = await asyncio.to_thread(factory, settings)
                names = ", ".join(m.name for m in state.engine.models())
                log.info("ready: serving %s on http://%s:%s", names, settings.host, settings.port)
            except Exception as e:
                log.exception("loading the models failed")
                state.load_error = str(e)
                return
            if state.embedder is not None and (embedder := settings.embedder) is not None:
                await _load_into(state.embedder, "embedder", lambda: _load_embedder(embedder))
            if state.reranker is not None and (reranker := settings.reranker) is not None:
                await _load_into(state.reranker, "reranker", lambda: _load_reranker(reranker))

        loader = asyncio.create_task(load())
        try:
            yield {"server": state}
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if state.engine is not None:
                await state.engine.close()
            for loaded in (state.embedder, state.reranker):
                if loaded is not None and loaded.model is not None:
                    await asyncio.to_thread(loaded.model.close)

    routes = [
        Route("/", chat_page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/rerank", rerank, methods=["POST"]),
        Route("/rerank", rerank, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/embeddings", embeddings, methods=["POST"]),
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
