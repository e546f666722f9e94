"""Models from a folder, loaded on demand (`edgellm serve --models-dir DIR`): a real server over a folder of real
GGUFs (the default model under several names, and an encoder GGUF that must not be listed), the first request to a
model loading it, the least recently used one unloaded beyond `max_loaded_models`, /models/load and /models/unload,
a file dropped in at runtime, `keep_alive`, unknown names."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgellm.paths import resolve_input
from tests.servers import running_server

log = logging.getLogger(__name__)

EMBEDDER = Path("models/all-minilm-l6-v2-gguf/all-minilm-l6-v2-f16.gguf")
COMMON = ("--no-reranker", "--no-embedder", "--set", "slots=1", "--set", "model_defaults.n_ctx=512")


def _folder(tmp: Path, gguf: Path, names: list[str]) -> Path:
    folder = tmp / "models"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(names):
        (folder / ("sub" if i == 1 else "") / f"{name}.gguf").symlink_to(gguf.resolve())
    (folder / "notes.txt").write_text("not a model\n")
    (folder / "partial.gguf").write_bytes(b"GGUF\x03\x00")  # a copy still under way: skipped, no error
    embedder = resolve_input(EMBEDDER)
    if embedder.is_file():
        (folder / "encoder.gguf").symlink_to(embedder.resolve())
    return folder


@pytest.fixture(scope="module")
def lru_server(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    folder = _folder(tmp_path_factory.mktemp("lru"), default_gguf, ["alpha", "beta", "gamma"])
    with running_server("--models-dir", str(folder), *COMMON, "--set", "max_loaded_models=1",
                        "--set", "keep_alive=-1") as url:
        yield url, folder


def models(url: str) -> dict[str, bool]:
    r = httpx.get(f"{url}/v1/models", timeout=30)
    assert r.status_code == 200, r.text
    return {m["id"]: m["meta"]["loaded"] for m in r.json()["data"]}


def chat(url: str, model: str, max_tokens: int = 8) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens,
              "temperature": 0},
        timeout=120,
    )


def test_folder_is_listed_unloaded_and_encoders_skipped(lru_server: tuple[str, Path]) -> None:
    url, folder = lru_server
    listed = models(url)
    assert {"alpha", "beta", "gamma"} <= set(listed)  # "beta" is in a subfolder
    assert "encoder" not in listed and "partial" not in listed and "notes" not in listed
    assert listed == {"alpha": False, "beta": False, "gamma": False}  # nothing loaded before a request


def test_first_request_loads_and_lru_unloads(lru_server: tuple[str, Path]) -> None:
    url, _ = lru_server
    first = chat(url, "alpha")
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["message"]["content"]
    assert models(url)["alpha"] is True
    second = chat(url, "beta")
    assert second.status_code == 200, second.text
    listed = models(url)
    assert listed["beta"] is True and listed["alpha"] is False  # max_loaded_models=1: alpha made room
    assert chat(url, "alpha").status_code == 200  # and comes back on demand
    assert models(url)["alpha"] is True


def test_concurrent_first_requests_share_one_load(lru_server: tuple[str, Path]) -> None:
    import concurrent.futures

    url, _ = lru_server
    httpx.post(f"{url}/models/unload", json={"model": "gamma"}, timeout=60)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: chat(url, "gamma", 4), range(3)))
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert models(url)["gamma"] is True


def test_load_and_unload_routes(lru_server: tuple[str, Path]) -> None:
    url, _ = lru_server
    r = httpx.post(f"{url}/models/load", json={"model": "beta"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "beta" and r.json()["loaded"] is True
    assert models(url)["beta"] is True
    r = httpx.post(f"{url}/models/unload", json={"model": "beta"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["loaded"] is False and r.json()["unloaded"] is True
    assert models(url)["beta"] is False
    r = httpx.post(f"{url}/models/unload", json={"model": "beta"}, timeout=60)
    assert r.status_code == 200 and r.json()["unloaded"] is False  # already unloaded: nothing to do
    for route in ("load", "unload"):
        r = httpx.post(f"{url}/models/{route}", json={"model": "nope"}, timeout=30)
        assert r.status_code == 404, r.text
        r = httpx.post(f"{url}/models/{route}", json={"name": "beta"}, timeout=30)
        assert r.status_code == 400, r.text


def test_unknown_model_is_404(lru_server: tuple[str, Path]) -> None:
    url, _ = lru_server
    r = chat(url, "no-such-model")
    assert r.status_code == 404, r.text
    assert "no-such-model" in r.json()["error"]["message"]


def test_file_added_at_runtime_appears(lru_server: tuple[str, Path], default_gguf: Path) -> None:
    url, folder = lru_server
    assert "delta" not in models(url)
    (folder / "delta.gguf").symlink_to(default_gguf.resolve())
    assert models(url).get("delta") is False
    (folder / "epsilon.gguf").symlink_to(default_gguf.resolve())
    r = chat(url, "epsilon")  # a request for a name not seen yet rescans the folder
    assert r.status_code == 200, r.text
    assert models(url)["epsilon"] is True


def test_keep_alive_unloads_an_idle_model(default_gguf: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path, default_gguf, ["one", "two"])
    with running_server("--models-dir", str(folder), *COMMON, "--set", "keep_alive=1") as url:
        assert chat(url, "one").status_code == 200
        deadline = time.monotonic() + 30
        while models(url)["one"] and time.monotonic() < deadline:
            time.sleep(0.25)
        assert models(url)["one"] is False


def test_time_to_first_token_of_an_unloaded_model(default_gguf: Path, tmp_path: Path) -> None:
    """The figure for the notes: from the request to a model not loaded to its first streamed token."""
    folder = _folder(tmp_path, default_gguf, ["cold"])
    shutil.rmtree(folder / "sub")
    with running_server("--models-dir", str(folder), *COMMON) as url:
        assert models(url) == {"cold": False}
        started = time.perf_counter()
        first = None
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", timeout=120,
            json={"model": "cold", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
                  "stream": True},
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if first is None and line.startswith("data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        first = time.perf_counter() - started
        assert first is not None
        warm_started = time.perf_counter()
        assert chat(url, "cold").status_code == 200
        warm = time.perf_counter() - warm_started
        log.warning("models_dir: cold request to first token %.2f s; a whole warm request %.2f s", first, warm)
        assert models(url) == {"cold": True}


def test_loading_more_than_max_while_all_are_busy_is_503(lru_server: tuple[str, Path]) -> None:
    """max_loaded_models=1 and the loaded model mid-answer: another model cannot make room (503, Retry-After);
    once the answer is done it can."""
    url, _ = lru_server
    assert chat(url, "alpha").status_code == 200
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", timeout=120,
        json={"model": "alpha", "messages": [{"role": "user", "content": "Count from 1 to 500."}],
              "max_tokens": 480, "stream": True, "temperature": 0,
              "logit_bias": {"0": -100, "2": -100}},  # no end of text: the answer runs on
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        refused = chat(url, "beta")
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert models(url)["alpha"] is True and models(url)["beta"] is False
    deadline = time.monotonic() + 30  # the cancelled answer leaves its slot within a step
    while (r := chat(url, "beta")).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200, r.text


def test_a_load_slower_than_load_timeout_is_503_then_served(default_gguf: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path, default_gguf, ["slow"])
    with running_server("--models-dir", str(folder), *COMMON, "--set", "load_timeout=0.001") as url:
        r = chat(url, "slow")
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5"
        deadline = time.monotonic() + 60  # the load goes on without the request that started it
        while not models(url)["slow"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert chat(url, "slow").status_code == 200


def test_ollama_clients_see_and_load_folder_models(lru_server: tuple[str, Path]) -> None:
    """Ollama's /api/tags lists the folder's models, loaded or not; /api/chat loads one on demand; /api/ps lists
    only the loaded ones."""
    import ollama

    url, _ = lru_server
    httpx.post(f"{url}/models/unload", json={"model": "gamma"}, timeout=60)
    with ollama.Client(host=url) as client:
        assert {"alpha", "beta", "gamma"} <= {m.model for m in client.list().models}
        assert "gamma" not in {m.model for m in client.ps().models}
        answer = client.chat(model="gamma:latest", messages=[{"role": "user", "content": "Say hello."}],
                             options={"num_predict": 4, "temperature": 0})
        assert answer.done and answer.eval_count and answer.eval_count <= 4
        assert models(url)["gamma"] is True
        assert "gamma" in {m.model for m in client.ps().models}
