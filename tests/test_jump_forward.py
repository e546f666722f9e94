"""Jump-forward under grammars (serve/engine/speculative.py): the text a grammar forced in earlier answers is drafted
and verified in one batch; at temperature 0 the answers equal step-by-step constrained decoding (drafting off),
near ties aside (``tests/near_ties.py``), under three JSON schemas."""

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
def engines(default_gguf: Path) -> Iterator[tuple[BatchedEngine, BatchedEngine]]:
    off = make_engine(default_gguf, draft=False, slots=2)
    on = make_engine(default_gguf, draft=True, slots=2, jump_forward=True)
    yield off, on
    asyncio.run(off.close())
    asyncio.run(on.close())


def test_jump_forward_equals_step_by_step_under_three_schemas(engines: tuple[BatchedEngine, BatchedEngine]) -> None:
    off, on = engines

    async def go() -> list[Answer]:
        later: list[Answer] = []
        for schema, contents in CASES:
            for i, content in enumerate(contents):
                reference = await run(off, request(content, schema, logprobs=True))
                got = await run(on, request(content, schema, logprobs=False))
                check_same("schema: " + content[:30], reference, got)
                if reference.text == got.text and got.finished.finish_reason == "stop":
                    json.loads(got.text)
                if i:
                    later.append(got)
        return later

    later = asyncio.run(go())
    # the second answer under each schema is drafted from what the grammar forced in the first
    assert sum(a.finished.timings.draft_n_accepted for a in later) > 0
    assert on._batched[MODEL]._speculator is not None
    assert len(on._batched[MODEL]._speculator._grammar_caches) == len(CASES)
