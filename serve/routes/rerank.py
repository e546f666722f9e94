"""POST /v1/rerank (alias /rerank): the request/response shape llama.cpp's server, Jina and Cohere share."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgellm.serve.errors import NOT_FOUND, NOT_SUPPORTED, APIError
from edgellm.serve.http import check_auth, read_json, server_state
from edgellm.serve.schemas import parse_body

NO_RERANKER = (
    "no reranker is configured on this server; add a `reranker: {path: <cross-encoder .gguf or directory>}` section "
    "to configs/serve.yaml (or run `edgellm models pull reranker-gguf` and pass `--reranker` with its .gguf file)"
)


class TextDocument(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    text: str


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    query: str
    documents: list[str | TextDocument]
    top_n: Annotated[int, Field(ge=1)] | None = None
    return_documents: bool = False
    raw_scores: bool = False
    truncate: bool | None = None


async def rerank(request: Request) -> Response:
    state = server_state(request)
    settings = state.settings
    check_auth(request, settings.api_key)
    served = state.reranker
    if settings.reranker is None or served is None:
        raise APIError(501, NO_RERANKER, NOT_SUPPORTED)
    body = parse_body(RerankRequest, await read_json(request, settings.max_body_bytes))
    reranker = served.ready("reranker")
    if body.model not in (None, "", reranker.name):
        raise APIError(404, f"reranker {body.model!r} is not served here; available: {reranker.name}", NOT_FOUND)
    texts = [d if isinstance(d, str) else d.text for d in body.documents]
    truncate = settings.reranker.truncate if body.truncate is None else body.truncate
    out = await served.run(
        "reranker",
        lambda: reranker.rerank(body.query, texts, top_n=body.top_n, raw_scores=body.raw_scores, truncate=truncate),
        items=len(texts),
    )
    results = []
    for r in out.results:
        item: dict[str, object] = {"index": r.index, "relevance_score": r.relevance_score}
        if body.return_documents:
            item["document"] = {"text": texts[r.index]}
        results.append(item)
    return JSONResponse(
        {
            "model": reranker.name,
            "object": "list",
            "results": results,
            "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens},
        }
    )
