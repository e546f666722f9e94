"""``create_app(settings)``: the Starlette application. The lifespan builds the server's state, loads the models
(then the embedder, then the reranker, each checked with one tiny call) in the background and closes them at
shutdown. /health is 200 only once every configured part answers (503 naming the parts still loading, or draining);
/livez is 200 as soon as the process serves. ``DrainMiddleware`` and the ``Drain`` (``drain.py``) carry the graceful
drain on SIGTERM. No module-level state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from edgellm.serve.drain import Drain, DrainMiddleware
from edgellm.serve.engine import Engine, ModelSpec, build_engine
from edgellm.serve.engine.pool import ModelPool
from edgellm.serve.errors import exception_handlers
from edgellm.serve.http import EmbedderState, ModelState, RerankerState, ServerState
from edgellm.serve.metrics import HTTPMetricsMiddleware, Metrics, pool_families
from edgellm.serve.personas import PersonaSet, build_router
from edgellm.serve.routes.embeddings import embeddings
from edgellm.serve.routes.generate import chat_completions, completions
from edgellm.serve.routes.info import health, list_models, livez
from edgellm.serve.routes.metrics import metrics as metrics_route
from edgellm.serve.routes.models import load_model, unload_model
from edgellm.serve.routes.ollama import ollama_routes
from edgellm.serve.routes.page import chat_page
from edgellm.serve.routes.rerank import rerank
from edgellm.serve.routes.slots import slots
from edgellm.serve.routes.tokenize import apply_template, detokenize, tokenize
from edgellm.serve.settings import EmbedderSettings, ModelsDir, RerankerSettings, ServeSettings
from edgellm.serve.sizing import estimate_memory, parse_memory_budget, plan_contexts
from edgellm.serve.throttle import Probe, PsutilProbe, Reading, Throttle

if TYPE_CHECKING:
    from edgellm.serve.engine.embed import Embedder
    from edgellm.serve.engine.rerank import Reranker

log = logging.getLogger(__name__)

EngineFactory = Callable[[ServeSettings], Engine]


def model_specs(settings: ServeSettings) -> list[ModelSpec]:
    """The configured models as the engine takes them: flat, typed, independent of the settings file. A model with
    ``n_ctx: null`` gets a context sized to this machine (``sizing.plan_contexts``, which logs the plan)."""
    slots = settings.slots if settings.engine == "batched" else 1
    plans = plan_contexts([(m.name, m.path, m.n_ctx) for m in settings.models], slots)
    personas = PersonaSet.from_settings(settings)  # each base loads its personas' LoRA adapters, once
    return [
        ModelSpec(
            name=m.name,
            path=m.path,
            n_ctx=plan.n_ctx,
            n_threads=m.n_threads,
            n_gpu_layers=m.n_gpu_layers,
            n_batch=m.n_batch,
            chat_template=m.chat_template.read_text(encoding="utf-8") if m.chat_template else None,
            loras=personas.loras_for(m.name),
        )
        for m, plan in zip(settings.models, plans, strict=True)
    ]


def dir_catalog(settings: ServeSettings) -> Callable[[], list[ModelSpec]] | None:
    """The chat models in ``models_dir`` as specs (``model_defaults``; an ``n_ctx: null`` planned once per file,
    as if the model were alone), rescanned on each call; None without a ``models_dir``."""
    if settings.models_dir is None:
        return None
    folder, d = ModelsDir(settings.models_dir), settings.model_defaults
    slots = settings.slots if settings.engine == "batched" else 1
    n_ctx: dict[tuple[str, Path], int] = {}

    def scan() -> list[ModelSpec]:
        specs = []
        for name, path in folder.scan():
            if (name, path) not in n_ctx:
                n_ctx[(name, path)] = d.n_ctx or plan_contexts([(name, path, None)], slots)[0].n_ctx
            specs.append(ModelSpec(name=name, path=path, n_ctx=n_ctx[(name, path)], n_threads=d.n_threads,
                                   n_gpu_layers=d.n_gpu_layers, n_batch=d.n_batch))
        return specs

    return scan


def _default_engine_factory(settings: ServeSettings) -> Engine:
    engine = build_engine(
        settings.engine,
        model_specs(settings),
        slots=settings.slots,
        prompt_chunk=settings.prompt_chunk,
        kv_unified=settings.kv_unified,
        queue_size=settings.queue_size,
        catalog=dir_catalog(settings),
        max_loaded=settings.max_loaded_models,
        keep_alive=settings.keep_alive,
        load_timeout=settings.load_timeout,
        draft=settings.draft.policy(),
    )
    _configure_memory(engine, settings)
    return engine


def _configure_memory(engine: Engine, settings: ServeSettings) -> None:
    """Each model's estimated RAM (file + KV cache of its slots) and the memory budget, for the on-demand pool."""
    if isinstance(engine, ModelPool):
        slots = settings.slots if settings.engine == "batched" else 1
        budget = parse_memory_budget(settings.memory_budget)
        engine.configure_memory(lambda spec: estimate_memory(spec.path, spec.n_ctx, slots), budget)


def _start_throttle(
    settings: ServeSettings, state: ServerState, metrics: Metrics, probe: Probe | None
) -> asyncio.Task[None] | None:
    """The throttle (``serve/throttle.py``) over the loaded models, its gauges in /metrics; its task when enabled."""
    t = settings.throttle
    throttle = Throttle(
        probe or (PsutilProbe() if t.enabled else Reading),
        lambda: state.engine.loaded_workers() if isinstance(state.engine, ModelPool) else [],
        threads=t.threads, slots=t.slots, on_battery=t.on_battery, cpu_percent=t.cpu_percent, interval=t.interval,
    )
    metrics.sources["throttle"] = throttle.families
    if not t.enabled:
        return None
    if settings.engine == "serial":
        log.warning("throttle: the serial engine has no thread or slot limits to set; throttling changes nothing")
    log.info("throttle: on battery %s, CPU of other processes above %s: %d threads, %d slots per model (checked "
             "every %g s)", t.on_battery, f"{t.cpu_percent:g}%" if t.cpu_percent else "never", t.threads, t.slots,
             t.interval)
    return asyncio.create_task(throttle.run())


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


def _answering_reranker(r: RerankerSettings) -> Reranker:
    """The loaded reranker, once it has answered one tiny request (readiness means it answers)."""
    log.info("loading the reranker %s from %s", r.name, r.path)
    reranker = _load_reranker(r)
    try:
        reranker.rerank("ready?", ["ready"])
    except BaseException:
        reranker.close()
        raise
    return reranker


def _answering_embedder(e: EmbedderSettings) -> Embedder:
    """The loaded embedder, once it has answered one tiny request."""
    log.info("loading the embedder %s from %s", e.name, e.path)
    embedder = _load_embedder(e)
    try:
        embedder.embed(["ready"])
    except BaseException:
        embedder.close()
        raise
    return embedder


async def _embedding_routers(settings: ServeSettings, state: ServerState) -> None:
    """The routers that compare messages with persona descriptions, once the embedder answers (each persona's
    vector computed once, here)."""
    embedder = state.embedder.model if state.embedder is not None else None
    if embedder is None:
        return
    for r in settings.routers:
        if r.method != "keywords":
            router = build_router(r, state.personas, embedder)
            await asyncio.to_thread(router.warm)
            state.routers[r.name] = router


async def _load_into(state: ModelState[Any], what: str, load: Callable[[], Any]) -> None:
    try:
        state.model = await asyncio.to_thread(load)
    except Exception as e:
        log.exception("loading the %s failed", what)
        state.error = str(e)


def create_app(
    settings: ServeSettings,
    engine_factory: EngineFactory | None = None,
    drain: Drain | None = None,
    throttle_probe: Probe | None = None,
) -> Starlette:
    """Build the app. ``engine_factory`` replaces the llama.cpp engine (unit tests use a fake one); ``drain`` is
    the one the server's signal handler starts (``drain.DrainingServer``; default: a new one, started by nobody);
    ``throttle_probe`` replaces psutil's reading of the machine for throttling (tests drive it)."""
    factory = engine_factory or _default_engine_factory
    drain = drain or Drain(settings.shutdown_timeout)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, ServerState]]:
        state = ServerState(settings=settings, drain=drain, metrics=metrics, personas=PersonaSet.from_settings(settings))
        for r in settings.routers:  # keyword routers now; embedding ones once the embedder answers
            if r.method == "keywords":
                state.routers[r.name] = build_router(r, state.personas)
        if settings.reranker is not None:
            state.reranker = RerankerState(
                limiter=anyio.CapacityLimiter(1),
                max_waiting=settings.reranker.max_waiting,
                observe=lambda seconds, items: metrics.observe_retrieval("rerank", seconds, items),
            )
        if settings.embedder is not None:
            state.embedder = EmbedderState(
                limiter=anyio.CapacityLimiter(1),
                max_waiting=settings.embedder.max_waiting,
                observe=lambda seconds, items: metrics.observe_retrieval("embeddings", seconds, items),
            )

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
                await _load_into(state.embedder, "embedder", lambda: _answering_embedder(embedder))
                await _embedding_routers(settings, state)
            if state.reranker is not None and (reranker := settings.reranker) is not None:
                await _load_into(state.reranker, "reranker", lambda: _answering_reranker(reranker))
            if state.readiness()["status"] == "ok":
                log.info("ready: every configured part answers")

        loader = asyncio.create_task(load())
        metrics.sources["models"] = lambda: pool_families(state.engine)
        throttling = _start_throttle(settings, state, metrics, throttle_probe)
        try:
            yield {"server": state}
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if throttling is not None:
                throttling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await throttling
            if state.engine is not None:
                await state.engine.close()
            for loaded in (state.embedder, state.reranker):
                if loaded is not None and loaded.model is not None:
                    await asyncio.to_thread(loaded.model.close)

    routes = [
        Route("/", chat_page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/livez", livez, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/slots", slots, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/models/load", load_model, methods=["POST"]),
        Route("/models/unload", unload_model, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/rerank", rerank, methods=["POST"]),
        Route("/rerank", rerank, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/embeddings", embeddings, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/apply-template", apply_template, methods=["POST"]),
        *ollama_routes(),
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
    middleware.append(Middleware(DrainMiddleware, drain=drain))  # inside CORS: its 503s carry the CORS headers
    middleware.append(Middleware(HTTPMetricsMiddleware, metrics=metrics, paths={r.path for r in routes}))
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=exception_handlers(),  # type: ignore[arg-type]
        lifespan=lifespan,
    )
