"""Server hardening with a fake engine (unit level; the real server runs the same paths in tests/test_drain.py,
tests/test_disconnect.py, tests/test_fuzz.py and tests/test_tokenize.py): strict JSON, constant-time API key,
readiness and liveness, the drain's 503s, no paths in /v1/models, the bounded wait of the rerank and embeddings
limiters."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import anyio
import pytest
from starlette.testclient import TestClient

from edgellm.serve.app import create_app
from edgellm.serve.drain import Drain
from edgellm.serve.errors import APIError
from edgellm.serve.http import MAX_JSON_DEPTH, ModelState, parse_json, too_deep
from tests.test_server_http import FakeEngine, assert_error, chat, settings


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(settings(max_body_bytes=300_000), engine_factory=lambda s: FakeEngine())) as c:
        wait_for(lambda: c.get("/health").status_code == 200)
        yield c


def wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def post(c: TestClient, body: bytes, path: str = "/v1/chat/completions"):  # type: ignore[no-untyped-def]
    return c.post(path, content=body, headers={"content-type": "application/json"})


# --- strict JSON -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"[" * 100_000, "nests"),  # the json module's RecursionError was a 500
        (b'{"a":' * 5_000 + b"1" + b"}" * 5_000, "nests"),
        (b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "NaN"),
        (b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', "Infinity"),
        (b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}', "range of a double"),
        (b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 30 + b"}",
         "64-bit"),
        (b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}",
         "64-bit"),  # beyond Python's int() digit limit
        (b'{"model": "fake", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "surrogate"),
        (b'{"model": "fake", "messages": [{"role": "user", "content": "\\udc00"}]}', "surrogate"),
        (b'{"model": "fake", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "UTF-8"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),  # a UTF-8 byte-order mark
        ("{\"a\": 1}".encode("utf-16"), "UTF-8"),
    ],
)
def test_pathological_json_is_a_400(client: TestClient, body: bytes, fragment: str) -> None:
    assert_error(post(client, body), 400, "invalid_request_error", fragment)


def test_valid_json_is_not_refused() -> None:
    assert parse_json(b'{"s": "\\ud83e\\udd9c \\"[[[\\" ]]]", "n": -9223372036854775808, "f": 1.5e300}') == {
        "s": "🦜 \"[[[\" ]]]",
        "n": -(2**63),
        "f": 1.5e300,
    }
    deep = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert not too_deep(deep) and parse_json(deep)
    assert too_deep(b"[" + deep + b"]")
    with pytest.raises(APIError):
        parse_json(b"[" + deep + b"]")
    assert not too_deep(b'["' + b"[" * 500 + b'", "\\", "\"{{{{"]')  # brackets inside strings do not count


# --- API key -----------------------------------------------------------------------------------------------------


def test_api_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    from edgellm.serve import http

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(http.hmac, "compare_digest", spy)
    with TestClient(create_app(settings(api_key="s3cret"), engine_factory=lambda s: FakeEngine())) as c:
        wait_for(lambda: c.get("/health").status_code == 200)
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer s3cre"}), 401, "authentication_error")
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert len(calls) == 2


def test_a_non_ascii_api_key_sent_as_utf8_is_accepted() -> None:
    key = "clé-🔑"
    with TestClient(create_app(settings(api_key=key), engine_factory=lambda s: FakeEngine())) as c:
        wait_for(lambda: c.get("/health").status_code == 200)
        good = {"Authorization": ("Bearer " + key).encode("utf-8")}
        assert c.get("/v1/models", headers=good).status_code == 200  # type: ignore[arg-type]
        bad = {"Authorization": "Bearer clé".encode()}
        assert_error(c.get("/v1/models", headers=bad), 401, "authentication_error")  # type: ignore[arg-type]


# --- /v1/models, /health, /livez ------------------------------------------------------------------------------------


def test_models_list_names_not_paths(client: TestClient) -> None:
    body = client.get("/v1/models")
    assert body.json()["data"][0]["id"] == "fake"
    assert "fake.gguf" not in body.text and "path" not in body.text


def test_health_waits_for_the_reranker_and_names_it_without_its_error(client: TestClient) -> None:
    """A reranker that cannot load: the server is not ready (a balancer would send rerank requests that fail),
    and the open /health names the part, not the path or the exception."""
    app = create_app(settings(reranker={"path": "no-such-dir", "threads": None}), engine_factory=lambda s: FakeEngine())
    with TestClient(app) as c:
        wait_for(lambda: c.get("/health").json().get("failed") == ["reranker"])
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "failed", "failed": ["reranker"], "waiting": []}
        assert c.get("/livez").status_code == 200 and c.get("/health?live=1").status_code == 200
        assert c.post("/v1/chat/completions", json=chat()).status_code == 200  # chat itself still works


def test_health_lists_what_is_still_loading() -> None:
    gate = threading.Event()

    def slow(s):  # type: ignore[no-untyped-def]
        gate.wait(10)
        return FakeEngine()

    app = create_app(settings(embedder={"path": "nope.gguf"}), engine_factory=slow)
    with TestClient(app) as c:
        assert c.get("/health").json() == {"status": "loading", "waiting": ["models", "embedder"]}
        assert c.get("/health").headers["retry-after"] == "1"
        gate.set()
        wait_for(lambda: c.get("/health").json()["status"] == "failed")
        assert c.get("/health").json() == {"status": "failed", "failed": ["embedder"], "waiting": []}


# --- draining ------------------------------------------------------------------------------------------------------


def test_while_draining_health_is_503_and_new_posts_are_refused() -> None:
    drain = Drain(timeout=30)
    with TestClient(create_app(settings(), engine_factory=lambda s: FakeEngine(), drain=drain)) as c:
        wait_for(lambda: c.get("/health").status_code == 200)
        drain.begin()
        h = c.get("/health")
        assert h.status_code == 503 and h.json() == {"status": "draining"}
        assert c.get("/livez").status_code == 200
        assert c.get("/v1/models").status_code == 200  # reads still work
        for path, body in (("/v1/chat/completions", chat()), ("/v1/rerank", {"query": "q", "documents": ["d"]}),
                           ("/v1/embeddings", {"input": "x"}), ("/tokenize", {"content": "x"})):
            r = c.post(path, json=body)
            assert_error(r, 503, "unavailable_error", "shutting down")
            assert 30 <= int(r.headers["retry-after"]) <= 36 and r.headers["connection"] == "close"


def test_a_generation_in_flight_at_expiry_ends_with_length() -> None:
    """The drain's cut on a generation that waits for its next event: one Finished per unfinished choice."""
    from edgellm.serve.engine.base import Finished, TextDelta
    from edgellm.serve.engine.stream import EventStream

    async def run() -> list[object]:
        drain = Drain(timeout=0.2)
        stream = EventStream(asyncio.get_running_loop(), prompt_tokens=7, n_choices=2)
        stream.emit(TextDelta("Hel", choice=1))
        generation = drain.watch(stream, n=2)
        events = [await generation.__anext__()]
        asyncio.get_running_loop().call_later(0.05, drain.expire)
        events += [e async for e in generation]
        await generation.aclose()
        return events

    events = asyncio.run(run())
    assert isinstance(events[0], TextDelta)
    finals = events[1:]
    assert all(isinstance(f, Finished) and f.finish_reason == "length" for f in finals)
    assert [(f.choice, f.completion_tokens, f.prompt_tokens) for f in finals] == [(0, 0, 7), (1, 1, 7)]  # type: ignore[union-attr]


# --- the rerank and embeddings limiters --------------------------------------------------------------------------


def test_the_wait_for_a_busy_model_is_bounded() -> None:
    state: ModelState[object] = ModelState(limiter=anyio.CapacityLimiter(1), max_waiting=2, model=object())
    release = threading.Event()

    async def run() -> list[object]:
        async def call() -> object:
            try:
                return await state.run("reranker", lambda: release.wait(10))
            except APIError as e:
                return e

        tasks = [asyncio.create_task(call()) for _ in range(5)]
        await asyncio.sleep(0.2)  # one runs, two wait, two are refused
        release.set()
        return list(await asyncio.gather(*tasks))

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, APIError)]
    assert results.count(True) == 3 and len(refused) == 2
    assert all(e.status == 503 and int(e.headers["Retry-After"]) >= 1 and "max_waiting" in e.message for e in refused)
    assert state.queued == 0


def test_max_waiting_settings_reach_the_limiters() -> None:
    app = create_app(
        settings(reranker={"path": "no-such-dir", "threads": None, "max_waiting": 0}, embedder={"path": "x.gguf", "max_waiting": 3}),
        engine_factory=lambda s: FakeEngine(),
    )
    with TestClient(app) as c:
        c.get("/livez")
        state = c.app_state["server"]  # type: ignore[attr-defined]
        assert (state.reranker.max_waiting, state.embedder.max_waiting) == (0, 3)
