"""Ollama's API (/api/*) on a real `edgellm serve` with the real default GGUF and embedder, driven by the official
`ollama` Python client: chat and generate streamed and not, options, structured output, tools, embeddings, the
model listings, refusals by name, and the API key. Plus the pure request logic (serve/routes/ollama_format.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ollama
import pytest
from pydantic import BaseModel

from edgellm.serve.engine.base import InvalidRequestError, TextDelta, ToolCallDelta
from edgellm.serve.errors import APIError
from edgellm.serve.routes.ollama import Shape, ToolCalls, collect_answer, ndjson_lines, ollama_error
from edgellm.serve.routes.ollama_format import (
    Message,
    chat_messages,
    check_keep_alive,
    check_options,
    parameter_size,
    parse_keep_alive,
)
from tests.servers import running_server
from tests.test_embeddings import default_embedder_gguf

MODEL = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"
KEY = "ollama-test-key"
N_CTX = 1024
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city"}},
            "required": ["city"],
        },
    },
}


# --- the real server -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedder_gguf() -> Path:
    return default_embedder_gguf()


@pytest.fixture(scope="module")
def server(default_gguf: Path, embedder_gguf: Path) -> Iterator[str]:
    with running_server(
        "--engine", "batched", "--no-reranker", "--embedder", str(embedder_gguf),
        "--set", f"embedder.name={EMBEDDER}", "--set", f"models.0.n_ctx={N_CTX}", "--api-key", KEY,
    ) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[ollama.Client]:
    c = ollama.Client(host=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
    yield c
    c.close()


def _status(call: Any) -> ollama.ResponseError:
    with pytest.raises(ollama.ResponseError) as info:
        call()
    return info.value


def test_version_tags_ps_and_show(client: ollama.Client, server: str, default_gguf: Path) -> None:
    version = httpx.get(f"{server}/api/version", timeout=30)  # no key needed: a liveness probe, like /health
    assert version.status_code == 200 and version.json()["version"].count(".") == 2

    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {MODEL, EMBEDDER}
    chat = listed[MODEL]
    assert chat.size == default_gguf.stat().st_size
    assert chat.digest == hashlib.sha256(default_gguf.read_bytes()).hexdigest()
    assert chat.details is not None
    assert (chat.details.format, chat.details.family, chat.details.quantization_level) == ("gguf", "llama", "Q4_1")
    assert chat.details.parameter_size is not None and chat.details.parameter_size.endswith("M")
    embed_details = listed[EMBEDDER].details
    assert embed_details is not None and embed_details.family == "bert"
    assert client.list().models[0].digest == chat.digest  # cached, same answer

    running = {m.model: m for m in client.ps().models}
    assert set(running) == {MODEL, EMBEDDER}
    assert running[MODEL].context_length == N_CTX and running[MODEL].digest == chat.digest
    assert running[MODEL].expires_at is not None and running[MODEL].expires_at.year > 2200  # never unloaded

    shown = client.show(MODEL)
    assert shown.details == chat.details
    assert shown.template and "<|im_start|>" in shown.template  # the GGUF's own chat template
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["tokenizer.ggml.tokens"] == []  # arrays only with verbose, as in Ollama
    assert shown.capabilities == ["completion", "tools"]
    assert shown.parameters is not None and f"num_ctx {N_CTX}" in " ".join(shown.parameters.split())
    verbose = httpx.post(f"{server}/api/show", json={"model": f"{MODEL}:latest", "verbose": True},
                         headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()
    assert len(verbose["model_info"]["tokenizer.ggml.tokens"]) == 49152
    assert client.show(EMBEDDER).capabilities == ["embedding"]
    assert _status(lambda: client.show("nope")).status_code == 404


def test_chat_streamed_and_not(client: ollama.Client) -> None:
    kw: dict[str, Any] = dict(
        model=MODEL,
        messages=[{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."}],
        options={"temperature": 0, "num_predict": 12},
    )
    whole = client.chat(**kw)
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.eval_count is not None and 0 < whole.eval_count <= 12
    assert whole.prompt_eval_count is not None and whole.prompt_eval_count > 5
    assert whole.total_duration is not None and whole.eval_duration is not None
    assert whole.total_duration >= whole.eval_duration > 0 and whole.load_duration == 0

    parts = list(client.chat(**kw, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert len(parts) > 2 and parts[-1].message.content == ""
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert (parts[-1].eval_count, parts[-1].done_reason) == (whole.eval_count, whole.done_reason)


def test_generate_streamed_not_raw_and_load(client: ollama.Client, server: str) -> None:
    story = dict(model=MODEL, prompt="Write a long story about a dragon.", options={"temperature": 0, "num_predict": 6})
    whole = client.generate(**story)
    assert whole.response and whole.done and whole.done_reason == "length" and whole.eval_count == 6
    parts = list(client.generate(**story, stream=True))
    assert parts[-1].done and parts[-1].eval_count == 6
    assert "".join(p.response or "" for p in parts) == whole.response

    raw = client.generate(model=MODEL, prompt="<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", raw=True,
                          options={"temperature": 0, "num_predict": 6})
    templated = client.generate(model=MODEL, prompt="Hi", options={"temperature": 0, "num_predict": 6})
    assert raw.response and templated.response  # the chat template adds a system prompt: not the same prompt
    assert raw.prompt_eval_count is not None and templated.prompt_eval_count is not None
    assert raw.prompt_eval_count < templated.prompt_eval_count
    with_system = client.generate(model=MODEL, prompt="Hi", system="Answer in French.", options={"num_predict": 2})
    assert with_system.prompt_eval_count != templated.prompt_eval_count

    loaded = client.generate(model=MODEL)  # Ollama: no prompt loads the model
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_options_are_honoured(client: ollama.Client) -> None:
    def say(**options: Any) -> str:
        r = client.generate(model=MODEL, prompt="Tell me about the sea.", options={"num_predict": 16, **options})
        return r.response or ""

    a, b = say(temperature=1.2, seed=42), say(temperature=1.2, seed=42)
    assert a == b
    others = {say(temperature=1.2, seed=s) for s in (1, 2, 3)}
    assert others != {a}

    greedy = say(temperature=0)
    words = greedy.split()
    assert len(words) >= 4
    stop = " " + words[3]
    cut = say(temperature=0, stop=[stop])
    assert stop not in cut and greedy.startswith(cut) and len(cut) < len(greedy)

    capped = client.chat(model=MODEL, messages=[{"role": "user", "content": "Write a poem."}],
                         options={"num_predict": 3, "top_k": 5, "top_p": 0.9, "min_p": 0.1, "repeat_penalty": 1.1,
                                  "repeat_last_n": 32, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                                  "num_ctx": N_CTX, "mirostat": 0, "typical_p": 1.0})
    assert capped.eval_count == 3 and capped.done_reason == "length"


class City(BaseModel):
    name: str
    population: int


def test_format_json_and_schema(client: ollama.Client) -> None:
    plain = client.chat(model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
                        format="json", options={"temperature": 0, "num_predict": 60})
    assert isinstance(json.loads(plain.message.content or ""), dict)
    for stream in (False, True):
        r = client.generate(model=MODEL, prompt="Paris has 2 million people. Give its name and population as JSON.",
                            format=City.model_json_schema(), options={"num_predict": 60}, stream=stream)
        text = "".join(p.response or "" for p in r) if stream else r.response  # type: ignore[union-attr]
        City.model_validate_json(text or "", strict=True)


def test_tools_round_trip(client: ollama.Client) -> None:
    history: list[Any] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                         "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temperature": 18}', "tool_name": "get_weather"},
        {"role": "assistant", "content": "It is 18 °C in Paris."},
        {"role": "user", "content": "And what is the weather in Berlin?"},
    ]
    r = client.chat(model=MODEL, messages=history, tools=[WEATHER], options={"temperature": 0, "num_predict": 60})
    assert r.done_reason == "stop" and r.message.tool_calls, r
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(call.function.arguments["city"], str)

    parts = list(client.chat(model=MODEL, messages=history, tools=[WEATHER], stream=True,
                             options={"temperature": 0, "num_predict": 60}))
    streamed = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed] == [
        (call.function.name, dict(call.function.arguments))
    ]

    history += [{"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                {"role": "tool", "content": '{"temperature": 11}', "tool_name": "get_weather"}]
    final = client.chat(model=MODEL, messages=history, options={"temperature": 0, "num_predict": 30})
    assert final.done and final.message.content and not final.message.tool_calls


def test_embed_matches_v1_embeddings(client: ollama.Client, server: str) -> None:
    texts = ["how do I stop a small cut from bleeding", "Press a clean cloth firmly on the wound."]
    out = client.embed(model=EMBEDDER, input=texts)
    vectors = np.asarray(out.embeddings)
    assert vectors.shape == (2, 384) and out.model == EMBEDDER and (out.prompt_eval_count or 0) > 10
    v1 = httpx.post(f"{server}/v1/embeddings", json={"model": EMBEDDER, "input": texts},
                    headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()
    assert np.allclose(vectors, np.asarray([d["embedding"] for d in v1["data"]]), atol=1e-6)
    legacy = client.embeddings(model=f"{EMBEDDER}:latest", prompt=texts[0])
    assert np.allclose(legacy.embedding, vectors[0], atol=1e-6)
    assert len(client.embed(model=EMBEDDER, input="one").embeddings) == 1
    assert _status(lambda: client.embed(model=MODEL, input="x")).status_code == 404
    assert "dimensions" in _status(lambda: client.embed(model=EMBEDDER, input="x", dimensions=64)).error


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("chat", {"options": {"mirostat": 2}}, 400, "'options.mirostat'"),
        ("chat", {"options": {"num_thread": 4, "use_mmap": True}}, 400, "'options.num_thread', 'options.use_mmap'"),
        ("chat", {"options": {"num_ctx": N_CTX + 1}}, 400, "'options.num_ctx'"),
        ("chat", {"options": {"temperature": "hot"}}, 400, "'options.temperature'"),
        ("chat", {"options": {"num_predict": 0}}, 400, "'options.num_predict'"),
        ("chat", {"keep_alive": "5m"}, 400, "'keep_alive'"),
        ("chat", {"keep_alive": 0}, 400, "'keep_alive'"),
        ("chat", {"think": True}, 400, "'think'"),
        ("chat", {"format": "yaml"}, 400, "'format'"),
        ("chat", {"format": {"type": "string", "pattern": "^a$"}}, 400, "'format.pattern'"),
        ("chat", {"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, 400, "'messages[0].images'"),
        ("chat", {"tools": [{"type": "retrieval"}]}, 400, "'tools[0].type'"),
        ("chat", {"model": "llama3.2"}, 404, "'llama3.2' not found"),
        ("chat", {"model": EMBEDDER}, 400, "embedding model"),
        ("chat", {"model": ""}, 400, "'model' is required"),
        ("generate", {"prompt": "hi", "template": "{{ .Prompt }}"}, 400, "'template'"),
        ("generate", {"prompt": "hi", "context": [1, 2, 3]}, 400, "'context'"),
        ("generate", {"prompt": "hi", "images": ["aGk="]}, 400, "'images'"),
        ("generate", {"prompt": "hi", "suffix": "end"}, 400, "'suffix'"),
        ("generate", {"prompt": "hi", "raw": True, "system": "x"}, 400, "'system'"),
        ("generate", {"prompt": "hi", "logprobs": True}, 400, "'logprobs'"),
        ("generate", {"prompt": "hi", "stream": "yes"}, 400, "'stream'"),
        ("generate", {"prompt": "word " * 2000}, 400, "n_ctx"),
    ],
)
def test_refusals_name_the_field(server: str, path: str, body: dict[str, Any], status: int, fragment: str) -> None:
    payload = {**CHAT, **body}
    if path == "generate":
        del payload["messages"]
    r = httpx.post(f"{server}/api/{path}", json=payload, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and fragment in r.json()["error"], r.json()


def test_refusals_reach_the_official_client(client: ollama.Client) -> None:
    e = _status(lambda: client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                    options={"mirostat": 1}))
    assert e.status_code == 400 and "options.mirostat" in e.error
    e = _status(lambda: list(client.generate(model=MODEL, prompt="hi", keep_alive="10m", stream=True)))
    assert e.status_code == 400 and "keep_alive" in e.error
    kept = client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], keep_alive=-1,
                       options={"num_predict": 2, "seed": -1})
    assert kept.done and client.generate(model=MODEL, prompt="hi", keep_alive="-1m", options={"num_predict": 2}).done


def test_the_api_key_is_required(server: str) -> None:
    anonymous = ollama.Client(host=server, timeout=60)
    wrong = ollama.Client(host=server, headers={"Authorization": "Bearer wrong"}, timeout=60)
    try:
        for call in (anonymous.list, anonymous.ps, lambda: anonymous.show(MODEL),
                     lambda: anonymous.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}]),
                     lambda: anonymous.embed(model=EMBEDDER, input="x")):
            e = _status(call)
            assert e.status_code == 401 and "API key" in e.error
        assert _status(lambda: wrong.generate(model=MODEL, prompt="hi")).status_code == 401
    finally:
        anonymous.close()
        wrong.close()


# --- keep_alive on models served on demand (--models-dir) ----------------------------------------------------------
@pytest.fixture(scope="module")
def on_demand(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("ollama-on-demand")
    for name in ("alpha", "beta"):
        (folder / f"{name}.gguf").symlink_to(default_gguf.resolve())
    with running_server("--models-dir", str(folder), "--no-reranker", "--no-embedder", "--set", "slots=1",
                        "--set", "model_defaults.n_ctx=512", "--set", "keep_alive=-1",
                        "--set", "max_loaded_models=2") as url:
        yield url


def _running(client: ollama.Client) -> dict[str, Any]:
    return {m.model: m for m in client.ps().models}


def _wait_unloaded(client: ollama.Client, name: str) -> None:
    deadline = time.monotonic() + 30
    while name in _running(client) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert name not in _running(client)


def test_keep_alive_sets_the_expiry_of_a_model_served_on_demand(on_demand: str) -> None:
    with ollama.Client(host=on_demand, timeout=300) as client:
        assert _running(client) == {}
        loaded = client.generate(model="alpha")  # nothing to say: Ollama loads the model
        assert loaded.done and loaded.done_reason == "load" and loaded.load_duration and loaded.load_duration > 0
        alpha = _running(client)["alpha"]
        assert alpha.expires_at is not None and alpha.expires_at.year > 2200  # the server's keep_alive: forever
        assert alpha.size is not None and alpha.size > 98_000_000  # the file and its KV cache (an estimate)
        assert alpha.size_vram == 0 and alpha.context_length == 512

        answer = client.generate(model="alpha", prompt="Hi", keep_alive="5m", options={"num_predict": 2})
        assert answer.done and answer.load_duration == 0  # loaded already
        expires = _running(client)["alpha"].expires_at
        assert expires is not None
        left = (expires - datetime.now(UTC)).total_seconds()
        assert 60 < left <= 301, left  # about 5 minutes from the end of the request

        answer = client.generate(model="alpha", prompt="Hi", options={"num_predict": 2})  # absent: the server's again
        assert _running(client)["alpha"].expires_at.year > 2200  # type: ignore[union-attr]

        chat = client.chat(model="alpha", messages=[{"role": "user", "content": "Hi"}], keep_alive=0,
                           options={"num_predict": 4})
        assert chat.done and chat.message.content is not None
        _wait_unloaded(client, "alpha")  # unloaded once the request was done

        cold = client.chat(model="alpha", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2})
        assert cold.load_duration is not None and cold.load_duration > 0  # this request loaded it
        assert "alpha" in _running(client)


def test_generate_with_keep_alive_0_and_no_prompt_unloads(on_demand: str) -> None:
    with ollama.Client(host=on_demand, timeout=300) as client:
        assert client.generate(model="beta", keep_alive="10m").done_reason == "load"
        assert "beta" in _running(client)
        unloaded = client.generate(model="beta", keep_alive=0)
        assert unloaded.done and unloaded.done_reason == "unload" and unloaded.response == ""
        assert "beta" not in _running(client)  # idle: unloaded before the answer
        again = client.generate(model="beta", keep_alive=0)  # not loaded: nothing to do, and it stays so
        assert again.done_reason == "unload" and "beta" not in _running(client)
        r = httpx.get(f"{on_demand}/v1/models", timeout=30).json()
        assert {m["id"]: m["meta"]["loaded"] for m in r["data"]}["beta"] is False


def test_a_bad_keep_alive_is_a_400_naming_it(on_demand: str) -> None:
    with ollama.Client(host=on_demand, timeout=60) as client:
        e = _status(lambda: client.generate(model="alpha", prompt="hi", keep_alive="forever"))
        assert e.status_code == 400 and "'keep_alive'" in e.error and "5m" in e.error


# --- the request logic, without a server ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (-1, -1.0), (-1.5, -1.0), ("-1", -1.0), ("-1m", -1.0), ("-5m30s", -1.0), ("-0.5h", -1.0),
     (0, 0.0), ("0", 0.0), (300, 300.0), ("300", 300.0), ("5m", 300.0), ("30s", 30.0), ("1h", 3600.0),
     ("1h30m", 5400.0), ("500ms", 0.5), (2.5, 2.5)],
)
def test_keep_alive_is_read_as_ollama_reads_it(value: Any, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["forever", "-", "-5 minutes", "", "5 m", "m"])
def test_a_keep_alive_that_is_not_a_duration_is_refused(value: Any) -> None:
    with pytest.raises(APIError, match="'keep_alive'"):
        parse_keep_alive(value)


@pytest.mark.parametrize("value", [None, -1, "-1m"])
def test_a_model_loaded_at_start_accepts_only_forever(value: Any) -> None:
    check_keep_alive(value)


@pytest.mark.parametrize("value", [0, 300, "5m"])
def test_a_model_loaded_at_start_refuses_an_expiry(value: Any) -> None:
    with pytest.raises(APIError, match="'keep_alive'.*loaded at start"):
        check_keep_alive(value)


def test_options_refusal_lists_every_unhonoured_key() -> None:
    with pytest.raises(APIError) as info:
        check_options({"num_gpu": 1, "temperature": 0.5, "tfs_z": 0.9, "tfs_z_ok": None}, n_ctx=512)
    assert "'options.num_gpu', 'options.tfs_z'" in info.value.message and info.value.status == 400
    assert check_options({"tfs_z": 1.0, "penalize_newline": True, "stop": None}, n_ctx=512).stop is None


@pytest.mark.parametrize(("n", "text"), [(8_030_261_248, "8.0B"), (7_000_000_000, "7B"), (134_515_008, "134.52M"),
                                          (22_000_000, "22M"), (5_000, "5K"), (12, "12")])
def test_parameter_size_is_printed_as_ollama_prints_it(n: int, text: str) -> None:
    assert parameter_size(n) == text


def test_tool_messages_answer_the_calls_by_name_then_in_order() -> None:
    calls = [{"function": {"name": "a", "arguments": {"x": 1}}}, {"function": {"name": "b", "arguments": {}}}]
    messages = [Message.model_validate(m) for m in [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "B", "tool_name": "b"},
        {"role": "tool", "content": "A"},
    ]]
    out = chat_messages(messages)
    assert out[1].tool_calls is not None
    assert [(c["id"], c["function"]["arguments"]) for c in out[1].tool_calls] == [("call_1_0", '{"x": 1}'),
                                                                                   ("call_1_1", "{}")]
    assert (out[2].tool_call_id, out[2].name) == ("call_1_1", "b")
    assert (out[3].tool_call_id, out[3].name) == ("call_1_0", "a")


class _FailingGeneration:
    """Two text deltas, then an engine error (as a model that fails mid-answer)."""

    prompt_tokens = 3

    def __init__(self) -> None:
        self.closed = False

    async def _events(self) -> AsyncIterator[Any]:
        yield TextDelta("Hel")
        yield TextDelta("lo")
        raise InvalidRequestError("the grammar broke", field="format")

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._events()

    async def aclose(self) -> None:
        self.closed = True


class _ConnectedClient:
    async def receive(self) -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}


def test_an_engine_error_mid_answer_keeps_its_status_and_message() -> None:
    async def run() -> tuple[list[bytes], BaseException | None, bool, bool]:
        streamed = _FailingGeneration()
        lines = [line async for line in ndjson_lines(streamed, Shape(MODEL, chat=True), 0)]  # type: ignore[arg-type]
        whole = _FailingGeneration()
        try:
            await collect_answer(whole, _ConnectedClient(), Shape(MODEL, chat=False), 0)  # type: ignore[arg-type]
        except Exception as e:
            return lines, e, streamed.closed, whole.closed
        return lines, None, streamed.closed, whole.closed

    lines, error, streamed_closed, whole_closed = asyncio.run(run())
    assert [json.loads(x)["message"]["content"] for x in lines[:2]] == ["Hel", "lo"]
    assert json.loads(lines[2]) == {"error": "format: the grammar broke"}
    assert isinstance(error, InvalidRequestError) and ollama_error(error).status_code == 400
    assert json.loads(ollama_error(error).body) == {"error": "format: the grammar broke"}
    assert streamed_closed and whole_closed


def test_tool_call_deltas_become_whole_calls_with_object_arguments() -> None:
    calls = ToolCalls()
    assert calls.add(ToolCallDelta(0, id="c0", name="a", arguments="")) is None
    assert calls.add(ToolCallDelta(0, arguments='{"x": ')) is None
    assert calls.add(ToolCallDelta(0, arguments="1}")) is None
    assert calls.add(ToolCallDelta(1, id="c1", name="b", arguments="{}")) == {"function": {"name": "a", "arguments": {"x": 1}}}
    assert calls.close() == {"function": {"name": "b", "arguments": {}}}
    assert calls.close() is None
    calls.add(ToolCallDelta(0, id="c2", name="c", arguments='["not an object"]'))
    with pytest.raises(APIError, match="not a JSON object"):
        calls.close()
