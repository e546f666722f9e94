"""POST /v1/embeddings (alias /embeddings): OpenAI's request and response shape.

``input`` is a string, a list of strings, a token array or a list of token arrays (ids of the embedding model's own
vocabulary, used as given); ``encoding_format`` is ``float`` (JSON numbers) or ``base64`` (little-endian float32
bytes, which the official client asks for and decodes); ``dimensions`` is accepted only when it equals the model's
size (the model cannot be shortened: 400 otherwise)."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgellm.serve.errors import NOT_FOUND, NOT_SUPPORTED, APIError
from edgellm.serve.http import check_auth, read_json, server_state
from edgellm.serve.schemas import parse_body

NO_EMBEDDER = (
    "no embedding model is configured on this server; add an `embedder: {path: <embedding .gguf>}` section to "
    "configs/serve.yaml (or run `edgellm models pull embedder` and pass `--embedder` with its .gguf file)"
)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    truncate: bool | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        x: Any = self.input
        if isinstance(x, str):
            return [x]
        if x and all(isinstance(t, int) for t in x):
            return [x]  # one token array
        return list(x)


async def embeddings(request: Request) -> Response:
    state = server_state(request)
    settings = state.settings
    check_auth(request, settings.api_key)
    served = state.embedder
    if settings.embedder is None or served is None:
        raise APIError(501, NO_EMBEDDER, NOT_SUPPORTED)
    body = parse_body(EmbeddingRequest, await read_json(request, settings.max_body_bytes))
    embedder = served.ready("embedder")
    if body.model not in (None, "", embedder.name):
        raise APIError(404, f"embedding model {body.model!r} is not served here; available: {embedder.name}", NOT_FOUND)
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise APIError(
            400,
            f"dimensions={body.dimensions} is not supported: {embedder.name} makes {embedder.dimensions}-dimensional "
            "vectors and cannot shorten them; leave 'dimensions' out",
        )
    inputs = body.inputs()
    out = await served.run("embedder", lambda: embedder.embed(inputs, truncate=body.truncate), items=len(inputs))
    data: list[dict[str, Any]] = []
    for i, vector in enumerate(out.vectors):
        value: Any = (
            base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            if body.encoding_format == "base64"
            else vector.tolist()
        )
        data.append({"object": "embedding", "index": i, "embedding": value})
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": embedder.name,
            "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens},
        }
    )
