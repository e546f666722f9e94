"""The real server: `edgellm serve` on a loopback port, the real default GGUF through llama.cpp, and the
official `openai` client. Parametrized over both engines once the batched one exists."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.servers import running_server

MODEL = "smollm2-135m-instruct"
ENGINES = ["serial", "batched"]


@pytest.fixture(scope="module", params=ENGINES)
def server(request: pytest.FixtureRequest, default_gguf) -> Iterator[str]:
    engine = request.param
    if engine == "batched":
        pytest.importorskip("edgellm.serve.engine.batched")
    with running_server("--engine", engine, "--set", "models.0.n_ctx=1024", "--no-reranker", "--no-embedder") as url:
        yield url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


CAPITAL = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def ask(client: openai.OpenAI, content: str | list[dict[str, str]], **kw: object) -> str:
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)
    return r.choices[0].message.content or ""


def test_openai_client_chat_non_streaming(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=CAPITAL,
        max_tokens=40,
        temperature=0,
    )
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert text and "Paris" in text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10


def test_openai_client_chat_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CAPITAL,
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    # the streamed answer is the non-streamed answer
    assert text == ask(client, CAPITAL, max_tokens=40)
    assert "Paris" in text


def test_openai_client_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip()
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 8
    stream = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text


def test_sse_framing_on_the_wire(server: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events.pop() == ""
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert "timings" in chunks[-1]


def test_timings_report_drafted_tokens(server: str, request: pytest.FixtureRequest) -> None:
    """llama-server's `draft_n` / `draft_n_accepted` in the timings of a request that copies its prompt: the batched
    engine drafts from the context (at least a probe); the serial one does not, and says nothing of drafts."""
    text = "The river runs past the old mill, under the stone bridge, and on to the sea at Leeford harbour."
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Repeat this sentence exactly: {text}"}],
        "max_tokens": 48,
        "temperature": 0,
    }
    batched = request.node.callspec.params["server"] == "batched"
    plain = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()["timings"]
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body | {"stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = next(e["timings"] for e in reversed(events) if "timings" in e)
    for t in (plain, streamed):
        if batched:
            assert 1 <= t["draft_n"] and 0 <= t["draft_n_accepted"] <= t["draft_n"], t
        else:
            assert "draft_n" not in t, t


def test_seed_and_greedy_are_reproducible(client: openai.OpenAI) -> None:
    a = ask(client, "Tell me a short story about a cat.", max_tokens=24)
    assert a == ask(client, "Tell me a short story about a cat.", max_tokens=24)
    kw = {"temperature": 1.0, "seed": 1234, "max_tokens": 24}
    msgs = [{"role": "user", "content": "Tell me a short story about a cat."}]
    x = client.chat.completions.create(model=MODEL, messages=msgs, **kw).choices[0].message.content
    y = client.chat.completions.create(model=MODEL, messages=msgs, **kw).choices[0].message.content
    assert x == y


def test_stop_strings(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=40, temperature=0, stop=["9"])
    text = r.choices[0].text
    assert "9" not in text and "8" in text
    assert r.choices[0].finish_reason == "stop"


def test_disconnect_mid_stream_frees_the_model(server: str, client: openai.OpenAI) -> None:
    t0 = time.monotonic()
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    alone = time.monotonic() - t0
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
    # Counting on for 1000 tokens takes 10 s or more; a freed model answers the next request at once.
    t0 = time.monotonic()
    r2 = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    elapsed = time.monotonic() - t0
    assert r2.choices[0].text
    assert elapsed < alone + 5, f"the next request waited {elapsed:.1f}s: the abandoned generation kept the model busy"


def test_four_concurrent_streams_are_whole_and_unmixed(client: openai.OpenAI) -> None:
    prompts = [
        "What is the capital of France?",
        "Name three colors.",
        "What is 2 plus 2?",
        "Write one sentence about the sea.",
    ]
    alone = {p: ask(client, p, max_tokens=32) for p in prompts}
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def run(p: str) -> None:
        try:
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=32, stream=True
            )
            results[p] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert set(results) == set(alone)
    for p, text in results.items():
        if text == alone[p]:
            continue
        # Whole and unmixed: each stream is its own prompt's answer. Greedy answers may still part at a numerical
        # near-tie, since the tokens a prompt shares with the previous one (prefix reuse) change the batch shapes
        # llama.cpp evaluates; they must agree well past the start, and never take another prompt's words.
        common = len(os.path.commonprefix([text, alone[p]]))
        assert common >= 16, f"{p!r}: streamed {text!r}, alone {alone[p]!r}"
        others = [a for q, a in alone.items() if q != p]
        assert not any(len(os.path.commonprefix([text, a])) > common for a in others), (p, text)


def test_errors_on_the_real_model(server: str) -> None:
    r = httpx.post(
        f"{server}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "word " * 2000}]},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "exceed_context_size_error"
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(f"{server}/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": [], "max_tokens": 0})
    assert r.status_code == 400
    # and the server keeps serving
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    models = httpx.get(f"{server}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_unicode_survives_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Repeat exactly: 你好世界 🙂 café"}],
        temperature=0,
        max_tokens=30,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    text = "".join(pieces)
    assert "\ufffd" not in text
    assert all("\ufffd" not in p for p in pieces)
