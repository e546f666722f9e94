"""POST /models/load and POST /models/unload ``{"model": NAME}`` (API key): an operator's hand on the models served
on demand (``models_dir``), as llama-server's router mode. Both answer 200 with the model's state, 404 for a name the
server does not know, 503 with Retry-After when the model is busy (unload) or cannot be loaded now."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgellm.serve.engine.pool import ModelPool
from edgellm.serve.errors import APIError
from edgellm.serve.http import check_auth, not_supported, read_json, ready_engine, server_state


async def _pool_and_name(request: Request) -> tuple[ModelPool, str]:
    state = server_state(request)
    check_auth(request, state.settings.api_key)
    body = await read_json(request, state.settings.max_body_bytes)
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
        raise APIError(400, 'send {"model": "<name>"}: the name of a model listed by /v1/models')
    engine = ready_engine(request)
    if not isinstance(engine, ModelPool):
        raise not_supported("this engine cannot load or unload models")
    return engine, body["model"]


def model_state(pool: ModelPool, name: str) -> dict[str, Any]:
    entry = next(e for e in pool.catalog(rescan=False) if e.info.name == name)
    return {"id": name, "object": "model", "loaded": entry.loaded, "pinned": entry.pinned, "n_ctx": entry.info.n_ctx}


async def load_model(request: Request) -> Response:
    pool, name = await _pool_and_name(request)
    started = asyncio.get_running_loop().time()
    await pool.load_model(name)
    body = model_state(pool, name)
    body["load_seconds"] = round(asyncio.get_running_loop().time() - started, 3)
    return JSONResponse(body)


async def unload_model(request: Request) -> Response:
    pool, name = await _pool_and_name(request)
    unloaded = await pool.unload_model(name)
    return JSONResponse({**model_state(pool, name), "unloaded": unloaded})
