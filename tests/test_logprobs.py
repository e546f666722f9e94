"""Logprobs: the numbers (a log-softmax of the raw logits, checked against llama.cpp run directly), their
alignment with the text deltas, and OpenAI's shapes on the real server through the official `openai` client."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from edgellm.serve.engine.base import Finished, GenerationRequest, SamplingParams, TextDelta, TokenLogprob
from edgellm.serve.engine.batched import BatchedEngine
from edgellm.serve.engine.logprobs import LogprobQueue, token_logprob
from edgellm.serve.engine.specs import ModelSpec

MODEL = "smollm2-135m-instruct"
PROMPT = "The three primary colors are"


def piece(t: int) -> bytes:
    return f"<{t}>".encode()


# -- the numbers --------------------------------------------------------------------------------------------------
def test_token_logprob_is_a_log_softmax_over_the_whole_vocabulary() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(5000) * 4).astype(np.float32)
    everything = token_logprob(logits, 3, 5000, piece)
    assert math.isclose(sum(math.exp(t.logprob) for t in everything.top), 1.0, rel_tol=1e-4)
    assert all(t.logprob <= 0 for t in everything.top)
    lps = [t.logprob for t in everything.top]
    assert lps == sorted(lps, reverse=True)
    shifted = token_logprob(logits + 1000.0, 3, 5, piece)  # no overflow, same distribution
    assert math.isclose(shifted.logprob, everything.logprob, abs_tol=1e-3)
    unlikely = int(np.argmin(logits))
    entry = token_logprob(logits, unlikely, 20, piece)  # the sampled token is reported even far outside the top
    assert entry.token == unlikely and entry.piece == piece(unlikely)
    assert unlikely not in [t.token for t in entry.top] and entry.logprob < entry.top[-1].logprob
    assert [t.token for t in entry.top] == [t.token for t in everything.top[:20]]
    assert token_logprob(logits, 3, 0, piece).top == ()


def test_logprob_queue_hands_each_token_to_the_delta_that_sends_its_text() -> None:
    q = LogprobQueue()
    e = [TokenLogprob(i, piece(i), -float(i)) for i in range(5)]
    q.push(e[0], 3)  # "abc"
    assert [t.token for t in q.take(3)] == [0]
    q.push(e[1], 0)  # the first bytes of a character: no text yet
    assert q.take(0) == ()
    q.push(e[2], 1)  # completes it
    got = q.take(1)
    assert [t.token for t in got] == [1, 2] and [t.offset for t in got] == [3, 3]
    q.push(e[3], 4)  # " Sto", held back: may be the start of a stop string
    assert q.take(0) == ()
    q.push(e[4], 2)  # "p!" : the stop string " Stop" cut the text after one character
    assert [t.token for t in q.take(1)] == [3]
    q.drop()
    assert q.take_all() == ()


# -- the engine ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(default_gguf: Path) -> Iterator[BatchedEngine]:
    e = BatchedEngine([ModelSpec(name=MODEL, path=default_gguf, n_ctx=512, n_threads=2)], slots=2, flash_attn=True)
    yield e
    asyncio.run(e.close())


async def run(engine: BatchedEngine, request: GenerationRequest) -> tuple[str, list[TokenLogprob], Finished]:
    gen = await engine.submit(request)
    text, entries, finished = "", [], None
    async for event in gen:
        if isinstance(event, TextDelta):
            text += event.text
            entries.extend(event.logprobs)
        elif isinstance(event, Finished):
            finished = event
    assert finished is not None
    return text, entries, finished


def test_greedy_logprobs_match_llama_cpp_run_directly(engine: BatchedEngine, default_gguf: Path) -> None:
    import llama_cpp
    from llama_cpp import Llama

    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5)
    text, entries, finished = asyncio.run(run(engine, GenerationRequest(model=MODEL, prompt=PROMPT, params=params)))
    assert len(entries) == finished.completion_tokens and text
    assert "".join(e.piece.decode() for e in entries) == text
    assert [e.offset for e in entries] == [len("".join(x.piece.decode() for x in entries[:i])) for i in range(len(entries))]
    for e in entries:  # greedy: every token is the top one, with the top one's logprob
        assert e.top[0].token == e.token and e.top[0].logprob == e.logprob and e.logprob <= 0

    tokens = engine._batched[MODEL].tokenize(PROMPT)
    llm = Llama(model_path=str(default_gguf), n_ctx=512, n_threads=2, flash_attn=True, verbose=False)  # as the engine
    try:
        llm.eval(tokens)
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).astype(np.float64)
    finally:
        llm.close()
    reference = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    first = entries[0]
    assert first.token == int(np.argmax(logits))
    assert abs(first.logprob - reference[first.token]) < 1e-3, (first.logprob, reference[first.token])
    assert [t.token for t in first.top] == list(np.argsort(-reference, kind="stable")[:5])
    for alt in first.top:
        assert abs(alt.logprob - reference[alt.token]) < 1e-3


def test_stop_string_drops_the_logprobs_of_the_cut_text(engine: BatchedEngine) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)
    full, entries, _ = asyncio.run(run(engine, GenerationRequest(model=MODEL, prompt=PROMPT, params=params)))
    stop = full.split()[1]  # the second word
    cut_params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, stop=(stop,))
    text, cut, finished = asyncio.run(run(engine, GenerationRequest(model=MODEL, prompt=PROMPT, params=cut_params)))
    assert finished.finish_reason == "stop" and text == full[: full.index(stop)]
    assert 0 < len(cut) < len(entries) and all(e.offset < len(text) for e in cut)
    assert all(e.top == () for e in cut)


# -- OpenAI's shapes on the real server --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(chat_server: str) -> str:
    return chat_server  # the session's shared server (tests/conftest.py)


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


MESSAGES = [{"role": "user", "content": "Name a fruit."}]


def test_chat_logprobs_non_streamed(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0.7, seed=1, logprobs=True, top_logprobs=3
    )
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens - (choice.finish_reason == "stop")  # no logprob for the EOS
    assert "".join(c.token for c in content) == choice.message.content
    for c in content:
        assert c.logprob <= 0 and bytes(c.bytes).decode(errors="replace") == c.token
        assert len(c.top_logprobs) == 3
        tops = [t.logprob for t in c.top_logprobs]
        assert tops == sorted(tops, reverse=True) and c.logprob <= tops[0]
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True, stream=True
    )
    text, tokens = "", []
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None and choice.logprobs.content:
                assert "".join(c.token for c in choice.logprobs.content) == choice.delta.content
                tokens.extend(choice.logprobs.content)
    assert text and "".join(c.token for c in tokens) == text
    assert all(c.top_logprobs == [] for c in tokens)  # top_logprobs 0: none


def test_completion_logprobs_legacy_shape(client: openai.OpenAI, server: str) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and "".join(lp.tokens) == r.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == value and max(top.values()) == value and len(top) == 2  # greedy: the top one

    streamed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, stream=True
    )
    tokens: list[str] = []
    offsets: list[int] = []
    for chunk in streamed:
        c = chunk.choices[0]
        if c.logprobs is not None:
            tokens += c.logprobs.tokens or []
            offsets += c.logprobs.text_offset or []
    assert tokens == lp.tokens and offsets == lp.text_offset

    for body, field in (
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
    ):
        resp = httpx.post(f"{server}/v1/completions", json={"model": MODEL, **body})
        assert resp.status_code == 400 and field in resp.json()["error"]["message"], resp.text
    for body, field in (
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ):
        resp = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **body})
        assert resp.status_code == 400 and field in resp.json()["error"]["message"], resp.text


def test_logprobs_with_a_json_schema(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give a JSON object with a name."}],
        max_tokens=30,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    )
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content and content[0].token.startswith("{")
