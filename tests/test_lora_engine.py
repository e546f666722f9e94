"""LoRA adapters applied at run time by the batched engine, on the real default GGUF with real GGUF LoRA files
(llama.cpp's converter): one copy of the base, requests on different adapter sets served concurrently, each
greedy answer equal to the same request served alone; KV never reused across adapter sets; bad ids refused."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgellm.serve.engine.base import (
    ChatMessage,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    TextDelta,
)
from edgellm.serve.engine.batched import BatchedEngine
from edgellm.serve.engine.specs import ModelSpec
from tests.near_ties import MIXED_ADAPTERS_MARGIN, same_or_near_tie
from tests.test_engine_batched import collect

MODEL = "base"
PROMPTS = ["Name three colors.", "What do bees make?", "Say hello to Ada.", "What is the capital of France?"]
# (adapter id, scale) sets: the base alone, each adapter, two together, one at half strength
SETS: list[tuple[tuple[int, float], ...]] = [(), ((0, 1.0),), ((1, 1.0),), ((2, 1.0),), ((0, 1.0), (1, 1.0)),
                                             ((2, 0.5),)]


def request(
    prompt: str, lora: tuple[tuple[int, float], ...], max_tokens: int = 24, logprobs: int | None = None
) -> GenerationRequest:
    return GenerationRequest(
        model=MODEL,
        messages=(ChatMessage("user", prompt),),
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs),
        lora=lora,
    )


@pytest.fixture(scope="module")
def engine(default_gguf: Path, smollm2_adapters: list[Path]) -> Iterator[BatchedEngine]:
    spec = ModelSpec(name=MODEL, path=default_gguf, n_ctx=512, n_threads=2, loras=tuple(smollm2_adapters))
    e = BatchedEngine([spec], slots=4, queue_size=32)
    yield e
    asyncio.run(e.close())


async def answer(engine: BatchedEngine, req: GenerationRequest) -> tuple[str, int]:
    pieces, finished = await collect(engine, req)
    return "".join(pieces), finished.timings.cache_n


async def reference(engine: BatchedEngine, req: GenerationRequest) -> tuple[str, list[tuple[int, float]]]:
    """A greedy answer and each token's (offset, top-2 margin), for ``same_or_near_tie``."""
    req = dataclasses.replace(req, params=dataclasses.replace(req.params, logprobs=2))
    text, margins = "", []
    async for event in await engine.submit(req):
        if isinstance(event, TextDelta):
            text += event.text
            for t in event.logprobs:
                margins.append((t.offset, t.top[0].logprob - t.top[1].logprob if len(t.top) > 1 else math.inf))
    return text, margins


def test_adapters_change_answers_and_mixed_batches_equal_alone(engine: BatchedEngine) -> None:
    async def run() -> None:
        cases = [(p, s) for p in PROMPTS[:2] for s in SETS]
        alone = {}
        for p, s in cases:
            alone[(p, s)] = await reference(engine, request(p, s))
        # the adapters do something: the sets' answers to one prompt differ from the base's and from each other
        for p in PROMPTS[:2]:
            texts = [alone[(p, s)][0] for s in SETS]
            assert len(set(texts)) == len(SETS), texts
        # 12 requests over 6 adapter sets at once on 4 slots: interleaved batches, each answer as when alone (or
        # parting from it only at a near tie: see tests/near_ties.py)
        together = await asyncio.gather(*(answer(engine, request(p, s)) for p, s in cases))
        flips = 0
        for (p, s), (text, _) in zip(cases, together, strict=True):
            ref, margins = alone[(p, s)]
            assert same_or_near_tie(ref, text, margins, MIXED_ADAPTERS_MARGIN), (p, s, ref, text)
            flips += text != ref
        assert flips <= len(cases) // 4  # near ties are rare; an adapter applied to the wrong tokens is not

    asyncio.run(run())


def test_kv_is_not_reused_across_adapter_sets(engine: BatchedEngine) -> None:
    async def run() -> None:
        prompt = PROMPTS[2]
        first, _ = await answer(engine, request(prompt, ((0, 1.0),)))
        again, cached_same = await answer(engine, request(prompt, ((0, 1.0),)))
        assert cached_same > 0  # same set: the whole prompt's KV is reused
        other, cached = await answer(engine, request(prompt, ((1, 1.0),)))
        # another set: at most the template's shared system prompt, from a slot that computed it with that set
        assert cached < cached_same
        fresh = {}
        for s in [((1, 1.0),), ()]:
            # 4 concurrent fillers with other prompts take every slot's KV, then the request alone reads its prompt
            await asyncio.gather(*(answer(engine, request(p, ((2, 1.0),), 4)) for p in PROMPTS))
            fresh[s] = await reference(engine, request(prompt, s))
        ref, margins = fresh[((1, 1.0),)]
        assert same_or_near_tie(ref, other, margins)
        base, cached = await answer(engine, request(prompt, ()))
        assert same_or_near_tie(fresh[()][0], base, fresh[()][1]) and base != first

    asyncio.run(run())


@pytest.mark.parametrize(
    ("lora", "message"),
    [(((3, 1.0),), "not loaded"), (((0, 1.0), (0, 0.5)), "once"), (((0, float("nan")),), "finite")],
)
def test_bad_adapter_ids_are_refused(engine: BatchedEngine, lora: tuple[tuple[int, float], ...], message: str) -> None:
    async def run() -> None:
        with pytest.raises(InvalidRequestError, match=message) as info:
            await engine.submit(request(PROMPTS[0], lora))
        assert info.value.field == "lora"

    asyncio.run(run())
