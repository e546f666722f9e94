"""POST /v1/chat/completions and /v1/completions: validate, submit to the engine, answer as JSON or SSE."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgellm.serve.engine.base import Engine, Finished, Generation, TextDelta, ToolCallDelta
from edgellm.serve.errors import NOT_FOUND, APIError, error_body, to_api_error
from edgellm.serve.http import check_auth, read_json, ready_engine, server_state
from edgellm.serve.routes.openai_format import ChatFormat, CompletionFormat, dumps
from edgellm.serve.schemas import ChatCompletionRequest, CompletionRequest, parse_body

log = logging.getLogger(__name__)

Format = ChatFormat | CompletionFormat


def _resolve_model(engine: Engine, requested: str | None) -> str:
    names = [m.name for m in engine.models()]
    if requested is None or requested == "":
        return names[0]
    if engine.has_model(requested):
        return requested
    raise APIError(404, f"model {requested!r} is not served here; available: {', '.join(names)}", NOT_FOUND)


def _event(data: str) -> bytes:
    """One SSE event, framed here (sse-starlette sends bytes as they are): ``data: <json>`` and a blank line."""
    return b"data: " + data.encode("utf-8") + b"\n\n"


async def _sse(generation: Generation, fmt: Format, include_usage: bool) -> AsyncIterator[bytes]:
    try:
        first = fmt.first_chunk()
        if first is not None:
            yield _event(dumps(first))
        async for event in generation:
            if isinstance(event, TextDelta):
                yield _event(fmt.delta_json(event.text))
            elif isinstance(event, ToolCallDelta):
                yield _event(dumps(fmt.tool_call_chunk(event)))
            elif isinstance(event, Finished):
                yield _event(dumps(fmt.final_chunk(event)))
                if include_usage:
                    yield _event(dumps(fmt.usage_chunk(event)))
        yield _event("[DONE]")
    except Exception as e:  # the response has started: report the error in-band, like llama-server
        err = to_api_error(e)
        yield _event(dumps(error_body(err.status, err.message, err.type)))
    finally:
        await generation.aclose()


async def _collect(generation: Generation, request: Request) -> tuple[str, list[dict[str, Any]], Finished]:
    """Gather a whole answer (text and tool calls); if the client goes away first, cancel the generation."""
    parts: list[str] = []
    calls: list[dict[str, Any]] = []
    finished: Finished | None = None

    async def gather() -> None:
        nonlocal finished
        async for event in generation:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, ToolCallDelta):
                if event.id is not None:
                    calls.append({"id": event.id, "type": "function", "function": {"name": event.name, "arguments": ""}})
                calls[-1]["function"]["arguments"] += event.arguments
            elif isinstance(event, Finished):
                finished = event
        tg.cancel_scope.cancel()

    async def watch_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                tg.cancel_scope.cancel()
                return

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(gather)
            tg.start_soon(watch_disconnect)
    finally:
        await generation.aclose()
    if finished is None:
        raise APIError(499, "client disconnected")
    return "".join(parts), calls, finished


async def _generate(request: Request, body_model: type[ChatCompletionRequest] | type[CompletionRequest]) -> Response:
    state = server_state(request)
    settings = state.settings
    check_auth(request, settings.api_key)
    body = parse_body(body_model, await read_json(request, settings.max_body_bytes))
    engine = ready_engine(request)
    model = _resolve_model(engine, body.model)
    gen_request = body.to_generation_request(model, settings.default_max_tokens, settings.max_tokens_cap)
    generation = await engine.submit(gen_request)
    fmt: Format = ChatFormat(model) if isinstance(body, ChatCompletionRequest) else CompletionFormat(model)
    if body.stream:
        return EventSourceResponse(
            _sse(generation, fmt, body.include_usage()),
            sep="\n",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    text, calls, finished = await _collect(generation, request)
    return JSONResponse(fmt.response(text, finished, calls))


async def chat_completions(request: Request) -> Response:
    return await _generate(request, ChatCompletionRequest)


async def completions(request: Request) -> Response:
    return await _generate(request, CompletionRequest)
