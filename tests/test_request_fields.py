"""No silent drops: every request field is honoured, or client metadata (accepted, ignored), or a 400 that names it;
and the bounds of what is honoured. Routes with a fake engine (fast); the real server runs the same checks in
tests/test_n_choices.py."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from starlette.testclient import TestClient

from edgellm.serve.app import create_app
from edgellm.serve.schemas import METADATA_FIELDS, NEUTRAL
from tests.test_server_http import FakeEngine, assert_error, settings

ROUTES = {
    "/v1/chat/completions": {"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "fake", "prompt": "hi"},
}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(settings(max_body_bytes=100_000), engine_factory=lambda s: engine)) as c:
        yield c


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_an_unhonoured_field_is_400_unless_it_asks_for_nothing(client: TestClient, route: str, name: str) -> None:
    assert_error(client.post(route, json={**ROUTES[route], name: {"x": 1}}), 400, "invalid_request_error", f"'{name}'")
    for value in (None, *NEUTRAL[name]):
        r = client.post(route, json={**ROUTES[route], name: value})
        assert r.status_code == 200, (name, value, r.text)


@pytest.mark.parametrize("route", ROUTES)
def test_metadata_is_accepted_and_unknown_fields_are_400(client: TestClient, route: str) -> None:
    metadata = {name: "x" for name in METADATA_FIELDS} | {"metadata": {"k": "v"}, "store": True}
    assert client.post(route, json={**ROUTES[route], **metadata}).status_code == 200
    assert_error(client.post(route, json={**ROUTES[route], "temprature": 0.5}), 400, "invalid_request_error", "'temprature'")
    assert_error(client.post(route, json={**ROUTES[route], "mirostat": 2}), 400, "invalid_request_error", "'mirostat'")
    assert_error(client.post(route, json={**ROUTES[route], "mirostat": True}), 400, "invalid_request_error", "'mirostat'")
    r = client.post(route, json={**ROUTES[route], "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": True}})
    assert r.status_code == 200
    bad = {**ROUTES[route], "stream": True, "stream_options": {"include_usage": True, "chunk_size": 5}}
    assert_error(client.post(route, json=bad), 400, "invalid_request_error", "'stream_options.chunk_size'")


def test_legacy_completion_fields(client: TestClient) -> None:
    body = ROUTES["/v1/completions"]
    assert_error(client.post("/v1/completions", json={**body, "echo": True}), 400, "invalid_request_error", "'echo'")
    assert_error(client.post("/v1/completions", json={**body, "suffix": "end"}), 400, "invalid_request_error", "'suffix'")
    assert_error(client.post("/v1/completions", json={**body, "best_of": 3}), 400, "invalid_request_error", "'best_of'")
    for ok in ({"echo": False}, {"suffix": ""}, {"best_of": 1}):
        assert client.post("/v1/completions", json={**body, **ok}).status_code == 200


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"stop": [str(i) for i in range(17)]}, "stop"),
        ({"stop": "x" * 257}, "stop"),
        ({"stop": ["ok", "y" * 257]}, "stop"),
        ({"n": 9}, "'n'"),
        ({"n": 0}, "'n'"),
        ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
        ({"n_predict": 0}, "n_predict"),
        ({"n_predict": -2}, "n_predict"),
        ({"repeat_last_n": -2}, "repeat_last_n"),
        ({"top_logprobs": 21, "logprobs": True}, "logprobs"),
    ],
)
def test_bounds_are_400(client: TestClient, route: str, extra: dict[str, object], fragment: str) -> None:
    assert_error(client.post(route, json={**ROUTES[route], **extra}), 400, "invalid_request_error", fragment)


def test_what_is_honoured_reaches_the_engine(client: TestClient, engine: FakeEngine) -> None:
    body = {
        **ROUTES["/v1/chat/completions"],
        "logit_bias": {"5": -100, "7": 2.5},
        "logprobs": True,
        "top_logprobs": 4,
        "stop": ["a" * 256] * 16,
        "repeat_last_n": 32,
        "max_tokens": 2**62,
    }
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    p = engine.requests[-1].params
    assert p.logit_bias == ((5, -100.0), (7, 2.5)) and p.logprobs == 4 and p.repeat_last_n == 32
    assert p.max_tokens == 100  # clamped to max_tokens_cap
    assert client.post("/v1/completions", json={**ROUTES["/v1/completions"], "n_predict": -1, "logprobs": 0}).status_code == 200
    p = engine.requests[-1].params
    assert p.max_tokens == 100 and p.logprobs == 0
    assert client.post("/v1/completions", json={**ROUTES["/v1/completions"], "n_predict": 3}).status_code == 200
    assert engine.requests[-1].params.max_tokens == 3


def test_the_official_client_and_langchain_style_bodies_keep_working(client: TestClient, engine: FakeEngine) -> None:
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=client, max_retries=0)
    r = oai.chat.completions.create(
        model="fake",
        messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
        temperature=0.2, top_p=0.9, max_completion_tokens=20, seed=1, stop=["x"], presence_penalty=0.1,
        frequency_penalty=0.1, user="u", store=False, metadata={"a": "b"}, service_tier="auto", n=1,
        logprobs=False, parallel_tool_calls=True, stream_options=None,
    )
    assert r.choices[0].message.content == "Hello wörld"
    r2 = oai.completions.create(model="fake", prompt="Once", max_tokens=5, echo=False, best_of=1, user="u", n=1)
    assert r2.choices[0].text
    langchain = {  # what LangChain's ChatOpenAI sends (nulls for what it does not set)
        "model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": False, "n": 1,
        "temperature": 0.7, "max_tokens": None, "stop": None, "logit_bias": None, "logprobs": None,
        "top_logprobs": None, "presence_penalty": 0, "frequency_penalty": 0, "top_p": 1, "seed": None,
        "response_format": None, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
        "user": None, "store": None, "reasoning_effort": None, "modalities": None, "audio": None,
        "prediction": None, "stream_options": None, "service_tier": None, "parallel_tool_calls": None,
    }
    r3 = client.post("/v1/chat/completions", json=langchain)
    assert r3.status_code == 200, r3.text
    assert engine.requests[-1].params.temperature == 0.7 and engine.requests[-1].params.max_tokens == 50
