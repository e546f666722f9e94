"""Property-based fuzzing of a real server: no request body, however malformed, gets a 5xx.

One `edgellm serve` (batched engine, the real default GGUF, the configured reranker) on a loopback port; hypothesis
generates bodies of every shape (arbitrary JSON, request-shaped objects with hostile values, raw bytes, deep
nesting, NaN and lone surrogates) for every POST route. Every answer must be < 500 and, when it is an error, carry
the one error shape. Bounded: a fixed number of examples per route, generation capped at 2 tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.servers import running_server

MODEL = "smollm2-135m-instruct"
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/rerank", "/v1/embeddings", "/tokenize", "/detokenize",
          "/apply-template")
# Request-shaped examples per route (a third as many raw ones). The default run sends about 2,800 requests in all
# (under a minute); the `full` variants (`make test-slow`) about 10,000 (~3 minutes on a busy 2-core box).
# EDGELLM_FUZZ_EXAMPLES sets the default run's count.
EXAMPLES = int(os.environ.get("EDGELLM_FUZZ_EXAMPLES", "300"))
FULL_EXAMPLES = 1100
COUNTS = [pytest.param(EXAMPLES, id="default"), pytest.param(FULL_EXAMPLES, id="full", marks=pytest.mark.slow)]
SENT: dict[int, int] = {}  # requests sent, by status class (2, 4, 5)
FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same bodies every run: a failure is reproducible, CI is deterministic
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    database=None,
)


@pytest.fixture(scope="module")
def http(default_gguf: Any) -> Iterator[httpx.Client]:
    with running_server(
        "--set", "max_tokens_cap=2", "--set", "default_max_tokens=2", "--set", "models.0.n_ctx=512",
        "--set", "models.0.n_threads=1", timeout=300,
    ) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


def check(client: httpx.Client, route: str, content: bytes) -> None:
    r = client.post(route, content=content, headers={"content-type": "application/json"})
    SENT[r.status_code // 100] = SENT.get(r.status_code // 100, 0) + 1
    assert r.status_code < 500, f"{route} answered {r.status_code} to {content[:300]!r}: {r.text[:500]}"
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"} and {"code", "message", "type"} <= set(body["error"]), body
        assert body["error"]["code"] == r.status_code


def dump(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", errors="surrogatepass")


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["\ud800", "\udfff", "a\x00b", "<|im_start|>system", "", " ", "\u202e", "🦜" * 10])
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
KEYS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "stop", "stream", "stream_options", "seed", "n", "logprobs", "top_logprobs", "logit_bias", "response_format",
    "tools", "tool_choice", "parallel_tool_calls", "frequency_penalty", "presence_penalty", "repeat_penalty",
    "query", "documents", "top_n", "return_documents", "input", "encoding_format", "dimensions", "tokens",
    "content", "add_special", "with_pieces", "grammar", "json_schema", "user", "echo", "suffix",
]
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "bogus"]) | json_values},
    optional={
        "content": st.text(max_size=60) | json_values,
        "tool_calls": json_values,
        "tool_call_id": json_values,
        "name": json_values,
    },
)
good_messages = st.lists(message, min_size=0, max_size=4)
request_shaped = st.dictionaries(
    st.sampled_from(KEYS),
    json_values | good_messages | st.just(MODEL),
    max_size=8,
).map(lambda d: {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **d})
raw = st.binary(max_size=200) | st.sampled_from(
    [b"[" * 3000, b"{\"a\":" * 3000, b"[" * 100000, b"{", b"", b"null", b"NaN", b"1e999999", b"\"\\ud800\"",
     b"{\"messages\": [{\"role\": \"user\", \"content\": \"\\udc00\"}]}", b"\xff\xfe", "é".encode("latin-1")]
)


@pytest.mark.parametrize("examples", COUNTS)
@pytest.mark.parametrize("route", ROUTES)
def test_request_shaped_bodies_never_5xx(http: httpx.Client, route: str, examples: int) -> None:
    @settings(parent=FUZZ, max_examples=examples)
    @given(body=request_shaped)
    def run(body: dict[str, Any]) -> None:
        check(http, route, dump(body))

    run()


@pytest.mark.parametrize("examples", COUNTS)
@pytest.mark.parametrize("route", ROUTES)
def test_arbitrary_json_and_bytes_never_5xx(http: httpx.Client, route: str, examples: int) -> None:
    @settings(parent=FUZZ, max_examples=max(examples // 3, 10))
    @given(body=json_values.map(dump) | raw)
    def run(body: bytes) -> None:
        check(http, route, body)

    run()


def test_server_still_serves_after_the_fuzz(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None
    print(f"\nfuzz: {sum(SENT.values())} requests, by status class: {dict(sorted(SENT.items()))}")
