"""POST /v1/rerank on a real `edgellm serve` (uvicorn, the default GGUF for chat, the default cross-encoder as a
GGUF on llama.cpp, as configs/serve.yaml ships it; and once on the sentence-transformers backend).

The contract is the one llama.cpp's server, Jina and Cohere share; the engines themselves are tested in
tests/test_rerank_engine.py and tests/test_rerank_gguf.py, the 501 without a reranker in tests/test_server_http.py.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.servers import running_server
from tests.test_rerank_gguf import default_reranker_gguf

MODEL = "smollm2-135m-instruct"
RERANKER = "reranker-minilm-l6"
QUERY = "How do I recursively copy a directory tree to another location?"
DOCUMENTS = [
    "json.dumps(obj): Serialize obj to a JSON formatted string, using the conversion table of the json module.",
    "math.gcd(*integers): Return the greatest common divisor of the specified integer arguments.",
    "shutil.copytree(src, dst): Recursively copy an entire directory tree rooted at src to a directory named "
    "dst and return the destination directory.",
    "The Eiffel Tower was completed in 1889 and is 330 metres tall.",
]
RELEVANT = 2


@pytest.fixture(scope="module")
def reranker_gguf() -> Path:
    return default_reranker_gguf()


@contextmanager
def reranker_server(*args: str) -> Iterator[str]:
    with running_server(
        "--set", "models.0.n_ctx=1024", "--no-embedder", *args,
        "--set", f"reranker.name={RERANKER}", "--set", "reranker.max_documents=8",
        timeout=300,
    ) as url:
        deadline = time.monotonic() + 300
        while (
            httpx.post(f"{url}/v1/rerank", json={"query": "q", "documents": ["d"]}, timeout=60).status_code
            == 503
        ):
            assert time.monotonic() < deadline, "the reranker did not finish loading"
            time.sleep(0.5)
        yield url


@pytest.fixture(scope="module")
def server(default_gguf: Path, reranker_gguf: Path) -> Iterator[str]:
    with reranker_server("--set", "reranker.backend=llama.cpp", "--set", f"reranker.path={reranker_gguf}") as url:
        yield url


def rerank(server: str, path: str = "/v1/rerank", **body: object) -> httpx.Response:
    return httpx.post(f"{server}{path}", json={"query": QUERY, "documents": DOCUMENTS, **body}, timeout=120)


def assert_error(r: httpx.Response, status: int, type_: str, fragment: str = "") -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["type"] == type_
    assert fragment.lower() in error["message"].lower()


def test_response_shape_and_ordering(server: str) -> None:
    r = rerank(server)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == RERANKER
    results = body["results"]
    assert sorted(x["index"] for x in results) == list(range(len(DOCUMENTS)))
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert results[0]["index"] == RELEVANT
    assert all("document" not in x for x in results)
    usage = body["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 4 * len(QUERY.split())


def test_top_n_return_documents_and_index_mapping(server: str) -> None:
    full = rerank(server).json()["results"]
    top = rerank(server, top_n=2, return_documents=True).json()["results"]
    assert [x["index"] for x in top] == [x["index"] for x in full[:2]]
    for x in top:
        assert x["document"] == {"text": DOCUMENTS[x["index"]]}
    reversed_docs = DOCUMENTS[::-1]
    back = httpx.post(
        f"{server}/v1/rerank",
        json={"query": QUERY, "documents": reversed_docs, "return_documents": True},
        timeout=60,
    ).json()["results"]
    assert back[0]["document"]["text"] == DOCUMENTS[RELEVANT]
    assert back[0]["index"] == len(DOCUMENTS) - 1 - RELEVANT


def test_object_documents_and_alias(server: str) -> None:
    as_objects = rerank(server, path="/rerank", documents=[{"text": d} for d in DOCUMENTS]).json()
    as_strings = rerank(server).json()
    assert [x["index"] for x in as_objects["results"]] == [x["index"] for x in as_strings["results"]]
    for a, b in zip(as_objects["results"], as_strings["results"], strict=True):
        assert a["relevance_score"] == pytest.approx(b["relevance_score"], abs=1e-5)
    mixed = rerank(server, documents=[DOCUMENTS[0], {"text": DOCUMENTS[RELEVANT]}]).json()
    assert mixed["results"][0]["index"] == 1


def test_raw_scores(server: str) -> None:
    probs = {x["index"]: x["relevance_score"] for x in rerank(server).json()["results"]}
    for x in rerank(server, raw_scores=True).json()["results"]:
        assert 1 / (1 + math.exp(-x["relevance_score"])) == pytest.approx(probs[x["index"]], abs=1e-5)


def test_long_documents_truncate_or_400(server: str) -> None:
    long_doc = "directory " * 2000
    r = rerank(server, documents=[DOCUMENTS[RELEVANT], long_doc])
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    assert_error(
        rerank(server, documents=[DOCUMENTS[RELEVANT], long_doc], truncate=False),
        400,
        "invalid_request_error",
        "documents[1]",
    )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"query": ""}, "query"),
        ({"documents": []}, "documents"),
        ({"documents": ["d"] * 9}, "limit of 8"),
        ({"top_n": 0}, "top_n"),
        ({"documents": [{"title": "no text"}]}, "text"),
        ({"documents": "not a list"}, "documents"),
    ],
)
def test_invalid_requests_are_400(server: str, body: dict[str, object], fragment: str) -> None:
    assert_error(rerank(server, **body), 400, "invalid_request_error", fragment)


def test_missing_query_and_unknown_model(server: str) -> None:
    r = httpx.post(f"{server}/v1/rerank", json={"documents": DOCUMENTS}, timeout=60)
    assert_error(r, 400, "invalid_request_error", "query")
    assert_error(rerank(server, model="bge-reranker-v2-m3"), 404, "not_found_error", "reranker")
    assert rerank(server, model=RERANKER).status_code == 200


def test_rerank_during_a_streaming_chat(server: str) -> None:
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}],
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
    }
    first_chunk, stream_done = threading.Event(), threading.Event()

    def stream(events: list[str]) -> None:
        with httpx.stream("POST", f"{server}/v1/chat/completions", json=chat, timeout=120) as r:
            for line in r.iter_lines():
                if line and not line.startswith(":"):  # SSE comments (sse-starlette's keep-alive pings)
                    events.append(line)
                    first_chunk.set()
        stream_done.set()

    def text_of(events: list[str]) -> str:
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

    stream([])  # warm the prompt cache, so that the two streams below start from the same state
    alone: list[str] = []
    stream(alone)
    first_chunk.clear()
    stream_done.clear()
    events: list[str] = []
    t = threading.Thread(target=stream, args=(events,))
    t.start()
    assert first_chunk.wait(60)
    r = rerank(server)
    rerank_finished_mid_stream = not stream_done.is_set()
    t.join(120)
    assert r.status_code == 200 and r.json()["results"][0]["index"] == RELEVANT
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert text_of(events) == text_of(alone) != ""
    assert rerank_finished_mid_stream, "the rerank waited for the whole chat stream"


def test_sentence_transformers_backend_answers_the_same(server: str, default_gguf: Path) -> None:
    """The same model as a sentence-transformers directory (backend sentence-transformers): same order, same scale."""
    from edgellm.catalog import pull

    reranker_dir = pull("reranker")
    ours = rerank(server).json()["results"]
    with reranker_server(
        "--set", "reranker.backend=sentence-transformers", "--set", f"reranker.path={reranker_dir}"
    ) as url:
        theirs = rerank(url).json()["results"]
    assert [x["index"] for x in ours] == [x["index"] for x in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a["relevance_score"] == pytest.approx(b["relevance_score"], abs=0.005)
