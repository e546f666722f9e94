"""Tool calling: the formats of real model families (parsed from their exact output, detected from their real chat
templates), the call grammars and lazy triggers on llama.cpp's grammar sampler, the fallback prompt, and tools on a
real server with the official ``openai`` client (forced and required calls, streaming, a round trip, ``auto``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from edgellm.serve.engine.base import ChatMessage, Grammar, NamedTool, TextDelta, ToolCallDelta
from edgellm.serve.engine.tools import (
    GENERIC,
    HERMES,
    LLAMA3,
    MISTRAL,
    ToolCallParser,
    ToolFormat,
    assemble,
    call_grammar,
    detect_format,
    fallback_messages,
    parse_tool_calls,
    tool_list,
    trigger_pattern,
)
from tests.test_structured_output import GrammarProbe

MODEL = "smollm2-135m-instruct"
TEMPLATES = Path(__file__).parent / "assets" / "templates"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string", "maxLength": 30}},
            "required": ["tz"],
            "additionalProperties": False,
        },
    },
}


class WeatherArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    city: str = Field(max_length=40)
    unit: Literal["celsius", "fahrenheit"]


class TimeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tz: str = Field(max_length=30)


ARGS = {"get_weather": WeatherArgs, "get_time": TimeArgs}


# -- formats of real model families ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("template", "fmt"),
    [
        ("Qwen-Qwen2.5-7B-Instruct.jinja", HERMES),
        ("meta-llama-Llama-3.2-3B-Instruct.jinja", LLAMA3),
        ("mistralai-Mistral-Nemo-Instruct-2407.jinja", MISTRAL),
        ("google-gemma-3-it.jinja", GENERIC),
        ("microsoft-Phi-3.5-mini-instruct.jinja", GENERIC),
    ],
)
def test_formats_are_detected_from_real_templates(template: str, fmt: ToolFormat) -> None:
    assert detect_format((TEMPLATES / template).read_text()) is fmt


EXACT_OUTPUTS = [  # (format, what the model wrote, expected content, expected [(name, arguments)])
    (
        HERMES,  # Qwen 2.5: text, then two blocks
        'I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
        "I will check both.",
        [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"tz": "Europe/Paris"})],
    ),
    (
        HERMES,  # keys in the other order (no grammar)
        '<tool_call>\n{"arguments": {"tz": "UTC"}, "name": "get_time"}\n</tool_call>',
        None,
        [("get_time", {"tz": "UTC"})],
    ),
    (HERMES, "Paris is sunny today, 21 °C.", "Paris is sunny today, 21 °C.", []),
    (
        LLAMA3,  # Llama 3.1/3.2: the JSON call is the answer
        '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}',
        None,
        [("get_weather", {"city": "Oslo", "unit": "celsius"})],
    ),
    (LLAMA3, '{"answer": 42} is a JSON object.', '{"answer": 42} is a JSON object.', []),
    (
        MISTRAL,  # Mistral Nemo: a list after [TOOL_CALLS], ids of its own (replaced by ours)
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lima", "unit": "celsius"}, "id": "a1B2c3D4e"}, '
        '{"name": "get_time", "arguments": {"tz": "America/Lima"}, "id": "f5G6h7I8j"}]',
        None,
        [("get_weather", {"city": "Lima", "unit": "celsius"}), ("get_time", {"tz": "America/Lima"})],
    ),
    (
        GENERIC,  # the fallback format, with escapes and nesting in the arguments
        '{"tool_calls": [{"name": "get_time", "arguments": {"tz": "a \\"quoted\\" {zone}"}}]}',
        None,
        [("get_time", {"tz": 'a "quoted" {zone}'})],
    ),
    (GENERIC, "It is 9 o'clock.", "It is 9 o'clock.", []),
    (GENERIC, '{"weather": "sunny"}', '{"weather": "sunny"}', []),
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), EXACT_OUTPUTS)
def test_exact_family_outputs_parse(fmt: ToolFormat, text: str, content: str | None, calls: list[Any]) -> None:
    got_content, got_calls = parse_tool_calls(fmt, text)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    ids = [c["id"] for c in got_calls]
    assert len(set(ids)) == len(ids)
    if fmt is MISTRAL:
        assert all(re.fullmatch(r"[a-zA-Z0-9]{9}", i) for i in ids)  # what Mistral's templates accept back
    else:
        assert all(i.startswith("call_") for i in ids)
    # streamed one character at a time: the same answer, the name before any argument
    parser = ToolCallParser(fmt, new_id=lambda: "id")
    events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
    assert assemble(events)[0] == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in assemble(events)[1]] == calls
    for e in events:
        if isinstance(e, ToolCallDelta) and e.id is not None:
            assert e.name and e.arguments == ""


def test_trigger_patterns_fire_only_inside_the_start_of_a_call() -> None:
    generic = re.compile(trigger_pattern(GENERIC))
    for text in ("{", ' \n{"', '{"tool_calls": [', '{\n  "tool_calls": [{"name": "'):
        m = generic.fullmatch(text)
        assert m is not None and text[m.start(1)] == "{", text
    for text in ('{"answer"', "Hi {", '{"tool_calls": [{"name": "get'):
        assert generic.fullmatch(text) is None, text
    hermes = re.compile(trigger_pattern(HERMES))
    for text in ("Let me see. <tool_call>", "x<tool_call>\n{", 'a<tool_call>\n{"name": "'):
        m = hermes.search(text)
        assert m is not None and text[m.start(1) :].startswith("<tool_call>"), text
    assert hermes.search("<tool_call") is None and hermes.search('<tool_call>{"arguments"') is None


def test_fallback_prompt_rewrites_tools_calls_and_results() -> None:
    messages = (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather in Rome?"),
        ChatMessage(
            "assistant",
            None,
            tool_calls=(
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ),
        ),
        ChatMessage("tool", '{"temp": 20}', tool_call_id="c1"),
        ChatMessage("tool", "sunny", tool_call_id="c1"),
    )
    out = fallback_messages(messages, tool_list((WEATHER,)), "auto", True)
    assert [m.role for m in out] == ["system", "user", "assistant", "user"]
    assert out[0].content is not None and out[0].content.startswith("Be brief.\n\n# Tools\n")
    assert '"name": "get_weather"' in out[0].content and '{"tool_calls": [' in out[0].content
    assert out[2].content == '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]}'
    assert out[3].content == (
        'Function results:\n{"name": "get_weather", "content": {"temp": 20}}\n'
        '{"name": "get_weather", "content": "sunny"}\nUse these results to answer my question.'
    )
    named = fallback_messages(messages[1:2], tool_list((WEATHER,)), NamedTool("get_weather"), False)
    assert named[0].role == "system" and "You must call the function `get_weather`." in (named[0].content or "")


# -- grammars on llama.cpp's sampler -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probe(default_gguf: Path) -> Iterator[GrammarProbe]:
    p = GrammarProbe(default_gguf)
    yield p
    p.close()


def test_call_grammars_accept_valid_calls_only(probe: GrammarProbe) -> None:
    tools = tool_list((WEATHER, TIME))
    generic = call_grammar(GENERIC, tools, parallel=True)
    ok = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}]}'
    assert probe.accepts(generic, ok)
    assert probe.accepts(generic, ok[:-2] + ', {"name": "get_time", "arguments": {"tz": "UTC"}}]}')
    assert not probe.accepts(generic, ok.replace("celsius", "kelvin"))
    assert not probe.accepts(generic, ok.replace("get_weather", "get_news"))
    assert not probe.accepts(generic, ok.replace(', "unit": "celsius"', ""))
    single = call_grammar(GENERIC, tools, parallel=False)
    assert not probe.accepts(single, ok[:-2] + ', {"name": "get_time", "arguments": {"tz": "UTC"}}]}')
    hermes = call_grammar(HERMES, tools, parallel=True)
    assert probe.accepts(hermes, EXACT_OUTPUTS[0][1].split("\n", 1)[1])
    llama3 = call_grammar(LLAMA3, tools, parallel=True)
    assert probe.accepts(llama3, EXACT_OUTPUTS[3][1])
    mistral = call_grammar(MISTRAL, tools, parallel=True)
    assert probe.accepts(mistral, '[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "UTC"}}]')


@pytest.mark.parametrize("fmt", [GENERIC, HERMES])
def test_lazy_grammar_leaves_text_free_and_constrains_a_started_call(probe: GrammarProbe, fmt: ToolFormat) -> None:
    tools = tool_list((WEATHER,))
    lazy = Grammar(call_grammar(fmt, tools, parallel=True), lazy=True, trigger_patterns=(trigger_pattern(fmt),))
    call = '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}'
    good = f"{{\"tool_calls\": [{call}]}}" if fmt is GENERIC else f"Let me look.\n<tool_call>\n{call}\n</tool_call>"
    bad = good.replace("celsius", "kelvin")

    def accepts(text: str) -> bool:
        sampler = probe.grammars.instantiate(lazy)
        try:
            for token in probe.model.tokenize(text.encode(), add_bos=False, special=False):
                if not probe.candidates.allows(sampler, token):
                    return False
                probe.ll.llama_sampler_accept(sampler, token)  # a trigger replays text into the grammar here
            return probe.candidates.allows(sampler, probe.eos)
        finally:
            probe.ll.llama_sampler_free(sampler)

    assert accepts("The weather in Rome is mild; no need for a tool.")
    assert accepts(good)
    assert not accepts(bad)


# -- the real server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(chat_server: str) -> str:
    return chat_server  # the session's shared server (tests/conftest.py)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


CITIES = [
    "Paris", "Tokyo", "Lima", "Oslo", "Nairobi", "Denver", "Hanoi", "Cairo", "Quito", "Perth",
    "Lyon", "Seoul", "Accra", "Bergen", "Cusco", "Dakar", "Fez", "Graz", "Hobart", "Izmir",
]


def _check_calls(message: Any, allowed: set[str]) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.function.name in allowed
        ARGS[call.function.name].model_validate_json(call.function.arguments, strict=True)
    ids = [c.id for c in message.tool_calls]
    assert len(set(ids)) == len(ids)


# Requests: 8 (each of the four tool_choice / parallel_tool_calls combinations twice) by default, 20 under
# `make test-slow`.
@pytest.mark.parametrize("n", [pytest.param(8, id="8"), pytest.param(20, id="20", marks=pytest.mark.slow)])
def test_forced_and_required_calls_have_valid_arguments(client: openai.OpenAI, n: int) -> None:
    def one(i: int) -> tuple[Any, str | None]:
        choice: Any = {"type": "function", "function": {"name": "get_weather"}} if i % 2 else "required"
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"What is the weather like in {CITIES[i]} right now?"}],
            tools=[WEATHER, TIME],
            tool_choice=choice,
            parallel_tool_calls=i % 4 == 0,
            temperature=0.8,
            seed=i,
            max_tokens=80,
        )
        return r.choices[0].message, r.choices[0].finish_reason

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(n)))
    assert len(answers) == n
    for i, (message, finish) in enumerate(answers):
        assert finish in ("tool_calls", "length"), (finish, message)
        assert message.content is None
        _check_calls(message, {"get_weather"} if i % 2 else {"get_weather", "get_time"})
        if i % 4:
            assert len(message.tool_calls) == 1


def test_streamed_call_reassembles_into_the_non_streamed_one(client: openai.OpenAI, server: str) -> None:
    kw: dict[str, Any] = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    plain = client.chat.completions.create(**kw).choices[0]
    with client.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == plain.finish_reason == "tool_calls"
    assert plain.message.tool_calls and streamed.message.tool_calls
    # two greedy requests may lay out their JSON differently: drafting changes llama.cpp's batch shapes, and the
    # model's choice of indentation can be a near tie; the call itself must be the same
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed.message.tool_calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in plain.message.tool_calls
    ]
    # on the wire: id, type and name first (arguments ""), then argument fragments with the index only
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**kw, "stream": True}, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert set(calls[0]) == {"index", "id", "type", "function"} and calls[0]["function"]["arguments"] == ""
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls[1:])
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == json.loads(
        plain.message.tool_calls[0].function.arguments
    )


def test_round_trip_call_result_answer(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=80,
    ).choices[0].message
    _check_calls(first, {"get_weather"})
    call = first.tool_calls[0]
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "cloudy"})},
    ]
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=60
    ).choices[0]
    assert final.message.tool_calls is None
    assert final.message.content and not final.message.content.lstrip().startswith("{")
    assert final.finish_reason in ("stop", "length")


def test_auto_returns_tool_calls_when_the_model_writes_one(client: openai.OpenAI) -> None:
    history: list[Any] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'},
        {"role": "assistant", "content": "It is 18 °C in Paris."},
        {"role": "user", "content": "And what is the weather in Berlin?"},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], tool_choice="auto", temperature=0, max_tokens=80
    ).choices[0]
    assert r.finish_reason == "tool_calls", r
    _check_calls(r.message, {"get_weather"})
    plain = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello to my friend Ana."}],
        tools=[WEATHER],
        temperature=0,
        max_tokens=30,
    ).choices[0]
    assert plain.message.tool_calls is None and plain.message.content


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_news"}}},
            "'tool_choice.function.name'",
        ),
        ({"tools": [{"type": "retrieval"}]}, "'tools[0].type'"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "'tools[0].function.name'"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"x": {"type": "string", "pattern": "^a$"}}}}}]},
            "'tools[0].function.parameters.properties.x.pattern'",
        ),
        ({"tools": [WEATHER, WEATHER]}, "defined twice"),
        ({"tool_choice": "required"}, "no 'tools'"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "cannot be combined"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}]},
            "'messages[1].tool_call_id'",
        ),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(server: str, body: dict[str, Any], fragment: str) -> None:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body}
    r = httpx.post(f"{server}/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert fragment in r.json()["error"]["message"], r.json()


def test_tool_events_from_the_engine(default_gguf: Path) -> None:
    """The engine without HTTP: a forced call arrives as ToolCallDelta events and finish_reason tool_calls."""
    import asyncio

    from edgellm.serve.engine import BatchedEngine, GenerationRequest, ModelSpec, SamplingParams

    async def run() -> list[Any]:
        engine = BatchedEngine([ModelSpec(name="m", path=default_gguf, n_ctx=512)], slots=1)
        try:
            gen = await engine.submit(
                GenerationRequest(
                    model="m",
                    messages=(ChatMessage("user", "Time in Oslo?"),),
                    tools=(TIME,),
                    tool_choice=NamedTool("get_time"),
                    params=SamplingParams(max_tokens=60, temperature=0),
                )
            )
            return [e async for e in gen]
        finally:
            await engine.close()

    events = asyncio.run(run())
    assert not [e for e in events if isinstance(e, TextDelta)]
    content, calls = assemble(events)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_time"]
    TimeArgs.model_validate_json(calls[0]["function"]["arguments"], strict=True)
    assert events[-1].finish_reason in ("tool_calls", "length")
