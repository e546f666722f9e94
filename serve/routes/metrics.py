"""GET /metrics: the Prometheus text format (see ``serve/metrics.py``). Needs the API key when one is set: a
Prometheus scrape job sends it with ``authorization: {credentials: <key>}``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from edgellm.serve.http import check_auth, server_state
from edgellm.serve.metrics import CONTENT_TYPE


async def metrics(request: Request) -> Response:
    state = server_state(request)
    check_auth(request, state.settings.api_key)
    engine = state.engine
    if engine is None:  # still loading: the counters so far
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)
    body = state.metrics.render(engine.stats(), models_loaded=len(engine.models()))
    return Response(body, media_type=CONTENT_TYPE)
