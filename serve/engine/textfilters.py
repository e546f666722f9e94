"""Incremental filters on a streamed answer, applied per choice after stop strings: a persona's forbidden phrases
(`PhraseFilter`) and its word cap (`WordLimit`), phrases first, then the cap on what is left (the batched engine
composes them per slot: ``persona_filters.TextFilters``). Pure Python: no llama.cpp, no I/O.

Each filter takes the answer's text as it arrives (``push``) and returns what is safe to send now; ``flush`` at the
end returns what it still held. Whatever the split of the text into pushes, the concatenated output is the same as
one push of the whole text followed by ``flush`` (the split only changes *when* text goes out, never *what*)::

    phrases, cap = PhraseFilter(["as an AI language model"]), WordLimit(40)
    for piece in pieces:
        text, done = cap.push(phrases.push(piece))   # send `text`; when `done`: stop, finish_reason "length"
        if done:
            break
    else:
        text, done = cap.push(phrases.flush())        # the answer ended on its own: what was held back
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["PhraseFilter", "WordLimit", "fold", "limit_words", "remove_phrases"]

_HSPACE = " \t"


def fold(text: str) -> str:
    """Lower case, one character for one (a character whose lower case is longer, such as ``İ``, is kept), so that
    positions in the folded text are positions in the original."""
    return "".join(low if len(low := c.lower()) == 1 else c for c in text)


class PhraseFilter:
    """Removes every occurrence of ``phrases`` from a streamed text, also when a phrase arrives split across pushes.

    Matching is case-insensitive (`fold`: per-character lower case) on the exact characters otherwise (whitespace
    and punctuation inside a phrase must match as written; the phrases are stripped of outer whitespace).

    The rules, which the output obeys whatever the split into pushes:

    - leftmost-longest: where several phrases match from one position, the longest is removed (``"as an AI"`` and
      ``"as an AI language model"``: the whole longer phrase goes); overlapping occurrences are removed left to
      right, the later one only if it is still whole after the first is gone.
    - no phrase survives in the output, not even one that a removal would join together (``"ab"`` in ``"aabb"``):
      text already sent cannot be taken back, so the part of such an occurrence that was not sent yet is removed.
    - whitespace: a removal at the very start of the answer also drops the whitespace after it; a removal that
      follows whitespace drops the spaces and tabs after it (``"I think as an AI you"`` -> ``"I think you"``).
      Nothing else is touched (punctuation beside a phrase stays).

    Held back: only the shortest end of the text that could still be the start of a phrase, at most the longest
    phrase's length minus one characters (``held`` tells how many)."""

    def __init__(self, phrases: Iterable[str]) -> None:
        cleaned = {fold(p.strip()) for p in phrases}
        if "" in cleaned:
            raise ValueError("forbidden_phrases: empty or whitespace-only phrases cannot be removed")
        self._phrases = tuple(sorted(cleaned, key=lambda p: (-len(p), p)))  # longest first
        self._max = max((len(p) for p in self._phrases), default=0)
        self._buf = ""  # received, not yet sent
        self._tail = ""  # the last (longest - 1) characters sent: a phrase may start in them
        self._last = ""  # the last character sent ("" before any)
        self._trim = ""  # whitespace characters dropped from what arrives next (after a removal)

    @property
    def held(self) -> int:
        """Characters received and not yet returned."""
        return len(self._buf)

    def push(self, text: str) -> str:
        """Add ``text``; return the text that no continuation can change."""
        if not self._phrases:
            return text
        self._buf += text
        return self._scan(final=False)

    def flush(self) -> str:
        """The end of the answer: return everything still held (minus the phrases it completes)."""
        if not self._phrases:
            return ""
        out = self._scan(final=True)
        self._buf = ""
        return out

    # -----------------------------------------------------------------------------------------------------------

    def _scan(self, final: bool) -> str:
        out: list[str] = []
        while True:
            self._apply_trim()
            text = self._tail + self._buf
            folded, start = fold(text), len(self._tail)
            cut = self._next_cut(folded, start, final)
            if cut is None:  # nothing can start a phrase: all of it goes
                out.append(self._send(len(self._buf)))
                return "".join(out)
            begin, end = cut
            if end < 0:  # a phrase may start at `begin`: hold from there
                out.append(self._send(max(begin, start) - start))
                return "".join(out)
            after = self._buf[end - start :]
            out.append(self._send(max(begin, start) - start))  # the text before the phrase
            self._buf = after
            self._trim = " \t\n\r\f\v" if not self._last else (_HSPACE if self._last.isspace() else "")

    def _next_cut(self, folded: str, start: int, final: bool) -> tuple[int, int] | None:
        """The leftmost position from which a phrase ends in the unsent text: ``(begin, end)`` of the longest phrase
        complete there, or ``(begin, -1)`` when a longer phrase could still complete (more text decides)."""
        for i in range(max(0, start - self._max + 1), len(folded)):
            rest = folded[i:]
            if not final and any(len(p) > len(rest) and p.startswith(rest) for p in self._phrases):
                return i, -1
            for p in self._phrases:  # longest first
                if i + len(p) > start and rest.startswith(p):
                    return i, i + len(p)
        return None

    def _send(self, n: int) -> str:
        """Move the first ``n`` unsent characters to the sent side and return them."""
        sent, self._buf = self._buf[:n], self._buf[n:]
        if sent:
            self._tail = (self._tail + sent)[-(self._max - 1) :] if self._max > 1 else ""
            self._last = sent[-1]
        return sent

    def _apply_trim(self) -> None:
        if not self._trim:
            return
        kept = self._buf.lstrip(self._trim)
        if kept:
            self._trim = ""
        self._buf = kept


def remove_phrases(text: str, phrases: Iterable[str]) -> str:
    """``text`` without ``phrases``, as `PhraseFilter` streams it."""
    f = PhraseFilter(phrases)
    return f.push(text) + f.flush()


class WordLimit:
    """Cuts a streamed text after ``max_words`` words (runs of non-whitespace): the output ends with the last
    allowed word, without the whitespace after it or any part of the next word.

    Nothing is held back: words before the cap and the cap's own word go out as they arrive (they belong to the
    output whatever follows); the whitespace after the last allowed word is what tells the cap is reached (a word
    is complete when whitespace follows it or the text ends). ``push`` returns ``(text, reached)``: once
    ``reached`` is True the answer is complete and later pushes return ``("", True)``."""

    def __init__(self, max_words: int) -> None:
        if max_words < 1:
            raise ValueError(f"max_words must be at least 1, got {max_words}")
        self.max_words = max_words
        self.words = 0  # words started so far
        self._in_word = False
        self.reached = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.reached:
            return "", True
        for i, c in enumerate(text):
            if c.isspace():
                if self._in_word and self.words == self.max_words:
                    self.reached = True
                    return text[:i], True
                self._in_word = False
            elif not self._in_word:
                self._in_word = True
                self.words += 1
        return text, False

    def flush(self) -> str:
        """Nothing is ever held back; here for symmetry with `PhraseFilter`."""
        return ""


def limit_words(text: str, max_words: int) -> tuple[str, bool]:
    """``text`` cut after ``max_words`` words, as `WordLimit` streams it, and whether the cap was reached."""
    limit = WordLimit(max_words)
    out, reached = limit.push(text)
    return out + limit.flush(), reached

