"""Jump-forward under grammars (serve/engine/speculative.py, forced.py): the text a request's grammar forces next
(and, with ``jump_forward_learned``, what it forced in earlier answers) is drafted and verified in one batch; at
temperature 0 the answers equal step-by-step constrained decoding (drafting off), near ties aside
(``tests/near_ties.py``), under three JSON schemas and JSON mode."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgellm.serve.engine.base import ChatMessage, GenerationRequest, SamplingParams
from edgellm.serve.engine.batched import BatchedEngine
from tests.test_speculative import MODEL, Answer, check_same, make_engine, run

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
}
ORDER = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"product": {"type": "string"}, "quantity": {"type": "integer"}},
                "required": ["product", "quantity"],
            },
        },
        "express": {"type": "boolean"},
    },
    "required": ["items", "express"],
}
EVENT = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "date": {"type": "object", "properties": {"day": {"type": "integer"}, "month": {"type": "string"}},
                 "required": ["day", "month"]},
        "status": {"enum": ["planned", "cancelled", "done"]},
    },
    "required": ["title", "date", "status"],
}
CASES: list[tuple[dict[str, Any], list[str]]] = [
    (PERSON, ["Extract as JSON: Maria Lopez, 34, lives in Madrid.", "Extract as JSON: John Smith is 51, from Boston."]),
    (ORDER, ["Order as JSON: two apples and three pears, express delivery.", "Order as JSON: one lamp, not express."]),
    (EVENT, ["Event as JSON: the village fair on 12 June is planned.", "Event as JSON: the concert on 3 May was cancelled."]),
]


def request(content: str, schema: dict[str, Any], logprobs: bool) -> GenerationRequest:
    params = SamplingParams(max_tokens=80, temperature=0.0, logprobs=2 if logprobs else None)
    return GenerationRequest(model=MODEL, messages=(ChatMessage("user", content),), params=params, json_schema=schema)


@pytest.fixture(scope="module")
def engines(default_gguf: Path) -> Iterator[tuple[BatchedEngine, BatchedEngine, BatchedEngine]]:
    off = make_engine(default_gguf, draft=False, slots=2)
    forced = make_engine(default_gguf, draft=True, slots=2)  # jump-forward from the grammar: the default
    learned = make_engine(default_gguf, draft=True, slots=2, jump_forward=False, learned=True)
    yield off, forced, learned
    for e in (off, forced, learned):
        asyncio.run(e.close())


def compare(off: BatchedEngine, on: BatchedEngine, cases: list[tuple[dict[str, Any], list[str]]]) -> list[Answer]:
    """Each request on both engines: the answers must be the same (near ties aside) and parse."""

    async def go() -> list[Answer]:
        answers: list[Answer] = []
        for schema, contents in cases:
            for content in contents:
                reference = await run(off, request(content, schema, logprobs=True))
                got = await run(on, request(content, schema, logprobs=False))
                check_same("schema: " + content[:30], reference, got)
                if reference.text == got.text and got.finished.finish_reason == "stop":
                    json.loads(got.text)
                answers.append(got)
        return answers

    return asyncio.run(go())


def test_jump_forward_equals_step_by_step_under_three_schemas(
    engines: tuple[BatchedEngine, BatchedEngine, BatchedEngine],
) -> None:
    off, forced, _ = engines
    answers = compare(off, forced, CASES)
    # the first answer under each schema already drafts what its grammar forces (nothing learned yet)
    firsts = answers[:: len(CASES[0][1])]
    assert all(a.finished.timings.draft_n_accepted > 0 for a in firsts), [a.finished.timings for a in firsts]
    accepted = sum(a.finished.timings.draft_n_accepted for a in answers)
    generated = sum(a.finished.timings.predicted_n for a in answers)
    assert accepted > generated / 5, (accepted, generated)  # keys, punctuation, layout: a good part of the text


def test_jump_forward_in_json_mode_and_under_a_requests_own_gbnf(
    engines: tuple[BatchedEngine, BatchedEngine, BatchedEngine],
) -> None:
    off, forced, _ = engines
    compare(off, forced, [({"type": "object"}, ["Describe a cat as JSON with its name and age."])])

    async def go() -> tuple[Answer, Answer]:
        gbnf = 'root ::= ("yes" | "no") ", because the sky is " [a-z ]{1,40} "."'
        params = SamplingParams(max_tokens=40, temperature=0.0)
        req = GenerationRequest(
            model=MODEL, messages=(ChatMessage("user", "Is the sky blue?"),), params=params, grammar=gbnf
        )
        return await run(off, req), await run(forced, req)

    reference, got = asyncio.run(go())
    assert got.text == reference.text
    assert got.text.startswith(("yes, because the sky is ", "no, because the sky is "))
    assert got.finished.timings.draft_n_accepted >= 3  # ", because the sky is " came in drafts


def test_learned_jump_forward_equals_step_by_step_and_learns_per_schema(
    engines: tuple[BatchedEngine, BatchedEngine, BatchedEngine],
) -> None:
    off, _, learned = engines
    answers = compare(off, learned, CASES)
    later = [a for i, a in enumerate(answers) if i % len(CASES[0][1])]
    # the second answer under each schema is drafted from what the grammar forced in the first
    assert sum(a.finished.timings.draft_n_accepted for a in later) > 0
    assert learned._batched[MODEL]._speculator is not None
    assert len(learned._batched[MODEL]._speculator._grammar_caches) == len(CASES)


def test_forced_text_is_drafted_in_the_models_own_tokens_once_seen(
    engines: tuple[BatchedEngine, BatchedEngine, BatchedEngine], default_gguf: Path
) -> None:
    """Two engines answer the same requests twice, one remembering how the model spelled forced text
    (``jump_forward_spellings``, the default) and one drafting it in the tokenizer's tokens: the second time the
    first has more drafted tokens accepted, and both still answer as step-by-step decoding does."""
    off = engines[0]
    firsts = [(schema, contents[:1]) for schema, contents in CASES]
    spelled = make_engine(default_gguf, draft=True, slots=1)
    tokenizer = make_engine(default_gguf, draft=True, slots=1, spellings=False)
    try:
        compare(off, spelled, firsts)  # the first time: both learn the layout, one the spellings
        compare(off, tokenizer, firsts)
        again = [sum(a.finished.timings.draft_n_accepted for a in compare(off, e, firsts)) for e in (spelled, tokenizer)]
        assert again[0] > again[1], again
        speculator = spelled._batched[MODEL]._speculator
        assert speculator is not None and speculator.habits.spellings
        assert all(b"Maria" not in text and b"Lopez" not in text for text in speculator.habits.spellings)
    finally:
        for e in (spelled, tokenizer):
            asyncio.run(e.close())
