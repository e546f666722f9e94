"""The batched engine against the real default GGUF: mostly at engine level (asyncio, no server), plus the
admission and disconnect behaviour through a real `edgellm serve --engine batched`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgellm.serve.engine.base import (
    ChatMessage,
    ContextOverflowError,
    EngineOverloadedError,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from edgellm.serve.engine.batched import BatchedEngine
from edgellm.serve.engine.detok import Detokenizer, StopMatcher
from edgellm.serve.engine.pool import Job
from edgellm.serve.engine.slots import SlotTable, copy_threshold
from edgellm.serve.engine.specs import ModelSpec
from tests.servers import running_server

MODEL = "smollm2-135m-instruct"
N_CTX = 512

PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "What is 2 plus 2?",
    "Write one sentence about the sea.",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "What do bees make?",
    "Translate 'thank you' into Spanish.",
]


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)  # type: ignore[arg-type]


def chat(content: str, params: SamplingParams) -> GenerationRequest:
    return GenerationRequest(model=MODEL, messages=(ChatMessage("user", content),), params=params)


async def collect(engine: BatchedEngine, request: GenerationRequest) -> tuple[list[str], Finished]:
    gen = await engine.submit(request)
    pieces: list[str] = []
    finished: Finished | None = None
    async for event in gen:
        if isinstance(event, TextDelta):
            pieces.append(event.text)
        else:
            finished = event
    await gen.aclose()
    assert finished is not None
    return pieces, finished


async def answer(engine: BatchedEngine, request: GenerationRequest) -> str:
    pieces, _ = await collect(engine, request)
    return "".join(pieces)


@pytest.fixture(scope="module")
def engine(default_gguf: Path) -> Iterator[BatchedEngine]:
    spec = ModelSpec(name=MODEL, path=default_gguf, n_ctx=N_CTX, n_threads=2)
    e = BatchedEngine([spec], slots=4, queue_size=16)
    yield e
    asyncio.run(e.close())


# -- detokenization and stop strings (no decoding) --------------------------------------------------------------
def test_detokenizer_never_splits_a_character(engine: BatchedEngine) -> None:
    model = engine._models[MODEL]
    text = "Hi 🙂 你好世界 café 👍🏽!"
    tokens = model.tokenize(text)
    detok = Detokenizer(model.llama.pieces)
    pieces = [detok.push(t) for t in tokens] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1], "expected some character to span several tokens in this text"


def test_stop_matcher_holds_back_a_partial_stop() -> None:
    m = StopMatcher(("</end>", "STOP"))
    assert m.push("Hello </") == ("Hello ", False)
    assert m.push("en") == ("", False)
    assert m.push("x") == ("</enx", False)  # not a stop after all: the held text is sent
    assert m.push(" ST") == (" ", False)
    assert m.push("OP and more") == ("", True)
    m = StopMatcher(("ab",))
    assert m.push("xa") == ("x", False)
    assert m.flush() == "a"
    assert StopMatcher(()).push("anything") == ("anything", False)


# -- the slot table (no model: a fake KV memory that records what it was asked) ---------------------------------
class FakeMemory:
    def __init__(self, partial: bool = True) -> None:
        self.partial = partial
        self.calls: list[tuple[object, ...]] = []

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        self.calls.append(("rm", seq_id, p0, p1))
        return self.partial or (p0, p1) == (-1, -1)

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.calls.append(("cp", src, dst, p0, p1))


def job(tokens: list[int]) -> Job:
    return Job(tokens=tokens, params=SamplingParams(), stream=None)  # type: ignore[arg-type]


def test_slot_choice_prefers_the_longest_cached_prefix_then_the_lowest_slot() -> None:
    table = SlotTable(3, FakeMemory(), copy_min_tokens=16)
    table.slots[1].cache = [1, 2, 3]
    table.slots[2].cache = [1, 2, 3, 4]
    assert table.assign(job([1, 2, 3, 9])).seq_id == 1  # 3 shared with slot 1 and with slot 2: the lower one
    assert table.assign(job([5, 6])).seq_id == 0  # nothing shared anywhere: the lowest free slot
    assert table.n_free() == 1 and [s.seq_id for s in table.active] == [0, 1]
    table.release(table.slots[0])
    assert table.n_free() == 2 and [s.seq_id for s in table.active] == [1]


def test_a_new_conversation_does_not_overwrite_another_that_shares_only_its_system_prompt() -> None:
    system = list(range(100, 120))
    table = SlotTable(3, FakeMemory(), copy_min_tokens=16)
    table.slots[0].cache = [*system, *range(200, 400)]  # a conversation: system prompt + 200 tokens
    table.slots[1].cache = [*system, *range(400, 500)]
    # an empty slot keeps both conversations (the system prompt is copied from a slot in reuse_prefix)
    first = table.assign(job([*system, 7, 8, 9]))
    assert first.seq_id == 2
    # the next turn of a conversation still finds its own slot
    assert table.assign(job([*system, *range(200, 400), 5, 6])).seq_id == 0
    table.release(table.slots[0])
    table.release(table.slots[2])
    # every free slot holds another conversation of the same length: the least recently used one is overwritten
    for slot, start, used in zip(table.slots, (200, 400, 600), (5, 3, 9), strict=True):
        slot.cache = [*system, *range(start, start + 200)]
        slot.last_used = used
    assert table.assign(job([*system, 1, 2])).seq_id == 1


def test_new_prompts_take_the_least_recently_used_slot_not_the_one_with_the_shortest_cache() -> None:
    """Every prompt starts with the template's default system prompt; three slots hold long answers nobody came
    back to, one a short recent chat. New prompts take the stale slots in turn, so the recent ones stay cached."""
    system = list(range(100, 125))
    table = SlotTable(4, FakeMemory(), copy_min_tokens=16)
    for slot in table.slots[:3]:
        slot.cache = [*system, *range(1000 + 500 * slot.seq_id, 1400 + 500 * slot.seq_id)]  # old, 425 tokens
    chats = [[*system, *range(5000 + 100 * i, 5030 + 100 * i)] for i in range(3)]
    taken = []
    for chat in chats:
        slot = table.assign(job(chat))
        slot.cache = [*chat, *range(9000, 9040)]  # its prompt and answer
        table.release(slot)
        taken.append(slot.seq_id)
    assert len(set(taken)) == 3  # each chat in its own slot
    for i, chat in enumerate(chats):  # the same prompts again: each finds its own cache
        slot = table.assign(job(chat))
        assert slot.seq_id == taken[i]
        table.release(slot)


def test_reuse_prefix_keeps_the_shared_prefix_and_drops_the_rest() -> None:
    memory = FakeMemory()
    table = SlotTable(1, memory, copy_min_tokens=16)
    slot = table.slots[0]
    slot.cache = [1, 2, 3, 4, 5]
    assert table.reuse_prefix(slot, [1, 2, 3, 7]) == 3
    assert slot.cache == [1, 2, 3] and memory.calls == [("rm", 0, 3, -1)]
    assert table.reuse_prefix(slot, [1, 2, 3]) == 2, "at least one prompt token is evaluated, for its logits"


def test_a_long_prefix_in_another_slot_is_copied() -> None:
    memory = FakeMemory()
    table = SlotTable(2, memory, copy_min_tokens=16)
    shared = list(range(100, 140))
    table.slots[0].cache = [*shared, 1, 2]
    slot = table.slots[1]
    assert table.reuse_prefix(slot, [*shared, 7, 8]) == len(shared)
    assert slot.cache == shared
    # the slot is emptied first (in a unified cache the copied cells would sit beside its own), then copied, trimmed
    assert memory.calls == [("rm", 1, -1, -1), ("cp", 0, 1, -1, -1), ("rm", 1, len(shared), -1)]
    short = SlotTable(2, FakeMemory(), copy_min_tokens=16)
    short.slots[0].cache = [1, 2, 3]
    assert short.reuse_prefix(short.slots[1], [1, 2, 3, 4]) == 0, "3 tokens are cheaper to recompute than to copy"


def test_a_copy_the_memory_cannot_trim_leaves_nothing_cached() -> None:
    memory = FakeMemory(partial=False)
    table = SlotTable(2, memory, copy_min_tokens=1)
    table.slots[0].cache = [1, 2, 3, 4, 5, 6]
    slot = table.slots[1]
    slot.cache = [1, 9]
    assert table.reuse_prefix(slot, [1, 2, 3, 4, 5, 6, 7]) == 0
    assert slot.cache == []


def test_copy_threshold() -> None:
    assert copy_threshold(n_ctx=1024, kv_bytes_per_token=23_040, n_params=135_000_000) == 16
    assert copy_threshold(n_ctx=32_768, kv_bytes_per_token=131_072, n_params=135_000_000) == 160


# -- generation ------------------------------------------------------------------------------------------------
def test_eight_concurrent_greedy_streams_match_each_served_alone(engine: BatchedEngine) -> None:
    async def main() -> None:
        alone = [await answer(engine, chat(p, greedy(16))) for p in PROMPTS]
        results = await asyncio.gather(*(collect(engine, chat(p, greedy(16))) for p in PROMPTS))
        for p, expected, (pieces, finished) in zip(PROMPTS, alone, results, strict=True):
            assert "".join(pieces) == expected, f"{p!r}: concurrent answer differs from the one served alone"
            assert finished.completion_tokens <= 16
            assert finished.finish_reason == ("length" if finished.completion_tokens == 16 else "stop")
        assert len(set(alone)) == len(alone)

    asyncio.run(main())


def test_max_tokens_and_stop_strings(engine: BatchedEngine) -> None:
    async def main() -> None:
        req = GenerationRequest(model=MODEL, prompt="1, 2, 3, 4, 5,", params=greedy(12))
        text, finished = await collect(engine, req)
        full = "".join(text)
        assert finished.finish_reason == "length" and finished.completion_tokens == 12
        assert "8" in full
        stop_req = GenerationRequest(model=MODEL, prompt="1, 2, 3, 4, 5,", params=greedy(12, stop=(" 8", "zzz")))
        cut, finished = await collect(engine, stop_req)
        assert finished.finish_reason == "stop"
        assert "".join(cut) == full[: full.index(" 8")]

    asyncio.run(main())


def test_seed_reproducibility_and_penalties(engine: BatchedEngine) -> None:
    async def main() -> None:
        def sampled(seed: int) -> GenerationRequest:
            return chat("Tell me a short story about a cat.", SamplingParams(max_tokens=24, temperature=1.0, seed=seed))

        a, b = await asyncio.gather(answer(engine, sampled(1234)), answer(engine, sampled(1234)))
        assert a == b
        assert a == await answer(engine, sampled(1234))
        others = {await answer(engine, sampled(s)) for s in (1, 2, 3)}
        assert others - {a}, "different seeds all gave the same text"

        prompt = "Write the word hello ten times."
        plain = await answer(engine, chat(prompt, greedy(24)))
        for kw in ({"repeat_penalty": 1.5}, {"frequency_penalty": 1.5}, {"presence_penalty": 1.5}):
            assert await answer(engine, chat(prompt, greedy(24, **kw))) != plain, kw

    asyncio.run(main())


def test_multibyte_answer_arrives_intact(engine: BatchedEngine) -> None:
    cjk = "Chinese: 你好\nEnglish: hello\nChinese: 谢谢\nEnglish: thank you\nChinese: 早上好\nEnglish: good morning\nChinese:"
    emoji = "Fruit emoji: 🍎 apple, 🍌 banana, 🍇 grapes, 🍓 strawberry, 🍒"

    async def main() -> None:
        (cjk_pieces, _), (emoji_pieces, emoji_done) = await asyncio.gather(
            collect(engine, GenerationRequest(model=MODEL, prompt=cjk, params=greedy(12))),
            collect(engine, GenerationRequest(model=MODEL, prompt=emoji, params=greedy(12))),
        )
        for pieces in (cjk_pieces, emoji_pieces):
            assert all("\ufffd" not in p for p in pieces), pieces
        assert any(0x4E00 <= ord(c) <= 0x9FFF for c in "".join(cjk_pieces)), cjk_pieces
        emojis = [c for c in "".join(emoji_pieces) if ord(c) >= 0x1F300]
        assert emojis, emoji_pieces
        # each emoji is several byte tokens, yet arrives whole in one chunk
        assert emoji_done.completion_tokens > len(emojis) + 1
        assert all(len(p) >= 1 for p in emoji_pieces)

    asyncio.run(main())


def test_chat_turns_reuse_the_cached_prefix(engine: BatchedEngine) -> None:
    async def main() -> None:
        turn1 = (ChatMessage("user", "My name is Ada. What is the capital of Italy?"),)
        req1 = GenerationRequest(model=MODEL, messages=turn1, params=greedy(20))
        pieces, f1 = await collect(engine, req1)
        turn2 = (*turn1, ChatMessage("assistant", "".join(pieces)), ChatMessage("user", "And of Spain?"))
        req2 = GenerationRequest(model=MODEL, messages=turn2, params=greedy(20))
        _, f2 = await collect(engine, req2)
        assert f2.prompt_tokens > f1.prompt_tokens
        assert f2.timings.cache_n >= f1.prompt_tokens - 1
        assert f2.timings.prompt_n == f2.prompt_tokens - f2.timings.cache_n
        assert f2.timings.prompt_n < f2.prompt_tokens // 2

    asyncio.run(main())


SYSTEM = (
    "You are Quill, the help desk assistant of the Northfield public library. You answer in one short, friendly "
    "sentence, you never invent opening hours, and you suggest asking a librarian when you are unsure."
)


def test_a_prefix_cached_in_another_slot_is_copied_not_recomputed(default_gguf: Path) -> None:
    """Two requests sharing a system prompt arrive together: the one admitted to an empty slot copies the system
    prompt's KV from the slot that holds it, and answers exactly as when it computed everything itself."""
    spec = ModelSpec(name=MODEL, path=default_gguf, n_ctx=N_CTX, n_threads=2)
    engine = BatchedEngine([spec], slots=2, queue_size=4)

    def ask(question: str) -> GenerationRequest:
        messages = (ChatMessage("system", SYSTEM), ChatMessage("user", question))
        return GenerationRequest(model=MODEL, messages=messages, params=greedy(16))

    async def main() -> None:
        computed, f0 = await collect(engine, ask(PROMPTS[6]))  # slot 0, nothing cached: computed in full
        assert f0.timings.cache_n == 0
        await collect(engine, ask(PROMPTS[1]))  # slot 0 again (it shares the system prompt); slot 1 stays empty
        (_, f1), (copied, f2) = await asyncio.gather(collect(engine, ask(PROMPTS[2])), collect(engine, ask(PROMPTS[6])))
        assert f1.timings.cache_n >= 40, "the request admitted to slot 0 should reuse its own cached system prompt"
        assert f2.timings.cache_n >= 40, "the request admitted to the empty slot should have copied the system prompt"
        assert f2.timings.prompt_n == f2.prompt_tokens - f2.timings.cache_n
        assert "".join(copied) == "".join(computed)

    try:
        asyncio.run(main())
    finally:
        asyncio.run(engine.close())


def test_prompts_arriving_together_are_read_one_after_another(
    default_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four ~50-token prompts at once: no decode step reads more than one of them (each step starts the next prompt
    only below prompt_min_batch tokens), so the first request starts streaming after one prompt's time, not four."""
    import llama_cpp

    readers_per_step: list[int] = []
    real_decode = llama_cpp.llama_decode

    def decode(ctx, batch):  # type: ignore[no-untyped-def]
        counts: dict[int, int] = {}
        for i in range(batch.n_tokens):
            sid = batch.seq_id[i][0]
            counts[sid] = counts.get(sid, 0) + 1
        readers_per_step.append(sum(1 for c in counts.values() if c > 1))
        return real_decode(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    engine = BatchedEngine([ModelSpec(name=MODEL, path=default_gguf, n_ctx=N_CTX, n_threads=2)], slots=4)
    subjects = ["otters", "volcanoes", "lighthouses", "violins"]

    async def main() -> list[Finished]:
        requests = [
            GenerationRequest(
                model=MODEL,
                prompt=f"{s.capitalize()} are the subject of this essay. " * 5 + f"Facts about {s}:",
                params=greedy(4),
            )
            for s in subjects
        ]
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
        return [f for _, f in results]

    try:
        finished = asyncio.run(main())
    finally:
        asyncio.run(engine.close())
    assert all(f.timings.prompt_n >= 40 for f in finished)
    assert readers_per_step and max(readers_per_step) == 1, readers_per_step
    firsts = sorted(f.timings.prompt_ms for f in finished)
    assert firsts[0] < firsts[-1] / 2, f"time to first token per request (ms): {firsts}"


def test_prompt_longer_than_a_slot_is_refused_before_queueing(engine: BatchedEngine) -> None:
    async def main() -> None:
        with pytest.raises(ContextOverflowError) as e:
            await engine.submit(chat("word " * (N_CTX + 10), greedy(8)))
        assert e.value.n_ctx == N_CTX

    asyncio.run(main())


def test_cancel_frees_the_slot_and_a_full_queue_overflows(default_gguf: Path) -> None:
    spec = ModelSpec(name=MODEL, path=default_gguf, n_ctx=N_CTX, n_threads=2)
    engine = BatchedEngine([spec], slots=1, queue_size=0)

    async def main() -> None:
        long = GenerationRequest(model=MODEL, prompt="1, 2, 3, 4, 5,", params=greedy(N_CTX))
        gen = await engine.submit(long)
        first = await gen.__anext__()
        assert isinstance(first, TextDelta)
        with pytest.raises(EngineOverloadedError) as e:
            await engine.submit(chat("Hello", greedy(4)))
        assert e.value.retry_after >= 1
        await gen.aclose()
        deadline = time.monotonic() + 5
        while True:  # the slot is freed at the scheduler's next step
            try:
                nxt = await engine.submit(chat("Hello", greedy(4)))
                break
            except EngineOverloadedError:
                assert time.monotonic() < deadline, "the cancelled generation kept its slot"
                await asyncio.sleep(0.01)
        events = [ev async for ev in nxt]
        assert isinstance(events[-1], Finished) and events[-1].completion_tokens <= 4

    try:
        asyncio.run(main())
    finally:
        asyncio.run(engine.close())


def test_models_of_one_engine_decode_on_one_thread(default_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two models busy at once: every llama_decode runs on the one scheduler thread (one OpenMP team: a thread per
    model made both decode ~3x slower on 2 cores), each model answers as it does alone, and the thread ends with
    the engine."""
    import llama_cpp

    callers: set[int] = set()
    real_decode = llama_cpp.llama_decode

    def decode(ctx, batch):  # type: ignore[no-untyped-def]
        callers.add(threading.get_ident())
        return real_decode(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    specs = [ModelSpec(name=n, path=default_gguf, n_ctx=N_CTX, n_threads=2) for n in ("first", "second")]
    engine = BatchedEngine(specs, slots=2, queue_size=4)
    scheduler = engine._models["first"]._scheduler  # type: ignore[attr-defined]
    assert engine._models["second"]._scheduler is scheduler  # type: ignore[attr-defined]
    thread = scheduler._thread

    def on(model: str, prompt: str) -> GenerationRequest:
        return GenerationRequest(model=model, messages=(ChatMessage("user", prompt),), params=greedy(12))

    async def main() -> None:
        alone = [await answer(engine, on("first", p)) for p in PROMPTS[:2]]
        both = await asyncio.gather(*(answer(engine, on(m, p)) for m in ("first", "second") for p in PROMPTS[:2]))
        assert both == alone + alone

    try:
        asyncio.run(main())
    finally:
        asyncio.run(engine.close())
    assert callers == {thread.ident}, f"llama_decode ran on {len(callers)} thread(s), not just the scheduler's"
    thread.join(timeout=10)
    assert not thread.is_alive(), "the scheduler thread outlived its engine"


# -- through the real server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_slot_server(default_gguf: Path) -> Iterator[str]:
    args = ("--engine", "batched", "--set", "slots=1", "--set", "queue_size=0", "--set", f"models.0.n_ctx={N_CTX}",
            "--no-reranker", "--no-embedder")
    with running_server(*args) as url:
        yield url


def test_server_full_queue_is_503_and_disconnect_frees_the_slot(one_slot_server: str) -> None:
    url = one_slot_server
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert any(next(lines).startswith("data: {") for _ in range(4))
        busy = httpx.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=30)
        assert busy.status_code == 503
        assert busy.json()["error"]["type"] == "unavailable_error"
        assert int(busy.headers["Retry-After"]) >= 1
    # the client is gone: its slot is freed at the next step and the server keeps serving
    deadline = time.monotonic() + 10
    while True:
        r2 = httpx.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=30)
        if r2.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r2.status_code == 200, r2.text
    out = r2.json()
    assert out["usage"]["completion_tokens"] == 4
    assert out["timings"]["predicted_n"] == 4


def test_server_concurrent_streams_are_whole(one_slot_server: str) -> None:
    """With one slot and no queue, concurrent clients get either a whole answer or a clean 503."""
    url = one_slot_server
    outcomes: list[tuple[int, int]] = []
    lock = threading.Lock()

    def run() -> None:
        body = {"model": MODEL, "prompt": "The sea is", "max_tokens": 8, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
        with lock:
            outcomes.append((r.status_code, tokens))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 4
    assert {s for s, _ in outcomes} <= {200, 503} and (200, 8) in outcomes
    assert all(n == 8 for s, n in outcomes if s == 200)


def test_prompt_chunk_is_a_setting_that_reaches_the_batch(default_gguf: Path) -> None:
    from edgellm.config import ConfigError
    from edgellm.serve.engine.factory import build_engine
    from edgellm.serve.settings import load_serve_settings

    models = {"models": [{"name": "m", "path": str(default_gguf)}]}
    settings = load_serve_settings(None, {**models, "prompt_chunk": 512}, environ={})
    assert settings.prompt_chunk == 512
    assert load_serve_settings(None, models, environ={}).prompt_chunk == 256
    with pytest.raises(ConfigError, match="prompt_chunk"):
        load_serve_settings(None, {**models, "prompt_chunk": 8}, environ={})
    spec = ModelSpec(name="m", path=default_gguf, n_ctx=512, n_threads=1)
    engine = build_engine("batched", [spec], slots=2, prompt_chunk=settings.prompt_chunk)
    try:
        assert engine._batched["m"]._batch.prompt_chunk == 512  # type: ignore[attr-defined]
    finally:
        asyncio.run(engine.close())


def test_kv_unified_is_a_setting_that_reaches_the_context_and_the_draft_policy(default_gguf: Path) -> None:
    from edgellm.serve.engine.factory import build_engine
    from edgellm.serve.settings import load_serve_settings

    models = {"models": [{"name": "m", "path": str(default_gguf)}]}
    assert load_serve_settings(None, models, environ={}).kv_unified is False
    settings = load_serve_settings(None, {**models, "kv_unified": True}, environ={})
    spec = ModelSpec(name=MODEL, path=default_gguf, n_ctx=512, n_threads=1)
    engine = build_engine("batched", [spec], slots=2, kv_unified=settings.kv_unified)
    try:
        model = engine._batched[MODEL]  # type: ignore[attr-defined]
        assert model._kv_unified is True and model._speculator.split is False  # one pass for uneven drafts
        unified = asyncio.run(answer(engine, chat("What do bees make?", greedy(12))))  # type: ignore[arg-type]
    finally:
        asyncio.run(engine.close())
    split = build_engine("batched", [spec], slots=2)
    try:
        alone = asyncio.run(answer(split, chat("What do bees make?", greedy(12))))  # type: ignore[arg-type]
    finally:
        asyncio.run(split.close())
    assert unified and unified == alone  # a request alone in the batch answers the same in both layouts
