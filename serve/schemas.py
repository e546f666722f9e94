"""OpenAI request bodies, validated; ``to_generation_request`` turns them into engine requests.

Unknown fields are accepted and ignored (clients send many), except those whose meaning we would silently
drop: they get a 400 that says so."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgellm.serve.engine.base import ChatMessage, GenerationRequest, SamplingParams
from edgellm.serve.errors import APIError

Role = Literal["system", "developer", "user", "assistant"]
T = TypeVar("T", bound=BaseModel)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Role
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


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

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

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

    def to_generation_request(self, model: str, default_max_tokens: int, cap: int) -> GenerationRequest:
        if self.tools:
            raise APIError(400, "tool calling is not supported by this server; send the request without 'tools'")
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if all(not m.text().strip() for m in self.messages):
            raise APIError(400, "'messages' has no text: every message content is empty")
        messages = tuple(
            ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text()) for m in self.messages
        )
        return GenerationRequest(model=model, messages=messages, params=self.sampling(default_max_tokens, cap))


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
        return GenerationRequest(model=model, prompt=prompt, params=self.sampling(default_max_tokens, cap))


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
