"""Chat prompts from the GGUF's own chat template (``tokenizer.chat_template``), rendered exactly as transformers'
``apply_chat_template`` renders it: the same sandboxed Jinja environment (``trim_blocks``, ``lstrip_blocks``, loop
controls, ``tojson`` without HTML escaping, ``raise_exception``, ``strftime_now``, ``{% generation %}``), the same
variables (``messages``, ``tools``, ``documents``, ``add_generation_prompt``, ``bos_token``, ``eos_token``), and
messages as the plain dicts transformers passes (keys whose value is None dropped; a tool call's ``arguments``
parsed from its JSON string into a dict). A model without a template falls back to ChatML, as llama.cpp does.

Bound to a model's ``PromptTokenizer`` (``tokens.py``), ``ChatTemplate.tokens`` gives the ids to decode: control-token
text that comes from the messages or tools is marked before rendering (two private-use characters around it), the
marks are taken out of the rendered text and their places kept, and those places are tokenized as plain text.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any

from edgellm.serve.engine.base import ChatMessage, InvalidPromptError
from edgellm.serve.engine.tokens import PromptTokenizer, RenderedChat, SpecialTokens

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Around control-token text from the messages: characters from the last private-use plane, removed from the inputs
# first so that a message cannot forge them.
MARK_START, MARK_END = "\U0010fffc", "\U0010fffd"
_MARKS = re.compile(f"[{MARK_START}{MARK_END}]")

_PROBE_TOOL = "edgellm_probe_tool_4f1c"


def _environment() -> Any:
    """transformers' chat-template environment (``utils/chat_template_utils.py``), without its assistant-mask
    bookkeeping: ``{% generation %}`` blocks render their body."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> Any:
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """Rejects underscore attributes, as transformers' does (no way to CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = Namespace
    return env


def message_dict(message: ChatMessage) -> dict[str, Any]:
    """A message as transformers passes it to a template: OpenAI's fields, None values dropped, each tool call's
    ``function.arguments`` parsed from JSON (kept as the string when it is not JSON)."""
    out: dict[str, Any] = {"role": message.role}
    content = getattr(message, "content", None)
    if content is not None:
        out["content"] = content
    calls = getattr(message, "tool_calls", None)
    if calls is not None:
        out["tool_calls"] = [_tool_call(c) for c in calls]
    for key in ("tool_call_id", "name"):
        value = getattr(message, key, None)
        if value is not None:
            out[key] = value
    return out


def _tool_call(call: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in call.items() if v is not None}
    function = out.get("function")
    if isinstance(function, Mapping):
        function = {k: v for k, v in function.items() if v is not None}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function["arguments"] = json.loads(arguments)
            except ValueError:
                pass
        out["function"] = function
    return out


class ChatTemplate:
    """Renders messages (and tools) to the prompt text a model was trained on; with a ``tokenizer``, to its ids."""

    def __init__(
        self, template: str | None, bos_token: str, eos_token: str, tokenizer: PromptTokenizer | None = None
    ) -> None:
        self.source = template or CHATML
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.tokenizer = tokenizer
        self._specials: SpecialTokens | None = tokenizer.specials if tokenizer else None
        env = _environment()
        try:
            self._template = env.from_string(self.source)
        except Exception as e:  # as llama-server: a template that does not parse gives way to ChatML
            log.warning("the model's chat template does not parse (%s); using ChatML", e)
            self.source = CHATML
            self._template = env.from_string(CHATML)

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, str], bos_token: str, eos_token: str, tokenizer: PromptTokenizer | None = None
    ) -> ChatTemplate:
        return cls(metadata.get("tokenizer.chat_template"), bos_token, eos_token, tokenizer)

    @classmethod
    def for_model(
        cls, metadata: Mapping[str, str], tokenizer: PromptTokenizer, source: str | None = None
    ) -> ChatTemplate:
        """The template of a loaded GGUF (or ``source``, a Jinja template that replaces it), bound to its tokenizer
        (BOS/EOS text from its vocabulary)."""
        if source is not None:
            return cls(source, tokenizer.bos_text, tokenizer.eos_text, tokenizer)
        return cls.from_metadata(metadata, tokenizer.bos_text, tokenizer.eos_text, tokenizer)

    # -- rendering ---------------------------------------------------------------------------------------------
    def render(self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt text, as ``apply_chat_template(..., tokenize=False, add_generation_prompt=True)``."""
        return self._render([message_dict(m) for m in messages], _plain(tools))

    def render_marked(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> RenderedChat:
        """The prompt text and the spans of it that are control-token text from the inputs (see ``tokens.py``)."""
        payload = [message_dict(m) for m in messages]
        plain_tools = _plain(tools)
        if self._specials is None or not self._specials.control_texts:
            return RenderedChat(self._render(payload, plain_tools))
        marker = _Marker(self._specials)
        payload = marker.mark(payload)
        plain_tools = marker.mark(plain_tools)
        text = self._render(payload, plain_tools)
        if not marker.marked and MARK_START not in text and MARK_END not in text:
            return RenderedChat(text)
        return _unmark(text)

    def tokens(self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """The prompt ids to decode: the rendered chat, BOS by the GGUF, control tokens only from the markup."""
        if self.tokenizer is None:
            raise TypeError("this ChatTemplate has no tokenizer (build it with ChatTemplate.for_model)")
        return self.tokenizer.chat(self.render_marked(messages, tools))

    @cached_property
    def supports_tools(self) -> bool:
        """Whether the template itself renders ``tools`` (a probe tool's name shows in the prompt)."""
        probe = [
            {
                "type": "function",
                "function": {
                    "name": _PROBE_TOOL,
                    "description": "probe",
                    "parameters": {"type": "object", "properties": {}},
                },
            }
        ]
        try:
            text = self._render([{"role": "user", "content": "hello"}], probe)
        except InvalidPromptError:
            return False
        return _PROBE_TOOL in text

    def _render(self, messages: list[dict[str, Any]], tools: list[Any] | None) -> str:
        try:
            return str(
                self._template.render(
                    messages=messages,
                    tools=tools,
                    documents=None,
                    add_generation_prompt=True,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                )
            )
        except Exception as e:  # the template's raise_exception() or a Jinja error
            raise InvalidPromptError(f"the model's chat template rejected these messages: {e}") from None


def _plain(tools: Sequence[Mapping[str, Any]] | None) -> list[Any] | None:
    return None if tools is None else [dict(t) for t in tools]


class _Marker:
    """Wraps control-token text in input strings with MARK_START/MARK_END (after removing any marks already there)."""

    def __init__(self, specials: SpecialTokens) -> None:
        self._specials = specials
        self.marked = False

    def mark(self, obj: Any) -> Any:
        if isinstance(obj, str):
            return self._mark_text(obj)
        if isinstance(obj, Mapping):
            return {k: self.mark(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self.mark(v) for v in obj]
        return obj

    def _mark_text(self, text: str) -> str:
        if MARK_START in text or MARK_END in text:
            text = _MARKS.sub("", text)
        spans = self._specials.control_spans(text)
        if not spans:
            return text
        self.marked = True
        parts: list[str] = []
        last = 0
        for a, b in spans:
            parts += [text[last:a], MARK_START, text[a:b], MARK_END]
            last = b
        parts.append(text[last:])
        return "".join(parts)


def _unmark(rendered: str) -> RenderedChat:
    """The rendered text without marks, and the protected spans they delimited. A lone mark (a template that cut a
    marked string apart) still breaks the text where it was, so no control token can form across it."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    opened: int | None = None
    last = 0
    for m in _MARKS.finditer(rendered):
        piece = rendered[last : m.start()]
        out.append(piece)
        pos += len(piece)
        last = m.end()
        if m.group() == MARK_START:
            if opened is not None:
                spans.append((opened, opened))
            opened = pos
        elif opened is not None:
            spans.append((opened, pos))
            opened = None
        else:
            spans.append((pos, pos))
    out.append(rendered[last:])
    if opened is not None:
        spans.append((opened, opened))
    return RenderedChat("".join(out), tuple(spans))


__all__ = ["CHATML", "ChatTemplate", "message_dict"]
