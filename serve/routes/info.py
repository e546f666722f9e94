"""GET /health and GET /v1/models."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgellm.serve.errors import UNAVAILABLE, error_response
from edgellm.serve.http import check_auth, ready_engine, server_state


async def health(request: Request) -> Response:
    state = server_state(request)
    if state.load_error:
        return error_response(503, f"the models failed to load: {state.load_error}", UNAVAILABLE)
    if not state.ready:
        return error_response(503, "loading models", UNAVAILABLE, {"Retry-After": "1"})
    return JSONResponse({"status": "ok"})


async def list_models(request: Request) -> Response:
    state = server_state(request)
    check_auth(request, state.settings.api_key)
    engine = ready_engine(request)
    data = [
        {
            "id": m.name,
            "object": "model",
            "created": m.created,
            "owned_by": "edgellm",
            "meta": {"n_ctx": m.n_ctx, "path": m.path},
        }
        for m in engine.models()
    ]
    embedder = state.embedder.model if state.embedder is not None else None
    if embedder is not None:
        data.append({"id": embedder.name, "object": "model", "created": 0, "owned_by": "edgellm",
                     "meta": {"kind": "embedding", "dimensions": embedder.dimensions, "max_length": embedder.max_length,
                              "path": str(embedder.path)}})
    reranker = state.reranker.model if state.reranker is not None else None
    if reranker is not None:
        data.append({"id": reranker.name, "object": "model", "created": 0, "owned_by": "edgellm",
                     "meta": {"kind": "reranker", "max_length": reranker.max_length}})
    return JSONResponse({"object": "list", "data": data})
