"""Ollama's API shapes: request bodies validated and turned into engine requests, and the JSON Ollama answers with.

What a request asks for is honoured or refused with a 400 that names the field, never dropped: ``options`` this
server applies (``HONOURED_OPTIONS``) map onto ``SamplingParams``; an option it does not apply is accepted only at
the value that means "off" (``NO_OP_OPTIONS``, e.g. ``mirostat: 0``), otherwise 400. ``keep_alive`` is read as
Ollama reads it (``parse_keep_alive``: seconds, or a Go duration such as ``"5m"``; negative: forever) and applied
to the on-demand pool by the route. Model facts (``details``, ``model_info``) come from the GGUF header
(``edgellm.gguf.read_header``) and ``edgellm.quants``.

Pure and synchronous: ``routes/ollama.py`` does the HTTP, the engine calls and the caching.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgellm.gguf import GGUFHeader
from edgellm.serve.engine.base import (
    ChatMessage,
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingParams,
)
from edgellm.serve.engine.grammar import SchemaError, check_schema
from edgellm.serve.errors import APIError
from edgellm.serve.schemas import check_tools

T = TypeVar("T", bound=BaseModel)

OLLAMA_API_VERSION = "0.9.0"
"""The Ollama release whose API core this server follows (what ``GET /api/version`` reports)."""

HONOURED_OPTIONS = (
    "temperature", "top_p", "top_k", "min_p", "num_predict", "stop", "seed", "repeat_penalty", "repeat_last_n",
    "presence_penalty", "frequency_penalty", "num_ctx",
)
# Options this server does not apply, accepted at the value that turns them off (what it does anyway).
# penalize_newline: llama.cpp's penalties apply to every token, newlines included.
NO_OP_OPTIONS: dict[str, Any] = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0, "penalize_newline": True}
MAX_STOPS = 16
SERIAL_REPEAT_LAST_N = 64  # llama-cpp-python's fixed penalty window in the serial engine
_NUMBER = re.compile(r"^(\d+(\.\d*)?|\.\d+)$")
_DURATION = re.compile(r"^((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# GGUF keys whose values are arrays (read_header keeps only their length unless asked): Ollama shows [] for them.
_ARRAY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
               "tokenizer.ggml.merges", "tokenizer.ggml.added_tokens")


# --- request bodies ------------------------------------------------------------------------------------------------


class Options(BaseModel):
    """The ``options`` this server honours, with Ollama's meaning (``num_predict`` -1: until the server's cap)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    num_predict: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0)] | None = None
    repeat_last_n: Annotated[int, Field(ge=-1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    num_ctx: Annotated[int, Field(ge=1)] | None = None


class _Body(BaseModel):
    """What /api/chat and /api/generate share. Unknown fields are ignored (as Ollama does); known ones this server
    cannot honour are refused by ``refuse_unhonoured``."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    stream: bool = True
    options: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: float | int | str | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    truncate: bool | None = None
    shift: bool | None = None


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    function: ToolFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[Any] | None = None
    thinking: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Any] | None = None


class GenerateBody(_Body):
    prompt: str = ""
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[Any] | None = None
    raw: bool = False
    images: list[Any] | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None


class ShowBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    name: str | None = None  # what older clients send
    verbose: bool = False


class EmbedBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    input: str | list[str]
    truncate: bool | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | int | str | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None


class EmbeddingsBody(BaseModel):
    """The legacy /api/embeddings body."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: float | int | str | None = None


def _where(loc: tuple[Any, ...], prefix: str) -> str:
    path = ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float"))))
    return f"{prefix}{path}"


def parse(model: type[T], body: Any, prefix: str = "") -> T:
    """``body`` validated as ``model``; a 400 names the fields that are wrong."""
    if not isinstance(body, dict):
        raise APIError(400, f"{prefix.rstrip('.') or 'the request body'} must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        parts = [f"'{_where(item['loc'], prefix)}': {item['msg']}" for item in e.errors()[:5]]
        raise APIError(400, "invalid request: " + "; ".join(parts)) from None


# --- checks: honour or refuse --------------------------------------------------------------------------------------


def parse_keep_alive(value: float | int | str | None) -> float | None:
    """``keep_alive`` in seconds as Ollama reads it: a number of seconds, or a Go duration string (``"5m"``,
    ``"1h30m"``, ``"30s"``, ``"0"``; a bare number string is seconds too); 0: unload right after the request;
    negative: keep loaded forever (returned as -1). None when absent; a 400 naming the field otherwise."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return -1.0 if value < 0 else float(value)
    text = value.strip() if isinstance(value, str) else ""
    body = text[1:] if text[:1] in "+-" else text
    if _NUMBER.match(body):
        seconds = float(body)
    elif _DURATION.match(body):
        seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(body))
    else:
        raise APIError(400, f"'keep_alive': {value!r} is not a duration: send seconds (300), a duration such as "
                       "\"5m\", \"1h30m\" or \"30s\", 0 to unload the model after the request, or a negative value to "
                       "keep it loaded")
    return -1.0 if text.startswith("-") and seconds > 0 else seconds


def check_keep_alive(value: float | int | str | None, what: str = "this model") -> float | None:
    """``keep_alive`` for a model that is loaded at start and stays loaded: accepted when absent or negative
    (forever), else a 400 that says why."""
    seconds = parse_keep_alive(value)
    if seconds is not None and seconds >= 0:
        raise APIError(
            400,
            f"'keep_alive': {value!r} is not supported for {what}: it is loaded at start and stays loaded (only the "
            "models served on demand from models_dir are unloaded); leave 'keep_alive' out or send a negative value",
        )
    return seconds


def check_options(options: dict[str, Any] | None, n_ctx: int) -> Options:
    """The request's ``options``, validated: every key honoured, or at its no-op value, or a 400 naming it."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    refused = [k for k in given if k not in HONOURED_OPTIONS and not (k in NO_OP_OPTIONS and given[k] == NO_OP_OPTIONS[k])]
    if refused:
        names = ", ".join(f"'options.{k}'" for k in refused)
        no_ops = ", ".join(f"{k}={json.dumps(v)}" for k, v in NO_OP_OPTIONS.items())
        raise APIError(
            400,
            f"{names}: not supported by this server (it honours {', '.join(HONOURED_OPTIONS)}; "
            f"and accepts {no_ops}, which it does anyway); load-time options are set in the server's configuration",
        )
    parsed = parse(Options, {k: v for k, v in given.items() if k in HONOURED_OPTIONS}, prefix="options.")
    if parsed.num_ctx is not None and parsed.num_ctx > n_ctx:
        raise APIError(
            400,
            f"'options.num_ctx': {parsed.num_ctx} is larger than the model's context on this server ({n_ctx} "
            "tokens, set by the server's configuration: models.<i>.n_ctx); ask for at most that",
        )
    if parsed.num_predict is not None and parsed.num_predict not in (-1, -2) and parsed.num_predict < 1:
        raise APIError(400, f"'options.num_predict': must be at least 1, or -1 (until the server's cap) or -2 "
                       f"(until the context is full), got {parsed.num_predict}")
    if isinstance(parsed.stop, list) and len(parsed.stop) > MAX_STOPS:
        raise APIError(400, f"'options.stop': at most {MAX_STOPS} stop strings")
    return parsed


def refuse_unhonoured(body: _Body) -> None:
    """400 for request fields this server cannot honour (each named); ``keep_alive`` is the route's (it depends on
    the model)."""
    if body.think not in (None, False):
        raise APIError(400, f"'think': {body.think!r} is not supported: the models here do not think; leave it out "
                       "or send false")
    if body.logprobs:
        raise APIError(400, "'logprobs': log probabilities are not returned by this server's Ollama API; leave it out")
    if body.top_logprobs:
        raise APIError(400, "'top_logprobs': log probabilities are not returned by this server's Ollama API")
    if body.truncate:
        raise APIError(400, "'truncate': prompts are never truncated here (a prompt longer than the context is a 400); "
                       "leave it out or send false")
    if body.shift:
        raise APIError(400, "'shift': the context is never shifted here (generation stops at the context's end); "
                       "leave it out or send false")
    if isinstance(body, GenerateBody):
        for name in ("template", "suffix"):
            if getattr(body, name):
                what = "the model's own chat template is used" if name == "template" else "fill-in-the-middle is not supported"
                raise APIError(400, f"'{name}' is not supported: {what}; leave it out")
        if body.context:
            raise APIError(400, "'context' (deprecated by Ollama) is not supported: send the conversation to /api/chat "
                           "as 'messages'")
        if body.images:
            raise APIError(400, "'images': the models here have no vision; send text only")
        if body.width is not None or body.height is not None or body.steps is not None:
            raise APIError(400, "'width', 'height' and 'steps' are for image generation, which this server does not do")
        if body.raw and body.system:
            raise APIError(400, "'system' cannot be used with 'raw': true (a raw prompt is sent as is); put the system "
                           "text in the prompt")


def response_schema(format: str | dict[str, Any] | None) -> Any:
    """The JSON schema ``format`` asks for: ``"json"`` any object, a schema as given (checked), ``""``/absent none."""
    if format is None or format == "":
        return None
    if format == "json":
        return {"type": "object"}
    if isinstance(format, str):
        raise APIError(400, f"'format' must be \"json\" or a JSON schema object, got {format!r}")
    try:
        check_schema(format)
    except SchemaError as e:
        where = f"format.{e.path}" if e.path else "format"
        raise APIError(400, f"'{where}': {e.reason}") from None
    return format


def sampling(options: Options, default_max_tokens: int, cap: int) -> SamplingParams:
    """``options`` as the engine's sampling; unset options keep the server's defaults (``SamplingParams``)."""
    base = SamplingParams()
    n = options.num_predict
    max_tokens = default_max_tokens if n is None else cap if n < 0 else min(n, cap)
    stops = [options.stop] if isinstance(options.stop, str) else list(options.stop or [])
    seed = options.seed
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=base.temperature if options.temperature is None else options.temperature,
        top_p=base.top_p if options.top_p is None else options.top_p,
        top_k=base.top_k if options.top_k is None else options.top_k,
        min_p=base.min_p if options.min_p is None else options.min_p,
        repeat_penalty=base.repeat_penalty if options.repeat_penalty is None else options.repeat_penalty,
        repeat_last_n=base.repeat_last_n if options.repeat_last_n is None else options.repeat_last_n,
        presence_penalty=base.presence_penalty if options.presence_penalty is None else options.presence_penalty,
        frequency_penalty=base.frequency_penalty if options.frequency_penalty is None else options.frequency_penalty,
        seed=None if seed is None or seed < 0 else seed,  # Ollama: -1 is a random seed
        stop=tuple(s for s in stops if s),
    )


# --- messages ------------------------------------------------------------------------------------------------------


def chat_messages(messages: list[Message]) -> tuple[ChatMessage, ...]:
    """Ollama messages as the engine's (OpenAI-shaped) ones. Ollama's tool calls carry no ids: each gets one
    (``call_<message>_<k>``), and a ``tool`` message answers the first unanswered call of that name (``tool_name``),
    or the first unanswered call."""
    out: list[ChatMessage] = []
    pending: list[tuple[str, str]] = []  # (id, function name) of calls not answered yet
    for i, m in enumerate(messages):
        if m.images:
            raise APIError(400, f"'messages[{i}].images': the models here have no vision; send text only")
        if m.thinking:
            raise APIError(400, f"'messages[{i}].thinking': the models here do not think; leave it out")
        if m.tool_calls and m.role != "assistant":
            raise APIError(400, f"'messages[{i}].tool_calls': only assistant messages carry tool calls")
        if m.tool_name is not None and m.role != "tool":
            raise APIError(400, f"'messages[{i}].tool_name': only tool messages name a tool")
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for k, call in enumerate(m.tool_calls):
                call_id = f"call_{i}_{k}"
                args = call.function.arguments
                text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": call.function.name, "arguments": text}})
                pending.append((call_id, call.function.name))
            out.append(ChatMessage(role="assistant", content=m.content or None, tool_calls=tuple(calls)))
        elif m.role == "tool":
            match = next((p for p in pending if m.tool_name in (None, p[1])), None)
            if match is not None:
                pending.remove(match)
            out.append(ChatMessage(role="tool", content=m.content or "", tool_call_id=match[0] if match else None,
                                   name=m.tool_name or (match[1] if match else None)))
        else:
            out.append(ChatMessage(role=m.role, content=m.content or ""))
    return tuple(out)


def chat_request(body: ChatBody, model: str, params: SamplingParams) -> GenerationRequest:
    tools = check_tools(body.tools)
    schema = response_schema(body.format)
    if tools and schema is not None:
        raise APIError(400, "'tools' cannot be combined with 'format'")
    return GenerationRequest(
        model=model,
        messages=chat_messages(body.messages),
        params=params,
        tools=tools or None,
        tool_choice="auto" if tools else "none",
        json_schema=schema,
    )


def generate_request(body: GenerateBody, model: str, params: SamplingParams) -> GenerationRequest:
    schema = response_schema(body.format)
    if body.raw:
        return GenerationRequest(model=model, prompt=body.prompt, params=params, json_schema=schema)
    messages = [ChatMessage("system", body.system)] if body.system else []
    messages.append(ChatMessage("user", body.prompt))
    return GenerationRequest(model=model, messages=tuple(messages), params=params, json_schema=schema)


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    """One finished call, as Ollama returns it: ``{"function": {"name", "arguments": {...}}}``."""
    try:
        args = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise APIError(500, f"the model's call of {name!r} has arguments that are not a JSON object: {arguments!r}")
    return {"function": {"name": name, "arguments": args}}


# --- responses -----------------------------------------------------------------------------------------------------


def timestamp(when: datetime | None = None) -> str:
    """RFC 3339 in UTC with microseconds, as Ollama writes ``created_at``."""
    return (when or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def done_reason(reason: FinishReason) -> str:
    """Ollama's ``done_reason``: ``stop`` or ``length`` (a tool call ends with ``stop``, as in Ollama)."""
    return "length" if reason == "length" else "stop"


def final_fields(f: Finished, total_ns: int, load_ns: int = 0) -> dict[str, Any]:
    """The statistics of a final chunk, durations in nanoseconds; ``load_ns``: the time this request waited for its
    model to load (0 when it was loaded)."""
    return {
        "done": True,
        "done_reason": done_reason(f.finish_reason),
        "total_duration": total_ns,
        "load_duration": load_ns,
        "prompt_eval_count": f.prompt_tokens,
        "prompt_eval_duration": int(f.timings.prompt_ms * 1e6),
        "eval_count": f.completion_tokens,
        "eval_duration": int(f.timings.predicted_ms * 1e6),
    }


def assistant(content: str, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


# --- model facts ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What Ollama's model listings say about a GGUF file, read once from its header."""

    family: str
    parameter_count: int
    quantization_level: str
    size: int
    modified_at: datetime
    template: str
    license: str | None
    model_info: dict[str, Any]

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family] if self.family else None,
            "parameter_size": parameter_size(self.parameter_count),
            "quantization_level": self.quantization_level,
        }


def parameter_size(n: int) -> str:
    """A parameter count as Ollama prints it: ``8.0B``, ``134.52M``, ``7B``."""
    for unit, scale, decimals in (("B", 1e9, 1), ("M", 1e6, 2), ("K", 1e3, 0)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{decimals}f}{unit}"
    return str(n)


def model_facts(path: Path, header: GGUFHeader, quantization_level: str) -> ModelFacts:
    """Facts from a header read with ``read_header(path)`` (arrays as lengths) or with ``keep_arrays=True``."""
    stat = path.stat()
    count = header.meta.get("general.parameter_count")
    if not isinstance(count, int):
        count = sum(t.n_elements for t in header.tensors)
    info: dict[str, Any] = {}
    for key, value in header.meta.items():
        if key == "tokenizer.chat_template":
            continue
        info[key] = [] if key in _ARRAY_KEYS and not isinstance(value, list) else value
    info["general.parameter_count"] = count
    template = header.meta.get("tokenizer.chat_template")
    license = header.meta.get("general.license")
    return ModelFacts(
        family=header.architecture,
        parameter_count=count,
        quantization_level=quantization_level,
        size=stat.st_size,
        modified_at=datetime.fromtimestamp(stat.st_mtime, UTC),
        template=template if isinstance(template, str) else "",
        license=license if isinstance(license, str) else None,
        model_info=info,
    )


def parameters_text(n_ctx: int, params: SamplingParams, num_predict: int, stops: tuple[str, ...] = ()) -> str:
    """Ollama's ``parameters`` listing (``name value`` lines): the defaults a request gets on this server."""
    rows: list[tuple[str, Any]] = [
        ("num_ctx", n_ctx), ("num_predict", num_predict), ("temperature", params.temperature),
        ("top_k", params.top_k), ("top_p", params.top_p), ("min_p", params.min_p),
        ("repeat_penalty", params.repeat_penalty), ("repeat_last_n", params.repeat_last_n),
    ]
    rows += [("stop", json.dumps(s)) for s in stops]
    return "\n".join(f"{name:<30} {value}" for name, value in rows)
