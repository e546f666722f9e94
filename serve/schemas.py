"""OpenAI request bodies, validated; ``to_generation_request`` turns them into engine requests.

Unknown fields are accepted and ignored (clients send many), except those whose meaning we would silently
drop: they get a 400 that says so.

Structured output: ``response_format`` (``text``, ``json_object``, ``json_schema``) and llama-server's
``json_schema`` and ``grammar`` fields, on chat and completions; tools (chat): ``tools``, ``tool_choice``,
``parallel_tool_calls``, assistant ``tool_calls`` and ``tool`` messages in the history. Every schema is checked
here (``grammar.check_schema``), so a keyword that cannot be enforced is a 400 naming the field and the keyword;
the engine converts and parses the grammar (a GBNF grammar llama.cpp rejects is a 400 from the engine)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgellm.serve.engine.base import ChatMessage, GenerationRequest, NamedTool, SamplingParams, ToolChoice
from edgellm.serve.engine.grammar import SchemaError, check_schema
from edgellm.serve.errors import APIError

Role = Literal["system", "developer", "user", "assistant", "tool"]
T = TypeVar("T", bound=BaseModel)
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_GRAMMAR_CHARS = 100_000
MAX_GRAMMAR_NESTING = 64


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


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.8
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95
    top_k: Annotated[int, Field(ge=0)] = 40
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    repeat_penalty: Annotated[float, Field(gt=0.0)] = 1.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] = 1
    response_format: dict[str, Any] | None = None
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def structured_output(self) -> tuple[Any, str | None]:
        """(JSON schema the answer must validate against, or None; GBNF grammar, or None), checked."""
        return structured_output(self.response_format, self.json_schema, self.grammar)

    def sampling(self, default_max_tokens: int, cap: int) -> SamplingParams:
        if self.n != 1:
            raise APIError(400, "only n=1 is supported")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=min(self.max_tokens or default_max_tokens, cap),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.seed,
            stop=tuple(s for s in stops if s),
        )


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    def to_generation_request(self, model: str, default_max_tokens: int, cap: int) -> GenerationRequest:
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
            params=self.sampling(default_max_tokens, cap),
            tools=tools or None,
            tool_choice=choice,
            parallel_tool_calls=self.parallel_tool_calls,
            json_schema=schema,
            grammar=grammar,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    def to_generation_request(self, model: str, default_max_tokens: int, cap: int) -> GenerationRequest:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "'prompt' must be a string (or a list of exactly one string)")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "'prompt' is empty")
        if self.echo or self.suffix:
            raise APIError(400, "'echo' and 'suffix' are not supported")
        schema, grammar = self.structured_output()
        return GenerationRequest(
            model=model,
            prompt=prompt,
            params=self.sampling(default_max_tokens, cap),
            json_schema=schema,
            grammar=grammar,
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
