"""Prompt text -> the token ids a model was trained on.

Two rules, the ones llama-server and transformers follow, and one guard:

- **BOS** is added by the GGUF's ``tokenizer.ggml.add_bos_token`` and never twice: a chat template that writes
  ``{{ bos_token }}`` itself (Llama 3, Mistral, Gemma) gets no second one (llama-server strips the rendered BOS text
  before tokenizing with BOS; the result is the same).
- **Special tokens** are split out of the text before the rest is tokenized, exactly as llama.cpp's tokenizer does
  (``tokenizer_st_partition``: longest token first, with the tokens' lstrip/rstrip attributes), so that a benign
  prompt gives the same ids as ``llama_tokenize(text, parse_special=True)``.
- **The guard**: control tokens (``<|im_start|>``, ``<start_of_turn>``, ...) are parsed only where the chat template
  wrote them. Where they came from a message (its content, a tool call's arguments, a tool result) the chat template
  marks them (``prompt.ChatTemplate.render_marked``), and they are tokenized as the plain text they are, as
  llama.cpp does with ``parse_special=False``. User-defined tokens (Gemma's ``\\n\\n``, Qwen's ``<tool_call>``) are
  text to the model and are split out everywhere, as llama.cpp and transformers both do.

Completions (a raw ``prompt``) keep llama-server's behaviour: BOS by the GGUF, special tokens parsed everywhere
(the client writes the whole prompt, markup included), with one change: a prompt that already starts with the BOS
token gets no second one (llama-server would add it and log a warning).
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# llama_token_attr bits (llama.h)
ATTR_UNKNOWN = 1
ATTR_CONTROL = 8
ATTR_USER_DEFINED = 16
ATTR_LSTRIP = 128
ATTR_RSTRIP = 256

_SPACE = " \t\n\v\f\r"  # C isspace(), what llama.cpp strips next to an lstrip/rstrip token

Span = tuple[int, int]


@dataclass(frozen=True)
class SpecialToken:
    id: int
    text: str
    control: bool  # control or unknown: parsed only in a template's markup (and in completions)
    lstrip: bool = False
    rstrip: bool = False


@dataclass(frozen=True)
class RenderedChat:
    """A chat rendered by its template: the text, and the spans of it where control-token text came from the
    messages or tools (never parsed as control tokens). An empty span ``(i, i)`` only breaks the text at ``i``."""

    text: str
    protected: tuple[Span, ...] = ()


class SpecialTokens:
    """A vocabulary's special tokens (llama.cpp's control, unknown and user-defined tokens) by text, and where they
    occur in a string."""

    def __init__(self, tokens: Iterable[SpecialToken]) -> None:
        by_text: dict[str, SpecialToken] = {}
        for t in sorted(tokens, key=lambda t: t.id):
            if t.text:
                by_text.setdefault(t.text, t)
        self.by_text = by_text
        self._prefixes = frozenset(text[:k] for text in by_text for k in range(1, len(text)))
        firsts = sorted({text[0] for text in by_text})
        self._first = re.compile("[" + "".join(re.escape(c) for c in firsts) + "]") if firsts else None
        self.control_texts = tuple(sorted((t.text for t in by_text.values() if t.control), key=len, reverse=True))

    def __len__(self) -> int:
        return len(self.by_text)

    def occurrences(self, text: str, control_only: bool = False) -> Iterator[tuple[int, SpecialToken]]:
        """Every occurrence of a special token in ``text`` (overlapping ones too), by position."""
        if self._first is None:
            return
        by_text, prefixes = self.by_text, self._prefixes
        n = len(text)
        for m in self._first.finditer(text):
            i = m.start()
            j = i + 1
            while True:
                piece = text[i:j]
                tok = by_text.get(piece)
                if tok is not None and (tok.control or not control_only):
                    yield i, tok
                if j >= n or piece not in prefixes:
                    break
                j += 1

    def control_spans(self, text: str) -> list[Span]:
        """The spans of ``text`` covered by control-token text (overlapping occurrences merged)."""
        spans: list[Span] = []
        for i, tok in self.occurrences(text, control_only=True):
            end = i + len(tok.text)
            if spans and i < spans[-1][1]:
                spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
            else:
                spans.append((i, end))
        return spans


def _blocked(start: int, end: int, protected: Sequence[Span]) -> bool:
    for a, b in protected:
        if a == b:
            if start < a < end:
                return True
        elif start < b and a < end:
            return True
    return False


def partition(text: str, specials: SpecialTokens, protected: Sequence[Span] = ()) -> list[SpecialToken | str]:
    """``text`` split into special tokens and plain-text pieces as llama.cpp's ``tokenizer_st_partition`` splits it
    with ``parse_special=True`` (longest token first, leftmost occurrence first, lstrip/rstrip applied), except that
    a control token overlapping a ``protected`` span stays text."""
    present = {tok for _, tok in specials.occurrences(text)}
    if not present:
        return [text] if text else []
    fragments: list[SpecialToken | Span] = [(0, len(text))]
    for tok in sorted(present, key=lambda t: (-len(t.text), t.id)):
        guard = tok.control and bool(protected)
        out: list[SpecialToken | Span] = []
        for frag in fragments:
            if isinstance(frag, SpecialToken):
                out.append(frag)
                continue
            start, end = frag
            pos = start
            while (m := text.find(tok.text, pos, end)) >= 0:
                m_end = m + len(tok.text)
                if guard and _blocked(m, m_end, protected):
                    pos = m + 1
                    continue
                left = m
                if tok.lstrip:
                    while left > start and text[left - 1] in _SPACE:
                        left -= 1
                if left > start:
                    out.append((start, left))
                out.append(tok)
                start = m_end
                if tok.rstrip:
                    while start < end and text[start] in _SPACE:
                        start += 1
                pos = start
            if start < end:
                out.append((start, end))
        fragments = out
    return [f if isinstance(f, SpecialToken) else text[f[0] : f[1]] for f in fragments]


_PHI3_NO_RSTRIP = frozenset({"<unk>", "<s>", "<|endoftext|>"})


def phi3_rstrip(model_name: str) -> bool:
    """Phi-3's special tokens strip the whitespace after them (``rstrip`` in its tokenizer.json; transformers drops
    the newline after ``<|user|>``). llama.cpp knows this only for a ``general.name`` containing "phi-3" or "phi3",
    but today's converter names the models "Phi 3 Mini 4k Instruct", "Phi 3.5 Mini Instruct": this rule matches
    those too (Phi-4's tokens have no rstrip and are not matched)."""
    return "phi3" in re.sub(r"[\s_-]", "", model_name.lower())


Encode = Callable[[str, bool, bool], list[int]]  # (text, add_special, parse_special) -> ids, as llama_tokenize


class PromptTokenizer:
    """A model's prompt tokenizer: ``chat`` for rendered chat templates, ``completion`` for raw prompts. Thread-safe
    (llama.cpp's tokenizer is)."""

    def __init__(
        self,
        encode: Encode,
        specials: SpecialTokens,
        bos: int | None,
        add_bos: bool,
        bos_text: str = "",
        eos_text: str = "",
        owner: Any = None,
        piece: Callable[[int], bytes] | None = None,
        n_vocab: int = 0,
    ) -> None:
        self._encode = encode
        self._piece = piece
        self.n_vocab = n_vocab
        self._owner = owner  # what keeps ``encode``'s vocabulary alive
        self.specials = specials
        self.bos = bos if bos is not None and bos >= 0 else None
        self.add_bos = add_bos and self.bos is not None
        self.bos_text = bos_text
        self.eos_text = eos_text

    @classmethod
    def from_vocab(cls, vocab: Any, owner: Any = None, model_name: str = "") -> PromptTokenizer:
        """From a ``llama_vocab`` pointer; ``owner`` (the model holding it) is kept alive with the tokenizer.
        ``model_name`` (``general.name``) completes one of llama.cpp's per-model rules (``phi3_rstrip``)."""
        import llama_cpp as ll

        n_vocab = int(ll.llama_vocab_n_tokens(vocab))
        rstrip_all = phi3_rstrip(model_name)
        tokens: list[SpecialToken] = []
        for t in range(n_vocab):
            attr = int(ll.llama_vocab_get_attr(vocab, t))
            if attr & (ATTR_CONTROL | ATTR_UNKNOWN | ATTR_USER_DEFINED):
                raw = ll.llama_vocab_get_text(vocab, t) or b""
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:  # not text llama.cpp could match in a prompt either
                    continue
                tokens.append(
                    SpecialToken(
                        id=t,
                        text=text,
                        control=bool(attr & (ATTR_CONTROL | ATTR_UNKNOWN)),
                        lstrip=bool(attr & ATTR_LSTRIP),
                        rstrip=bool(attr & ATTR_RSTRIP) or (rstrip_all and text not in _PHI3_NO_RSTRIP),
                    )
                )
        bos, eos = int(ll.llama_vocab_bos(vocab)), int(ll.llama_vocab_eos(vocab))

        def token_text(t: int) -> str:
            return (ll.llama_vocab_get_text(vocab, t) or b"").decode("utf-8", errors="replace") if t >= 0 else ""

        def encode(text: str, add_special: bool, parse_special: bool) -> list[int]:
            data = text.encode("utf-8")
            cap = len(data) + 8
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
            if n < 0:  # more tokens than bytes (added BOS/EOS): grow once
                cap = -n
                buf = (ll.llama_token * cap)()
                n = ll.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
                if n < 0:
                    raise RuntimeError(f"llama_tokenize failed ({n}) on {len(data)} bytes")
            return list(buf[:n])

        def piece(t: int) -> bytes:  # llama.cpp's common_token_to_piece (special tokens rendered)
            buf = ctypes.create_string_buffer(32)
            n = ll.llama_token_to_piece(vocab, t, buf, len(buf), 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = ll.llama_token_to_piece(vocab, t, buf, len(buf), 0, True)
            return buf.raw[:n]

        return cls(
            encode,
            SpecialTokens(tokens),
            bos=bos,
            add_bos=bool(ll.llama_vocab_get_add_bos(vocab)),
            bos_text=token_text(bos),
            eos_text=token_text(eos),
            owner=owner,
            piece=piece,
            n_vocab=n_vocab,
        )

    # -- llama-server's /tokenize and /detokenize -----------------------------------------------------------------
    def encode(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        """``llama_tokenize`` as it is: BOS/EOS by the GGUF if ``add_special``, special tokens if ``parse_special``."""
        return self._encode(text, add_special, parse_special)

    def piece(self, token: int) -> bytes:
        """A token's bytes, special tokens rendered (llama.cpp's ``common_token_to_piece``); ``0 <= token <
        n_vocab``."""
        if self._piece is None:
            raise TypeError("this PromptTokenizer has no vocabulary pieces (build it with from_vocab)")
        return self._piece(token)

    def chat(self, rendered: RenderedChat) -> list[int]:
        """The ids of a rendered chat: BOS by the GGUF (not again if the template wrote it), control tokens only
        from the template's markup. No EOS: transformers' ``apply_chat_template`` adds none either."""
        text, protected = rendered.text, rendered.protected
        ids: list[int] = []
        if self.add_bos and self.bos is not None:
            ids.append(self.bos)
            n = len(self.bos_text)
            if n and text.startswith(self.bos_text) and not _blocked(0, n, protected):
                text = text[n:]
                protected = tuple((max(0, a - n), max(0, b - n)) for a, b in protected)
        for piece in partition(text, self.specials, protected):
            if isinstance(piece, SpecialToken):
                ids.append(piece.id)
            else:
                ids.extend(self._encode(piece, False, False))
        return ids

    def completion(self, text: str) -> list[int]:
        """llama-server's tokenization of a raw prompt (BOS and EOS by the GGUF, special tokens parsed), without a
        second BOS when the prompt starts with one."""
        ids = self._encode(text, True, True)
        if self.add_bos and len(ids) >= 2 and ids[0] == ids[1] == self.bos:
            del ids[0]
        return ids


__all__ = ["PromptTokenizer", "RenderedChat", "SpecialToken", "SpecialTokens", "partition", "phi3_rstrip"]
