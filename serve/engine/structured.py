"""Structured output and tool calling for one model: a request's ``json_schema``, ``grammar`` and ``tools`` become
the grammar its llama.cpp sampler enforces, the messages its chat template renders, and the parser its answer
goes through (``tools.ToolCallStream``).

``StructuredOutput.plan(request)`` returns the request to submit (messages rewritten for templates without tool
support, ``params.grammar`` and ``params.preserved_tokens`` set) and how to wrap the resulting generation. The
model's tool-call format comes from its chat template (``tools.detect_format``); the template renders ``tools``
itself only when it supports them (``ChatTemplate.supports_tools``) and the format is one of the known families;
otherwise the fallback prompt of ``tools`` is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from edgellm.serve.engine.base import (
    Generation,
    GenerationRequest,
    Grammar,
    InvalidRequestError,
    NamedTool,
)
from edgellm.serve.engine.grammar import GrammarCache, SchemaError, canonical
from edgellm.serve.engine.prompt import ChatTemplate
from edgellm.serve.engine.sampling import CompiledGrammars
from edgellm.serve.engine.tools import (
    GENERIC,
    NO_CALL_GRAMMAR,
    ToolCallParser,
    ToolCallStream,
    ToolFormat,
    call_grammar,
    choose,
    detect_format,
    fallback_messages,
    plain_messages,
    short_call_text,
    tool_list,
    trigger_pattern,
)


def needs_plan(request: GenerationRequest) -> bool:
    """Whether ``request`` asks for anything beyond plain generation."""
    return bool(
        request.tools
        or request.json_schema is not None
        or request.grammar
        or (request.messages is not None and not plain_messages(request.messages))
    )


@dataclass(frozen=True)
class Plan:
    """What to submit, and how to read the answer (``tool_format``: parse tool calls in this format)."""

    request: GenerationRequest
    tool_format: ToolFormat | None = None

    def wrap(self, generation: Generation) -> Generation:
        if self.tool_format is None:
            return generation
        return ToolCallStream(generation, ToolCallParser(self.tool_format))


class StructuredOutput:
    """One model's structured output: its tool-call format, the token ids of that format's markers, its parsed
    grammars (``grammars``, per vocabulary) and the engine's cache of generated grammars (``cache``).
    ``tokenize``: text -> token ids (no BOS, special tokens parsed)."""

    def __init__(
        self,
        template: ChatTemplate,
        tokenize: Callable[[str], list[int]],
        grammars: CompiledGrammars,
        cache: GrammarCache,
    ) -> None:
        self.template = template
        self.format = detect_format(template.source)
        self.native = self.format is not GENERIC and template.supports_tools
        if not self.native:
            self.format = GENERIC
        self.grammars = grammars
        self.cache = cache
        self.marker_tokens = {m: ids[0] for m in self.format.markers() if len(ids := tokenize(m)) == 1}
        self._tokenize = tokenize

    def plan(self, request: GenerationRequest) -> Plan:
        """Raises ``InvalidRequestError`` (naming the field) for what cannot be served."""
        tools = tool_list(request.tools)
        choice = request.tool_choice
        names = {t.name for t in tools}
        if isinstance(choice, NamedTool) and choice.name not in names:
            raise InvalidRequestError(f"{choice.name!r} is not one of the functions in 'tools'", "tool_choice")
        if choice == "required" and not tools:
            raise InvalidRequestError("'required' needs 'tools'", "tool_choice")
        callable_tools = choose(tools, choice)
        if callable_tools and request.messages is None:
            raise InvalidRequestError("tools need 'messages' (a chat request)", "tools")
        if callable_tools and (request.json_schema is not None or request.grammar):
            raise InvalidRequestError("tools cannot be combined with a JSON schema or a grammar", "tools")
        if request.json_schema is not None and request.grammar:
            raise InvalidRequestError("give either a JSON schema or a grammar, not both", "grammar")

        fmt = self.format
        params = request.params
        out = request
        no_calls = False  # the fallback format, calls in the history, none allowed now
        if request.messages is not None:
            if self.native:
                out = replace(out, tools=request.tools if callable_tools else None)
            elif callable_tools or not plain_messages(request.messages):
                messages = fallback_messages(request.messages, tools, choice, request.parallel_tool_calls)
                out = replace(out, messages=messages, tools=None)
                no_calls = not callable_tools and not plain_messages(request.messages)

        grammar: Grammar | None = None
        if no_calls and request.json_schema is None and not request.grammar:
            grammar = Grammar(NO_CALL_GRAMMAR)
        if callable_tools:
            gbnf = self._tool_grammar(fmt, callable_tools, request.parallel_tool_calls)
            if choice == "auto":
                grammar = Grammar(
                    gbnf,
                    lazy=True,
                    trigger_patterns=(trigger_pattern(fmt),),
                    trigger_tokens=tuple(t for m, t in self.marker_tokens.items() if m == fmt.trigger),
                )
            else:  # near the budget's end, keep room for the closing text, or for one short call
                closing = "".join(a for a in fmt.closing if a)
                grammar = Grammar(
                    gbnf,
                    json=True,
                    tail_tokens=len(self._tokenize(closing)) if closing else 0,
                    restart_tokens=len(self._tokenize(short_call_text(fmt, callable_tools))),
                )
            params = replace(params, preserved_tokens=frozenset(self.marker_tokens.values()))
        elif request.json_schema is not None:
            try:
                grammar = Grammar(self.cache.schema(request.json_schema), json=True)
            except SchemaError as e:
                raise InvalidRequestError(str(e), "json_schema") from None
        elif request.grammar:
            grammar = Grammar(request.grammar)
        if grammar is not None:
            self.grammars.check(grammar)
            params = replace(params, grammar=grammar)
        out = replace(out, params=params)
        return Plan(out, fmt if callable_tools else None)

    def _tool_grammar(self, fmt: ToolFormat, tools: list[Any], parallel: bool) -> str:
        key = "tools:" + fmt.name + ":" + str(parallel) + ":" + canonical([[t.name, t.parameters] for t in tools])
        try:
            return self.cache.get(key, lambda: call_grammar(fmt, tools, parallel))
        except SchemaError as e:
            raise InvalidRequestError(str(e)) from None


__all__ = ["Plan", "StructuredOutput", "needs_plan"]
