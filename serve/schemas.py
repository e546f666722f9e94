"""OpenAI request bodies, validated; ``to_generation_request`` turns them into engine requests.

**No silent drops.** A field is either honoured (declared on the models below), or client metadata that changes
nothing in the answer (``METADATA_FIELDS``: accepted and ignored), or a known OpenAI / llama-server field the server
does not honour, accepted only at the value that asks for nothing (``NEUTRAL``: e.g. ``mirostat: 0``,
``modalities: ["text"]``), or else a 400 that names it; a field known to neither list is a 400 too. ``null`` is
always "not given".

Structured output: ``response_format`` (``text``, ``json_object``, ``json_schema``) and llama-server's
``json_schema`` and ``grammar`` fields, on chat and completions; tools (chat): ``tools``, ``tool_choice``,
``parallel_tool_calls``, assistant ``tool_calls`` and ``tool`` messages in the history. Every schema is checked
here (``grammar.check_schema``), so a keyword that cannot be enforced is a 400 naming the field and the keyword;
the engine converts and parses the grammar (a GBNF grammar llama.cpp rejects is a 400 from the engine)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgellm.serve.engine.base import ChatMessage, GenerationRequest, NamedTool, SamplingParams, ToolChoice
from edgellm.serve.engine.grammar import SchemaError, check_schema
from edgellm.serve.errors import APIError

Role = Literal["system", "developer", "user", "assistant", "tool"]
T = TypeVar("T", bound=BaseModel)
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_GRAMMAR_CHARS = 100_000
MAX_GRAMMAR_NESTING = 64
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI's bound)
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs (OpenAI's bound)
TOKEN_ID = re.compile(r"^[0-9]{1,9}$")

# Fields that only describe the client or the call, never the answer: accepted and ignored.
METADATA_FIELDS = frozenset({"user", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"})

# OpenAI and llama-server fields the server does not honour, each with the values that ask for nothing (what the
# server does anyway); any other value is a 400 naming the field.
NEUTRAL: Mapping[str, tuple[Any, ...]] = MappingProxyType({
    # OpenAI chat
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "reasoning_effort": (),
    "verbosity": (),
    "functions": ([],),
    "function_call": ("none",),
    # llama-server
    "n_probs": (0,),
    "post_sampling_probs": (False,),
    "mirostat": (0,),
    "mirostat_tau": (5.0,),
    "mirostat_eta": (0.1,),
    "typical_p": (1.0,),
    "top_n_sigma": (-1.0,),
    "dynatemp_range": (0.0,),
    "dynatemp_exponent": (1.0,),
    "xtc_probability": (0.0,),
    "xtc_threshold": (0.1,),
    "dry_multiplier": (0.0,),
    "dry_base": (1.75,),
    "dry_allowed_length": (2,),
    "dry_penalty_last_n": (-1,),
    "dry_sequence_breakers": (),
    "n_keep": (0,),
    "n_discard": (0,),
    "n_indent": (0,),
    "n_cmpl": (1,),
    "t_max_predict_ms": (0,),
    "cache_prompt": (True,),
    "id_slot": (-1,),
    "ignore_eos": (False,),
    "samplers": (),
    "min_keep": (0,),
    "return_tokens": (False,),
    "return_progress": (False,),
    "timings_per_token": (False,),
    "lora": ([],),
    "grammar_lazy": (False,),
    "grammar_triggers": ([],),
    "preserved_tokens": ([],),
    "response_fields": ([],),
    "chat_template_kwargs": ({},),
    "chat_template": (),
    "reasoning_format": ("none",),
    "reasoning_budget": (-1,),
    "enable_thinking": (False,),
    "thinking_forced_open": (False,),
    "parse_tool_calls": (True,),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "backend_sampling": (False,),
})
STREAM_OPTIONS_IGNORED = frozenset({"include_obfuscation"})  # OpenAI's padding of stream events: changes no text


def _same(a: Any, b: Any) -> bool:
    """JSON equality that tells booleans from numbers."""
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def check_fields(extra: Mapping[str, Any] | None, where: str = "") -> None:
    """The 400 for a field the server would otherwise drop (see the module docstring)."""
    for name, value in (extra or {}).items():
        if value is None or name in METADATA_FIELDS:
            continue
        if name in NEUTRAL:
            if any(_same(value, ok) for ok in NEUTRAL[name]):
                continue
            raise APIError(400, f"'{where}{name}' is not supported by this server; remove it (or send null)")
        raise APIError(400, f"'{where}{name}' is not a request field this server knows; remove it")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def as_dict(self) -> dict[str, Any]:
        args = self.function.arguments
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": text}}


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Role
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_chat_message(self) -> ChatMessage:
        role = "system" if self.role == "developer" else self.role
        calls = tuple(c.as_dict() for c in self.tool_calls) if self.tool_calls else None
        content = None if (self.content is None and calls) else self.text()
        return ChatMessage(role=role, content=content, tool_calls=calls, tool_call_id=self.tool_call_id, name=self.name)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False

    def check(self) -> None:
        extra = {k: v for k, v in (self.model_extra or {}).items() if k not in STREAM_OPTIONS_IGNORED}
        check_fields(extra, "stream_options.")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    n_predict: Annotated[int, Field(ge=-1)] | None = None  # llama-server's max_tokens (-1: as many as allowed)
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.8
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95
    top_k: Annotated[int, Field(ge=0)] = 40
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    repeat_penalty: Annotated[float, Field(gt=0.0)] = 1.0
    repeat_last_n: Annotated[int, Field(ge=-1, le=1_000_000)] = 64
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] = 1
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        """A field sent as null takes its default, as if it was not sent (clients send nulls for what they do not
        set)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string is at most {MAX_STOP_CHARS} characters")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for key, bias in v.items():
            if not TOKEN_ID.match(key):
                raise ValueError(f"keys are token ids (decimal strings), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"a bias is between -100 and 100, got {bias} for token {key}")
        return v

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def structured_output(self) -> tuple[Any, str | None]:
        """(JSON schema the answer must validate against, or None; GBNF grammar, or None), checked."""
        return structured_output(self.response_format, self.json_schema, self.grammar)

    def check_fields(self, max_n: int) -> None:
        """400 for fields the server does not honour (see ``check_fields``) and for ``n`` above ``max_n``."""
        check_fields(self.model_extra)
        if self.stream_options is not None:
            self.stream_options.check()
        if self.n > max_n:
            raise APIError(400, f"'n': at most {max_n} choices per request (the server's max_n), got {self.n}")

    def sampling(self, default_max_tokens: int, cap: int, logprobs: int | None) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        max_tokens = self.max_tokens
        if max_tokens is None and self.n_predict is not None:
            if self.n_predict == 0:
                raise APIError(400, "'n_predict' must be -1 (as many as allowed) or at least 1")
            max_tokens = cap if self.n_predict < 0 else self.n_predict
        return SamplingParams(
            max_tokens=min(max_tokens or default_max_tokens, cap),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            repeat_last_n=self.repeat_last_n,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.seed,
            stop=tuple(s for s in stops if s),
            logprobs=logprobs,
            logit_bias=tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items()),
        )


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def to_generation_request(self, model: str, default_max_tokens: int, cap: int, max_n: int) -> GenerationRequest:
        self.check_fields(max_n)
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if all(not m.text().strip() and not m.tool_calls for m in self.messages):
            raise APIError(400, "'messages' has no text: every message content is empty")
        check_tool_messages(self.messages)
        tools = check_tools(self.tools)
        choice = tool_choice(self.tool_choice, tools)
        schema, grammar = self.structured_output()
        if tools and choice != "none" and (schema is not None or grammar is not None):
            raise APIError(400, "'tools' cannot be combined with 'response_format', 'json_schema' or 'grammar'")
        return GenerationRequest(
            model=model,
            messages=tuple(m.to_chat_message() for m in self.messages),
            params=self.sampling(default_max_tokens, cap, logprobs),
            tools=tools or None,
            tool_choice=choice,
            parallel_tool_calls=self.parallel_tool_calls,
            json_schema=schema,
            grammar=grammar,
            n=self.n,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None

    def to_generation_request(self, model: str, default_max_tokens: int, cap: int, max_n: int) -> GenerationRequest:
        self.check_fields(max_n)
        if self.echo:
            raise APIError(400, "'echo' is not supported by this server; remove it (or send false)")
        if self.suffix:
            raise APIError(400, "'suffix' is not supported by this server (no fill-in-the-middle); remove it")
        if self.best_of is not None and self.best_of not in (1, self.n):
            raise APIError(400, f"'best_of' is not supported by this server beyond best_of = n; got {self.best_of}")
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "'prompt' must be a string (or a list of exactly one string)")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "'prompt' is empty")
        schema, grammar = self.structured_output()
        return GenerationRequest(
            model=model,
            prompt=prompt,
            params=self.sampling(default_max_tokens, cap, self.logprobs),
            json_schema=schema,
            grammar=grammar,
            n=self.n,
        )


def _schema(schema: Any, field: str) -> Any:
    try:
        check_schema(schema)
    except SchemaError as e:
        where = f"{field}.{e.path}" if e.path else field
        raise APIError(400, f"'{where}': {e.reason}") from None
    return schema


def structured_output(response_format: Any, json_schema: Any, grammar: Any) -> tuple[Any, str | None]:
    """The JSON schema and GBNF grammar a request asks for (OpenAI's ``response_format``, llama-server's
    ``json_schema`` and ``grammar``), checked; a 400 names the field."""
    given = [name for name, v in (("response_format", response_format), ("json_schema", json_schema),
                                   ("grammar", grammar)) if v is not None]
    if response_format is not None and response_format.get("type") == "text":
        given.remove("response_format")
    if len(given) > 1:
        raise APIError(400, f"give one of {', '.join(repr(g) for g in given)}, not several")
    if response_format is not None:
        kind = response_format.get("type")
        if kind == "text":
            return None, None
        if kind == "json_object":
            schema = response_format.get("schema")  # llama-server accepts a schema here too
            return (_schema(schema, "response_format.schema") if schema is not None else {"type": "object"}), None
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict):
                raise APIError(400, "'response_format.json_schema' must be an object with 'name' and 'schema'")
            if "schema" not in spec:
                raise APIError(400, "'response_format.json_schema.schema' is missing")
            return _schema(spec["schema"], "response_format.json_schema.schema"), None
        raise APIError(400, f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    if json_schema is not None:
        return _schema(json_schema, "json_schema"), None
    if grammar is not None:
        return None, check_grammar(grammar)
    return None, None


def check_grammar(grammar: str) -> str:
    """Cheap checks of a raw GBNF grammar before llama.cpp parses it (which reports only that it failed)."""
    if not grammar.strip():
        raise APIError(400, "'grammar' is empty")
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise APIError(400, f"'grammar' is longer than {MAX_GRAMMAR_CHARS} characters")
    depth = deepest = 0
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]', "", grammar):
        if ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    if deepest > MAX_GRAMMAR_NESTING:
        raise APIError(400, f"'grammar' nests parentheses deeper than {MAX_GRAMMAR_NESTING}")
    if not re.search(r"(?m)^\s*root\s*::=", grammar):
        raise APIError(400, "'grammar' has no 'root' rule ('root ::= ...')")
    return grammar


def check_tools(tools: list[Any] | None) -> tuple[dict[str, Any], ...]:
    """OpenAI tool definitions, checked: function tools with unique names and enforceable parameter schemas."""
    out: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, tool in enumerate(tools or ()):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise APIError(400, f"'{where}' must be an object")
        if tool.get("type") != "function":
            raise APIError(400, f"'{where}.type' must be 'function' (only function tools are supported), got "
                           f"{tool.get('type')!r}")
        f = tool.get("function")
        if not isinstance(f, dict):
            raise APIError(400, f"'{where}.function' must be an object with a 'name'")
        name = f.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise APIError(400, f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in names:
            raise APIError(400, f"'{where}.function.name': {name!r} is defined twice")
        names.add(name)
        description = f.get("description")
        if description is not None and not isinstance(description, str):
            raise APIError(400, f"'{where}.function.description' must be a string")
        params = f.get("parameters")
        if params is not None:
            if not isinstance(params, dict) or params.get("type", "object") != "object":
                raise APIError(400, f"'{where}.function.parameters' must be a JSON schema of type 'object'")
            _schema(params, f"{where}.function.parameters")
        clean: dict[str, Any] = {"name": name}
        if description is not None:
            clean["description"] = description
        if params is not None:
            clean["parameters"] = params
        out.append({"type": "function", "function": clean})
    return tuple(out)


def tool_choice(value: str | dict[str, Any] | None, tools: tuple[dict[str, Any], ...]) -> ToolChoice:
    """OpenAI's ``tool_choice``: 'none', 'auto', 'required' or ``{"type": "function", "function": {"name"}}``."""
    if value is None:
        return "auto" if tools else "none"
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise APIError(400, "'tool_choice' is 'required' but there are no 'tools'")
        return value  # type: ignore[return-value]
    if isinstance(value, dict):
        f = value.get("function")
        name = f.get("name") if isinstance(f, dict) else None
        if value.get("type") != "function" or not isinstance(name, str):
            raise APIError(400, "'tool_choice' must be 'none', 'auto', 'required' or "
                           '{"type": "function", "function": {"name": ...}}')
        if name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"'tool_choice.function.name': {name!r} is not one of the functions in 'tools'")
        return NamedTool(name)
    raise APIError(400, f"'tool_choice' must be 'none', 'auto', 'required' or a function, got {value!r}")


def check_tool_messages(messages: list[Message]) -> None:
    """Every ``tool`` message answers a call of an earlier assistant message (by ``tool_call_id``)."""
    calls: set[str] = set()
    for i, m in enumerate(messages):
        if m.role == "assistant" and m.tool_calls:
            calls.update(c.id for c in m.tool_calls)
        elif m.role == "tool":
            if m.tool_call_id is None:
                raise APIError(400, f"'messages[{i}].tool_call_id' is missing: a tool message answers a tool call")
            if m.tool_call_id not in calls:
                raise APIError(
                    400,
                    f"'messages[{i}].tool_call_id': {m.tool_call_id!r} matches no tool call of an earlier assistant "
                    "message",
                )
        elif m.tool_calls:
            raise APIError(400, f"'messages[{i}].tool_calls': only assistant messages carry tool calls")


def format_validation_error(err: ValidationError) -> str:
    parts = []
    for item in err.errors()[:5]:
        loc = ".".join(str(p) for p in item["loc"] if not (isinstance(p, str) and p in ("str", "list[TextPart]")))
        parts.append(f"'{loc}': {item['msg']}" if loc else item["msg"])
    return "invalid request: " + "; ".join(parts)


def parse_body(model: type[T], body: Any) -> T:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise APIError(400, format_validation_error(e)) from None
