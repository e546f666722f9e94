"""GET /slots: every model's slots, as llama-server's /slots (``id``, ``n_ctx``, ``is_processing``, the current
request's progress under ``next_token``), with the model's name and the tokens its KV cache holds. Never prompt
or answer text. ``?model=NAME``: one model's slots. Needs the API key when one is set."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgellm.serve.errors import NOT_FOUND, APIError
from edgellm.serve.http import check_auth, ready_engine, server_state


async def slots(request: Request) -> Response:
    check_auth(request, server_state(request).settings.api_key)
    engine = ready_engine(request)
    model = request.query_params.get("model")
    if model is not None and not engine.has_model(model):
        names = ", ".join(m.name for m in engine.models())
        raise APIError(404, f"model {model!r} is not served here; available: {names}", NOT_FOUND)
    return JSONResponse(
        [
            {
                "id": s.id,
                "model": s.model,
                "n_ctx": s.n_ctx,
                "is_processing": s.is_processing,
                "n_cached": s.n_cached,
                "n_prompt_tokens": s.n_prompt,
                "choice": s.choice,
                "next_token": [
                    {"has_next_token": s.is_processing, "n_remain": s.n_remain, "n_decoded": s.n_decoded}
                ],
            }
            for s in engine.slots()
            if model is None or s.model == model
        ]
    )
