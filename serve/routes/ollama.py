"""Ollama's API (``/api/*``) on the same port and the same engine as the OpenAI routes.

``GET /api/version``, ``GET /api/tags``, ``GET /api/ps``, ``POST /api/show``, ``POST /api/chat``,
``POST /api/generate`` (newline-delimited JSON when ``stream`` is true, Ollama's default; one object otherwise),
``POST /api/embed`` and the legacy ``POST /api/embeddings``. Requests are validated and shaped by
``ollama_format``; every error leaves here as Ollama's ``{"error": "message"}`` with the status ``to_api_error``
gives (``ollama_error``, the one place). The API key is checked as on the other routes, except on
``/api/version`` (a liveness probe for Ollama clients, like ``/health``).

``/api/tags`` lists the chat models and a GGUF embedder. A model's ``digest`` is the sha256 of its file, computed
once in a worker thread the first time a listing needs it and kept until the file changes (size or mtime).

``keep_alive`` on /api/chat and /api/generate is Ollama's: for a model served on demand (``--models-dir``) it sets
that model's idle expiry in the pool (``ModelPool.set_keep_alive``; absent: the server's ``keep_alive`` again, as
Ollama returns to its default), 0 unloads it once the request is done, negative keeps it loaded. A request with
nothing to say loads the model (``done_reason: "load"``), or with ``keep_alive: 0`` unloads it (``"unload"``).
``/api/ps`` reports each loaded model's real ``expires_at`` and its estimated ``size`` (file + KV cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgellm import __version__
from edgellm.fsutil import sha256_file
from edgellm.gguf import read_header
from edgellm.serve.engine.base import (
    Engine,
    EngineOverloadedError,
    Finished,
    Generation,
    ModelInfo,
    SamplingParams,
    TextDelta,
    ToolCallDelta,
)
from edgellm.serve.engine.pool import ModelPool
from edgellm.serve.errors import NOT_FOUND, NOT_SUPPORTED, APIError, to_api_error
from edgellm.serve.http import (
    ServerState,
    check_auth,
    for_persona,
    persona_base,
    read_json,
    ready_engine,
    server_state,
    serves_persona,
)
from edgellm.serve.routes.embeddings import NO_EMBEDDER
from edgellm.serve.routes.ollama_format import (
    OLLAMA_API_VERSION,
    SERIAL_REPEAT_LAST_N,
    ChatBody,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
    ModelFacts,
    ShowBody,
    assistant,
    chat_request,
    check_keep_alive,
    check_options,
    final_fields,
    generate_request,
    model_facts,
    parameters_text,
    parse,
    parse_keep_alive,
    refuse_unhonoured,
    sampling,
    timestamp,
    tool_call,
)

if TYPE_CHECKING:
    from edgellm.serve.engine.embed import EmbedOutput

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
NDJSON = "application/x-ndjson"
# What Ollama reports for a model kept loaded forever (keep_alive < 0): now + the longest Go duration.
FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)


# --- errors: one place ---------------------------------------------------------------------------------------------


def ollama_error(exc: Exception) -> JSONResponse:
    """Any exception as Ollama's error shape, with the status (and headers, e.g. Retry-After) the server uses."""
    err = to_api_error(exc)
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


def _ollama_errors(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as e:
            return ollama_error(e)

    return wrapped


# --- the models as Ollama's listings see them ----------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    name: str
    path: Path
    kind: Literal["chat", "embedding"]
    n_ctx: int


def served_models(state: ServerState, engine: Engine, loaded_only: bool = False) -> list[Served]:
    """The chat models (with ``--models-dir``, those not loaded yet too, unless ``loaded_only``), then the embedder
    when it is a loaded GGUF file (a sentence-transformers folder is not listed: Ollama's listings describe GGUF
    files)."""
    infos = (
        [e.info for e in engine.catalog()] if isinstance(engine, ModelPool) and not loaded_only else engine.models()
    )
    out = [Served(m.name, Path(m.path), "chat", m.n_ctx) for m in infos]
    embedder = state.embedder.model if state.embedder is not None else None
    if embedder is not None and Path(embedder.path).suffix == ".gguf":
        out.append(Served(embedder.name, Path(embedder.path), "embedding", embedder.max_length))
    return out


def find_model(served: list[Served], name: str | None) -> Served:
    """The served model ``name`` names (``<name>:latest`` is ``<name>``, as in Ollama), else 400/404."""
    if not name:
        raise APIError(400, "'model' is required")
    for candidate in (name, name.removesuffix(":latest")):
        for s in served:
            if s.name == candidate:
                return s
    available = ", ".join(s.name for s in served)
    raise APIError(404, f"model {name!r} not found; served here: {available}", NOT_FOUND)


def _quantization_level(path: Path, file_type: int | None) -> str:
    from edgellm.quants import ftype_name, quant_in_name

    return (ftype_name(file_type) if file_type is not None else None) or quant_in_name(path) or "unknown"


def _read_facts(path: Path, verbose: bool) -> ModelFacts:
    header = read_header(path, keep_arrays=verbose, with_tensors=True)
    return model_facts(path, header, _quantization_level(path, header.file_type))


class ModelFactsCache:
    """Header facts and sha256 digests of the served files, each computed once in a worker thread and kept while
    the file's size and mtime stay the same. Lives on the app (``app.state``), not in the module."""

    def __init__(self) -> None:
        self._facts: dict[tuple[str, int, int], ModelFacts] = {}
        self._digests: dict[tuple[str, int, int], asyncio.Task[str]] = {}

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return str(path.resolve()), st.st_size, st.st_mtime_ns

    async def facts(self, path: Path, verbose: bool = False) -> ModelFacts:
        if verbose:  # every array in full: not kept
            return await asyncio.to_thread(_read_facts, path, True)
        key = self._key(path)
        facts = self._facts.get(key)
        if facts is None:
            facts = self._facts[key] = await asyncio.to_thread(_read_facts, path, False)
        return facts

    async def digest(self, path: Path) -> str:
        key = self._key(path)
        task = self._digests.get(key)
        if task is None:
            task = self._digests[key] = asyncio.ensure_future(asyncio.to_thread(sha256_file, path))
        try:
            return await asyncio.shield(task)  # a client that goes away does not cancel the shared hashing
        except OSError:
            self._digests.pop(key, None)
            raise


def facts_cache(request: Request) -> ModelFactsCache:
    state = request.app.state
    cache: ModelFactsCache | None = getattr(state, "ollama_model_facts", None)
    if cache is None:
        cache = state.ollama_model_facts = ModelFactsCache()
    return cache


async def _listing(cache: ModelFactsCache, s: Served) -> tuple[dict[str, Any], ModelFacts]:
    facts = await cache.facts(s.path)
    entry = {
        "name": s.name,
        "model": s.name,
        "modified_at": timestamp(facts.modified_at),
        "size": facts.size,
        "digest": await cache.digest(s.path),
        "details": facts.details(),
    }
    return entry, facts


# --- GET /api/version, GET /api/tags, GET /api/ps, POST /api/show --------------------------------------------------


async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_API_VERSION, "edgellm": __version__})


async def tags(request: Request) -> Response:
    state = server_state(request)
    check_auth(request, state.settings.api_key)
    cache = facts_cache(request)
    models = [(await _listing(cache, s))[0] for s in served_models(state, ready_engine(request))]
    return JSONResponse({"models": models})


def expires_at(seconds: float | None) -> str:
    """Ollama's ``expires_at``: now + ``seconds``; None (never unloaded) is what Ollama says for ``keep_alive: -1``."""
    forever = FOREVER.total_seconds()
    return timestamp(datetime.now(UTC) + (FOREVER if seconds is None else timedelta(seconds=min(seconds, forever))))


async def ps(request: Request) -> Response:
    """The loaded models: ``expires_at`` from the pool (when it unloads an idle model; models loaded at start and
    the embedder: never), ``size`` the estimated RAM (file + KV cache; the file for the embedder), ``size_vram`` the
    part on a GPU (0 on CPU)."""
    state = server_state(request)
    check_auth(request, state.settings.api_key)
    cache = facts_cache(request)
    engine = ready_engine(request)
    pool = engine if isinstance(engine, ModelPool) else None
    models = []
    for s in served_models(state, engine, loaded_only=True):
        entry, _ = await _listing(cache, s)
        del entry["modified_at"]
        spec = pool.spec_of(s.name) if pool is not None and s.kind == "chat" else None
        est = await asyncio.to_thread(pool.memory_estimate, spec) if pool is not None and spec is not None else None
        expires = pool.expires_in(s.name) if pool is not None and s.kind == "chat" else None
        if est is not None and spec is not None:
            entry["size"] = est.total
        vram = est.offloaded(spec.n_gpu_layers) if est is not None and spec is not None else 0
        models.append({**entry, "expires_at": expires_at(expires), "size_vram": vram, "context_length": s.n_ctx})
    return JSONResponse({"models": models})


async def show(request: Request) -> Response:
    state = server_state(request)
    settings = state.settings
    check_auth(request, settings.api_key)
    body = parse(ShowBody, await read_json(request, settings.max_body_bytes))
    s = find_model(served_models(state, ready_engine(request)), body.model or body.name)
    facts = await facts_cache(request).facts(s.path, verbose=body.verbose)
    if s.kind == "chat":
        capabilities = ["completion", "tools"] if settings.engine == "batched" else ["completion"]
        parameters = parameters_text(s.n_ctx, SamplingParams(), settings.default_max_tokens)
    else:
        capabilities, parameters = ["embedding"], f"{'num_ctx':<30} {s.n_ctx}"
    out: dict[str, Any] = {
        "modelfile": f"# Modelfile of what edgellm serves as {s.name}\nFROM {s.path}\n",
        "parameters": parameters,
        "template": facts.template,
        "details": facts.details(),
        "model_info": facts.model_info,
        "capabilities": capabilities,
        "modified_at": timestamp(facts.modified_at),
    }
    if facts.license:
        out["license"] = facts.license
    return JSONResponse(out)


# --- POST /api/chat, POST /api/generate ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One answer object: chat puts text in ``message``, generate in ``response``."""

    model: str
    chat: bool

    def chunk(
        self, text: str, calls: list[dict[str, Any]] | None = None, final: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": timestamp()}
        if self.chat:
            out["message"] = assistant(text, calls)
        else:
            out["response"] = text
        out.update(final or {"done": False})
        return out


class ToolCalls:
    """Ollama returns each tool call whole (arguments as an object): the engine's deltas, gathered per call."""

    def __init__(self) -> None:
        self._name: str | None = None
        self._args: list[str] = []

    def add(self, d: ToolCallDelta) -> dict[str, Any] | None:
        """Take a delta; when it starts a new call, return the previous one, finished."""
        done = self.close() if d.id is not None else None
        if d.id is not None:
            self._name = d.name or ""
        self._args.append(d.arguments)
        return done

    def close(self) -> dict[str, Any] | None:
        if self._name is None:
            return None
        call = tool_call(self._name, "".join(self._args))
        self._name, self._args = None, []
        return call


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


async def ndjson_lines(generation: Generation, shape: Shape, started_ns: int, load_ns: int = 0) -> AsyncIterator[bytes]:
    calls = ToolCalls()
    try:
        async for event in generation:
            if isinstance(event, TextDelta):
                if event.text:
                    yield _line(shape.chunk(event.text))
            elif isinstance(event, ToolCallDelta):
                if (call := calls.add(event)) is not None:
                    yield _line(shape.chunk("", [call]))
            elif isinstance(event, Finished):
                if (call := calls.close()) is not None:
                    yield _line(shape.chunk("", [call]))
                total = time.perf_counter_ns() - started_ns
                yield _line(shape.chunk("", final=final_fields(event, total, load_ns)))
    except Exception as e:  # the response has started: report the error in-band, as Ollama does
        yield _line({"error": to_api_error(e).message})
    finally:
        await generation.aclose()


async def collect_answer(
    generation: Generation, request: Request, shape: Shape, started_ns: int, load_ns: int = 0
) -> dict[str, Any]:
    """The whole answer as one object; if the client goes away first, the generation is cancelled."""
    parts: list[str] = []
    calls: list[dict[str, Any]] = []
    pending = ToolCalls()
    finished: Finished | None = None
    failed: Exception | None = None

    async def gather() -> None:
        nonlocal finished, failed
        try:
            async for event in generation:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                elif isinstance(event, ToolCallDelta):
                    if (call := pending.add(event)) is not None:
                        calls.append(call)
                elif isinstance(event, Finished):
                    if (call := pending.close()) is not None:
                        calls.append(call)
                    finished = event
        except Exception as e:  # raised below as itself, not inside the task group's ExceptionGroup
            failed = e
        tg.cancel_scope.cancel()

    async def watch_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        tg.cancel_scope.cancel()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(gather)
            tg.start_soon(watch_disconnect)
    finally:
        await generation.aclose()
    if failed is not None:
        raise failed
    if finished is None:
        raise APIError(499, "client disconnected")
    return shape.chunk("".join(parts), calls, final_fields(finished, time.perf_counter_ns() - started_ns, load_ns))


def _chat_model(state: ServerState, engine: Engine, name: str | None) -> ModelInfo:
    s = find_model(served_models(state, engine), name)
    if s.kind != "chat":
        raise APIError(400, f"{s.name!r} is an embedding model: it does not generate; use /api/embed")
    return ModelInfo(name=s.name, path=str(s.path), n_ctx=s.n_ctx, created=0)


def apply_keep_alive(engine: Engine, name: str, value: float | int | str | None) -> float | None:
    """Ollama's ``keep_alive`` for model ``name``: the model's idle expiry in the pool (absent: the server's
    keep_alive). A model loaded at start (or an engine without a pool) stays loaded: only absent or negative."""
    if not isinstance(engine, ModelPool) or engine.is_pinned(name):
        return check_keep_alive(value, f"model {name!r}")
    seconds = parse_keep_alive(value)
    engine.set_keep_alive(name, seconds)
    return seconds


@contextlib.asynccontextmanager
async def loaded(engine: Engine, name: str) -> AsyncIterator[int]:
    """Model ``name`` loaded (if it is served on demand) and held loaded while inside; yields the nanoseconds its
    load took (0: it was loaded), for ``load_duration``."""
    if not isinstance(engine, ModelPool):
        yield 0
        return
    started, was_loaded = time.perf_counter_ns(), engine.is_loaded(name)
    async with engine.holding(name):
        yield 0 if was_loaded else time.perf_counter_ns() - started


async def unload_when_idle(engine: Engine, name: str) -> None:
    """``keep_alive: 0`` with nothing to say: unload ``name`` now, or once its running requests are done."""
    if not isinstance(engine, ModelPool) or not engine.is_loaded(name):
        if isinstance(engine, ModelPool):
            engine.set_keep_alive(name, None)  # nothing loaded: nothing to expire
        return
    if not engine.busy(name):
        try:
            await engine.unload_model(name)
        except EngineOverloadedError:  # a request came meanwhile: keep_alive 0 unloads it after that one
            pass


async def _answer(request: Request, body_type: type[ChatBody] | type[GenerateBody]) -> Response:
    started = time.perf_counter_ns()
    state = server_state(request)
    arrived = state.metrics.now()
    settings = state.settings
    check_auth(request, settings.api_key)
    body = parse(body_type, await read_json(request, settings.max_body_bytes))
    refuse_unhonoured(body)
    engine = ready_engine(request)
    persona = serves_persona(state, body.model)  # a persona or a router: its base model serves it
    model = _chat_model(state, engine, persona_base(state, body.model) if persona and body.model else body.model)
    options = check_options(body.options, model.n_ctx)
    if settings.engine == "serial" and options.repeat_last_n not in (None, SERIAL_REPEAT_LAST_N):
        raise APIError(400, f"'options.repeat_last_n' needs the batched engine (the serial engine's penalty window "
                       f"is fixed at {SERIAL_REPEAT_LAST_N}); serve with `--engine batched` (the default)")
    shape = Shape(body.model or model.name, chat=isinstance(body, ChatBody))  # the name as asked, as Ollama does
    keep_alive = apply_keep_alive(engine, model.name, body.keep_alive)
    if not (body.messages if isinstance(body, ChatBody) else body.prompt):  # Ollama: nothing to say loads the model
        if keep_alive == 0:  # ... or, with keep_alive 0, unloads it
            await unload_when_idle(engine, model.name)
            return JSONResponse(shape.chunk("", final={"done": True, "done_reason": "unload"}))
        async with loaded(engine, model.name) as load_ns:
            return JSONResponse(shape.chunk("", final={"done": True, "done_reason": "load", "load_duration": load_ns}))
    params = sampling(options, settings.default_max_tokens, settings.max_tokens_cap)
    asked = body.model if persona and body.model else model.name
    gen_request = (
        chat_request(body, asked, params) if isinstance(body, ChatBody) else generate_request(body, asked, params)
    )
    if persona:  # the persona's adapters, prompt, caps and filters (a router's choice first)
        gen_request, _ = await for_persona(state, gen_request)
    async with loaded(engine, model.name) as load_ns:  # timed here, for load_duration; submit finds it loaded
        submitted = await engine.submit(gen_request)
    # a drain ends it with its final chunk; metrics count its tokens and latency
    generation = state.drain.watch(state.metrics.observe_generation(model.name, submitted, arrived))
    if body.stream:
        return StreamingResponse(ndjson_lines(generation, shape, started, load_ns), media_type=NDJSON)
    return JSONResponse(await collect_answer(generation, request, shape, started, load_ns))


async def chat(request: Request) -> Response:
    return await _answer(request, ChatBody)


async def generate(request: Request) -> Response:
    return await _answer(request, GenerateBody)


# --- POST /api/embed, POST /api/embeddings -------------------------------------------------------------------------


async def _embed(request: Request, body_type: type[EmbedBody] | type[EmbeddingsBody]) -> tuple[str, EmbedOutput | None]:
    """(the embedder's name, the vectors or None when there is nothing to embed), checked as the OpenAI route
    checks a request."""
    state = server_state(request)
    settings = state.settings
    check_auth(request, settings.api_key)
    served = state.embedder
    if settings.embedder is None or served is None:
        raise APIError(501, NO_EMBEDDER, NOT_SUPPORTED)
    body = parse(body_type, await read_json(request, settings.max_body_bytes))
    check_keep_alive(body.keep_alive, "the embedder")
    if given := [k for k, v in (body.options or {}).items() if v is not None]:
        raise APIError(400, f"{', '.join(repr('options.' + k) for k in given)}: embeddings take no options here")
    embedder = served.ready("embedder")
    if not body.model:
        raise APIError(400, "'model' is required")
    if embedder.name not in (body.model, body.model.removesuffix(":latest")):
        raise APIError(404, f"embedding model {body.model!r} not found; served here: {embedder.name}", NOT_FOUND)
    if isinstance(body, EmbedBody):
        if body.dimensions is not None and body.dimensions != embedder.dimensions:
            raise APIError(400, f"'dimensions': {body.dimensions} is not supported: {embedder.name} makes "
                           f"{embedder.dimensions}-dimensional vectors and cannot shorten them; leave it out")
        inputs = [body.input] if isinstance(body.input, str) else list(body.input)
        truncate = body.truncate
    else:
        inputs, truncate = ([body.prompt] if body.prompt else []), None
    if not inputs:
        return embedder.name, None
    out = await served.run("embedder", lambda: embedder.embed(inputs, truncate=truncate), items=len(inputs))
    return embedder.name, out


async def embed(request: Request) -> Response:
    started = time.perf_counter_ns()
    name, out = await _embed(request, EmbedBody)
    return JSONResponse({
        "model": name,
        "embeddings": [] if out is None else out.vectors.tolist(),
        "total_duration": time.perf_counter_ns() - started,
        "load_duration": 0,
        "prompt_eval_count": 0 if out is None else out.prompt_tokens,
    })


async def embeddings(request: Request) -> Response:
    """The legacy route: one ``prompt``, one ``embedding`` (empty for an empty prompt, as Ollama answers)."""
    _, out = await _embed(request, EmbeddingsBody)
    return JSONResponse({"embedding": [] if out is None else out.vectors[0].tolist()})


def ollama_routes() -> list[Route]:
    """The routes, each answering errors in Ollama's shape."""
    return [
        Route("/api/version", _ollama_errors(version), methods=["GET"]),
        Route("/api/tags", _ollama_errors(tags), methods=["GET"]),
        Route("/api/ps", _ollama_errors(ps), methods=["GET"]),
        Route("/api/show", _ollama_errors(show), methods=["POST"]),
        Route("/api/chat", _ollama_errors(chat), methods=["POST"]),
        Route("/api/generate", _ollama_errors(generate), methods=["POST"]),
        Route("/api/embed", _ollama_errors(embed), methods=["POST"]),
        Route("/api/embeddings", _ollama_errors(embeddings), methods=["POST"]),
    ]

