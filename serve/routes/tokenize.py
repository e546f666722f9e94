"""llama-server's POST /tokenize, /detokenize and /apply-template, with its request and response shapes.

- ``/tokenize`` ``{content, add_special=false, parse_special=true, with_pieces=false}`` -> ``{"tokens": [ids]}``, or
  with ``with_pieces`` ``{"tokens": [{"id", "piece"}]}`` (``piece``: the token's text, or its bytes as a list of
  integers when they are not valid UTF-8). ``content`` may also be a list of strings and token ids (llama-server's
  mixed prompt: only the first string gets BOS).
- ``/detokenize`` ``{tokens}`` -> ``{"content"}`` (each token's piece, special tokens rendered, as llama-server).
- ``/apply-template`` ``{messages, tools?}`` -> ``{"prompt"}``: the model's chat template as the chat route
  renders it.

``model`` picks the model (default: the first). Token ids outside the vocabulary are a 400. The tokenizer runs in
a worker thread (a megabyte of text takes a while)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgellm.serve.engine.base import Engine
from edgellm.serve.errors import NOT_FOUND, APIError
from edgellm.serve.http import check_auth, not_supported, read_json, ready_engine, server_state
from edgellm.serve.schemas import Message, check_tools, parse_body

if TYPE_CHECKING:
    from edgellm.serve.engine.prompt import ChatTemplate
    from edgellm.serve.engine.tokens import PromptTokenizer


class _ModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None


T = TypeVar("T", bound=_ModelRequest)


class TokenizeRequest(_ModelRequest):
    content: str | list[str | int]
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_ModelRequest):
    tokens: list[int] = Field(default_factory=list)


class ApplyTemplateRequest(_ModelRequest):
    messages: list[Message] = Field(min_length=1)
    tools: list[Any] | None = None


async def tokenize(request: Request) -> Response:
    body, template = await _parse(request, TokenizeRequest)
    tokenizer = _tokenizer(template)
    content = body.content
    parts = [content] if isinstance(content, str) else content
    _check_ids(parts, tokenizer, "content")

    def run() -> list[Any]:
        ids: list[int] = []
        for i, part in enumerate(parts):
            if isinstance(part, int):
                ids.append(part)
            else:  # as llama-server: BOS (add_special) only when the first part is a string
                ids.extend(tokenizer.encode(part, body.add_special and i == 0, body.parse_special))
        if not body.with_pieces:
            return list(ids)
        return [{"id": t, "piece": _piece_json(tokenizer.piece(t))} for t in ids]

    return JSONResponse({"tokens": await anyio.to_thread.run_sync(run)})


async def detokenize(request: Request) -> Response:
    body, template = await _parse(request, DetokenizeRequest)
    tokenizer = _tokenizer(template)
    _check_ids(body.tokens, tokenizer, "tokens")

    def run() -> str:
        return b"".join(tokenizer.piece(t) for t in body.tokens).decode("utf-8", errors="replace")

    return JSONResponse({"content": await anyio.to_thread.run_sync(run)})


async def apply_template(request: Request) -> Response:
    body, template = await _parse(request, ApplyTemplateRequest)
    tools = check_tools(body.tools) or None
    messages = [m.to_chat_message() for m in body.messages]
    prompt = await anyio.to_thread.run_sync(lambda: template.render(messages, tools))
    return JSONResponse({"prompt": prompt})


# -- helpers ---------------------------------------------------------------------------------------------------------
async def _parse(request: Request, model: type[T]) -> tuple[T, ChatTemplate]:
    """The request body, validated, and the chat template (with its tokenizer) of the model it names."""
    settings = server_state(request).settings
    check_auth(request, settings.api_key)
    body = parse_body(model, await read_json(request, settings.max_body_bytes))
    engine = ready_engine(request)
    return body, _template(engine, body.model)


def _template(engine: Engine, requested: str | None) -> ChatTemplate:
    names = [m.name for m in engine.models()]
    name = requested or names[0]
    if not engine.has_model(name):
        raise APIError(404, f"model {name!r} is not served here; available: {', '.join(names)}", NOT_FOUND)
    template = getattr(engine, "template", None)  # every llama.cpp engine has it; test fakes need not
    if template is None:
        raise not_supported("this engine has no tokenizer to offer")
    chat_template: ChatTemplate = template(name)
    return chat_template


def _tokenizer(template: ChatTemplate) -> PromptTokenizer:
    if template.tokenizer is None:
        raise not_supported("this model has no tokenizer to offer")
    return template.tokenizer


def _check_ids(ids: Sequence[str | int], tokenizer: PromptTokenizer, field: str) -> None:
    n_vocab = tokenizer.n_vocab
    for i, t in enumerate(ids):
        if isinstance(t, int) and not 0 <= t < n_vocab:
            raise APIError(400, f"'{field}[{i}]': token id {t} is not in the vocabulary (0..{n_vocab - 1})")


def _piece_json(piece: bytes) -> str | list[int]:
    """llama-server's piece: its text if the bytes are valid UTF-8, else the bytes as integers."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)
