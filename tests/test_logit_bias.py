"""logit_bias through llama.cpp's logit-bias sampler: -100 bans a token greedy decoding would pick, +100 forces one;
ids outside the vocabulary and malformed maps are 400s naming the field. Engine level and the real server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from edgellm.serve.engine.base import ChatMessage, GenerationRequest, SamplingParams, TextDelta, TokenLogprob
from edgellm.serve.engine.batched import BatchedEngine
from edgellm.serve.engine.specs import ModelSpec

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"


def greedy(bias: dict[int, float] | None = None, max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=0.0, logprobs=5, logit_bias=tuple((bias or {}).items())
    )


async def first_tokens(engine: BatchedEngine, params: SamplingParams) -> list[TokenLogprob]:
    gen = await engine.submit(GenerationRequest(model=MODEL, messages=(ChatMessage("user", QUESTION),), params=params))
    out: list[TokenLogprob] = []
    async for event in gen:
        if isinstance(event, TextDelta):
            out.extend(event.logprobs)
    return out


@pytest.fixture(scope="module")
def engine(default_gguf: Path) -> Iterator[BatchedEngine]:
    e = BatchedEngine([ModelSpec(name=MODEL, path=default_gguf, n_ctx=512, n_threads=2)], slots=2)
    yield e
    asyncio.run(e.close())


def test_minus_100_bans_and_plus_100_forces(engine: BatchedEngine) -> None:
    plain = asyncio.run(first_tokens(engine, greedy()))
    top, runner_up = plain[0].token, plain[0].top[1].token
    banned = asyncio.run(first_tokens(engine, greedy({top: -100})))
    assert banned[0].token == runner_up  # greedy falls to the next best
    assert banned[0].logprob == plain[0].top[1].logprob  # logprobs are the model's, before the bias
    unlikely = plain[0].top[4].token
    forced = asyncio.run(first_tokens(engine, greedy({unlikely: 100})))
    assert forced[0].token == unlikely
    everywhere = asyncio.run(first_tokens(engine, greedy({t.token: -100 for t in plain}, max_tokens=len(plain))))
    assert not {t.token for t in everywhere} & {t.token for t in plain}
    sampled = SamplingParams(max_tokens=4, temperature=1.5, seed=3, logprobs=0, logit_bias=((top, -100.0),))
    assert all(t.token != top for t in asyncio.run(first_tokens(engine, sampled))[:1])


def test_bias_with_a_grammar(engine: BatchedEngine) -> None:
    """The grammar path samples through the same chain: a ban holds there too."""

    async def go(bias: tuple[tuple[int, float], ...]) -> str:
        request = GenerationRequest(
            model=MODEL,
            messages=(ChatMessage("user", "Answer yes or no: is water wet?"),),
            params=SamplingParams(max_tokens=3, temperature=0.0, logit_bias=bias),
            grammar='root ::= "yes" | "no"',
        )
        gen = await engine.submit(request)
        return "".join([e.text async for e in gen if isinstance(e, TextDelta)])

    unbiased = asyncio.run(go(()))
    assert unbiased in ("yes", "no")
    (token,) = engine._batched[MODEL]._markup_tokens(unbiased)
    assert asyncio.run(go(((token, -100.0),))) == ({"yes", "no"} - {unbiased}).pop()


# -- the real server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(chat_server: str) -> str:
    return chat_server  # the session's shared server (tests/conftest.py)


def test_openai_client_logit_bias(server: str, engine: BatchedEngine) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    plain = asyncio.run(first_tokens(engine, greedy()))
    top = plain[0]
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert r.choices[0].message.content.startswith(top.piece.decode())
    banned = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0, logit_bias={str(top.token): -100}
    )
    assert banned.choices[0].message.content.startswith(top.top[1].piece.decode())
    forced = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=1, temperature=0, logit_bias={str(top.top[4].token): 100},
        stream=True,
    )
    assert "".join(c.choices[0].text for c in forced if c.choices) == top.top[4].piece.decode()


@pytest.mark.parametrize(
    "bias",
    [{"abc": 1}, {"-1": 1}, {"1.5": 1}, {"999999999": 1}, {"5": 101}, {"5": -100.5}, {"5": True}, {"5": "1"}, [1]],
)
def test_bad_logit_bias_is_400_naming_it(server: str, bias: object) -> None:
    for route, body in (("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), ("completions", {"prompt": "hi"})):
        r = httpx.post(f"{server}/v1/{route}", json={"model": MODEL, "max_tokens": 1, "logit_bias": bias, **body})
        assert r.status_code == 400, r.text
        assert "logit_bias" in r.json()["error"]["message"]
