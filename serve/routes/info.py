"""GET /health (readiness), GET /livez (liveness) and GET /v1/models.

/health is open (no API key: orchestrators and balancers probe it), so it says only which parts are not ready,
never a path or an error's text (those are in the log). /v1/models names the models; their files are in the log."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgellm.serve.engine.pool import ModelPool
from edgellm.serve.http import check_auth, ready_engine, server_state


async def health(request: Request) -> Response:
    """200 ``{"status": "ok"}`` once the models, the embedder and the reranker (those configured) answer; else 503
    with the status and the parts not ready: ``{"status": "loading", "waiting": ["reranker"]}``, ``{"status":
    "failed", "failed": [...], "waiting": [...]}`` (the reason is in the log), ``{"status": "draining"}``.
    ``?live=1``: as /livez."""
    if request.query_params.get("live") not in (None, "", "0", "false"):
        return await livez(request)
    readiness = server_state(request).readiness()
    if readiness["status"] == "ok":
        return JSONResponse(readiness)
    headers = {"Retry-After": "1"} if readiness["status"] == "loading" else None
    return JSONResponse(readiness, status_code=503, headers=headers)


async def livez(request: Request) -> Response:
    """200 while the process serves HTTP at all: loading, ready or draining."""
    return JSONResponse({"status": "alive"})


async def list_models(request: Request) -> Response:
    state = server_state(request)
    check_auth(request, state.settings.api_key)
    engine = ready_engine(request)
    if isinstance(engine, ModelPool):  # every model served, loaded or not (the models folder rescanned)
        catalog = await asyncio.to_thread(engine.catalog)
        data = [
            {"id": e.info.name, "object": "model", "created": e.info.created, "owned_by": "edgellm",
             "meta": {"n_ctx": e.info.n_ctx, "loaded": e.loaded}}
            for e in catalog
        ]
    else:
        data = [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "edgellm",
             "meta": {"n_ctx": m.n_ctx, "loaded": True}}
            for m in engine.models()
        ]
    for p in state.personas:
        data.append({"id": p.name, "object": "model", "created": 0, "owned_by": "edgellm",
                     "meta": {"kind": "persona", "base": p.base, "adapters": len(p.adapters),
                              "description": p.description}})
    for r in state.settings.routers:
        data.append({"id": r.name, "object": "model", "created": 0, "owned_by": "edgellm",
                     "meta": {"kind": "router", "method": r.method, "default": r.default,
                              "ready": r.name in state.routers}})
    embedder = state.embedder.model if state.embedder is not None else None
    if embedder is not None:
        data.append({"id": embedder.name, "object": "model", "created": 0, "owned_by": "edgellm",
                     "meta": {"kind": "embedding", "dimensions": embedder.dimensions, "max_length": embedder.max_length}})
    reranker = state.reranker.model if state.reranker is not None else None
    if reranker is not None:
        data.append({"id": reranker.name, "object": "model", "created": 0, "owned_by": "edgellm",
                     "meta": {"kind": "reranker", "max_length": reranker.max_length}})
    return JSONResponse({"object": "list", "data": data})
