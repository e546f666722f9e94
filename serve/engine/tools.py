"""Tool calls: the formats models write them in, the grammar that makes a call valid, the prompt for chat templates
without tool support, and the parser that turns generated text back into OpenAI tool calls.

Formats, chosen from the chat template's source as llama.cpp's ``common/chat.cpp`` does:

- ``hermes`` (Hermes 2 Pro, Qwen 2.5/3, templates that mention ``<tool_call>``): one block per call,
  ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``, anywhere in the answer;
- ``mistral`` (templates with ``[TOOL_CALLS]``): ``[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]``;
- ``llama3`` (Llama 3.1+, templates with ``<|start_header_id|>`` and ``ipython``): the whole answer is
  ``{"name": "f", "parameters": {...}}`` (one call);
- ``generic`` (every other template): the fallback below.

**The fallback prompt** (``generic``; also used for templates that know tools but none of the formats above). The
messages are rewritten before the template renders them, so the template never sees ``tools``, ``tool_calls`` or a
``tool`` role:

1. The tools and the answer format are appended to the system message (one is inserted first if there is none)::

       # Tools

       You may call these functions. Each line is a function: its name, what it does, and the JSON Schema of its
       arguments.
       {"name": "get_weather", "description": "...", "parameters": {...}}

       To call functions, answer with only a JSON object in this format, and nothing else:
       {"tool_calls": [{"name": "<function name>", "arguments": {<arguments>}}]}
       Their results come back in the next message. To answer without calling a function, write plain text.

   (``required``: "You must call at least one function ..."; a named function: "You must call the function
   `f`."; without ``parallel_tool_calls``: exactly one call; ``none``: no tools block.)
2. An assistant message with ``tool_calls`` becomes text: its content (if any), a newline, then the calls as
   ``{"tool_calls": [{"name": "f", "arguments": {...}}]}``.
3. ``tool`` messages become one ``user`` message per run of consecutive results: ``Function results:``, one line
   per result ``{"name": "f", "content": <the result, as JSON if it parses, else the string>}``, then ``Use these
   results to answer my question.``
4. With ``tool_choice: none`` and calls in the history, the answer may not start with ``{`` (a grammar): small
   models otherwise copy the earlier call as their answer.

**Grammars.** ``required`` or a named function: the whole answer is constrained to the format's calls, each
``{"name": "<one of the tools>", "arguments": <valid against its parameters schema>}`` (several only with
``parallel_tool_calls``; ``llama3`` calls one). ``auto``: the same grammar, lazy: it switches on at the format's
trigger (``<tool_call>``, ``[TOOL_CALLS]``, or for ``generic``/``llama3`` an answer that starts with ``{``),
so the model may answer in text, and once a call starts its arguments are valid. A trigger pattern matches only
text that ends inside the fixed start of a call (the trigger, then e.g. ``{"name": "``), so that everything
llama.cpp replays into the grammar when it fires is text the grammar accepts.

**Parsing.** ``ToolCallParser`` reads the text as it streams: text before a trigger is content; a call's ``id``
and ``name`` are emitted as soon as the name is complete, then its ``arguments`` text as it arrives (OpenAI's
streamed ``delta.tool_calls``); a call whose keys come in another order (unconstrained output) is emitted whole
when its object closes.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from edgellm.serve.engine.base import (
    ChatMessage,
    Event,
    Finished,
    Generation,
    NamedTool,
    TextDelta,
    ToolCallDelta,
    ToolChoice,
)
from edgellm.serve.engine.grammar import GrammarBuilder, gbnf_literal

WS = None  # an atom: the whitespace the grammar's ``space`` rule allows
Atom = str | None

_REGEX_SPECIAL = set("\\^$.|?*+()[]{}/")
_WS_ECMA = "(?: |\\n{1,2}[ \\t]{0,20})?"  # the grammar's ``space``, as a regex
_CALL_HEAD: tuple[Atom, ...] = ("{", WS, '"name"', WS, ":", WS, '"')


def _escape(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def _units(atoms: Iterable[Atom], ws: str) -> list[str]:
    units: list[str] = []
    for atom in atoms:
        units.extend([ws] if atom is WS else [_escape(c) for c in atom])
    return units


def prefix_regex(atoms: Sequence[Atom], ws: str = _WS_ECMA) -> str:
    """A regex for the non-empty prefixes of the text ``atoms`` spell (its first character required)."""
    units = _units(atoms, ws)
    tail = ""
    for unit in reversed(units[1:]):
        tail = f"(?:{unit}{tail})?"
    return units[0] + tail


def full_regex(atoms: Sequence[Atom], ws: str = r"\s*") -> str:
    return "".join(_units(atoms, ws))


def gbnf_sequence(atoms: Sequence[Atom]) -> str:
    return " ".join("space" if a is WS else gbnf_literal(a) for a in atoms)


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes tool calls (see the module docstring)."""

    name: str
    trigger: str | None  # the marker that starts the calls anywhere; None: the answer starts with them
    opening: tuple[Atom, ...]  # after the trigger, before the first call
    separator: tuple[Atom, ...]  # between two calls
    closing: tuple[Atom, ...]  # after the last call
    args_key: str = "arguments"
    parallel: bool = True  # several calls in one answer
    id_length: int = 0  # ids of exactly this many letters and digits (Mistral's templates demand 9); 0: call_...
    after_closing: str = "tail"  # "text": more text (and calls) may follow the closing; "tail": the answer ends

    def markers(self) -> tuple[str, ...]:
        """Special tokens of the format whose text must reach the parser."""
        return tuple(m for m in (self.trigger,) if m)


GENERIC = ToolFormat(
    "generic",
    trigger=None,
    opening=("{", WS, '"tool_calls"', WS, ":", WS, "[", WS),
    separator=(",", WS),
    closing=(WS, "]", WS, "}"),
)
HERMES = ToolFormat(
    "hermes",
    trigger="<tool_call>",
    opening=(WS,),
    separator=(WS, "</tool_call>", WS, "<tool_call>", WS),
    closing=(WS, "</tool_call>"),
    after_closing="text",
)
MISTRAL = ToolFormat(
    "mistral", trigger="[TOOL_CALLS]", opening=("[",), separator=(",", WS), closing=("]",), id_length=9
)
LLAMA3 = ToolFormat(
    "llama3", trigger=None, opening=(), separator=(), closing=(), args_key="parameters", parallel=False
)
FORMATS = {f.name: f for f in (GENERIC, HERMES, MISTRAL, LLAMA3)}


def detect_format(template_source: str) -> ToolFormat:
    """The tool-call format of a chat template (``generic`` when it is none of the known families)."""
    if "<tool_call>" in template_source:
        return HERMES
    if "[TOOL_CALLS]" in template_source:
        return MISTRAL
    llama3_tools = "ipython" in template_source or "<|python_tag|>" in template_source
    if "<|start_header_id|>" in template_source and llama3_tools:
        return LLAMA3
    return GENERIC


# -- tools ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Any  # a JSON schema of the arguments object
    index: int = 0  # its place in the request's ``tools``


def tool_list(tools: Sequence[Mapping[str, Any]] | None) -> list[Tool]:
    """OpenAI tool definitions (already validated by the caller) as ``Tool`` values."""
    out = []
    for i, t in enumerate(tools or ()):
        f = t["function"]
        params = f.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        out.append(Tool(name=f["name"], description=f.get("description") or "", parameters=params, index=i))
    return out


def choose(tools: list[Tool], choice: ToolChoice) -> list[Tool]:
    """The tools a call may use under ``choice``."""
    if isinstance(choice, NamedTool):
        return [t for t in tools if t.name == choice.name]
    return tools if choice != "none" else []


def call_grammar(fmt: ToolFormat, tools: list[Tool], parallel: bool) -> str:
    """GBNF for an answer made of calls in ``fmt`` of ``tools`` (arguments valid against each one's parameters)."""
    b = GrammarBuilder()
    alternatives = []
    for i, tool in enumerate(tools):
        args = b.add_schema(tool.parameters, f"tool-{i}-args", f"tools[{tool.index}].function.parameters")
        head = gbnf_sequence(("{", WS, '"name"', WS, ":", WS))
        key = gbnf_sequence((WS, ",", WS, json.dumps(fmt.args_key), WS, ":", WS))
        name = gbnf_literal(json.dumps(tool.name))
        alternatives.append(b.add_rule(f"tool-{i}-call", f'{head} {name} {key} {args} space "}}"'))
    call = b.add_rule("call", " | ".join(alternatives))
    parts = [gbnf_literal(fmt.trigger)] if fmt.trigger else []
    if fmt.opening:
        parts.append(gbnf_sequence(fmt.opening))
    parts.append(call)
    if parallel and fmt.parallel:
        parts.append(f"( {gbnf_sequence(fmt.separator)} {call} )*")
    if fmt.closing:
        parts.append(gbnf_sequence(fmt.closing))
    b.add_rule("root", " ".join(parts))
    return b.grammar()


def short_call_text(fmt: ToolFormat, tools: list[Tool]) -> str:
    """The text of a call with empty arguments of the longest-named tool, with the format's fixed text around."""
    name = max((t.name for t in tools), key=len)
    call = "{" + f'"name": {json.dumps(name)}, {json.dumps(fmt.args_key)}: ' + "{}}"
    parts = [fmt.trigger or "", *(a or "" for a in fmt.opening), call, *(a or "" for a in fmt.closing)]
    return "".join(parts)


# ``tool_choice: none`` with the fallback format: an answer that does not start with ``{`` (the model, shown calls in
# its history, would otherwise write one more, as text).
NO_CALL_GRAMMAR = 'root ::= [ \\t\\n]* ( [^{ \\t\\n] [^\\x00]* )?\n'


def trigger_pattern(fmt: ToolFormat) -> str:
    """The lazy grammar's trigger (std::regex, see the module docstring): the text generated so far ends inside
    the fixed start of a call."""
    start = prefix_regex((*fmt.opening, *_CALL_HEAD))
    if fmt.trigger is None:
        return f"^[ \\t\\n]*({start})$"
    return f"({_escape(fmt.trigger)}(?:{start})?)$"


# -- the fallback prompt ----------------------------------------------------------------------------------------
def _arguments_value(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


RESULTS_NOTE = "Use these results to answer my question."


def fallback_system_prompt(tools: list[Tool], choice: ToolChoice, parallel: bool) -> str:
    lines = [
        "# Tools",
        "",
        "You may call these functions. Each line is a function: its name, what it does, and the JSON Schema of "
        "its arguments.",
    ]
    for t in tools:
        lines.append(_dumps({"name": t.name, "description": t.description, "parameters": t.parameters}))
    one = '{"tool_calls": [{"name": "<function name>", "arguments": {<arguments>}}]}'
    lines += ["", "To call functions, answer with only a JSON object in this format, and nothing else:", one]
    if isinstance(choice, NamedTool):
        lines.append(f"You must call the function `{choice.name}`.")
    elif choice == "required":
        lines.append("You must call at least one function." if parallel else "You must call exactly one function.")
    else:
        lines.append("Their results come back in the next message. To answer without calling a function, write "
                     "plain text.")
        if not parallel:
            lines.append("Call at most one function at a time.")
    return "\n".join(lines)


def fallback_messages(
    messages: Sequence[ChatMessage], tools: list[Tool], choice: ToolChoice, parallel: bool
) -> tuple[ChatMessage, ...]:
    """The messages rewritten for a template without tool support (see the module docstring)."""
    names: dict[str, str] = {}
    out: list[ChatMessage] = []
    results: list[dict[str, Any]] = []

    def flush_results() -> None:
        if results:
            lines = ["Function results:", *(_dumps(r) for r in results), RESULTS_NOTE]
            out.append(ChatMessage(role="user", content="\n".join(lines)))
            results.clear()

    for m in messages:
        if m.role == "tool":
            name = m.name or names.get(m.tool_call_id or "", "")
            results.append({"name": name, "content": _arguments_value(m.content or "")})
            continue
        flush_results()
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for c in m.tool_calls:
                f = c.get("function", {})
                names[str(c.get("id", ""))] = str(f.get("name", ""))
                calls.append({"name": f.get("name", ""), "arguments": _arguments_value(f.get("arguments", "{}"))})
            text = (m.content or "").strip()
            body = _dumps({"tool_calls": calls})
            out.append(ChatMessage(role="assistant", content=f"{text}\n{body}" if text else body))
        else:
            out.append(ChatMessage(role=m.role, content=m.content or ""))
    flush_results()
    if tools and choice != "none":
        block = fallback_system_prompt(tools, choice, parallel)
        if out and out[0].role == "system":
            out[0] = ChatMessage(role="system", content=f"{out[0].content}\n\n{block}" if out[0].content else block)
        else:
            out.insert(0, ChatMessage(role="system", content=block))
    return tuple(out)


def plain_messages(messages: Sequence[ChatMessage]) -> bool:
    """True if no message carries tool calls or is a tool result."""
    return all(m.role != "tool" and not m.tool_calls for m in messages)


# -- parsing ----------------------------------------------------------------------------------------------------
def new_call_id(length: int = 0) -> str:
    if length:
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(length))
    return "call_" + secrets.token_hex(12)


_HEADER = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_HEADER_MAX = 512  # characters within which a streamed call's header must be complete


class _CallScanner:
    """One call object, character by character: JSON nesting (to find its end), and once its header
    ``{"name": "...", "arguments": `` is read and the arguments open with ``{``, their text as it arrives."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.done = False
        self.name: str | None = None  # set when the arguments start streaming
        self._header_name = ""
        self.args_state = "none"  # none -> await (header read) -> streaming -> complete; or invalid
        self._pending: list[str] = []

    def feed(self, s: str) -> int:
        """Consume characters of ``s`` up to the end of the object; returns how many were consumed."""
        text = self.text
        for i, ch in enumerate(s):
            text.append(ch)
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
            elif ch == '"':
                self.in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
            state = self.args_state
            if state == "streaming":
                self._pending.append(ch)
                if not self.in_str and self.depth == 1:
                    self.args_state = "complete"
            elif state == "await":
                if ch == "{":
                    self.name = self._header_name
                    self.args_state = "streaming"
                    self._pending.append(ch)
                elif not ch.isspace():
                    self.args_state = "invalid"
            elif state == "none" and not self.in_str and ch == ":" and len(text) < _HEADER_MAX:
                m = _HEADER.fullmatch("".join(text))
                if m is not None:
                    try:
                        self._header_name = json.loads(f'"{m.group(1)}"')
                        self.args_state = "await"
                    except json.JSONDecodeError:
                        self.args_state = "invalid"
            if self.depth == 0 and not self.in_str:
                self.done = True
                return i + 1
        return len(s)

    def take_arguments(self) -> str:
        out = "".join(self._pending)
        self._pending.clear()
        return out

    def whole(self) -> tuple[str, str] | None:
        """At the end of the object: (name, arguments JSON) if it is a call, in any key order."""
        try:
            obj = json.loads("".join(self.text))
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        return obj["name"], _dumps(args)


class ToolCallParser:
    """Generated text in, ``TextDelta`` (content) and ``ToolCallDelta`` events out, for one answer in ``fmt``."""

    def __init__(self, fmt: ToolFormat, new_id: Callable[[], str] | None = None) -> None:
        self.fmt = fmt
        self._new_id = new_id or (lambda: new_call_id(fmt.id_length))
        self._state = "start" if fmt.trigger is None else "text"
        self._buf = ""
        self._ws = ""  # trailing whitespace of the content, held back (dropped if calls follow)
        self._call: _CallScanner | None = None
        self.n_calls = 0
        self._open_index = -1  # index of the call whose arguments are streaming
        self._raw_calls = ""  # text of the current calls region, returned as content if it is not calls
        opening = fmt.opening
        self._opening_re = re.compile(full_regex(opening))
        self._opening_prefix = re.compile(prefix_regex((*opening, "{"), r"\s*")) if opening else None
        lists = fmt.parallel and fmt.after_closing == "tail"  # calls in one list: a separator, then the next
        self._sep_re = re.compile(full_regex(fmt.separator)) if lists and fmt.separator else None
        self._close_re = re.compile(full_regex(fmt.closing)) if fmt.closing else None
        after = [a for a in ((fmt.separator if lists else ()), fmt.closing) if a]
        self._after_prefixes = [re.compile(prefix_regex(a, r"\s*")) for a in after]

    # -- output helpers ---------------------------------------------------------------------------------------
    def _content(self, out: list[Event], text: str) -> None:
        """Emit content; trailing whitespace is held until more text follows (dropped before a call)."""
        body = text.rstrip()
        if body:
            out.append(TextDelta(self._ws + body))
            self._ws = ""
        self._ws += text[len(body) :]

    # -- driving ----------------------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Event]:
        self._buf += text
        out: list[Event] = []
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[Event]:
        """At the end of the answer: whatever is still held back."""
        out: list[Event] = []
        while self._step(out, final=True):
            pass
        if self._state == "call" and self._call is not None and self._call.name is None:
            self._content(out, self._raw_calls + "".join(self._call.text))  # a call that never got a name
        elif self._state in ("opening", "call_start"):
            self._content(out, self._raw_calls + self._buf)
        elif self._buf:
            self._content(out, self._buf)
        self._buf = ""
        if self._ws and not self.n_calls:
            out.append(TextDelta(self._ws))
        self._ws = ""
        return out

    def _step(self, out: list[Event], final: bool) -> bool:
        """Advance one state; True if it made progress (call again)."""
        fmt = self.fmt
        buf = self._buf
        if self._state == "start":  # formats whose calls are the whole answer
            s = buf.lstrip(" \t\n")
            if not s:
                return False
            if s[0] != "{":
                self._state = "tail"
                return True
            self._raw_calls = buf[: len(buf) - len(s)]
            self._buf = s
            self._state = "opening"
            return True
        if self._state == "text":  # look for the trigger
            assert fmt.trigger is not None
            i = buf.find(fmt.trigger)
            if i >= 0:
                self._content(out, buf[:i])
                self._raw_calls = fmt.trigger
                self._buf = buf[i + len(fmt.trigger) :]
                self._state = "opening"
                return True
            keep = 0 if final else _partial_suffix(buf, fmt.trigger)
            self._content(out, buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep :]
            return False
        if self._state == "opening":
            if not buf and not final:
                return False
            m = self._opening_re.match(buf)
            if m is not None:
                self._raw_calls += buf[: m.end()]
                self._buf = buf[m.end() :]
                self._state = "call_start"
                return True
            if not final and (self._opening_prefix is None or self._opening_prefix.fullmatch(buf)):
                return False
            self._fail(out)
            return True
        if self._state == "call_start":
            s = buf.lstrip()
            if not s:
                return False
            if s[0] != "{":
                self._fail(out)
                return True
            self._raw_calls += buf[: len(buf) - len(s)]
            self._buf = s
            self._call = _CallScanner()
            self._state = "call"
            return True
        if self._state == "call":
            return self._step_call(out, final)
        if self._state == "after_call":
            if not buf and not final:
                return False
            if self._sep_re is not None:
                m = self._sep_re.match(buf)
                if m is not None:
                    self._buf = buf[m.end() :]
                    self._state = "call_start"
                    return True
            if self._close_re is None:  # one call, then the answer ends
                self._state = "tail"
                return True
            m = self._close_re.match(buf)
            if m is not None:
                self._buf = buf[m.end() :]
                self._state = "text" if fmt.after_closing == "text" else "tail"
                return True
            if any(p.fullmatch(buf) for p in self._after_prefixes):
                if not final:
                    return False
                self._buf = ""  # the answer was cut before its closing
            self._state = "tail" if fmt.trigger is None or fmt.after_closing == "tail" else "text"
            return True
        if self._state == "tail":
            if buf:
                self._content(out, buf)
                self._buf = ""
            return False
        raise AssertionError(self._state)

    def _step_call(self, out: list[Event], final: bool) -> bool:
        call = self._call
        assert call is not None
        buf = self._buf
        if not buf:
            return False
        had_name = call.name is not None
        n = call.feed(buf)
        self._buf = buf[n:]
        if call.name is not None and not had_name:
            self._open_index = self.n_calls
            self.n_calls += 1
            out.append(ToolCallDelta(index=self._open_index, id=self._new_id(), name=call.name, arguments=""))
        if call.name is not None:
            fragment = call.take_arguments()
            if fragment:
                out.append(ToolCallDelta(index=self._open_index, arguments=fragment))
        if not call.done:
            return False
        if call.name is None:  # keys in another order, or not a call at all
            whole = call.whole()
            if whole is None:
                self._buf = "".join(call.text) + self._buf
                self._call = None
                self._fail(out)
                return True
            name, args = whole
            out.append(ToolCallDelta(index=self.n_calls, id=self._new_id(), name=name, arguments=""))
            out.append(ToolCallDelta(index=self.n_calls, arguments=args))
            self.n_calls += 1
        self._raw_calls = ""
        self._call = None
        self._state = "after_call"
        return True

    def _fail(self, out: list[Event]) -> None:
        """What looked like the start of calls is not: it is content."""
        self._content(out, self._raw_calls + self._buf)
        self._raw_calls = ""
        self._buf = ""
        self._state = "tail" if self.fmt.trigger is None else "text"


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def parse_tool_calls(fmt: ToolFormat, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer in ``fmt`` as (content or None, OpenAI tool calls)."""
    parser = ToolCallParser(fmt)
    events = parser.feed(text) + parser.finish()
    return assemble(events)


def assemble(events: Iterable[Event]) -> tuple[str | None, list[dict[str, Any]]]:
    """Content and OpenAI ``tool_calls`` from a stream's text and tool-call deltas (what a client accumulates)."""
    parts: list[str] = []
    calls: list[dict[str, Any]] = []
    for e in events:
        if isinstance(e, TextDelta):
            parts.append(e.text)
        elif isinstance(e, ToolCallDelta):
            if e.index == len(calls):
                calls.append({"id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}})
            calls[e.index]["function"]["arguments"] += e.arguments
    content = "".join(parts)
    return (content if content or not calls else None), calls


class ToolCallStream:
    """A ``Generation`` whose text is parsed for tool calls: content as ``TextDelta``, calls as ``ToolCallDelta``,
    and ``finish_reason`` ``tool_calls`` when the answer called tools."""

    def __init__(self, inner: Generation, parser: ToolCallParser) -> None:
        self.prompt_tokens = inner.prompt_tokens
        self._inner = inner
        self._it = inner.__aiter__()
        self._parser = parser
        self._ready: deque[Event] = deque()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while not self._ready:
            event = await self._it.__anext__()
            if isinstance(event, TextDelta):
                self._ready.extend(self._parser.feed(event.text))
            elif isinstance(event, Finished):
                self._ready.extend(self._parser.finish())
                if self._parser.n_calls and event.finish_reason == "stop":
                    event = replace(event, finish_reason="tool_calls")
                self._ready.append(event)
            else:
                self._ready.append(event)
        return self._ready.popleft()

    async def aclose(self) -> None:
        await self._inner.aclose()


__all__ = [
    "FORMATS",
    "GENERIC",
    "HERMES",
    "LLAMA3",
    "MISTRAL",
    "NO_CALL_GRAMMAR",
    "Tool",
    "ToolCallParser",
    "ToolCallStream",
    "ToolFormat",
    "assemble",
    "call_grammar",
    "choose",
    "detect_format",
    "fallback_messages",
    "new_call_id",
    "parse_tool_calls",
    "plain_messages",
    "tool_list",
    "trigger_pattern",
]
