"""Models from a folder, loaded on demand (`edgellm serve --models-dir DIR`): a real server over a folder of real
GGUFs (the default model under several names, and an encoder GGUF that must not be listed), the first request to a
model loading it, the least recently used one unloaded beyond `max_loaded_models`, /models/load and /models/unload,
a file dropped in at runtime, `keep_alive`, unknown names."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgellm.paths import resolve_input
from edgellm.serve.engine.base import EngineOverloadedError, EngineStats
from edgellm.serve.engine.pool import Loaded, ModelPool, ModelTooLargeError, plan_evictions
from edgellm.serve.engine.specs import ModelSpec
from edgellm.serve.errors import to_api_error
from edgellm.serve.sizing import MemoryEstimate, estimate_memory
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


# --- the memory budget: eviction arithmetic on fake workers (no model loaded) ----------------------------------------
MB = 1_000_000


class FakeWorker:
    """A loaded model as the pool sees it, without llama.cpp: busy while ``busy`` is set."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec, self.template, self.created = spec, None, 0
        self.busy = False
        self.closed = False

    def stats(self) -> EngineStats:
        return EngineStats(self.spec.name, slots_total=1, slots_busy=int(self.busy), waiting=0)

    def close(self) -> None:
        self.closed = True


def fake_pool(sizes_mb: dict[str, int], budget_mb: int | None, pinned: tuple[str, ...] = (),
              max_loaded: int = 10) -> tuple[ModelPool, dict[str, FakeWorker]]:
    """A pool over fake workers whose estimated sizes are ``sizes_mb`` (weights only), ``pinned`` loaded at start."""
    specs = [ModelSpec(name=n, path=Path(f"/models/{n}.gguf"), n_ctx=512) for n in sizes_mb]
    workers: dict[str, FakeWorker] = {}

    def load(spec: ModelSpec) -> FakeWorker:
        workers[spec.name] = FakeWorker(spec)
        return workers[spec.name]

    pool = ModelPool([s for s in specs if s.name in pinned], load)  # type: ignore[arg-type]
    pool.serve_on_demand(lambda: specs, max_loaded=max_loaded, keep_alive=-1)
    pool.configure_memory(lambda spec: MemoryEstimate(sizes_mb[spec.name] * MB, 0, 1),
                          None if budget_mb is None else budget_mb * MB)
    return pool, workers


def loaded(pool: ModelPool) -> set[str]:
    return {m.name for m in pool.models()}


def test_plan_evictions_unloads_least_recently_used_idle_first() -> None:
    a, b, c = Loaded("a", 100, False, 1.0), Loaded("b", 100, False, 2.0), Loaded("c", 100, False, 3.0)
    assert plan_evictions([a, b, c], need=50, budget=400, max_loaded=4) == []
    assert plan_evictions([c, b, a], need=150, budget=400, max_loaded=4) == ["a"]
    assert plan_evictions([a, b, c], need=250, budget=400, max_loaded=4) == ["a", "b"]
    assert plan_evictions([a, b, c], need=50, budget=None, max_loaded=2) == ["a", "b"]  # the count alone
    busy_a = Loaded("a", 100, True, 1.0)
    assert plan_evictions([busy_a, b, c], need=150, budget=400, max_loaded=4) == ["b"]
    assert plan_evictions([busy_a, b, c], need=350, budget=400, max_loaded=4) is None  # a cannot go: no plan
    pinned = Loaded("p", 300, False, 0.0, pinned=True)
    assert plan_evictions([pinned, c], need=100, budget=400, max_loaded=1) == ["c"]  # pinned: never a victim
    assert plan_evictions([pinned, c], need=150, budget=400, max_loaded=4) is None


def test_loading_unloads_lru_idle_models_until_the_estimates_fit() -> None:
    async def run() -> None:
        pool, workers = fake_pool({"a": 100, "b": 100, "c": 100, "big": 200}, budget_mb=250)
        await pool.load_model("a")
        await pool.load_model("b")
        assert loaded(pool) == {"a", "b"} and pool.loaded_memory() == {"a": 100 * MB, "b": 100 * MB}
        await pool.load_model("c")  # 300 MB > 250: a, the least recently used, goes
        assert loaded(pool) == {"b", "c"} and workers["a"].closed
        await pool.load_model("b")  # used again: c is now the least recently used
        await pool.load_model("a")
        assert loaded(pool) == {"a", "b"}
        await pool.load_model("big")  # 200 MB: both 100 MB models must go
        assert loaded(pool) == {"big"}
        await pool.close()

    asyncio.run(run())


def test_a_model_larger_than_the_budget_is_refused_by_name_and_sizes() -> None:
    async def run() -> None:
        pool, workers = fake_pool({"a": 100, "huge": 300}, budget_mb=250)
        await pool.load_model("a")
        with pytest.raises(ModelTooLargeError) as info:
            await pool.load_model("huge")
        assert "'huge'" in str(info.value) and "300 MB" in str(info.value) and "memory_budget is 250 MB" in str(
            info.value)
        assert loaded(pool) == {"a"} and not workers["a"].closed  # nothing was unloaded for nothing
        assert to_api_error(info.value).status == 503
        await pool.close()

    asyncio.run(run())


def test_models_loaded_at_start_count_toward_the_budget() -> None:
    async def run() -> None:
        pool, _ = fake_pool({"pinned": 150, "a": 80, "b": 120}, budget_mb=250, pinned=("pinned",))
        await pool.load_model("a")  # 150 + 80 fits
        with pytest.raises(ModelTooLargeError, match="150 MB of it taken by the models loaded at start"):
            await pool.load_model("b")  # 150 + 120 never fits: pinned models are never unloaded
        assert loaded(pool) == {"pinned", "a"}
        await pool.close()

    asyncio.run(run())


def test_busy_models_make_it_503_with_retry_after_and_nothing_is_unloaded() -> None:
    async def run() -> None:
        pool, workers = fake_pool({"a": 100, "b": 100, "big": 200}, budget_mb=250)
        await pool.load_model("a")
        await pool.load_model("b")
        workers["a"].busy = True  # serving a request: never unloaded
        with pytest.raises(EngineOverloadedError, match="memory_budget") as info:
            await pool.load_model("big")  # would need a and b gone
        assert info.value.retry_after >= 1 and loaded(pool) == {"a", "b"} and not workers["b"].closed
        workers["a"].busy = False
        await pool.load_model("big")
        assert loaded(pool) == {"big"}
        await pool.close()

    asyncio.run(run())


def test_max_loaded_models_still_applies_with_a_budget() -> None:
    async def run() -> None:
        pool, _ = fake_pool({"a": 10, "b": 10, "c": 10}, budget_mb=1000, max_loaded=2)
        for name in ("a", "b", "c"):
            await pool.load_model(name)
        assert loaded(pool) == {"b", "c"}
        await pool.close()

    asyncio.run(run())


def test_a_models_own_keep_alive_overrides_the_servers_until_it_is_unloaded() -> None:
    async def run() -> None:
        pool, _ = fake_pool({"a": 10, "b": 10}, budget_mb=None)
        await pool.load_model("a")
        assert pool.keep_alive_of("a") == -1 and pool.expires_in("a") is None  # the server's: forever
        pool.set_keep_alive("a", 600)
        expires = pool.expires_in("a")
        assert expires is not None and 0 < expires <= 600
        pool.set_keep_alive("a", 0)  # unloaded by the reaper as soon as it is idle
        deadline = time.monotonic() + 30
        while pool.is_loaded("a") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not pool.is_loaded("a") and pool.keep_alive_of("a") == -1  # forgotten with the unload
        await pool.load_model("b")
        pool.set_keep_alive("b", 0)
        pool.set_keep_alive("b", None)  # back to the server's
        await asyncio.sleep(0.5)
        assert pool.is_loaded("b")
        await pool.close()

    asyncio.run(run())


def test_memory_budget_on_a_real_server(default_gguf: Path, tmp_path: Path) -> None:
    """The real default GGUF under two names with a budget that holds one (about 110 MB each: the file and a 512-token
    KV cache): loading the second unloads the first; a bigger GGUF that can never fit is a 503 naming the budget
    and the sizes; /metrics reports the estimates and the budget, /api/ps the estimate as `size`."""
    import ollama
    from prometheus_client.parser import text_string_to_metric_families

    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("alpha", "beta"):
        (folder / f"{name}.gguf").symlink_to(default_gguf.resolve())
    gemma = resolve_input(Path("models/gemma-3-270m-q4_k_m.gguf"))  # 253 MB file: never fits in 200 MB
    if gemma.is_file():
        (folder / "gemma.gguf").symlink_to(gemma.resolve())
    each = estimate_memory(default_gguf, 512, 1).total
    assert 100 * MB < each < 200 * MB < 2 * each
    with running_server("--models-dir", str(folder), *COMMON, "--set", "memory_budget=200MB",
                        "--set", "max_loaded_models=4", "--set", "keep_alive=-1") as url:
        assert chat(url, "alpha").status_code == 200
        assert chat(url, "beta").status_code == 200
        listed = models(url)
        assert listed["beta"] is True and listed["alpha"] is False  # the budget, not max_loaded_models, made room

        text = httpx.get(f"{url}/metrics", timeout=30).text
        parsed = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for f in text_string_to_metric_families(text) for s in f.samples}
        assert parsed[("edgellm:memory_budget_bytes", ())] == 200 * MB
        assert parsed[("edgellm:model_memory_bytes", (("model", "beta"),))] == each
        assert ("edgellm:model_memory_bytes", (("model", "alpha"),)) not in parsed
        assert parsed[("edgellm:models_memory_bytes", ())] == each

        with ollama.Client(host=url) as client:
            [running] = client.ps().models
            assert running.model == "beta" and running.size == each and running.size_vram == 0

        if gemma.is_file():
            r = chat(url, "gemma")
            assert r.status_code == 503, r.text
            message = r.json()["error"]["message"]
            assert "'gemma'" in message and "memory_budget is 200 MB" in message and "263 MB" in message, message
            assert models(url)["beta"] is True  # nothing unloaded for a model that cannot fit
