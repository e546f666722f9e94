"""Personas served for real: a real `edgellm serve` (uvicorn on a loopback port) with three GGUF LoRA adapters on one
base GGUF as personas (system prompt, word cap, phrase filter, triggers) and a keyword router `auto`, driven by the
official `openai` client, streamed and not."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import yaml

from edgellm.serve.engine.textfilters import remove_phrases
from tests.near_ties import openai_token_margins, same_or_near_tie
from tests.servers import running_server

QUESTION = "Name three colors."


def _config(tmp: Path, gguf: Path, adapters: list[Path], forbidden: list[str]) -> Path:
    personas = [
        {"name": "hammy", "base": "base", "adapters": [{"path": str(adapters[0])}],
         "system_prompt": "You are Hammy, a cheerful hamster.", "triggers": ["hamster", "seeds"],
         "description": "a cheerful hamster"},
        {"name": "pip", "base": "base", "adapters": [{"path": str(adapters[1])}], "max_words": 7,
         "triggers": ["step by step", "steps"], "description": "explains in steps"},
        {"name": "olive", "base": "base", "adapters": [{"path": str(adapters[2])}],
         "triggers": ["owl", "night"], "description": "a wise owl"},
        # olive's adapter again, its forbidden phrases removed: the same tokens, filtered
        {"name": "olive-clean", "base": "base", "adapters": [{"path": str(adapters[2])}],
         "forbidden_phrases": forbidden},
    ]
    config = {
        "models": [{"name": "base", "path": str(gguf), "n_ctx": 512, "n_threads": 2}],
        "slots": 4,
        "personas": personas,
        "routers": [{"name": "auto", "default": "hammy", "personas": ["hammy", "pip", "olive"]}],
        "reranker": None,
        "embedder": None,
    }
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _greedy(client: openai.OpenAI, model: str, content: str = QUESTION, max_tokens: int = 40) -> tuple[str, str]:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0
    )
    return r.choices[0].message.content or "", r.choices[0].finish_reason


def _reference(client: openai.OpenAI, model: str, content: str = QUESTION, max_tokens: int = 40) -> tuple[str, list]:
    """A greedy answer and its tokens' (offset, top-2 margin), for ``same_or_near_tie``."""
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
        logprobs=True, top_logprobs=2,
    )
    return r.choices[0].message.content or "", openai_token_margins(r.choices[0].logprobs)


def _streamed(client: openai.OpenAI, model: str, content: str = QUESTION, max_tokens: int = 40) -> tuple[str, str]:
    text, reason = "", ""
    for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0, stream=True
    ):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason


@pytest.fixture(scope="module")
def forbidden(default_gguf: Path, smollm2_adapters: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two phrases olive's adapter really says (its greedy answer, found by serving it without a filter)."""
    tmp = tmp_path_factory.mktemp("personas-probe")
    with running_server("--config", str(_config(tmp, default_gguf, smollm2_adapters, ["unused"]))) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x") as probe:
            text, _ = _greedy(probe, "olive")
    tokens = text.split()
    long_word = next(t for t in tokens[4:] if t.isalpha() and len(t) >= 5)
    return [" ".join(tokens[1:3]), long_word.upper()]  # a two-word phrase, and a word in the wrong case


@pytest.fixture(scope="module")
def server(
    default_gguf: Path, smollm2_adapters: list[Path], forbidden: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("personas")
    with running_server("--config", str(_config(tmp, default_gguf, smollm2_adapters, forbidden))) as url:
        yield url


@pytest.fixture()
def client(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server}/v1", api_key="x") as c:
        yield c


def test_models_lists_personas_and_the_router(server: str) -> None:
    data = httpx.get(f"{server}/v1/models", timeout=60).json()["data"]
    kinds = {m["id"]: m["meta"].get("kind", "model") for m in data}
    assert kinds == {"base": "model", "hammy": "persona", "pip": "persona", "olive": "persona",
                     "olive-clean": "persona", "auto": "router"}


def test_each_persona_streams_and_differs(client: openai.OpenAI) -> None:
    answers = {}
    for name in ("base", "hammy", "olive"):
        # warm: both measured requests then reuse the prompt's KV (a cold prompt is decoded in one batch, a warm
        # one token at a time: llama.cpp's rounding differs between the two and can flip a near tie)
        reference, margins = _reference(client, name)
        text, _ = _streamed(client, name)
        assert text and same_or_near_tie(reference, text, margins), name  # streamed == not streamed, greedy
        assert same_or_near_tie(reference, _greedy(client, name)[0], margins), name
        answers[name] = reference
    assert len(set(answers.values())) == 3, answers  # each adapter (and hammy's prompt) changes the answer
    assert _streamed(client, "pip")[0]


def test_personas_at_once_answer_as_alone(server: str, client: openai.OpenAI) -> None:
    names = ["hammy", "base", "olive", "base", "olive", "hammy"]
    alone = {n: _reference(client, n) for n in set(names)}

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="x") as c:
            rs = await asyncio.gather(*(
                c.chat.completions.create(model=n, messages=[{"role": "user", "content": QUESTION}], max_tokens=40,
                                          temperature=0)
                for n in names
            ))
        return [r.choices[0].message.content or "" for r in rs]

    for name, text in zip(names, asyncio.run(together()), strict=True):
        assert same_or_near_tie(alone[name][0], text, alone[name][1]), (name, alone[name][0], text)


def test_word_cap_stops_at_a_word_boundary(client: openai.OpenAI) -> None:
    long = "Write a long paragraph about the sea."
    for text, reason in (_greedy(client, "pip", long, 80), _streamed(client, "pip", long, 80)):
        assert reason == "length"
        assert len(text.split()) == 7, text
        assert not text[-1].isspace()


def test_forbidden_phrases_are_removed_from_the_same_tokens(client: openai.OpenAI, forbidden: list[str]) -> None:
    raw, _ = _greedy(client, "olive")
    expected = remove_phrases(raw, forbidden)
    assert expected != raw
    for text, _ in (_greedy(client, "olive-clean"), _streamed(client, "olive-clean")):
        assert text == expected
        assert all(p.lower() not in text.lower() for p in forbidden)


def test_auto_routes_by_keywords_and_explains(server: str, client: openai.OpenAI) -> None:
    cases = {"Tell me about the owl at night.": ("olive", False),
             "Explain step by step how to plant seeds as a hamster would.": ("pip", False),
             "What is the weather like?": ("hammy", True)}
    for message, (persona, fallback) in cases.items():
        r = httpx.post(f"{server}/v1/chat/completions", json={
            "model": "auto", "messages": [{"role": "user", "content": message}], "max_tokens": 16, "temperature": 0,
        }, timeout=120)
        assert r.status_code == 200, r.text
        route = r.json()["edgellm_route"]
        assert route["persona"] == persona and route["fallback"] is fallback, route
        assert set(route["scores"]) == {"hammy", "pip", "olive"}
        assert f"persona={persona}" in r.headers["x-edgellm-route"]
        assert r.json()["model"] == persona
        text = r.json()["choices"][0]["message"]["content"]
        if persona == "pip":  # its word cap applied
            assert len(text.split()) <= 7
        else:  # the routed answer is the persona's own
            reference, margins = _reference(client, persona, message, 16)
            assert same_or_near_tie(reference, text, margins)
    with client.chat.completions.with_streaming_response.create(
        model="auto", messages=[{"role": "user", "content": "A night owl's advice?"}], max_tokens=8, stream=True
    ) as raw:
        assert "persona=olive" in raw.headers["x-edgellm-route"]


def test_bad_persona_requests_get_clear_errors(server: str) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", json={
        "model": "nobody", "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert r.status_code == 404 and "nobody" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/chat/completions", json={
        "model": "olive-clean", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, timeout=60)
    assert r.status_code == 400 and "forbidden_phrases" in r.json()["error"]["message"]


def test_ollama_clients_reach_personas_and_the_router(server: str, client: openai.OpenAI) -> None:
    with ollama.Client(host=server, timeout=300) as o:
        _ollama_checks(o, client)


def _ollama_checks(o: ollama.Client, client: openai.OpenAI) -> None:
    streamed = "".join(part.message.content or "" for part in o.chat(
        model="hammy", messages=[{"role": "user", "content": QUESTION}], stream=True,
        options={"temperature": 0, "num_predict": 40}))
    reference, margins = _reference(client, "hammy")
    assert same_or_near_tie(reference, streamed, margins)
    capped = o.generate(model="pip", prompt="Write a long paragraph about the sea.", options={"num_predict": 80})
    assert len(capped.response.split()) <= 7 and capped.done_reason == "length"
    routed = o.chat(model="auto", messages=[{"role": "user", "content": "Any owl wisdom for the night?"}],
                    options={"temperature": 0, "num_predict": 8})
    assert routed.model == "auto" and routed.message.content
