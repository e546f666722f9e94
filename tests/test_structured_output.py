"""Structured output: JSON Schema -> GBNF (checked against llama.cpp's grammar sampler on the default model's
vocabulary), and ``response_format`` / ``json_schema`` / ``grammar`` on a real server with the official ``openai``
client: every answer parses and validates, at temperature 0.8, over varied prompts."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from edgellm.serve.engine.base import Grammar, InvalidRequestError
from edgellm.serve.engine.grammar import GrammarCache, SchemaError, check_schema, schema_grammar

MODEL = "smollm2-135m-instruct"


# -- grammar acceptance on the real vocabulary -------------------------------------------------------------------
class GrammarProbe:
    """Whether a grammar accepts a text, token by token, with llama.cpp's own grammar sampler (no decoding)."""

    def __init__(self, gguf: Path) -> None:
        import llama_cpp as ll
        from llama_cpp._internals import LlamaModel

        from edgellm.serve.engine.sampling import Candidates, CompiledGrammars

        self.ll = ll
        self.model = LlamaModel(path_model=str(gguf), params=ll.llama_model_default_params(), verbose=False)
        self.grammars = CompiledGrammars(self.model.vocab)
        self.candidates = Candidates(self.model.n_vocab())
        self.eos = self.model.token_eos()

    def accepts(self, gbnf: str, text: str) -> bool:
        sampler = self.grammars.instantiate(Grammar(gbnf))
        try:
            for token in self.model.tokenize(text.encode(), add_bos=False, special=False):
                if not self.candidates.allows(sampler, token):
                    return False
                self.ll.llama_sampler_accept(sampler, token)
            return self.candidates.allows(sampler, self.eos)
        finally:
            self.ll.llama_sampler_free(sampler)

    def close(self) -> None:
        self.grammars.close()
        self.model.close()


@pytest.fixture(scope="module")
def probe(default_gguf: Path) -> Iterator[GrammarProbe]:
    p = GrammarProbe(default_gguf)
    yield p
    p.close()


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    street: str = Field(max_length=40)
    city: str = Field(max_length=30)
    zip: str = Field(min_length=3, max_length=10)


class Contact(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    email: str = Field(max_length=40)
    phone: str | None = Field(default=None, max_length=20)


class Person(BaseModel):
    """Nested: $defs/$ref, an optional field (anyOf with null), integer bounds, string length bounds."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=120)
    address: Address
    contact: Contact


class Review(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sentiment: Literal["positive", "negative", "neutral"]
    stars: Literal[1, 2, 3, 4, 5]
    language: Literal["en"]
    topics: list[Literal["price", "quality", "delivery", "service"]] = Field(min_length=1, max_length=3)


REVIEW_SCHEMA = {  # hand-written: enum of strings and of integers, const, an array of enums with bounds
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
        "language": {"const": "en"},
        "topics": {
            "type": "array",
            "items": {"type": "string", "enum": ["price", "quality", "delivery", "service"]},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["sentiment", "stars", "language", "topics"],
    "additionalProperties": False,
}


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(max_length=30)
    quantity: int = Field(ge=1, le=100)
    unit: Literal["kg", "g", "l", "piece"]


class ShoppingList(BaseModel):
    """An array of objects, 1 to 5 of them."""

    model_config = ConfigDict(extra="forbid", strict=True)
    items: list[Item] = Field(min_length=1, max_length=5)


def test_nested_schema_accepts_valid_documents_only(probe: GrammarProbe) -> None:
    g = schema_grammar(Person.model_json_schema())
    ok = {
        "name": "Ada",
        "age": 36,
        "address": {"street": "1 Main St", "city": "Paris", "zip": "75001"},
        "contact": {"email": "ada@example.org", "phone": None},
    }
    assert probe.accepts(g, json.dumps(ok))
    assert probe.accepts(g, json.dumps(ok, indent=2))
    assert probe.accepts(g, json.dumps({**ok, "contact": {"email": "a@b.c"}}))  # optional property left out
    for bad in (
        {**ok, "age": 121},  # maximum
        {**ok, "age": 3.5},  # integer
        {**ok, "extra": 1},  # additionalProperties: false
        {k: v for k, v in ok.items() if k != "name"},  # required
        {**ok, "address": {**ok["address"], "zip": "75"}},  # minLength
        {**ok, "contact": {"email": "x" * 41}},  # maxLength
        {**ok, "contact": {"email": "a", "phone": 5}},  # anyOf string | null
    ):
        assert not probe.accepts(g, json.dumps(bad)), bad
    assert not probe.accepts(g, json.dumps(ok)[:-1])  # incomplete
    assert not probe.accepts(g, '{"name": "a\nb"}')  # raw control characters are not JSON


def test_enum_const_and_array_bounds(probe: GrammarProbe) -> None:
    g = schema_grammar(REVIEW_SCHEMA)
    ok = {"sentiment": "neutral", "stars": 3, "language": "en", "topics": ["price", "service"]}
    assert probe.accepts(g, json.dumps(ok))
    for bad in (
        {**ok, "sentiment": "mixed"},
        {**ok, "stars": 6},
        {**ok, "language": "fr"},
        {**ok, "topics": []},
        {**ok, "topics": ["price"] * 4},
        {**ok, "topics": ["colour"]},
    ):
        assert not probe.accepts(g, json.dumps(bad)), bad


def test_recursive_refs_and_tuples(probe: GrammarProbe) -> None:
    tree = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["v"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    }
    g = schema_grammar(tree)
    assert probe.accepts(g, json.dumps({"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}, {"v": 4}]}))
    assert not probe.accepts(g, json.dumps({"v": 1, "kids": [{"w": 2}]}))
    pair = schema_grammar({"type": "array", "prefixItems": [{"type": "string"}, {"type": "boolean"}]})
    assert probe.accepts(pair, '["a", true]')
    assert not probe.accepts(pair, '["a", true, 1]')
    map_ = schema_grammar({"type": "object", "additionalProperties": {"type": "number"}})
    assert probe.accepts(map_, '{"a": 1.5, "b": -2e3}')
    assert not probe.accepts(map_, '{"a": "x"}')
    dates = schema_grammar({"type": "string", "format": "date-time"})
    assert probe.accepts(dates, '"2026-12-02T05:30:00Z"')
    assert not probe.accepts(dates, '"yesterday"')


@pytest.mark.parametrize("lo,hi", [(0, 130), (-15, 7), (3, None), (None, -5), (10, 999), (-1000, -10), (None, 42)])
def test_integer_bounds_are_exact(probe: GrammarProbe, lo: int | None, hi: int | None) -> None:
    schema: dict[str, Any] = {"type": "integer"}
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    g = schema_grammar(schema)
    for n in [*range(-1100, 1100, 7), *range(-20, 20), lo or 0, hi or 0, (lo or 0) - 1, (hi or 0) + 1]:
        expected = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert probe.accepts(g, str(n)) == expected, (n, lo, hi)
    assert not probe.accepts(g, "007")


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"type": "string", "pattern": "^a+$"}, "'pattern' is not supported"),
        ({"oneOf": [{"type": "string"}]}, "'oneOf' is not supported"),
        ({"type": "number", "minimum": 0}, "'minimum' on a number"),
        ({"type": "object", "properties": {"e": {"type": "string", "format": "email"}}}, "properties.e.format"),
        ({"type": "object", "required": ["x"]}, "required property 'x'"),
        ({"$ref": "https://example.org/s.json"}, "only local references"),
        ({"$ref": "#/$defs/missing"}, "unresolved reference"),
        ({"type": "thing"}, "unknown type"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": []}, "properties: must be an object"),
        ({"not": {"type": "null"}}, "'not' is not supported"),
        ({"type": "object", "properties": {"a": {"type": "string", "minLength": -1}}}, "properties.a.minLength"),
        (False, "allows no value"),
    ],
)
def test_unenforceable_schemas_are_refused_by_name(schema: Any, fragment: str) -> None:
    with pytest.raises(SchemaError, match=re.escape(fragment)):
        check_schema(schema)


def test_grammar_cache_is_bounded_and_keyed_by_content() -> None:
    cache = GrammarCache(size=2)
    a = cache.schema({"type": "object", "properties": {"a": {"type": "string"}}})
    assert cache.schema({"properties": {"a": {"type": "string"}}, "type": "object"}) == a  # key order ignored
    assert (cache.hits, cache.misses) == (1, 1)
    cache.schema({"type": "string"})
    cache.schema({"type": "integer"})
    assert len(cache) == 2


def test_invalid_gbnf_is_refused_before_queueing(probe: GrammarProbe) -> None:
    with pytest.raises(InvalidRequestError, match="grammar"):
        probe.grammars.check(Grammar('root ::= "unterminated'))
    with pytest.raises(InvalidRequestError, match="grammar"):
        probe.grammars.check(Grammar("root ::= undefined-rule"))
    probe.grammars.check(Grammar('root ::= "yes" | "no"'))


# -- a real server, the openai client ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(chat_server: str) -> str:
    return chat_server  # the session's shared server (tests/conftest.py)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


SUBJECTS = [
    "a retired sailor", "a young violinist", "a baker in Lyon", "an astronaut", "a beekeeper", "a chess champion",
    "a nurse in Oslo", "a train driver", "a marine biologist", "a street artist", "a farmer in Kenya", "a librarian",
    "a mountain guide", "a software tester", "a potter", "a taxi driver in Lima", "a museum curator", "a firefighter",
    "a jazz drummer", "a glassblower",
]


def _many(fn: Any, n: int) -> list[Any]:
    with ThreadPoolExecutor(4) as pool:  # the server's four slots, busy together
        return list(pool.map(fn, range(n)))


# Answers per test: 8 (two rounds of the four slots) by default, all 20 subjects under `make test-slow`.
SAMPLES = [pytest.param(8, id="8"), pytest.param(len(SUBJECTS), id=f"{len(SUBJECTS)}", marks=pytest.mark.slow)]


@pytest.mark.parametrize("n", SAMPLES)
def test_json_object_mode_always_parses(client: openai.OpenAI, n: int) -> None:
    def one(i: int) -> tuple[str, str | None]:
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Describe {SUBJECTS[i]} as a JSON object."}],
            response_format={"type": "json_object"},
            temperature=0.8,
            seed=i,
            max_tokens=100,  # a small model rambles: many answers end by the budget, closed, still JSON
        )
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    answers = _many(one, n)
    assert len(answers) == n
    for text, finish in answers:
        assert finish in ("stop", "length")
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("n", SAMPLES)
@pytest.mark.parametrize(
    ("name", "schema", "model", "prompt"),
    [
        ("person", Person.model_json_schema(), Person, "Invent a person who is {s}: name, age, address, contact."),
        ("review", REVIEW_SCHEMA, Review, "Classify a customer review written by {s}."),
        ("shopping", ShoppingList.model_json_schema(), ShoppingList, "Write the shopping list of {s}."),
    ],
)
def test_json_schemas_always_validate(
    client: openai.OpenAI, name: str, schema: dict[str, Any], model: type[BaseModel], prompt: str, n: int
) -> None:
    def one(i: int) -> tuple[str, str | None]:
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt.format(s=SUBJECTS[i])}],
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
            temperature=0.8,
            seed=100 + i,
            max_tokens=160,
        )
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    answers = _many(one, n)
    assert len(answers) == n
    for text, finish in answers:
        assert finish in ("stop", "length")
        model.model_validate_json(text, strict=True)


WIDE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        key: {"type": "string", "maxLength": 30}
        for key in (
            "full_name", "home_address", "favourite_colour", "occupation_title", "employer_name",
            "emergency_contact", "preferred_language", "dietary_requirements", "membership_number", "notes_for_staff",
        )
    },
    "required": [
        "full_name", "home_address", "favourite_colour", "occupation_title", "employer_name",
        "emergency_contact", "preferred_language", "dietary_requirements", "membership_number", "notes_for_staff",
    ],
    "additionalProperties": False,
}


def test_a_schema_with_many_required_keys_still_validates_at_a_tight_budget(client: openai.OpenAI) -> None:
    """Ten required keys still to write need more than brackets: the closing reserve covers the grammar's shortest
    completion (serve/engine/sampling.py ``JsonTracker``), so an answer cut by ``max_tokens`` still validates."""

    def one(i: int) -> tuple[str, str | None]:
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Fill in the membership form of {SUBJECTS[i]}, in detail."}],
            response_format={"type": "json_schema", "json_schema": {"name": "form", "schema": WIDE_SCHEMA}},
            temperature=0.8,
            seed=7 + i,
            max_tokens=140,
        )
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    answers = _many(one, 4)
    for text, finish in answers:
        assert finish in ("stop", "length")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise AssertionError(f"{finish}: {text!r}") from e
        assert set(doc) == set(WIDE_SCHEMA["required"]), text


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population: int = Field(ge=0)
    size: Literal["small", "medium", "large"]
    twin: Address | None


def test_openai_parse_returns_a_parsed_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe the city of Paris."}],
        response_format=City,
        temperature=0.8,
        seed=1,
        max_tokens=300,
    )
    assert isinstance(r.choices[0].message.parsed, City)


def test_streamed_schema_answer_and_completions_json_schema(client: openai.OpenAI, server: str) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Classify a review of a late delivery."}],
        response_format={"type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW_SCHEMA}},
        temperature=0.8,
        seed=5,
        max_tokens=200,
        stream=True,
    )
    Review.model_validate_json("".join(c.choices[0].delta.content or "" for c in stream if c.choices), strict=True)
    r = httpx.post(  # llama-server's own fields on /v1/completions
        f"{server}/v1/completions",
        json={"model": MODEL, "prompt": "A review:", "json_schema": REVIEW_SCHEMA, "max_tokens": 200, "seed": 2},
        timeout=120,
    )
    Review.model_validate_json(r.json()["choices"][0]["text"], strict=True)
    r = httpx.post(
        f"{server}/v1/completions",
        json={"model": MODEL, "prompt": "Sky blue? Answer:", "grammar": 'root ::= " yes" | " no"', "max_tokens": 5},
        timeout=120,
    )
    assert r.json()["choices"][0]["text"] in (" yes", " no")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}}}}},
            "'response_format.json_schema.schema.properties.code.pattern'",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "required": "name"}}}},
            "'response_format.json_schema.schema.required'",
        ),
        (
            {"json_schema": {"type": "object", "properties": {"n": {"type": "number", "maximum": 3}}}},
            "'json_schema.properties.n.maximum'",
        ),
        ({"response_format": {"type": "json_schema"}}, "'response_format.json_schema'"),
        ({"response_format": {"type": "xml"}}, "'response_format.type'"),
        ({"grammar": 'root ::= "a'}, "grammar"),
        ({"grammar": 'greeting ::= "hi"'}, "'root' rule"),
        ({"grammar": 'root ::= "a"', "json_schema": {"type": "object"}}, "not several"),
    ],
)
def test_bad_structured_requests_are_400_naming_the_field(server: str, body: dict[str, Any], fragment: str) -> None:
    r = httpx.post(
        f"{server}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert fragment in r.json()["error"]["message"], r.json()


def test_serial_engine_refuses_structured_requests_by_name(default_gguf: Path) -> None:
    """The serial engine has no per-request sampler chain: it refuses a schema, a grammar or tools (400 naming
    ``engine``) instead of answering unconstrained, and still serves a plain request."""
    import asyncio

    from edgellm.serve.engine import ChatMessage, GenerationRequest, ModelSpec, SamplingParams, SerialEngine

    hi = (ChatMessage("user", "Hi"),)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    refused = [
        GenerationRequest(model="m", messages=hi, json_schema={"type": "object"}),
        GenerationRequest(model="m", prompt="Hi", grammar='root ::= "a"'),
        GenerationRequest(model="m", messages=hi, tools=(tool,)),
    ]

    async def run() -> str:
        engine = SerialEngine([ModelSpec(name="m", path=default_gguf, n_ctx=512, n_threads=1)])
        try:
            for request in refused:
                with pytest.raises(InvalidRequestError, match="batched engine") as err:
                    await engine.submit(request)
                assert err.value.field == "engine"
            generation = await engine.submit(GenerationRequest(model="m", messages=hi, params=SamplingParams(max_tokens=4)))
            return "".join([getattr(e, "text", "") async for e in generation])
        finally:
            await engine.close()

    assert asyncio.run(run())
