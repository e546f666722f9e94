"""Incremental detokenization and stop strings, token by token, with as little Python per token as possible.

``Detokenizer`` turns one sampled token at a time into text: the token's bytes come from llama.cpp's
``llama_token_to_piece`` (cached per token id after the first time), and an incremental UTF-8 decoder holds back
the bytes of a character split across tokens, so no chunk ever ends inside a character (an emoji spread over
three byte-fallback tokens arrives whole, in one chunk).

``StopMatcher`` holds back the tail of the text that could still become a stop string, and cuts the text at the
first stop string found, like llama-server (the stop string itself is never sent).
"""

from __future__ import annotations

import codecs
import ctypes
from typing import Any


class PieceTable:
    """Token id -> bytes of its piece (special tokens rendered empty), filled lazily; one per model, used by the
    scheduler thread only."""

    def __init__(self, vocab: Any, n_vocab: int) -> None:
        import llama_cpp

        self._vocab = vocab
        self._to_piece = llama_cpp.llama_token_to_piece
        self._buf = ctypes.create_string_buffer(256)
        self._pieces: list[bytes | None] = [None] * n_vocab

    def __call__(self, token: int) -> bytes:
        piece = self._pieces[token]
        if piece is None:
            piece = self._render(token)
            self._pieces[token] = piece
        return piece

    def _render(self, token: int) -> bytes:
        n = self._to_piece(self._vocab, token, self._buf, len(self._buf), 0, False)
        if n < 0:  # the buffer is too small for this piece: grow it and render again
            self._buf = ctypes.create_string_buffer(-n)
            n = self._to_piece(self._vocab, token, self._buf, len(self._buf), 0, False)
        return self._buf.raw[:n]


class Detokenizer:
    """One generation's incremental detokenizer: bytes in, whole characters out."""

    def __init__(self, pieces: PieceTable) -> None:
        self._pieces = pieces
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text this token completes (empty while a multi-byte character is still incomplete)."""
        return self._decoder.decode(self._pieces(token))

    def flush(self) -> str:
        """At the end of the generation: an incomplete trailing character becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds stop strings in streamed text; holds back a tail that may be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns ``(text safe to send, stopped)``; after ``stopped`` the generation must end."""
        if not self._stops:
            return text, False
        text = self._held + text
        cut = -1
        for stop in self._stops:
            i = text.find(stop)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self._held = ""
            return text[:cut], True
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """At the end of the generation: a held tail that never became a stop string is sent."""
        held, self._held = self._held, ""
        return held

    def _partial_tail(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
