"""Request plumbing shared by the routes: the server's state (and its readiness), body reading with a size and
shape limit, auth."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
from starlette.requests import Request

from edgellm.serve.drain import Drain
from edgellm.serve.engine.base import Engine, GenerationRequest
from edgellm.serve.errors import AUTHENTICATION, NOT_SUPPORTED, UNAVAILABLE, APIError
from edgellm.serve.metrics import Metrics
from edgellm.serve.personas import PersonaSet, RouteDecision, Router, routing_text
from edgellm.serve.settings import ServeSettings

if TYPE_CHECKING:
    from edgellm.serve.engine.embed import Embedder
    from edgellm.serve.engine.rerank import Reranker

M = TypeVar("M")
R = TypeVar("R")

MAX_JSON_DEPTH = 64  # arrays and objects inside one another; no request field needs more than a few
_INT64 = 2**63


@dataclass
class ModelState(Generic[M]):
    """A configured reranker or embedder as the routes see it. The lifespan builds it and loads the model in the
    background: ``model`` is None until it is loaded (``error`` says why, if it failed; it goes to the routes,
    which need the API key when one is set, never to /health). ``limiter`` lets one call at a time run in a worker
    thread (the model serializes its calls anyway); at most ``max_waiting`` more wait for it, later ones get a 503
    with Retry-After."""

    limiter: anyio.CapacityLimiter
    max_waiting: int = 16
    model: M | None = None
    error: str | None = None
    queued: int = 0  # calls running or waiting
    observe: Callable[[float, int], None] | None = None  # (seconds, items) of each request, for /metrics
    _call_s: float = field(default=0.5, repr=False)  # moving average of one call, for Retry-After

    def ready(self, what: str) -> M:
        """The loaded model, or a 503 that says whether it is still loading or why it failed."""
        if self.model is not None:
            return self.model
        if self.error:
            raise APIError(503, f"the {what} failed to load: {self.error}", UNAVAILABLE)
        raise APIError(503, f"the {what} is still loading; retry shortly", UNAVAILABLE, {"Retry-After": "1"})

    async def run(self, what: str, call: Callable[[], R], items: int = 0) -> R:
        """Run ``call`` (blocking) in a worker thread once the calls ahead of it are done; a 503 with Retry-After
        when ``max_waiting`` calls are already waiting. ``items``: documents or inputs, for /metrics."""
        waiting = self.queued - self.limiter.total_tokens + 1
        if waiting > self.max_waiting:
            seconds = min(60, max(1, math.ceil(self._call_s * self.queued)))
            raise APIError(
                503,
                f"the {what} is busy: {self.queued - 1} requests are already waiting (max_waiting "
                f"{self.max_waiting}); retry in {seconds} s",
                UNAVAILABLE,
                {"Retry-After": str(seconds)},
            )
        self.queued += 1
        started = time.perf_counter()
        try:
            result = await anyio.to_thread.run_sync(lambda: self._timed(call), limiter=self.limiter)
        finally:
            self.queued -= 1
        if self.observe is not None:  # served: its latency, waiting included
            self.observe(time.perf_counter() - started, items)
        return result

    def _timed(self, call: Callable[[], R]) -> R:
        t0 = time.perf_counter()
        try:
            return call()
        finally:
            self._call_s = 0.8 * self._call_s + 0.2 * (time.perf_counter() - t0)


if TYPE_CHECKING:
    RerankerState = ModelState[Reranker]
    EmbedderState = ModelState[Embedder]
else:
    RerankerState = EmbedderState = ModelState


@dataclass
class ServerState:
    """Everything the routes need, built by the lifespan (no globals). ``reranker`` (``embedder``) is None when no
    reranker (embedder) is configured."""

    settings: ServeSettings
    drain: Drain
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None
    load_error: str | None = None
    reranker: RerankerState | None = None
    embedder: EmbedderState | None = None
    personas: PersonaSet = field(default_factory=lambda: PersonaSet([]))
    routers: dict[str, Router] = field(default_factory=dict)  # by name; embedding routers once the embedder answers

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def readiness(self) -> dict[str, Any]:
        """``{"status": "ok"}`` when every configured part answers; else the status (``draining``, ``loading``,
        ``failed``) and the parts not ready (``models``, ``embedder``, ``reranker``), without paths or error text."""
        if self.drain.draining:
            return {"status": "draining"}
        waiting: list[str] = []
        failed: list[str] = []
        parts: list[tuple[str, bool, bool]] = [("models", self.engine is not None, self.load_error is not None)]
        for name, part in (("embedder", self.embedder), ("reranker", self.reranker)):
            if part is not None:
                parts.append((name, part.model is not None, part.error is not None))
        for name, loaded, error in parts:
            if error:
                failed.append(name)
            elif not loaded:
                waiting.append(name)
        if failed:
            return {"status": "failed", "failed": failed, "waiting": waiting}
        if waiting:
            return {"status": "loading", "waiting": waiting}
        return {"status": "ok"}


def server_state(request: Request) -> ServerState:
    state: ServerState = request.state.server
    return state


def ready_engine(request: Request) -> Engine:
    state = server_state(request)
    if state.engine is None:
        if state.load_error:
            raise APIError(503, f"the models failed to load: {state.load_error}", UNAVAILABLE)
        raise APIError(503, "the models are still loading; retry shortly", UNAVAILABLE, {"Retry-After": "1"})
    return state.engine


def serves_persona(state: ServerState, name: str | None) -> bool:
    """Whether ``name`` is a persona or a router (configured; a router may still wait for the embedder)."""
    return bool(name) and (name in state.personas or any(r.name == name for r in state.settings.routers))


def persona_base(state: ServerState, name: str) -> str:
    """The model a persona (or a router's default persona) runs on."""
    router = next((r for r in state.settings.routers if r.name == name), None)
    return state.personas.get(router.default if router is not None else name).base


async def for_persona(
    state: ServerState, request: GenerationRequest
) -> tuple[GenerationRequest, RouteDecision | None]:
    """A request for a persona (``model: "<persona>"``) or a router (``model: "auto"``) as the engine runs it: the
    router's choice (from the last user message; an embedding router in a worker thread), then the persona's base,
    adapters, system prompt, caps and filters (``PersonaSet.apply``). Other requests pass unchanged."""
    name, decision = request.model, None
    if any(r.name == name for r in state.settings.routers):
        router = state.routers.get(name)
        if router is None:
            raise APIError(503, f"router {name!r} waits for the embedder to load; retry shortly", UNAVAILABLE,
                           {"Retry-After": "1"})
        text = routing_text(request)
        decision = await asyncio.to_thread(router.route, text) if router.blocking else router.route(text)
        name = decision.persona
    if name in state.personas:
        return state.personas.apply(name, request), decision
    return request, decision


def check_auth(request: Request, api_key: str | None) -> None:
    """The key in constant time (``hmac.compare_digest``: how long the comparison takes says nothing about how much
    of the key was right). Compared as bytes: the header as sent (HTTP headers are read as latin-1), the key as
    UTF-8, so a non-ASCII key works when a client sends it in UTF-8."""
    if api_key is None:
        return
    sent = request.headers.get("authorization", "").encode("latin-1")
    if not hmac.compare_digest(sent, b"Bearer " + api_key.encode("utf-8")):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", AUTHENTICATION)


async def read_json(request: Request, limit: int) -> Any:
    """Read the body (at most ``limit`` bytes, else 413) and parse it as strict JSON: UTF-8, at most
    ``MAX_JSON_DEPTH`` arrays and objects deep, no NaN or Infinity, no number beyond a double or a 64-bit integer,
    no lone surrogate (``"\\ud800"``), else 400."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit} (max_body_bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes (max_body_bytes)")
    if not body:
        raise APIError(400, "the request body is empty; send a JSON object")
    return parse_json(bytes(body))


# A JSON string (escapes included), or one bracket: what the depth check steps through.
_STRING_OR_BRACKET = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
# A \uD800-\uDFFF escape: the only way a surrogate gets into decoded JSON (strict UTF-8 has none).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(body: bytes) -> Any:
    """``body`` as strict JSON (see ``read_json``), or a 400 that says what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8 (byte {e.start}); send UTF-8 JSON") from None
    if too_deep(body):
        raise APIError(
            400, f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} deep; no request needs that"
        )
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_int64)
    except _BadNumber as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if _SURROGATE_ESCAPE.search(body) is not None:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(
                400, "the request body has a lone surrogate escape (such as \\ud800): not a Unicode character"
            ) from None
    return value


def too_deep(body: bytes) -> bool:
    """Whether arrays and objects nest more than ``MAX_JSON_DEPTH`` deep in ``body`` (brackets inside strings do
    not count). Checked on the bytes, before the decoder recurses into them."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return False
    depth = 0
    for m in _STRING_OR_BRACKET.finditer(body):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif c in (b"]", b"}"):
            depth -= 1
    return False


class _BadNumber(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _BadNumber(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _BadNumber(f"the number {text[:40]} is beyond the range of a double")
    return value


def _int64(text: str) -> int:
    if len(text) > 20:
        raise _BadNumber(f"the integer {text[:40]}... is beyond the range of a 64-bit integer")
    value = int(text)
    if not -_INT64 <= value < _INT64:
        raise _BadNumber(f"the integer {text} is beyond the range of a 64-bit integer")
    return value


def not_supported(message: str) -> APIError:
    return APIError(501, message, NOT_SUPPORTED)
