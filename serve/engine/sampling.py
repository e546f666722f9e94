"""A request's sampling parameters as one of llama.cpp's native sampler chains (``llama_sampler_*``), built in the
order llama-server uses (common/sampling.cpp): logit bias -> penalties -> top_k -> top_p -> min_p -> temperature ->
dist. Greedy (``temperature <= 0``) is logit bias -> penalties -> argmax. The logit-bias sampler is in the chain
only for a request with a ``logit_bias`` (OpenAI's -100 is a ban: ``-inf``). The chain samples and accepts in C:
``llama_sampler_sample(chain, ctx, batch_index)``. The batched engine keeps one chain per running request.

A request with a grammar also has a llama.cpp grammar sampler, sampled as llama-server does
(``common_sampler_sample``): the chain picks a token from the raw logits; if the grammar accepts it, done (the
common case: the grammar's cost is one token's check); if not, the grammar masks the whole vocabulary and the
chain samples again. The candidates array is filled from the logits here (numpy), and a token is accepted only
once it is known to be valid, so a grammar with no way forward ends its request with ``InvalidRequestError``
instead of aborting in C++.

**Closing within the budget.** A JSON grammar (``Grammar.json``: a schema, JSON mode, forced tool calls) would be
cut off by ``max_tokens`` mid-document, and the answer would not parse. When the tokens left fall to a reserve
(``JsonTracker.reserve``: ten plus three per open bracket, plus the fixed text after a tool call; or, if more, the
grammar's shortest completion from here, e.g. the required keys still to write, at two characters a token, as
``forced.py``'s recognizer follows the text), the chain steers to the document's end: among the tokens the grammar
allows it takes, in order, an end of generation, a token that closes the open string or brackets, a short complete
value (``0``, ``null``, ``""``...), the first token of the text the grammar forces (a required key, written
compactly), else the model's likeliest allowed token that is not whitespace. The answer then ends valid, and its
``finish_reason`` is ``length``.

``CompiledGrammars`` parses each grammar once per model and clones the parsed sampler for each request (a bounded
cache owned by the model)."""

from __future__ import annotations

import codecs
import ctypes
import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from edgellm.serve.engine.base import Grammar, InvalidRequestError, SamplingParams
from edgellm.serve.engine.forced import Gbnf, GbnfError, JsonCursor, Recognizer, parse_gbnf

log = logging.getLogger(__name__)

_NEG_INF = float("-inf")
CHARS_PER_TOKEN = 2  # the closing reserve's estimate for the shortest completion's text (keys run ~3 a token)


TOP_N = (512, 4096)  # candidates the grammar checks first when the chain's own pick is not valid

_CLOSER = re.compile(rb'^"?[\]}\s]*[\]}][\]}\s]*$|^"$')
_SHORT_VALUES = {b"0", b"1", b"null", b"true", b"false", b'""', b"[]", b"{}", b'"'}


class JsonTracker:
    """The lexical state of a JSON text (``forced.JsonCursor``: inside a string or not, bracket depth), fed token
    pieces; with the grammar's shape (``forced.Gbnf``), also where the text is in the grammar, so the reserve covers
    its shortest completion (the required keys still to write, say), not only its brackets."""

    def __init__(self, shape: Gbnf | None = None, encode: Callable[[str], list[int]] | None = None) -> None:
        self.cursor = JsonCursor()
        self._rec = Recognizer(shape) if shape is not None else None
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a split character back
        self._encode = encode

    @property
    def in_str(self) -> bool:
        return self.cursor.in_string

    @property
    def depth(self) -> int:
        return self.cursor.depth

    def forced_token(self) -> int | None:
        """The first token of the text the grammar forces next, written compactly (a required key, ``":"``...;
        None: nothing is forced, or the grammar is not followed): the fewest tokens to write it."""
        rec = self._rec
        if rec is None or self._encode is None or not rec.alive or self._text.getstate()[0]:
            return None
        text, _ = rec.forced(compact=True)
        tokens = self._encode(text) if text else []
        return tokens[0] if tokens else None

    def push(self, piece: bytes) -> None:
        text = self._text.decode(piece)
        for ch in text:
            self.cursor.push(ch)
        rec = self._rec
        if text and rec is not None and rec.alive:
            rec.advance(text)

    def reserve(self, tail: int = 0, restart: int = 0) -> int:
        """Tokens kept back to end the output: inside a document, to close it and write ``tail`` tokens of fixed
        text after it; between documents (tool calls), enough to write a whole short one (``restart``)."""
        rec = self._rec
        need = 0
        if rec is not None and rec.alive:  # the shortest completion, at two characters a token, and a margin
            need = math.ceil(min(rec.shortest(), 4096) / CHARS_PER_TOKEN) + 4 + tail
        if self.depth > 0:
            return max(need, 10 + 3 * self.depth + tail)
        return max(need, 10 + restart)


class Candidates:
    """A ``llama_token_data_array`` over the whole vocabulary, refilled from a row of logits for each sample
    (one per model, used by its scheduler thread only). ``pieces`` (token -> bytes) and ``eog`` let it find the
    tokens that close a JSON document."""

    def __init__(
        self, n_vocab: int, pieces: Callable[[int], bytes] | None = None, eog: frozenset[int] = frozenset()
    ) -> None:
        import llama_cpp as ll
        import numpy as np

        self._ll = ll
        self._np = np
        self.n_vocab = n_vocab
        self.pieces = pieces
        self.eog = sorted(eog)
        self._closers: tuple[list[int], list[int], list[int]] | None = None
        self.blank: Any = None  # tokens that are only whitespace (a numpy mask)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self.data = np.zeros(n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        assert self.data.itemsize == ctypes.sizeof(ll.llama_token_data)
        self.array = ll.llama_token_data_array(
            data=ctypes.cast(self.data.ctypes.data, ctypes.POINTER(ll.llama_token_data)),
            size=n_vocab,
            selected=-1,
            sorted=False,
        )
        self.ref = ctypes.byref(self.array)
        self._one = (ll.llama_token_data * 1)()
        self.single = ll.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self.single_ref = ctypes.byref(self.single)
        self._top_k = [ll.llama_sampler_init_top_k(n) for n in TOP_N if n < n_vocab]  # sort the likeliest, in C

    @property
    def n_tiers(self) -> int:
        return len(self._top_k)

    def keep_top(self, tier: int) -> float:
        """After ``fill``: keep only the ``TOP_N[tier]`` likeliest candidates; returns the lowest logit kept."""
        self._ll.llama_sampler_apply(self._top_k[tier], self.ref)
        return float(self.data["logit"][: self.array.size].min())

    def close(self) -> None:
        for sampler in self._top_k:
            self._ll.llama_sampler_free(sampler)
        self._top_k = []

    def fill(self, ctx: Any, index: int) -> None:
        """Candidates = every token with its logit at batch ``index`` of ``ctx``'s last decode."""
        logits = self._ll.llama_get_logits_ith(ctx, index)
        data = self.data
        data["id"] = self._ids  # samplers sort and truncate the array in place
        data["logit"] = self._np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        data["p"] = 0.0
        a = self.array
        a.size = self.n_vocab
        a.selected = -1
        a.sorted = False

    def selected(self) -> tuple[int, float]:
        """The token the samplers selected and its logit (-inf: it was masked out)."""
        i = self.array.selected
        if i < 0 or i >= self.array.size:
            return -1, _NEG_INF
        row = self.data[i]
        return int(row["id"]), float(row["logit"])

    def closers(self) -> tuple[list[int], list[int], list[int]]:
        """Token ids that close a string (``"``, ``"}``...), that close brackets (``}``, ``]}``...), and short whole
        values (``0``, ``null``, ``""``...), the strongest closers first (computed once)."""
        if self._closers is None:
            if self.pieces is None:
                raise ValueError("closing a JSON document needs the token pieces")
            string: list[tuple[int, int]] = []
            brackets: list[tuple[int, int]] = []
            values: list[int] = []
            self.blank = self._np.zeros(self.n_vocab, dtype=bool)
            for t in range(self.n_vocab):
                piece = self.pieces(t)
                if not piece:
                    continue
                if not piece.strip():
                    self.blank[t] = True
                if _CLOSER.match(piece):
                    power = sum(piece.count(c) for c in (b"]", b"}"))
                    (string if piece.startswith(b'"') else brackets).append((-power, t))
                if piece.strip() in _SHORT_VALUES:
                    values.append(t)
            self._closers = ([t for _, t in sorted(string)], [t for _, t in sorted(brackets)], values)
        return self._closers

    def best(self, grammar: Any, tokens: Sequence[int]) -> int:
        """Of ``tokens`` (best first), the first the grammar allows, else -1."""
        for t in tokens:
            if self.allows(grammar, t):
                return t
        return -1

    def allows(self, grammar: Any, token: int) -> bool:
        """Whether ``grammar`` accepts ``token`` next (a one-token apply, as llama-server's check)."""
        self._one[0] = self._ll.llama_token_data(token, 1.0, 0.0)
        self.single.size = 1
        self.single.selected = -1
        self._ll.llama_sampler_apply(grammar, self.single_ref)
        return bool(self._one[0].logit != _NEG_INF)


class SamplerChain:
    """Owns one ``llama_sampler`` chain, and the request's grammar sampler if it has one (``grammar``, e.g. from
    ``CompiledGrammars.instantiate``, sampled through ``candidates``); ``close()`` frees them (exactly once)."""

    def __init__(
        self,
        params: SamplingParams,
        n_vocab: int,
        n_ctx: int,
        grammar: Any = None,
        candidates: Candidates | None = None,
        shape: Gbnf | None = None,
        encode: Callable[[str], list[int]] | None = None,
    ) -> None:
        import llama_cpp as ll

        self._ll = ll
        self._params = params
        self.grammar: Any = grammar
        self._candidates = candidates
        if grammar is not None and candidates is None:
            raise ValueError("a grammar needs a Candidates buffer")
        g = params.grammar
        self._json = JsonTracker(shape, encode) if grammar is not None and g is not None and g.json else None
        self._tail = g.tail_tokens if g is not None else 0
        self._restart = g.restart_tokens if g is not None else 0
        self.closing = False  # the budget ran low: steering to the end of the JSON document
        chain_params = ll.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.ptr: Any = ll.llama_sampler_chain_init(chain_params)
        if not self.ptr:
            raise MemoryError("llama_sampler_chain_init failed")
        p = params
        if p.logit_bias:
            self._add(_logit_bias_sampler(ll, n_vocab, p.logit_bias))
        last_n = n_ctx if p.repeat_last_n < 0 else p.repeat_last_n
        self.penalty_last_n = 0
        if last_n > 0 and (p.repeat_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0):
            self.penalty_last_n = last_n
            self._add(
                ll.llama_sampler_init_penalties(
                    n_vocab, last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
                )
            )
        if p.temperature <= 0:
            self._add(ll.llama_sampler_init_greedy())
            return
        if p.top_k > 0:
            self._add(ll.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            self._add(ll.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            self._add(ll.llama_sampler_init_min_p(p.min_p, 1))
        self._add(ll.llama_sampler_init_temp(p.temperature))
        seed = ll.LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
        self._add(ll.llama_sampler_init_dist(seed))

    def _add(self, sampler: Any) -> None:
        self._ll.llama_sampler_chain_add(self.ptr, sampler)  # the chain owns it from here on

    def accept_prompt(self, tokens: Sequence[int]) -> None:
        """Let the penalties see the prompt's tail, as llama-server does."""
        if self.penalty_last_n <= 0:
            return
        accept = self._ll.llama_sampler_accept
        for t in tokens[-self.penalty_last_n :]:
            accept(self.ptr, t)

    def sample(self, ctx: Any, index: int, remaining: int | None = None) -> int:
        """Sample the next token from the logits at batch ``index`` of ``ctx``'s last decode, and accept it (in C, no
        copy of the logits, unless there is a grammar). ``remaining``: tokens left in the budget, this one
        included."""
        if self.grammar is None:
            token: int = self._ll.llama_sampler_sample(self.ptr, ctx, index)
            return token
        tracker = self._json
        if tracker is not None and remaining is not None and (
            self.closing or remaining <= tracker.reserve(self._tail, self._restart)
        ):
            self.closing = True
            token = self._sample_closing(ctx, index, tracker)
        else:
            token = self._sample_with_grammar(ctx, index)
        if tracker is not None:
            c = self._candidates
            assert c is not None and c.pieces is not None
            tracker.push(c.pieces(token))
        return token

    def _sample_closing(self, ctx: Any, index: int, tracker: JsonTracker) -> int:
        c, grammar = self._candidates, self.grammar
        assert c is not None
        string, brackets, values = c.closers()
        token = c.best(grammar, c.eog)
        if token < 0:
            token = c.best(grammar, string if tracker.in_str else brackets)
        if token < 0 and not tracker.in_str:
            c.fill(ctx, index)
            logits = c.data["logit"]
            token = c.best(grammar, sorted(values, key=lambda t: -float(logits[t])))
        if token < 0:  # the grammar wants something else first (a required key): its text in the fewest tokens
            forced = tracker.forced_token()
            token = c.best(grammar, [forced]) if forced is not None else -1
        if token < 0:  # still something else (a minimum length...): the model's likeliest allowed token
            c.fill(ctx, index)
            self._ll.llama_sampler_apply(grammar, c.ref)
            logits = c.data["logit"]
            solid = logits.copy()
            solid[c.blank] = _NEG_INF  # no whitespace while the budget runs out, if anything else will do
            i = int(solid.argmax())
            if solid[i] == _NEG_INF:
                i = int(logits.argmax())
            if logits[i] == _NEG_INF:
                raise InvalidRequestError("the grammar allows no token at this point of the output", "grammar")
            token = int(c.data["id"][i])
        self._ll.llama_sampler_accept(grammar, token)
        self._ll.llama_sampler_accept(self.ptr, token)
        return token

    def _sample_with_grammar(self, ctx: Any, index: int) -> int:
        ll, c, grammar = self._ll, self._candidates, self.grammar
        assert c is not None
        c.fill(ctx, index)
        ll.llama_sampler_apply(self.ptr, c.ref)
        token, _ = c.selected()
        if token < 0 or not c.allows(grammar, token):
            token = self._resample(ctx, index, c)
        ll.llama_sampler_accept(grammar, token)
        ll.llama_sampler_accept(self.ptr, token)
        return token

    def _resample(self, ctx: Any, index: int, c: Candidates) -> int:
        """The chain's pick broke the grammar: sample again among the tokens the grammar allows. The grammar first
        checks only the 512, then the 4096 likeliest tokens (a full check costs ~50 and ~10 times more); that gives
        the same choice as checking all when the valid ones among them are all the chain can pick: at least
        ``top_k`` of them, or greedy, or the best valid one so far above the rest that ``min_p`` drops the rest."""
        ll, grammar, p = self._ll, self.grammar, self._params
        c.fill(ctx, index)
        reorder = self.penalty_last_n > 0 or bool(p.logit_bias)  # penalties and biases would reorder them
        tiers = range(0) if reorder else range(c.n_tiers)
        for tier in tiers:
            floor = c.keep_top(tier)  # every token left out is at most this likely
            ll.llama_sampler_apply(grammar, c.ref)
            c.array.sorted = False  # the grammar's -inf broke the order top_k would trust
            logits = c.data["logit"][: c.array.size]
            valid = logits[logits != _NEG_INF]
            enough = valid.size > 0 and (
                p.temperature <= 0
                or (p.top_k > 0 and valid.size >= p.top_k)
                or (p.min_p > 0 and floor < float(valid.max()) + math.log(p.min_p))
            )
            if enough:
                ll.llama_sampler_apply(self.ptr, c.ref)
                token, logit = c.selected()
                if token >= 0 and logit != _NEG_INF:
                    return token
            c.fill(ctx, index)
        ll.llama_sampler_apply(grammar, c.ref)
        ll.llama_sampler_apply(self.ptr, c.ref)
        token, logit = c.selected()
        if token < 0 or logit == _NEG_INF:
            raise InvalidRequestError("the grammar allows no token at this point of the output", "grammar")
        return token

    def close(self) -> None:
        if self.ptr:
            self._ll.llama_sampler_free(self.ptr)
            self.ptr = None
        if self.grammar is not None:
            self._ll.llama_sampler_free(self.grammar)
            self.grammar = None


def _logit_bias_sampler(ll: Any, n_vocab: int, bias: Sequence[tuple[int, float]]) -> Any:
    """llama.cpp's logit-bias sampler; a bias of -100 or less (OpenAI's ban) becomes ``-inf``."""
    entries = (ll.llama_logit_bias * len(bias))(
        *(ll.llama_logit_bias(token, _NEG_INF if b <= -100 else b) for token, b in bias)
    )
    return ll.llama_sampler_init_logit_bias(n_vocab, len(bias), entries)  # copies the entries


class CompiledGrammars:
    """One model's parsed grammars: each ``Grammar`` is parsed by llama.cpp once (``check``) and cloned for each
    request (``instantiate``); at most ``size`` are kept (least recently used dropped). Thread-safe; ``close()``
    frees them."""

    def __init__(self, vocab: Any, size: int = 64) -> None:
        import llama_cpp as ll

        self._ll = ll
        self._vocab = vocab
        self._size = size
        self._items: OrderedDict[Grammar, Any] = OrderedDict()
        self._shapes: OrderedDict[Grammar, Gbnf | None] = OrderedDict()
        self._lock = threading.Lock()

    def _compile(self, g: Grammar) -> Any:
        ll = self._ll
        text = g.gbnf.encode("utf-8")
        if not g.lazy:
            return ll.llama_sampler_init_grammar(self._vocab, text, b"root")
        n_patterns = len(g.trigger_patterns)
        patterns = (ctypes.c_char_p * max(1, n_patterns))(*(p.encode() for p in g.trigger_patterns))
        tokens = (ll.llama_token * max(1, len(g.trigger_tokens)))(*g.trigger_tokens)
        return ll.llama_sampler_init_grammar_lazy_patterns(
            self._vocab, text, b"root", patterns, n_patterns, tokens, len(g.trigger_tokens)
        )

    def check(self, g: Grammar) -> None:
        """Parse ``g`` (cached); raises ``InvalidRequestError`` if llama.cpp rejects it."""
        with self._lock:
            if g in self._items:
                self._items.move_to_end(g)
                return
        sampler = self._compile(g)
        if not sampler:
            raise InvalidRequestError(
                "llama.cpp's grammar parser rejected it (syntax error, undefined rule, no 'root' rule or left "
                "recursion)",
                "grammar",
            )
        with self._lock:
            old = self._items.pop(g, None)
            self._items[g] = sampler
            while len(self._items) > self._size:
                _, evicted = self._items.popitem(last=False)
                self._ll.llama_sampler_free(evicted)
        if old is not None:
            self._ll.llama_sampler_free(old)

    def instantiate(self, g: Grammar) -> Any:
        """A fresh grammar sampler for one request (the caller owns and frees it)."""
        while True:
            with self._lock:
                proto = self._items.get(g)
                if proto is not None:
                    self._items.move_to_end(g)
                    return self._ll.llama_sampler_clone(proto)
            self.check(g)

    def shape(self, g: Grammar) -> Gbnf | None:
        """``g`` parsed by ``forced.py`` for following text through it (cached; None: a lazy grammar, whose start
        is not known, or one that recognizer does not follow)."""
        with self._lock:
            if g in self._shapes:
                self._shapes.move_to_end(g)
                return self._shapes[g]
        shape: Gbnf | None = None
        if not g.lazy:
            try:
                shape = parse_gbnf(g.gbnf)
            except GbnfError as e:
                log.debug("grammar not followed in Python: %s", e)
            except Exception:  # noqa: BLE001 - an aid (drafts, the closing reserve) must not fail the request
                log.warning("grammar not followed in Python (the recognizer failed on it)", exc_info=True)
        with self._lock:
            self._shapes[g] = shape
            while len(self._shapes) > self._size:
                self._shapes.popitem(last=False)
        return shape

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        with self._lock:
            for sampler in self._items.values():
                self._ll.llama_sampler_free(sampler)
            self._items.clear()
