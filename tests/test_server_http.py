"""HTTP contract of the server with a fake engine: status codes, error shapes, SSE framing, loading state.

These are unit tests of the routes; tests/test_server_real.py runs the same endpoints on the real model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from edgellm.serve.app import create_app
from edgellm.serve.engine.base import (
    ContextOverflowError,
    Finished,
    GenerationRequest,
    ModelInfo,
    TextDelta,
    Timings,
    UnknownModelError,
)
from edgellm.serve.engine.stream import EventStream
from edgellm.serve.settings import ServeSettings


class FakeEngine:
    """Answers every request with fixed pieces; records what it was asked."""

    def __init__(self, pieces: tuple[str, ...] = ("Hel", "lo", " wörld")) -> None:
        self.pieces = pieces
        self.requests: list[GenerationRequest] = []

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name="fake", path="fake.gguf", n_ctx=64, created=1)]

    def has_model(self, name: str) -> bool:
        return name == "fake"

    async def submit(self, request: GenerationRequest) -> EventStream:
        if request.model != "fake":
            raise UnknownModelError(f"no {request.model}")
        if request.prompt and len(request.prompt) > 64:
            raise ContextOverflowError("prompt too long", len(request.prompt), 64)
        self.requests.append(request)
        stream = EventStream(asyncio.get_running_loop(), prompt_tokens=5)
        pieces = self.pieces[: request.params.max_tokens]
        for p in pieces:
            stream.emit(TextDelta(p))
        reason = "length" if len(pieces) < len(self.pieces) else "stop"
        stream.emit(Finished(reason, 5, len(pieces), Timings(5, 1.0, len(pieces), 2.0)))
        return stream

    async def close(self) -> None:
        pass


def settings(**kw: object) -> ServeSettings:
    base = {"models": [{"name": "fake", "path": "fake.gguf"}], "max_body_bytes": 2048, "max_tokens_cap": 100, "default_max_tokens": 50}
    return ServeSettings.model_validate({**base, **kw})


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine):
    with TestClient(create_app(settings(), engine_factory=lambda s: engine)) as c:
        for _ in range(100):
            if c.get("/health").status_code == 200:
                break
            import time

            time.sleep(0.01)
        yield c


def chat(**kw: object) -> dict[str, object]:
    return {"model": "fake", "messages": [{"role": "user", "content": "hi"}], **kw}


def assert_error(resp, status: int, type_: str, fragment: str = "") -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == status
    assert body["error"]["type"] == type_
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert fragment in body["error"]["message"]


def test_chat_non_streaming_shape(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json=chat(temperature=0, stop="x", seed=3, top_p=0.5, max_tokens=50))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello wörld"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    p = engine.requests[0].params
    assert (p.temperature, p.stop, p.seed, p.top_p, p.max_tokens) == (0.0, ("x",), 3, 0.5, 50)


def test_max_tokens_is_capped(client: TestClient, engine: FakeEngine) -> None:
    client.post("/v1/chat/completions", json=chat(max_tokens=10_000))
    assert engine.requests[0].params.max_tokens == 100


def test_chat_stream_framing_is_exact(client: TestClient) -> None:
    with client.stream(
        "POST", "/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == ""
    events = events[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw
    payloads = [e[len("data: ") :] for e in events]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    # deltas the engine emitted before the client read them are merged into one chunk: the text is what counts
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-2]]
    assert 1 <= len(deltas) <= 3 and all(set(d) == {"content"} for d in deltas)
    assert "".join(d["content"] for d in deltas) == "Hello wörld"
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_stream_without_usage_has_no_usage_chunk(client: TestClient) -> None:
    with client.stream("POST", "/v1/chat/completions", json=chat(stream=True, max_tokens=2)) as r:
        raw = r.read().decode()
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n")[:-1] if e != "data: [DONE]"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"] for c in chunks)


def test_completions_stream_and_plain(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "Once"})
    assert r.json()["choices"][0]["text"] == "Hello wörld"
    assert r.json()["object"] == "text_completion"
    with client.stream("POST", "/v1/completions", json={"model": "fake", "prompt": "Once", "stream": True}) as r:
        raw = r.read().decode()
    payloads = [e[6:] for e in raw.split("\n\n")[:-1]]
    assert payloads[-1] == "[DONE]"
    texts = [json.loads(p)["choices"][0]["text"] for p in payloads[:-1]]
    assert "".join(texts) == "Hello wörld"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": "fake"}, "messages"),
        ({"model": "fake", "messages": []}, "messages"),
        ({"model": "fake", "messages": "hi"}, "messages"),
        ({"model": "fake", "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"model": "fake", "messages": [{"role": "user"}]}, "no text"),
        ({"model": "fake", "messages": [{"role": "user", "content": ""}]}, "no text"),
        ({"model": "fake", "messages": [{"role": "user", "content": 5}]}, "content"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens="ten"), "max_tokens"),
        (chat(temperature=-1), "temperature"),
        (chat(n=9), "'n'"),
        (chat(stream="yes"), "stream"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_chat_requests_are_400(client: TestClient, body: object, fragment: str) -> None:
    assert_error(client.post("/v1/chat/completions", json=body), 400, "invalid_request_error", fragment)


def test_malformed_json_is_400(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_request_error", "not valid JSON")
    assert_error(client.post("/v1/completions", content=b""), 400, "invalid_request_error", "empty")


def test_bad_completion_requests_are_400(client: TestClient) -> None:
    assert_error(client.post("/v1/completions", json={"model": "fake"}), 400, "invalid_request_error", "prompt")
    assert_error(client.post("/v1/completions", json={"model": "fake", "prompt": ""}), 400, "invalid_request_error")


def test_context_overflow_is_400_exceed_context(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "x" * 100})
    assert_error(r, 400, "exceed_context_size_error")


def test_unknown_model_path_and_method(client: TestClient) -> None:
    assert_error(client.post("/v1/chat/completions", json={**chat(), "model": "gpt-4"}), 404, "not_found_error", "fake")
    assert_error(client.get("/v1/nothing"), 404, "not_found_error")
    assert_error(client.get("/v1/chat/completions"), 405, "invalid_request_error")
    assert_error(client.post("/health"), 405, "invalid_request_error")


def test_body_over_limit_is_413(client: TestClient) -> None:
    big = chat(messages=[{"role": "user", "content": "x" * 5000}])
    assert_error(client.post("/v1/chat/completions", json=big), 413, "invalid_request_error", "limit")


def test_rerank_without_reranker_is_501(client: TestClient) -> None:
    r = client.post("/v1/rerank", json={"query": "q", "documents": ["a"]})
    assert_error(r, 501, "not_supported_error", "reranker")


def test_models_endpoint(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake"]


def test_health_is_503_while_loading_and_when_load_fails() -> None:
    import threading

    gate = threading.Event()

    def slow_factory(s: ServeSettings) -> FakeEngine:
        gate.wait(10)
        return FakeEngine()

    with TestClient(create_app(settings(), engine_factory=slow_factory)) as c:
        loading = c.get("/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading", "waiting": ["models"]}
        assert c.get("/livez").json() == {"status": "alive"}  # alive while loading
        assert_error(c.post("/v1/chat/completions", json=chat()), 503, "unavailable_error", "loading")
        gate.set()
        for _ in range(200):
            if c.get("/health").status_code == 200:
                break
            import time

            time.sleep(0.01)
        assert c.get("/health").json() == {"status": "ok"}

    def broken_factory(s: ServeSettings) -> FakeEngine:
        raise FileNotFoundError("model file nope.gguf does not exist")

    with TestClient(create_app(settings(), engine_factory=broken_factory)) as c:
        import time

        time.sleep(0.1)
        r = c.get("/health")  # an open route: the part that failed, never its path or error text
        assert r.status_code == 503 and r.json() == {"status": "failed", "failed": ["models"], "waiting": []}
        assert_error(c.post("/v1/chat/completions", json=chat()), 503, "unavailable_error", "nope.gguf")


def test_api_key(engine: FakeEngine) -> None:
    with TestClient(create_app(settings(api_key="s3cret"), engine_factory=lambda s: engine)) as c:
        assert_error(c.get("/v1/models"), 401, "authentication_error")
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code in (200, 503)  # health stays open for orchestrators


def test_serving_a_gguf_config_does_not_need_torch() -> None:
    """The serve app and its routes import without torch (checked in a clean interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys; import edgellm.serve.app, edgellm.serve.engine.factory, edgellm.serve.engine.serial, "
        "edgellm.serve.routes.rerank, edgellm.serve.routes.embeddings, edgellm.serve.engine.embed, "
        "edgellm.serve.engine.encoder, edgellm.serve.engine.rerank; "
        "heavy = [m for m in ('torch', 'llama_cpp', 'gguf') if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_serving_chat_embeddings_and_rerank_from_ggufs_imports_no_torch(default_gguf: Path) -> None:
    """A server with a GGUF embedder and a GGUF reranker (the shipped configuration) answers chat, embeddings and
    rerank with neither torch, sentence-transformers nor transformers imported (checked in a clean interpreter)."""
    import subprocess
    import sys

    from tests.test_embeddings import default_embedder_gguf
    from tests.test_rerank_gguf import default_reranker_gguf

    config = {
        "models": [{"name": "m", "path": str(default_gguf), "n_ctx": 512}],
        "slots": 1,
        "embedder": {"path": str(default_embedder_gguf())},
        "reranker": {"path": str(default_reranker_gguf()), "backend": "llama.cpp"},
    }
    code = f"""
import sys, time
from starlette.testclient import TestClient
from edgellm.serve.app import create_app
from edgellm.serve.settings import ServeSettings

with TestClient(create_app(ServeSettings.model_validate({config!r}))) as c:
    deadline = time.monotonic() + 120
    while c.post("/v1/rerank", json={{"query": "q", "documents": ["d"]}}).status_code == 503:
        assert time.monotonic() < deadline, "not ready"
        time.sleep(0.1)
    chat = c.post("/v1/chat/completions", json={{"messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 4}})
    emb = c.post("/v1/embeddings", json={{"input": ["a retrieval pipeline", "on the edge"]}})
    rr = c.post("/v1/rerank", json={{"query": "copy a folder", "documents": ["shutil.copytree", "json.dumps"]}})
    assert [chat.status_code, emb.status_code, rr.status_code] == [200, 200, 200], (chat.text, emb.text, rr.text)
    assert len(emb.json()["data"][0]["embedding"]) == 384 and len(rr.json()["results"]) == 2
heavy = [m for m in ("torch", "sentence_transformers", "transformers") if m in sys.modules]
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1], timeout=300)


def test_engine_package_is_cheap_and_the_error_path_pulls_in_no_catalog() -> None:
    """`edgellm.serve.engine` (the engine's public API) imports neither llama_cpp nor torch; the server's error
    path imports neither the model catalog nor tqdm."""
    import subprocess
    import sys

    code = (
        "import sys; import edgellm.serve.engine as e, edgellm.serve.errors; "
        "heavy = [m for m in ('llama_cpp', 'torch', 'tqdm', 'edgellm.catalog') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "assert e.BatchedEngine.__name__ == 'BatchedEngine' and e.SerialEngine.__name__ == 'SerialEngine'; "
        "missing = [n for n in e.__all__ if not hasattr(e, n)]; assert not missing, missing"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_reranker_state_is_built_by_the_lifespan(engine: FakeEngine) -> None:
    """With a reranker configured that cannot load, the route says why (503); the limiter exists from the start."""
    with TestClient(
        create_app(settings(reranker={"path": "no-such-dir", "threads": None}), engine_factory=lambda s: engine)
    ) as c:
        for _ in range(500):
            r = c.post("/v1/rerank", json={"query": "q", "documents": ["a"]})
            if "failed to load" in r.text:
                break
            import time

            time.sleep(0.01)
        assert_error(r, 503, "unavailable_error", "no config.json")
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["fake"]
