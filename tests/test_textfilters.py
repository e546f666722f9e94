"""The streamed-answer filters (serve/engine/textfilters.py): forbidden phrases and the word cap, on random splits."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgellm.serve.engine.textfilters import (
    PhraseFilter,
    WordLimit,
    fold,
    limit_words,
    remove_phrases,
)

# Small alphabets so that phrases, their prefixes, overlaps and joins come up often.
TEXT = st.text(alphabet="abAB \n.", max_size=60)
PHRASES = st.lists(st.text(alphabet="abAB .", min_size=1, max_size=5).filter(lambda p: p.strip()), min_size=1, max_size=4)


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


def stream(f: PhraseFilter, pieces: list[str]) -> tuple[str, int]:
    """The filter's output over ``pieces`` and the most it held back after a push."""
    out, most = [], 0
    for piece in pieces:
        out.append(f.push(piece))
        most = max(most, f.held)
    out.append(f.flush())
    return "".join(out), most


# ---------------------------------------------------------------------------------------------------------------------
# PhraseFilter


@settings(max_examples=400, deadline=None)
@given(text=TEXT, phrases=PHRASES, cuts=st.lists(st.integers(0, 200), max_size=12))
def test_any_split_gives_the_one_shot_result(text: str, phrases: list[str], cuts: list[int]) -> None:
    out, _ = stream(PhraseFilter(phrases), split(text, cuts))
    assert out == remove_phrases(text, phrases)


@settings(max_examples=400, deadline=None)
@given(text=TEXT, phrases=PHRASES, cuts=st.lists(st.integers(0, 200), max_size=12))
def test_no_phrase_survives_and_little_is_held(text: str, phrases: list[str], cuts: list[int]) -> None:
    out, most = stream(PhraseFilter(phrases), split(text, cuts))
    for p in phrases:
        assert fold(p.strip()) not in fold(out)
    assert most <= max(len(p.strip()) for p in phrases) - 1


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.tuples(st.text(alphabet="cd", min_size=1, max_size=4), st.sampled_from(["xy", "XYX", "yxx"]))),
    cuts=st.lists(st.integers(0, 200), max_size=8),
)
def test_phrases_between_other_text_are_removed_and_nothing_else(
    parts: list[tuple[str, str]], cuts: list[int]
) -> None:
    """Phrases made of letters the rest of the text never uses: the output is exactly the rest."""
    text = "".join(filler + phrase for filler, phrase in parts)
    out, _ = stream(PhraseFilter(["xy", "xyx", "yxx"]), split(text, cuts))
    assert out == "".join(filler for filler, _ in parts)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("As an AI language model, I can help.", ", I can help."),  # the longer phrase wins, at the very start
        ("As an AI, I can help.", ", I can help."),
        ("I think as an AI you should rest.", "I think you should rest."),  # the double space collapses
        ("as an ai  \n\nHello", "Hello"),  # at the start: the whitespace after it goes too
        ("Done.\nAs an AI language model\nBye", "Done.\n\nBye"),  # a newline is kept after a removal mid-text
        ("Sure!As an AI language model I agree", "Sure! I agree"),  # no space before: the one after stays
        ("AS AN AI LANGUAGE MODEL", ""),  # case-insensitive
        ("as an artist", "as an artist"),  # a prefix that does not complete is sent as is
    ],
)
def test_examples(text: str, expected: str) -> None:
    assert remove_phrases(text, ["as an AI", "As an AI language model"]) == expected


def test_overlapping_phrases_and_joins() -> None:
    assert remove_phrases("abc", ["ab", "bc"]) == "c"  # leftmost first; "bc" is no longer whole
    assert remove_phrases("aabb", ["ab"]) == "a"  # the join "a"+"b" would form the phrase again
    assert remove_phrases("xaab b", ["ab"]) == "xa b"  # the space keeps the join apart


def test_a_phrase_split_token_by_token_is_removed_and_held_back_briefly() -> None:
    f = PhraseFilter(["as an AI language model", "as an AI"])
    sent = [f.push(piece) for piece in ["Sure. As", " an", " A", "I la", "nguage mo", "del is", " here"]]
    assert sent[0] == "Sure. "  # "As" could start a phrase: held
    assert "".join(sent) + f.flush() == "Sure. is here"
    assert f.held == 0


def test_without_phrases_everything_passes_at_once() -> None:
    f = PhraseFilter([])
    assert f.push("anything") == "anything" and f.held == 0 and f.flush() == ""


def test_empty_phrases_are_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        PhraseFilter(["ok", "  "])


# ---------------------------------------------------------------------------------------------------------------------
# WordLimit


def reference_limit(text: str, n: int) -> tuple[str, bool]:
    words = list(re.finditer(r"\S+", text))
    if len(words) >= n and words[n - 1].end() < len(text):
        return text[: words[n - 1].end()], True
    return text, False


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="ab \n\t", max_size=50), n=st.integers(1, 6), cuts=st.lists(st.integers(0, 200), max_size=10)
)
def test_word_limit_on_any_split(text: str, n: int, cuts: list[int]) -> None:
    limit, out, reached = WordLimit(n), [], False
    for piece in split(text, cuts):
        sent, reached = limit.push(piece)
        out.append(sent)
    out.append(limit.flush())
    assert ("".join(out), reached) == reference_limit(text, n) == limit_words(text, n)


def test_word_limit_stops_at_the_word_boundary() -> None:
    limit = WordLimit(3)
    assert limit.push("One two") == ("One two", False)
    assert limit.push(" thr") == (" thr", False)  # the third word is sent as it comes
    assert limit.push("ee fo") == ("ee", True)  # the space after it: done, no part of "four"
    assert limit.push("ur five") == ("", True)
    assert limit_words("one two three", 3) == ("one two three", False)  # ended on its own


def test_word_limit_needs_a_positive_cap() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        WordLimit(0)


# ---------------------------------------------------------------------------------------------------------------------
# Both, as the engine chains them: phrases first, then the cap on what is left


@settings(max_examples=200, deadline=None)
@given(text=TEXT, phrases=PHRASES, n=st.integers(1, 5), cuts=st.lists(st.integers(0, 200), max_size=10))
def test_phrases_then_words_on_any_split(text: str, phrases: list[str], n: int, cuts: list[int]) -> None:
    f, cap, out, reached = PhraseFilter(phrases), WordLimit(n), [], False
    for piece in split(text, cuts):
        sent, reached = cap.push(f.push(piece))
        out.append(sent)
        if reached:
            break
    if not reached:
        sent, reached = cap.push(f.flush())
        out.append(sent + cap.flush())
    assert ("".join(out), reached) == limit_words(remove_phrases(text, phrases), n)
