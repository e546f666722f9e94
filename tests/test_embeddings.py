"""/v1/embeddings and the embedding engine (serve/engine/embed.py) on the real default embedder: the packaged
all-MiniLM-L6-v2 converted to GGUF by our convert stage (`edgellm models pull embedder`), against
sentence-transformers, through the HTTP contract, and with the official `openai` client on a real server."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from edgellm.serve.app import create_app
from edgellm.serve.engine.embed import EmbedInputError, EmbedModelError, EmbedTooLongError, GGUFEmbedder
from edgellm.serve.settings import ServeSettings
from tests.servers import running_server
from tests.test_server_http import FakeEngine, assert_error

NAME = "all-minilm-l6-v2"
TEXTS = [
    "how do I stop a small cut from bleeding",
    "Press a clean cloth firmly on the wound and hold it there for several minutes.",
    "Café crème brûlée, naïve résumé — 東京",
    "hello",
]


def default_embedder_gguf() -> Path:
    """The default embedder, converted by the convert stage's catalog recipe (`edgellm models pull embedder`, which
    `make setup` runs); converted here if missing."""
    from edgellm.catalog import pull

    return pull("embedder") / "all-minilm-l6-v2-f16.gguf"


@pytest.fixture(scope="session")
def embedder_gguf() -> Path:
    return default_embedder_gguf()


@pytest.fixture(scope="module")
def embedder(embedder_gguf: Path) -> Iterator[GGUFEmbedder]:
    with GGUFEmbedder(embedder_gguf, name=NAME, n_batch=128, max_inputs=64) as e:
        yield e


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    from edgellm.train.reranker import PACKAGED_ENCODER, encoder_dir

    model = SentenceTransformer(str(encoder_dir(PACKAGED_ENCODER)), device="cpu", local_files_only=True)
    return np.asarray(model.encode(TEXTS, normalize_embeddings=True))


# --- the engine ---


def test_matches_sentence_transformers(embedder: GGUFEmbedder, reference: np.ndarray) -> None:
    out = embedder.embed(TEXTS)
    assert out.vectors.shape == (len(TEXTS), 384) and out.vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-5)
    cosine = (out.vectors * reference).sum(axis=1)
    assert cosine.min() >= 0.999, cosine


def test_parity_record_of_the_conversion(embedder_gguf: Path) -> None:
    import json

    record = json.loads((embedder_gguf.parent / "parity.json").read_text())
    assert record["kind"] == "embedding" and record["thresholds"]["min_cosine"] == 0.999
    (entry,) = record["files"]
    assert entry["path"] == embedder_gguf.name and entry["parity"]["min_cosine"] >= 0.999
    assert entry["parity"]["n_texts"] >= 300


def test_one_decode_for_many_inputs_equals_one_by_one(embedder: GGUFEmbedder) -> None:
    many = [f"{t} ({i})" for i in range(6) for t in TEXTS]
    together = embedder.embed(many)
    alone = np.stack([embedder.embed([t]).vectors[0] for t in many[:5]])
    assert ((together.vectors[:5] * alone).sum(axis=1) > 0.99999).all()
    counts = [embedder.count_tokens(t) for t in many]
    assert together.prompt_tokens == sum(counts)


def test_packing_respects_batch_and_sequence_limits(embedder: GGUFEmbedder) -> None:
    model = embedder._model
    assert model is not None
    groups = list(model.pack([100, 20, 10, 128, 1, 1]))
    assert groups == [[0, 1], [2], [3], [4, 5]]  # n_batch=128 tokens per decode, input order kept
    assert [i for g in groups for i in g] == list(range(6))


def test_token_arrays_are_model_token_ids(embedder: GGUFEmbedder) -> None:
    by_text = embedder.embed(["hello"]).vectors[0]
    by_ids = embedder.embed([[101, 7592, 102]]).vectors[0]  # [CLS] hello [SEP]
    assert float(by_text @ by_ids) > 0.99999
    with pytest.raises(EmbedInputError, match="token id 99999999 outside"):
        embedder.embed([[101, 99999999, 102]])


def test_long_input_is_cut_or_refused(embedder: GGUFEmbedder) -> None:
    long_text = "directory " * 600
    cut = embedder.embed([long_text])
    assert cut.prompt_tokens == embedder.max_length
    with pytest.raises(EmbedTooLongError, match=rf"input\[1\] is \d+ tokens, more than .* limit of {embedder.max_length}"):
        embedder.embed(["short", long_text], truncate=False)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [([], "input is empty"), (["a", ""], r"input\[1\] is an empty string"), ([[]], "empty token array")],
)
def test_invalid_inputs(embedder: GGUFEmbedder, inputs: list, message: str) -> None:
    with pytest.raises(EmbedInputError, match=message):
        embedder.embed(inputs)


def test_limits_and_load_errors(embedder_gguf: Path, tmp_path: Path) -> None:
    with GGUFEmbedder(embedder_gguf, name="small", max_inputs=2, max_length=16) as small:
        assert small.max_length == 16
        with pytest.raises(EmbedInputError, match="3 inputs is more than this embedder's limit of 2"):
            small.embed(["a", "b", "c"])
    with pytest.raises(EmbedModelError, match="closed"):
        small.embed(["a"])
    with pytest.raises(EmbedModelError, match="edgellm models pull embedder"):
        GGUFEmbedder(tmp_path / "missing.gguf", name="x")
    with pytest.raises(EmbedModelError, match="max_length 4096 is more than"):
        GGUFEmbedder(embedder_gguf, name="x", max_length=4096)


# --- the route, with a fake chat engine and the real embedder ---


@pytest.fixture(scope="module")
def client(embedder_gguf: Path) -> Iterator[TestClient]:
    settings = ServeSettings.model_validate(
        {
            "models": [{"name": "fake", "path": "fake.gguf"}],
            "embedder": {"name": NAME, "path": str(embedder_gguf), "max_inputs": 8, "truncate": False},
        }
    )
    with TestClient(create_app(settings, engine_factory=lambda s: FakeEngine())) as c:
        deadline = time.monotonic() + 60
        while c.post("/v1/embeddings", json={"input": "x"}).status_code == 503:
            assert time.monotonic() < deadline, "the embedder did not load"
            time.sleep(0.05)
        yield c


def test_response_shape_and_usage(client: TestClient, embedder: GGUFEmbedder) -> None:
    r = client.post("/v1/embeddings", json={"model": NAME, "input": TEXTS[:2]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == NAME
    assert [d["index"] for d in body["data"]] == [0, 1] and all(d["object"] == "embedding" for d in body["data"])
    vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert vectors.shape == (2, 384)
    assert np.allclose(vectors, embedder.embed(TEXTS[:2]).vectors, atol=1e-6)
    usage = body["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] == sum(embedder.count_tokens(t) for t in TEXTS[:2])


def test_string_token_array_and_base64_inputs(client: TestClient) -> None:
    one = client.post("/v1/embeddings", json={"input": "hello"}).json()["data"]
    assert len(one) == 1
    ids = client.post("/v1/embeddings", json={"input": [101, 7592, 102]}).json()["data"]
    many_ids = client.post("/v1/embeddings", json={"input": [[101, 7592, 102], [101, 102]]}).json()["data"]
    assert len(ids) == 1 and len(many_ids) == 2
    assert np.dot(one[0]["embedding"], ids[0]["embedding"]) > 0.99999
    b64 = client.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"}).json()["data"][0]
    decoded = np.frombuffer(base64.b64decode(b64["embedding"]), dtype="<f4")
    assert np.allclose(decoded, one[0]["embedding"], atol=1e-7)
    assert client.post("/v1/embeddings", json={"input": "hello", "dimensions": 384}).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "type_", "fragment"),
    [
        ({"input": "hi", "dimensions": 256}, 400, "invalid_request_error", "dimensions=256 is not supported"),
        ({"input": "hi", "model": "text-embedding-3-small"}, 404, "not_found_error", NAME),
        ({"input": []}, 400, "invalid_request_error", "input is empty"),
        ({"input": 5}, 400, "invalid_request_error", "input"),
        ({"input": [1.5]}, 400, "invalid_request_error", "input"),
        ({"input": ["a", 3]}, 400, "invalid_request_error", "input"),
        ({}, 400, "invalid_request_error", "input"),
        ({"input": "hi", "encoding_format": "int8"}, 400, "invalid_request_error", "encoding_format"),
        ({"input": ["a"] * 9}, 400, "invalid_request_error", "limit of 8"),
        ({"input": "word " * 600}, 400, "exceed_context_size_error", "input[0]"),
    ],
)
def test_invalid_requests(client: TestClient, body: dict, status: int, type_: str, fragment: str) -> None:
    assert_error(client.post("/v1/embeddings", json=body), status, type_, fragment)


def test_models_lists_the_embedder(client: TestClient) -> None:
    data = client.get("/v1/models").json()["data"]
    (entry,) = [m for m in data if m["id"] == NAME]
    assert entry["meta"]["kind"] == "embedding" and entry["meta"]["dimensions"] == 384


def test_no_embedder_is_501() -> None:
    settings = ServeSettings.model_validate({"models": [{"name": "fake", "path": "fake.gguf"}]})
    with TestClient(create_app(settings, engine_factory=lambda s: FakeEngine())) as c:
        assert_error(c.post("/v1/embeddings", json={"input": "x"}), 501, "not_supported_error", "embedder")


def test_an_embedder_that_fails_to_load_says_why() -> None:
    settings = ServeSettings.model_validate(
        {"models": [{"name": "fake", "path": "fake.gguf"}], "embedder": {"path": "nope.gguf"}}
    )
    with TestClient(create_app(settings, engine_factory=lambda s: FakeEngine())) as c:
        deadline = time.monotonic() + 10
        while "failed to load" not in (r := c.post("/v1/embeddings", json={"input": "x"})).text:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert_error(r, 503, "unavailable_error", "nope.gguf")
        health = c.get("/health")  # not ready (a configured part does not answer), though chat is still served
        assert health.status_code == 503 and health.json()["failed"] == ["embedder"], health.text
        assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 200


# --- the official client on a real server ---


def test_openai_client_on_a_real_server(default_gguf: Path, embedder_gguf: Path, embedder: GGUFEmbedder) -> None:
    from openai import OpenAI

    with running_server(
        "--model", str(default_gguf), "--set", "models.0.n_ctx=512", "--no-reranker",
        "--embedder", str(embedder_gguf), "--set", f"embedder.name={NAME}",
    ) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=5)
        result = client.embeddings.create(model=NAME, input=TEXTS)  # the client asks for base64 and decodes it
        assert [d.index for d in result.data] == list(range(len(TEXTS)))
        got = np.array([d.embedding for d in result.data], dtype=np.float32)
        assert np.allclose(got, embedder.embed(TEXTS).vectors, atol=1e-6)
        assert result.usage.prompt_tokens == sum(embedder.count_tokens(t) for t in TEXTS)
        floats = client.embeddings.create(model=NAME, input="hello", encoding_format="float")
        assert len(floats.data[0].embedding) == 384
        # what LangChain's OpenAIEmbeddings(check_embedding_ctx_length=False) sends: a list of strings, the model
        texts = ["retrieval on the edge", "a tiny embedding model"]
        lc = client.embeddings.create(input=texts, model=NAME).data
        assert len(lc) == 2 and np.dot(lc[0].embedding, lc[0].embedding) == pytest.approx(1.0, abs=1e-5)


# --- `edgellm bench embed`, tiny ---


def test_bench_embed_writes_its_table_json_and_chart(default_gguf: Path, embedder_gguf: Path, tmp_path: Path) -> None:
    import json

    from edgellm.bench.retrieval_speed import bench_retrieval, table

    out = tmp_path / "report"
    result = bench_retrieval(
        "embed", {"llama.cpp": embedder_gguf}, chat_model=default_gguf, requests=2, batch=8, chat_tokens=8, out=out
    )
    (row,) = result.rows
    assert row.backend == "llama.cpp" and row.batch == 8 and row.requests == 2
    assert row.docs_per_s > 0 and 0 < row.p50_ms <= row.p95_ms and row.peak_rss_mb > 50 and row.startup_s > 0
    assert row.chat_tok_s_alone > 0 and row.chat_tok_s_alongside > 0
    assert (out / "embed.md").read_text() == table(result) + "\n"
    assert json.loads((out / "embed.json").read_text())["rows"][0]["backend"] == "llama.cpp"
    assert (out / "embed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
