"""POST /v1/chat/completions and /v1/completions: validate, submit to the engine, answer as JSON or SSE."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TypeAlias

import anyio
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgellm.serve.engine.base import Engine, Finished, Generation, TextDelta, ToolCallDelta
from edgellm.serve.errors import NOT_FOUND, APIError, error_body, to_api_error
from edgellm.serve.http import check_auth, for_persona, read_json, ready_engine, server_state, serves_persona
from edgellm.serve.routes.openai_format import Answer, ChatFormat, CompletionFormat, dumps
from edgellm.serve.schemas import ChatCompletionRequest, CompletionRequest, parse_body

log = logging.getLogger(__name__)

Format: TypeAlias = ChatFormat | CompletionFormat


def _resolve_model(engine: Engine, requested: str | None) -> str:
    names = [m.name for m in engine.models()]
    if requested is None or requested == "":
        if not names:  # a folder of models loaded on demand, none loaded yet
            raise APIError(400, "no model is loaded: name one in 'model' (GET /v1/models lists them)")
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
                yield _event(fmt.text_json(event))
            elif isinstance(event, ToolCallDelta):
                yield _event(dumps(fmt.tool_call_chunk(event)))
            elif isinstance(event, Finished):
                chunk = fmt.final_chunk(event)
                if fmt.done():  # the response's timings ride on its last chunk, as llama-server's do
                    if include_usage:
                        yield _event(dumps(chunk))
                        chunk = fmt.usage_chunk()
                    else:
                        chunk["timings"] = fmt.timings()
                yield _event(dumps(chunk))
        yield _event("[DONE]")
    except Exception as e:  # the response has started: report the error in-band, like llama-server
        err = to_api_error(e)
        yield _event(dumps(error_body(err.status, err.message, err.type)))
    finally:
        await generation.aclose()


async def _collect(generation: Generation, request: Request, answer: Answer) -> Answer:
    """Gather a whole answer (text and tool calls of each choice); if the client goes away first, cancel the
    generation."""

    async def gather() -> None:
        async for event in generation:
            answer.add(event)
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
    if not answer.complete:
        raise APIError(499, "client disconnected")
    return answer


async def _generate(request: Request, body_model: type[ChatCompletionRequest] | type[CompletionRequest]) -> Response:
    state = server_state(request)
    arrived = state.metrics.now()
    settings = state.settings
    check_auth(request, settings.api_key)
    body = parse_body(body_model, await read_json(request, settings.max_body_bytes))
    engine = ready_engine(request)
    persona = serves_persona(state, body.model)
    model = body.model if persona and body.model else _resolve_model(engine, body.model)
    gen_request = body.to_generation_request(model, settings.default_max_tokens, settings.max_tokens_cap, settings.max_n)
    headers: dict[str, str] = {}
    route = None
    if persona:  # the persona's base, adapters, prompt and caps; a router's choice first
        gen_request, route = await for_persona(state, gen_request)
        if route is not None:
            model = route.persona
            headers["x-edgellm-route"] = route.header_value()
    # drain.watch: if the server's drain expires first, each choice ends with finish_reason "length"
    submitted = state.metrics.observe_generation(model, await engine.submit(gen_request), arrived)
    generation = state.drain.watch(submitted, gen_request.n)
    n, logprobs = gen_request.n, gen_request.params.logprobs is not None
    chat = isinstance(body, ChatCompletionRequest)
    fmt: Format = ChatFormat(model, n, logprobs) if chat else CompletionFormat(model, n, logprobs)
    if body.stream:
        return EventSourceResponse(
            _sse(generation, fmt, body.include_usage()),
            sep="\n",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
            # if the client is gone before the stream has started, _sse never runs: close the generation anyway
            background=BackgroundTask(generation.aclose),
        )
    answer = await _collect(generation, request, Answer(n))
    body_out = fmt.response(answer)
    if route is not None:  # why this persona: an extension field beside OpenAI's
        body_out["edgellm_route"] = route.as_dict()
    return JSONResponse(body_out, headers=headers)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, ChatCompletionRequest)


async def completions(request: Request) -> Response:
    return await _generate(request, CompletionRequest)
