"""Speculative decoding from the context in the batched engine (serve/engine/speculative.py), against the real
default GGUF at engine level: drafting on and off give the same greedy answers (except where llama.cpp's
batch-shape-dependent rounding flips a near tie: ``tests/near_ties.py``), drafts are accepted on a copy task,
seeded sampled answers do not change, and rejected draft rows leave no KV behind."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgellm.serve.engine.base import ChatMessage, Finished, GenerationRequest, SamplingParams, TextDelta
from edgellm.serve.engine.batched import BatchedEngine
from edgellm.serve.engine.specs import ModelSpec
from edgellm.serve.engine.speculative import DraftPolicy
from tests.near_ties import MARGIN, first_difference, near_tie_at

log = logging.getLogger(__name__)

MODEL = "m"
N_CTX = 1024

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling in long strips after decades of salt "
    "wind. Every evening the keeper climbed the spiral stairs, one hundred and twelve of them, to light the lamp that "
    "warned ships away from the rocks below. He had done this for thirty years, through storms that shook the glass "
    "and calm nights when the sea lay flat as a mirror. The villagers said he never missed a night, not even when his "
    "wife was ill, and that the light had saved more sailors than anyone could count. Now the lighthouse is "
    "automatic, and the keeper lives in a small cottage at the foot of the hill, where he still watches the beam "
    "sweep across the water."
)
CODE = (
    "Fix the typo in this function and return the whole function:\n\n```python\ndef total(items):\n    s = 0\n"
    "    for it in items:\n        s += it.prise * it.qty\n    return s\n```"
)
COPY = [
    ("Repeat this paragraph exactly:\n\n" + PARAGRAPH, 120),
    (CODE, 80),
    ("Rewrite this paragraph, replacing 'keeper' with 'guardian':\n\n" + PARAGRAPH, 96),
]
FREE = [("Write a short poem about autumn.", 32), ("What is the capital of France?", 24)]
MIXED = [
    ("Repeat this sentence: the quick brown fox jumps over the lazy dog near the river bank.", 32),
    ("Name three colors.", 24),
    (CODE, 40),
    ("What do bees make?", 24),
    ("Repeat exactly: " + PARAGRAPH[:240], 40),
    ("Give me a synonym for happy.", 16),
    ("Who wrote Romeo and Juliet?", 24),
    ("Translate 'thank you' into Spanish.", 16),
]

NEAR_TIES: list[tuple[str, float]] = []  # (request, margin) where drafting on and off parted, for the report


@dataclass
class Answer:
    text: str
    margins: list[tuple[int, float]]  # (character offset, top-1 minus top-2 logprob) per token, if asked
    finished: Finished


def request(content: str, max_tokens: int, logprobs: bool = False) -> GenerationRequest:
    """A greedy chat request (with two alternatives' logprobs: the reference runs, for the near-tie check)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2 if logprobs else None)
    return GenerationRequest(model=MODEL, messages=(ChatMessage("user", content),), params=params)


async def run(engine: BatchedEngine, req: GenerationRequest) -> Answer:
    gen = await engine.submit(req)
    pieces: list[str] = []
    margins: list[tuple[int, float]] = []
    finished: Finished | None = None
    async for event in gen:
        if isinstance(event, TextDelta):
            pieces.append(event.text)
            for t in event.logprobs:
                top = sorted((x.logprob for x in t.top), reverse=True)
                margins.append((t.offset, top[0] - top[1] if len(top) > 1 else float("inf")))
        else:
            finished = event
    await gen.aclose()
    assert finished is not None
    return Answer("".join(pieces), margins, finished)


def check_same(name: str, reference: Answer, got: Answer) -> None:
    """Equal, or parted first where the reference (drafting off, with logprobs) had a near tie."""
    index = first_difference(reference.text, got.text)
    if index is None:
        return
    chosen = [m for offset, m in reference.margins if offset <= index]
    margin = chosen[-1] if chosen else float("inf")
    assert near_tie_at(index, reference.margins), (
        f"{name}: drafting changed the answer at character {index} (margin {margin:.3f} >= {MARGIN}):\n"
        f"off: {reference.text!r}\non:  {got.text!r}"
    )
    NEAR_TIES.append((name, margin))
    log.warning("%s: near tie at character %d (margin %.4f)", name, index, margin)


def make_engine(
    path: Path,
    draft: bool,
    slots: int = 4,
    jump_forward: bool = True,
    shared: bool = False,
    learned: bool = False,
    cost_aware: bool = False,
    spellings: bool = True,
) -> BatchedEngine:
    """Drafting on means drafting whatever matches (``cost_aware=False``): these tests are about verification, and
    a cost-aware policy would draft little on a busy box."""
    spec = ModelSpec(name=MODEL, path=path, n_ctx=N_CTX, n_threads=2)
    policy = (
        DraftPolicy(
            jump_forward=jump_forward,
            cost_aware=cost_aware,
            shared=shared,
            jump_forward_learned=learned,
            jump_forward_spellings=spellings,
        )
        if draft
        else None
    )
    return BatchedEngine([spec], slots=slots, queue_size=16, draft=policy)


@pytest.fixture(scope="module")
def off(default_gguf: Path) -> Iterator[BatchedEngine]:
    e = make_engine(default_gguf, draft=False)
    yield e
    asyncio.run(e.close())


@pytest.fixture(scope="module")
def on(default_gguf: Path) -> Iterator[BatchedEngine]:
    e = make_engine(default_gguf, draft=True)
    yield e
    asyncio.run(e.close())


def test_greedy_answers_are_the_same_with_drafts_and_copies_are_drafted(off: BatchedEngine, on: BatchedEngine) -> None:
    async def go() -> None:
        accepted = 0
        for content, max_tokens in COPY + FREE:
            reference = await run(off, request(content, max_tokens, logprobs=True))
            got = await run(on, request(content, max_tokens))
            check_same(content[:40], reference, got)
            assert reference.finished.timings.draft_n == 0
            assert got.finished.completion_tokens <= max_tokens
            accepted += got.finished.timings.draft_n_accepted
            if content == COPY[0][0]:
                t = got.finished.timings
                assert t.draft_n_accepted > 0 and t.draft_n >= t.draft_n_accepted, t
                assert "draft_n" in t.as_dict()
        assert accepted > 0

    asyncio.run(go())


def test_eight_concurrent_mixed_requests_match_drafting_off(off: BatchedEngine, on: BatchedEngine) -> None:
    async def many(engine: BatchedEngine, logprobs: bool) -> list[Answer]:
        return list(await asyncio.gather(*(run(engine, request(c, n, logprobs)) for c, n in MIXED)))

    async def go() -> None:
        references = await many(off, True)
        got = await many(on, False)
        for (content, _), r, g in zip(MIXED, references, got, strict=True):
            check_same("concurrent: " + content[:30], r, g)
        assert sum(g.finished.timings.draft_n_accepted for g in got) > 0

    asyncio.run(go())


def test_the_shared_cache_drafts_an_answer_given_before_and_the_answer_stays_the_same(
    default_gguf: Path, off: BatchedEngine
) -> None:
    """``draft.shared``: a finished request's prompt and answer go into the model's shared n-gram cache, so the same
    question again (a regenerated answer, another client) drafts most of its answer, verified as any draft."""
    content, max_tokens = "Explain how a bicycle's gears help a rider climb a steep hill.", 64
    engine = make_engine(default_gguf, draft=True, slots=1, shared=True)

    async def go() -> None:
        reference = await run(off, request(content, max_tokens, logprobs=True))
        first = await run(engine, request(content, max_tokens))
        again = await run(engine, request(content, max_tokens))
        other = await run(engine, request("Name three colors.", 24))  # not in the cache: little to draft
        for name, got in (("shared, first", first), ("shared, again", again)):
            check_same(name, reference, got)
        t1, t2 = first.finished.timings, again.finished.timings
        log.info("shared cache: first %s, again %s", t1, t2)
        assert t2.draft_n_accepted >= again.finished.completion_tokens // 2, (t1, t2)
        assert t2.draft_n_accepted >= t1.draft_n_accepted + again.finished.completion_tokens // 4, (t1, t2)
        assert other.finished.timings.draft_n_accepted < other.finished.completion_tokens // 2

    try:
        asyncio.run(go())
    finally:
        asyncio.run(engine.close())


def test_stop_strings_and_max_tokens_end_a_drafted_answer_where_they_would(
    off: BatchedEngine, on: BatchedEngine
) -> None:
    """A stop string or the token budget inside an accepted draft ends the answer there, as step by step."""

    def req(max_tokens: int, stop: tuple[str, ...]) -> GenerationRequest:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop, logprobs=2)
        return GenerationRequest(model=MODEL, messages=(ChatMessage("user", COPY[0][0]),), params=params)

    async def go() -> None:
        for max_tokens, stop in ((37, ()), (120, ("salt",)), (120, ("twelve of",))):
            reference = await run(off, req(max_tokens, stop))
            got = await run(on, req(max_tokens, stop))
            check_same(f"stop {stop} max {max_tokens}", reference, got)
            assert got.finished.finish_reason == reference.finished.finish_reason
            assert got.finished.completion_tokens == reference.finished.completion_tokens

    asyncio.run(go())


def test_seeded_sampled_answers_do_not_change(off: BatchedEngine, on: BatchedEngine) -> None:
    """The draft is a point mass accepted exactly when the request's sampler drew it: same distribution, and with a
    seed (one random number per emitted token, in order) the very same tokens."""

    def req(seed: int) -> GenerationRequest:
        params = SamplingParams(max_tokens=48, temperature=0.7, top_k=40, seed=seed)
        return GenerationRequest(model=MODEL, messages=(ChatMessage("user", COPY[0][0]),), params=params)

    async def go() -> None:
        accepted = 0
        for seed in (1, 2, 3):
            a = await run(off, req(seed))
            b = await run(on, req(seed))
            assert a.text == b.text, (seed, a.text, b.text)
            accepted += b.finished.timings.draft_n_accepted
        assert accepted > 0

    asyncio.run(go())


def test_rejected_drafts_leave_no_kv_behind(default_gguf: Path) -> None:
    """After a rewrite with edits (drafts partly rejected), the slot's KV ends exactly at its cached tokens, and the
    next turn (reusing that KV) answers as the same request on a fresh engine."""
    import llama_cpp

    first = ("Rewrite this paragraph, replacing 'keeper' with 'guardian':\n\n" + PARAGRAPH, 96)

    async def go() -> None:
        used = make_engine(default_gguf, draft=True, slots=1)
        fresh = make_engine(default_gguf, draft=True, slots=1)
        try:
            a = await run(used, request(*first))
            assert a.finished.timings.draft_n > a.finished.timings.draft_n_accepted > 0
            model = used._batched[MODEL]
            slot = model._slots.slots[0]
            mem = llama_cpp.llama_get_memory(model.llama.ctx)
            for _ in range(200):  # the answer is out before the scheduler thread settles the last step's rows
                if not model._slots.active and llama_cpp.llama_memory_seq_pos_max(mem, 0) == len(slot.cache) - 1:
                    break
                await asyncio.sleep(0.01)
            assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == len(slot.cache) - 1
            follow = GenerationRequest(
                model=MODEL,
                messages=(
                    ChatMessage("user", first[0]),
                    ChatMessage("assistant", a.text),
                    ChatMessage("user", "Now repeat only its first sentence."),
                ),
                params=SamplingParams(max_tokens=48, temperature=0.0, logprobs=2),
            )
            again = await run(used, follow)
            assert again.finished.timings.cache_n > 0  # it did reuse the slot's KV
            reference = await run(fresh, follow)
            check_same("next turn after rollback", reference, again)
        finally:
            await used.close()
            await fresh.close()

    asyncio.run(go())


def test_near_tie_report() -> None:
    """How often drafting on and off parted (at near ties only: the tests above check that)."""
    log.warning("near ties where drafting on/off parted: %d %s", len(NEAR_TIES), NEAR_TIES)
    assert len(NEAR_TIES) <= 3, NEAR_TIES
