"""n > 1: several choices from one prompt, evaluated once (its KV copied to the other choices' sequences), each
with its own seed stream; at engine level and on the real server through the official `openai` client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from edgellm.serve.engine.base import (
    ChatMessage,
    Finished,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    TextDelta,
)
from edgellm.serve.engine.batched import BatchedEngine
from edgellm.serve.engine.specs import ModelSpec
from edgellm.serve.schemas import NEUTRAL

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def engine(default_gguf: Path) -> Iterator[BatchedEngine]:
    e = BatchedEngine([ModelSpec(name=MODEL, path=default_gguf, n_ctx=512, n_threads=2)], slots=4)
    yield e
    asyncio.run(e.close())


async def choices(engine: BatchedEngine, request: GenerationRequest) -> tuple[dict[int, str], dict[int, Finished]]:
    gen = await engine.submit(request)
    texts: dict[int, str] = {}
    finished: dict[int, Finished] = {}
    async for event in gen:
        if isinstance(event, TextDelta):
            texts[event.choice] = texts.get(event.choice, "") + event.text
        elif isinstance(event, Finished):
            assert event.choice not in finished
            finished[event.choice] = event
    return texts, finished


def story(n: int, seed: int | None, prompt: str = "Tell me a short story about a dragon.") -> GenerationRequest:
    params = SamplingParams(max_tokens=16, temperature=1.2, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
    return GenerationRequest(model=MODEL, messages=(ChatMessage("user", prompt),), params=params, n=n)


def test_each_choice_is_the_answer_of_its_own_seed(engine: BatchedEngine) -> None:
    texts, finished = asyncio.run(choices(engine, story(3, seed=42)))
    assert sorted(texts) == sorted(finished) == [0, 1, 2]
    assert len(set(texts.values())) == 3, texts
    for i in range(3):  # choice i samples with seed 42 + i: the same text as a request of its own with that seed
        alone, _ = asyncio.run(choices(engine, story(1, seed=42 + i)))
        assert alone[0] == texts[i], (i, alone[0], texts[i])


def test_the_prompt_is_read_once_and_copied(engine: BatchedEngine) -> None:
    request = story(4, seed=7, prompt="Describe a quiet harbour town at dawn in two sentences.")
    _, finished = asyncio.run(choices(engine, request))
    prompt_tokens = finished[0].prompt_tokens
    leader = finished[0].timings
    assert leader.prompt_n + leader.cache_n == prompt_tokens and leader.prompt_n > 10
    for i in (1, 2, 3):  # the other choices evaluated no prompt token
        assert finished[i].timings.prompt_n == 0 and finished[i].prompt_tokens == prompt_tokens


def test_n_beyond_the_slots_is_refused_and_tools_with_n_too(engine: BatchedEngine) -> None:
    with pytest.raises(InvalidRequestError) as e:
        asyncio.run(choices(engine, story(5, seed=1)))
    assert e.value.field == "n"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    request = GenerationRequest(model=MODEL, messages=(ChatMessage("user", "hi"),), tools=(tool,), n=2)
    with pytest.raises(InvalidRequestError) as e:
        asyncio.run(choices(engine, request))
    assert e.value.field == "n"


def test_n_with_a_json_schema_gives_n_valid_documents(engine: BatchedEngine) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    request = GenerationRequest(
        model=MODEL,
        messages=(ChatMessage("user", "Give a JSON object with a name."),),
        params=SamplingParams(max_tokens=40, temperature=1.0, seed=3),
        json_schema=schema,
        n=2,
    )
    texts, _ = asyncio.run(choices(engine, request))
    assert [set(json.loads(texts[i])) >= {"name"} for i in (0, 1)] == [True, True]


def test_serial_engine_refuses_what_needs_the_batched_one(default_gguf: Path) -> None:
    from edgellm.serve.engine.serial import SerialEngine

    async def go() -> list[str | None]:
        e = SerialEngine([ModelSpec(name=MODEL, path=default_gguf, n_ctx=256, n_threads=2)])
        fields = []
        try:
            for params, n in (
                (SamplingParams(), 2),
                (SamplingParams(logprobs=1), 1),
                (SamplingParams(logit_bias=((5, 1.0),)), 1),
            ):
                with pytest.raises(InvalidRequestError) as err:
                    await e.submit(GenerationRequest(model=MODEL, prompt="hi", params=params, n=n))
                fields.append(err.value.field)
        finally:
            await e.close()
        return fields

    assert asyncio.run(go()) == ["n", "logprobs", "logit_bias"]


# -- the real server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(chat_server: str) -> str:
    return chat_server  # the session's shared server (tests/conftest.py)


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


MESSAGES = [{"role": "user", "content": "Write a haiku about rain."}]


def test_openai_client_n_non_streamed(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, max_tokens=12, temperature=1.0, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices) and len({c.message.content for c in r.choices}) == 3
    extra = r.model_extra or {}
    assert r.usage.completion_tokens == extra["timings"]["predicted_n"] >= 3 * 1
    assert r.usage.completion_tokens <= 3 * 12 and r.usage.prompt_tokens > 5
    assert extra["timings"]["prompt_n"] <= r.usage.prompt_tokens  # read once, not three times
    one = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0, seed=6)
    assert one.choices[0].message.content == r.choices[1].message.content  # choice 1 is seed 5 + 1


def test_openai_client_n_streamed_with_logprobs(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, n=2, max_tokens=10, temperature=1.0, seed=5, stream=True,
        stream_options={"include_usage": True}, logprobs=True,
    )
    texts = {0: "", 1: ""}
    tokens = {0: "", 1: ""}
    finished = set()
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            assert finished == {0, 1}, "the usage chunk comes after every choice's final chunk"
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.logprobs is not None and c.logprobs.content:
                tokens[c.index] += "".join(t.token for t in c.logprobs.content)
            if c.finish_reason is not None:
                finished.add(c.index)
    assert finished == {0, 1} and texts[0] and texts[1] and texts == tokens
    assert usage is not None and usage.completion_tokens >= 2
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=10, temperature=1.0, seed=5)
    assert [c.message.content for c in plain.choices] == [texts[0], texts[1]]


def test_completions_n(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=8, temperature=1.0, seed=9)
    assert [c.index for c in r.choices] == [0, 1] and all(c.text for c in r.choices)


def test_n_bounds_and_unhonoured_fields_are_400_on_the_real_server(server: str) -> None:
    def post(route: str, **body: object) -> httpx.Response:
        base = {"model": MODEL, "max_tokens": 2}
        base.update({"messages": MESSAGES} if route == "chat/completions" else {"prompt": "Hi"})
        return httpx.post(f"{server}/v1/{route}", json={**base, **body}, timeout=60)

    for n in (5, 9, 0):  # 4 slots, max_n 8
        r = post("chat/completions", n=n)
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and ("'n'" in message or message.startswith("n: ")), message
    for name in NEUTRAL:
        for route in ("chat/completions", "completions"):
            r = post(route, **{name: "on"})
            assert r.status_code == 400, (name, r.text)
            assert f"'{name}'" in r.json()["error"]["message"], (name, r.text)
    assert post("chat/completions", mirostat=0, cache_prompt=True, user="u", store=False).status_code == 200
