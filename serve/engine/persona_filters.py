"""What a persona does to each choice's streamed text, after the stop strings: its forbidden phrases removed
(``textfilters.PhraseFilter``), then its word cap (``textfilters.WordLimit``: the answer stops at a word boundary
and ends with ``finish_reason: "length"``). Built per slot from ``SamplingParams.forbidden_phrases`` and
``max_words``; None when the request has neither (the common case costs nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgellm.serve.engine.textfilters import PhraseFilter, WordLimit


class TextFilters:
    """The phrase filter, then the word cap, over one choice's text."""

    def __init__(self, phrases: PhraseFilter | None, words: WordLimit | None) -> None:
        self._phrases = phrases
        self._words = words
        self.capped = False

    @classmethod
    def for_params(cls, max_words: int | None, forbidden_phrases: tuple[str, ...]) -> TextFilters | None:
        if max_words is None and not forbidden_phrases:
            return None
        from edgellm.serve.engine.textfilters import PhraseFilter, WordLimit

        return cls(
            PhraseFilter(forbidden_phrases) if forbidden_phrases else None,
            WordLimit(max_words) if max_words is not None else None,
        )

    def push(self, text: str, final: bool = False) -> tuple[str, bool]:
        """The text to emit now, and whether the word cap was reached (nothing more may follow). ``final``: this
        is the answer's last text; everything held back comes out."""
        if self.capped:
            return "", True
        if self._phrases is not None:
            text = self._phrases.push(text) + (self._phrases.flush() if final else "")
        if self._words is None:
            return text, False
        out, self.capped = self._words.push(text)
        if final and not self.capped:
            out += self._words.flush()
        return out, self.capped


__all__ = ["TextFilters"]
