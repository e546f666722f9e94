"""Request plumbing shared by the routes: the server's state, body reading with a size limit, auth."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
from starlette.requests import Request

from edgellm.serve.engine.base import Engine
from edgellm.serve.errors import AUTHENTICATION, NOT_SUPPORTED, UNAVAILABLE, APIError
from edgellm.serve.settings import ServeSettings

if TYPE_CHECKING:
    from edgellm.serve.engine.embed import Embedder
    from edgellm.serve.engine.rerank import Reranker

M = TypeVar("M")


@dataclass
class ModelState(Generic[M]):
    """A configured reranker or embedder as the routes see it. The lifespan builds it and loads the model in the
    background: ``model`` is None until it is loaded (``error`` says why, if it failed). ``limiter`` lets one call at
    a time run in a worker thread (the model serializes its calls anyway; the others wait without holding a
    thread)."""

    limiter: anyio.CapacityLimiter
    model: M | None = None
    error: str | None = None

    def ready(self, what: str) -> M:
        """The loaded model, or a 503 that says whether it is still loading or why it failed."""
        if self.model is not None:
            return self.model
        if self.error:
            raise APIError(503, f"the {what} failed to load: {self.error}", UNAVAILABLE)
        raise APIError(503, f"the {what} is still loading; retry shortly", UNAVAILABLE, {"Retry-After": "1"})


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
    engine: Engine | None = None
    load_error: str | None = None
    reranker: RerankerState | None = None
    embedder: EmbedderState | None = None

    @property
    def ready(self) -> bool:
        return self.engine is not None


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


def check_auth(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    if header != f"Bearer {api_key}":
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", AUTHENTICATION)


async def read_json(request: Request, limit: int) -> Any:
    """Read the body (at most ``limit`` bytes, else 413) and parse it as JSON (else 400)."""
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
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def not_supported(message: str) -> APIError:
    return APIError(501, message, NOT_SUPPORTED)
