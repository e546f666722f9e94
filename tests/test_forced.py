"""The GBNF recognizer behind jump-forward (serve/engine/forced.py): parsing, following text, the forced text ahead
and its whitespace style, and the per-request drafter over token pieces. Pure Python; the engine-level test (real
model, outputs equal step-by-step constrained decoding) is tests/test_jump_forward.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgellm.serve.engine.forced import (
    DraftVocab,
    ForcedDrafter,
    GbnfError,
    ModelHabits,
    Recognizer,
    parse_gbnf,
)
from edgellm.serve.engine.grammar import schema_grammar
from edgellm.serve.engine.tools import NO_CALL_GRAMMAR

ORDER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "maxLength": 60},
        "items": {
            "type": "array",
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {"product": {"type": "string"}, "quantity": {"type": "integer"}},
                "required": ["product", "quantity"],
            },
        },
        "day": {"enum": ["Monday", "Tuesday", "Friday"]},
        "paid": {"type": "boolean"},
    },
    "required": ["customer", "items", "day", "paid"],
}


def follow(rec: Recognizer, text: str) -> list[str]:
    """Feed ``text`` character by character, taking the forced text wherever it matches; returns the forced runs
    taken (what jump-forward would have drafted and had accepted)."""
    taken: list[str] = []
    pos = 0
    while pos < len(text):
        forced, _ = rec.forced()
        if forced and text.startswith(forced, pos):
            assert rec.advance(forced)
            taken.append(forced)
            pos += len(forced)
            continue
        assert rec.advance(text[pos]), f"the grammar refused {text[pos]!r} at {pos}"
        pos += 1
    return taken


def test_compact_json_keys_and_punctuation_are_forced() -> None:
    rec = Recognizer(parse_gbnf(schema_grammar(ORDER)))
    text = json.dumps({"customer": "Ann", "items": [{"product": "tea", "quantity": 2}], "day": "Friday", "paid": True})
    taken = follow(rec, text)
    assert taken[0] == '{"customer": "'
    assert ', "items": [' in taken  # after the value's closing quote, which the model wrote
    assert '"product": "' in taken
    assert ', "quantity": ' in taken  # then a digit or "-": a choice
    assert 'riday", "paid": ' in taken  # the enum: after "F" only "Friday" remains
    assert "rue}" in taken  # after "t" only "true"
    assert rec.forced() == ("", True)  # complete: only the end of generation may follow
    assert sum(map(len, taken)) > len(text) / 2


def test_pretty_printed_layout_is_learned_and_reindented_by_depth() -> None:
    rec = Recognizer(parse_gbnf(schema_grammar(ORDER)))
    doc = {"customer": "Ann", "items": [{"product": "tea", "quantity": 2}, {"product": "jam", "quantity": 1}],
           "day": "Monday", "paid": False}
    text = json.dumps(doc, indent=2, separators=(",", " : "))
    taken = follow(rec, text)
    # the second item comes with the indentation and " : " seen in the first
    assert '\n    {\n      "product" : "' in taken
    assert rec.indent == 2
    # the first line at depth 2 was inferred from the indent seen at depth 1
    rec2 = Recognizer(parse_gbnf(schema_grammar(ORDER)))
    rec2.advance('{\n  "customer" : "A",\n  "items" : [\n    {')
    forced, _ = rec2.forced()
    assert forced == '\n      "product" : "'


def test_default_style_is_one_space_after_colon_and_comma() -> None:
    rec = Recognizer(parse_gbnf(schema_grammar(ORDER)))
    assert rec.forced() == ('{"customer": "', False)


def test_text_outside_the_grammar_kills_the_recognizer() -> None:
    rec = Recognizer(parse_gbnf(schema_grammar(ORDER)))
    assert rec.advance('{"cust')
    assert not rec.advance("X")
    assert not rec.alive
    assert rec.forced() == ("", False)


def test_gbnf_syntax_is_parsed_as_llama_cpp_reads_it() -> None:
    grammar = r"""
# a comment
root ::= greeting ( " " name )+ [.!]? tail
greeting ::= "Hello" | "Hi"   # trailing comment
name ::= [A-Z] [a-z]{2,4}
tail ::= "\x21"{0,2} "\u00e9" [^\n"]* "\n"
"""
    g = parse_gbnf(grammar)
    rec = Recognizer(g)
    assert rec.advance("Hello Anna Bert!!é")
    assert rec.advance('x"'[:1])
    assert rec.advance("\n")
    assert rec.forced() == ("", True)
    rec = Recognizer(g)
    assert rec.forced() == ("H", False)  # then "ello" or "i"
    rec.advance("He")
    assert rec.forced() == ("llo ", False)  # then a space (the only way on), then a capital


def test_what_the_recognizer_does_not_follow_is_an_error() -> None:
    with pytest.raises(GbnfError):
        parse_gbnf('root ::= <[1000]> "x"')
    with pytest.raises(GbnfError):
        parse_gbnf('root ::= undefined-rule "x"')
    with pytest.raises(GbnfError):
        parse_gbnf('start ::= "x"')
    with pytest.raises(GbnfError):
        parse_gbnf('root ::= "unterminated')
    left = Recognizer(parse_gbnf('root ::= root "x" | "y"'))  # left recursion: followed no further, no crash
    assert not left.alive


def test_the_engines_own_grammars_parse() -> None:
    parse_gbnf(NO_CALL_GRAMMAR)
    parse_gbnf(schema_grammar({"type": "object"}))  # JSON mode: any object
    parse_gbnf(schema_grammar({"type": "array", "items": {"$ref": "#"}}))  # recursive
    rec = Recognizer(parse_gbnf(schema_grammar({"type": "object"})))
    assert rec.advance('{"a": [1, {"b": null}], "c": "d"}')
    assert rec.forced() == ("", True)


class FakeVocab:
    """Tokens are single characters, plus two multi-byte pieces of one UTF-8 character and an end token."""

    EOT = 1000

    def __init__(self) -> None:
        self.vocab = DraftVocab(piece=self.piece, encode=self.encode, eog=frozenset({self.EOT}), eot=self.EOT)

    @staticmethod
    def piece(t: int) -> bytes:
        if t == FakeVocab.EOT:
            return b""
        if t >= 2000:  # the two halves of "é"
            return "é".encode()[t - 2000 : t - 1999]
        return chr(t).encode()

    @staticmethod
    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]


def test_forced_drafter_drafts_tokens_waits_mid_character_and_ends() -> None:
    fake = FakeVocab()
    habits = ModelHabits(end=FakeVocab.EOT)
    drafter = ForcedDrafter(parse_gbnf(schema_grammar({"type": "object", "properties": {"n": {"type": "string"}},
                                                       "required": ["n"]})), fake.vocab, habits)
    assert drafter.draft(4) == [ord(c) for c in '{"n"']
    drafter.push(fake.encode('{"n": "'))
    assert drafter.draft(8) == []  # inside a string: nothing is forced
    drafter.push([2000])  # half of "é"
    assert drafter.draft(8) == []  # mid-character: wait
    drafter.push([2001])
    drafter.push([ord('"')])
    assert drafter.draft(8) == [ord("}"), FakeVocab.EOT]  # the end of the object, then the end of generation
    drafter.push([ord("}"), FakeVocab.EOT])
    drafter.finish()
    assert habits.style  # the layout seen is the model's habit for the next request
    nxt = ForcedDrafter(parse_gbnf(schema_grammar({"type": "object"})), fake.vocab, habits)
    assert nxt.rec.style == habits.style


class SpellVocab(FakeVocab):
    """FakeVocab plus multi-character tokens the tokenizer never produces (``encode`` is per character), as a model
    under a grammar writes keys in other pieces than the tokenizer's."""

    WORDS = {3000: "cus", 3001: "tomer", 3002: '":', 3003: "x", 3004: "ri"}

    def __init__(self) -> None:
        self.vocab = DraftVocab(piece=self.piece, encode=self.encode, eog=frozenset({self.EOT}), eot=self.EOT)

    @staticmethod
    def piece(t: int) -> bytes:
        word = SpellVocab.WORDS.get(t)
        return word.encode() if word is not None else FakeVocab.piece(t)


def test_forced_text_is_drafted_in_the_tokens_the_model_wrote_it_in() -> None:
    spell = SpellVocab()
    grammar = parse_gbnf('root ::= "{\\"customer\\":" [a-z]+ "}"')
    habits = ModelHabits(end=FakeVocab.EOT)
    first = ForcedDrafter(grammar, spell.vocab, habits)
    assert first.draft(16) == spell.encode('{"customer":')  # nothing seen yet: the tokenizer's tokens
    first.push([ord("{"), ord('"'), 3000, 3001, 3002, 3003, ord("}"), FakeVocab.EOT])
    assert habits.spellings[b'{"customer":'] == (ord("{"), ord('"'), 3000, 3001, 3002)
    again = ForcedDrafter(grammar, spell.vocab, habits)
    assert again.draft(16) == [ord("{"), ord('"'), 3000, 3001, 3002]  # the model's own spelling, next time
    again.push([ord("{"), ord('"'), 3000])  # part of it accepted: the spelling goes on
    assert again.draft(16) == [3001, 3002]
    other = ForcedDrafter(grammar, spell.vocab, habits)
    assert other.draft(16) == [ord("{"), ord('"'), 3000, 3001, 3002]
    other.push([ord("{"), ord('"'), ord("c")])  # the model spelled it otherwise this time: the tokenizer's tokens
    assert other.draft(16) == spell.encode('ustomer":')
    off = ForcedDrafter(grammar, spell.vocab, ModelHabits(end=FakeVocab.EOT, spell=False))
    off.push([ord("{"), ord('"'), 3000, 3001, 3002, 3003, ord("}"), FakeVocab.EOT])
    assert not off.habits.spellings


def test_a_value_the_model_began_is_never_remembered() -> None:
    spell = SpellVocab()
    schema = {"type": "object", "properties": {"day": {"enum": ["Monday", "Friday"]}}, "required": ["day"]}
    habits = ModelHabits(end=FakeVocab.EOT)
    drafter = ForcedDrafter(parse_gbnf(schema_grammar(schema)), spell.vocab, habits)
    assert drafter.draft(16) == spell.encode('{"day": "')
    drafter.push(spell.encode('{"day": "F'))
    assert drafter.draft(16)[:2] == [ord("r"), ord("i")]  # the rest of "Friday" is forced ...
    drafter.push([3004] + spell.encode('day"}') + [FakeVocab.EOT])
    assert all(b"riday" not in text for text in habits.spellings)  # ... but is an answer's text: not kept
    assert b'{"day": "' in habits.spellings  # the key is the schema's


def test_forced_drafter_stops_when_the_output_leaves_its_grammar() -> None:
    fake = FakeVocab()
    drafter = ForcedDrafter(parse_gbnf('root ::= "ab" [cd] "ef"'), fake.vocab)
    assert drafter.draft(8) == [ord("a"), ord("b")]
    drafter.push([ord("a"), ord("b"), ord("x")])  # e.g. a grammar llama.cpp reads differently
    assert drafter.draft(8) == []


def test_shortest_completion_counts_the_required_keys_still_to_write() -> None:
    rec = Recognizer(parse_gbnf(schema_grammar(ORDER)))
    assert rec.shortest() == len('{"customer":"","items":[],"day":"Monday","paid":true}')
    rec.advance('{"customer": "Ann", "items": [{"product": "t')
    assert rec.shortest() == len('","quantity":0}],"day":"Monday","paid":true}')
    rec.advance('ea", "quantity": 2}], "day": "Friday", "paid": false}')
    assert rec.shortest() == 0
    assert rec.forced(compact=True) == ("", True)
    assert Recognizer(parse_gbnf(schema_grammar(ORDER))).forced(compact=True) == ('{"customer":"', False)


def test_the_closing_reserve_covers_the_shortest_completion() -> None:
    from edgellm.serve.engine.sampling import JsonTracker

    shape = parse_gbnf(schema_grammar(ORDER))
    plain, shaped = JsonTracker(), JsonTracker(shape, encode=FakeVocab.encode)
    for t in (plain, shaped):
        t.push(b'{"customer": "A')
    assert plain.reserve() == 10 + 3  # brackets only
    need = len('","items":[],"day":"Monday","paid":true}')
    assert shaped.reserve() == -(-need // 2) + 4  # two characters a token, and a margin
    assert shaped.forced_token() is None  # inside a string: nothing is forced
    shaped.push(b'"')
    assert shaped.forced_token() == ord(",")  # the compact way on: ',"items":[' (one character a token here)


def test_free_text_gets_no_whitespace_guesses() -> None:
    rec = Recognizer(parse_gbnf(NO_CALL_GRAMMAR))
    assert rec.advance("Hello there, my friend")
    assert rec.forced() == ("", False)
