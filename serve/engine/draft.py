"""Drafts from the context (prompt lookup / n-gram speculation): guesses of the next tokens of a sequence, copied
from what followed the same recent tokens earlier in its prompt or its own output, for the engine to verify in one
``llama_decode`` batch. Pure Python; nothing here calls llama.cpp.

    drafter = NgramDrafter()                 # one per sequence
    k_policy = AdaptiveK()                   # one per sequence
    k = k_policy.next_k()                    # 0: not drafting this step
    draft = drafter.propose(tokens, k)       # tokens = prompt + accepted output (the same growing list)
    ...verify...
    k_policy.update(len(draft), n_accepted)

``NgramDrafter`` keeps, for each n in ``n_max .. n_min``, a hash index from every n-gram of the sequence to the
positions where it ended (only n-grams whose next token is known). A step appends the new tokens to the index
(``n_max - n_min + 1`` dictionary updates per token) and looks the last n tokens up, longest n first: the most recent
earlier occurrence wins and the up-to-``k`` tokens that followed it are the draft. Nothing is rescanned, so a step
costs the same at 40 tokens of context as at 4,000.

Why n from 4 down to 2: a 4-token match in a 49k-token BPE vocabulary is nearly always the passage being copied
(quoted text, code, the paragraph being rewritten), and its most recent occurrence is the right copy source; a longer
n rarely chooses a different source but delays the first draft after each edit by that many tokens. After an edit
(a changed word in a rewrite, a renamed variable) the copy resumes and 2 tokens of the resumed original re-anchor it
two tokens earlier than 4 would; a 1-token match proposes noise. The short matches are also the ones that fire in
free chat (", and", "of the"): ``AdaptiveK`` is what keeps them cheap there. llama-server's ``ngram-simple`` matches
12 tokens and drafts only when 12 more follow, which misses short copies entirely; its ``lookup`` example and
``ngram-cache`` use n = 1..4 with statistics instead.

``NgramCache`` (optional, off unless the engine creates one): n-grams of finished sequences, shared across requests.
Two uses: the model's *shared* cache (``draft.shared``: every finished request's prompt and answer, consulted after
the sequence's own longest match and before its shorter ones: a regenerated answer, a client re-sending the same
question, an agent's recurring boilerplate; llama-server's ``ngram-mod`` is the same idea), and a grammar's cache
(jump-forward, consulted last). Bounded (least recently used out). It changes only speed, never output, under
greedy verification; but speed is observable, so a deployment serving mutually untrusted clients should keep it off
(or one per tenant): how fast an answer comes out reveals whether another request's text continued the same way.

``AdaptiveK`` (per sequence) turns acceptance into the next draft length:

- start at ``k_start``; a fully accepted draft doubles k (up to ``k_max``), a partly accepted one sets k to
  accepted + 1 (the copy diverged: an edit; the next match usually resumes it), a rejected one (0 accepted) halves k;
- ``miss_limit`` rejected drafts in a row stop drafting for ``cooldown`` steps, then one probe of ``probe_k`` tokens;
  a probe that misses stops it again for twice as long (up to ``cooldown_max``), any accepted token resets all this.
- a step with no draft (no match) teaches nothing and changes nothing.

So on free chat with nothing to copy, a sequence pays for ``miss_limit`` short rejected drafts and then one
``probe_k``-token probe after 16, 32, 64, 128, 256, 256, ... steps: a few extra batch rows in a few hundred tokens.

How the engine should verify drafts (batch rows, greedy acceptance, sampled requests, KV rollback) and what
llama-server does: ``.wip-notes/h18-design.md``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence

log = logging.getLogger(__name__)

__all__ = ["AdaptiveK", "NgramCache", "NgramDrafter"]


class NgramCache:
    """N-grams of finished sequences, shared across requests: each ``n``-gram maps to the (up to) ``m`` tokens that
    followed it most recently; at most ``capacity`` n-grams, least recently used out. Not thread-safe: the engine's
    scheduler thread owns it."""

    def __init__(self, n: int = 4, m: int = 16, capacity: int = 65536) -> None:
        if n < 1 or m < 1 or capacity < 1:
            raise ValueError(f"NgramCache needs n, m, capacity >= 1, got n={n}, m={m}, capacity={capacity}")
        self.n = n
        self.m = m
        self.capacity = capacity
        self._map: OrderedDict[tuple[int, ...], tuple[int, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def add(self, tokens: Sequence[int]) -> None:
        """Index a finished sequence (its prompt and output): every n-gram with at least one following token."""
        toks = [int(t) for t in tokens]
        n, m, table = self.n, self.m, self._map
        for end in range(n - 1, len(toks) - 1):
            key = tuple(toks[end - n + 1 : end + 1])
            table[key] = tuple(toks[end + 1 : end + 1 + m])
            table.move_to_end(key)
        while len(table) > self.capacity:
            table.popitem(last=False)

    def lookup(self, suffix: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the last ``n`` tokens of ``suffix`` in an indexed sequence, or []."""
        if k <= 0 or len(suffix) < self.n:
            return []
        key = tuple(int(t) for t in suffix[len(suffix) - self.n :])
        hit = self._map.get(key)
        if hit is None:
            return []
        self._map.move_to_end(key)
        return list(hit[:k])

    def clear(self) -> None:
        self._map.clear()


class NgramDrafter:
    """Prompt-lookup drafts for one sequence (prompt + output so far), from an index that grows with it.

    ``propose(tokens, k)`` takes the sequence as the engine holds it: usually the same list, longer by the tokens
    accepted since the last call, which are all that gets indexed. A sequence that got shorter (rolled back) or
    changed before its end is re-synchronised from the first difference (a rescan of what changed).
    """

    def __init__(
        self, n_max: int = 4, n_min: int = 2, cache: NgramCache | None = None, shared: NgramCache | None = None
    ) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"NgramDrafter needs 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
        self.n_max = n_max
        self.n_min = n_min
        self.cache = cache  # consulted last (a grammar's continuations)
        self.shared = shared  # consulted after the own context's longest match (other requests' text)
        self.match_n = 0  # the n-gram size the last draft matched (0: none; -1: ``cache``; -2: ``shared``)
        self._tokens: list[int] = []
        # per n: n-gram -> the positions where it ended, ascending; only n-grams followed by a known token
        self._index: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in range(n_min, n_max + 1)}

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        """A copy of the sequence as indexed."""
        return list(self._tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens to the sequence (and the index)."""
        toks, index = self._tokens, self._index
        for t in tokens:
            toks.append(int(t))
            end = len(toks) - 2  # the n-grams ending just before the new token now have a known successor
            for n, table in index.items():
                if end >= n - 1:
                    key = tuple(toks[end - n + 1 : end + 1])
                    positions = table.get(key)
                    if positions is None:
                        table[key] = [end]
                    else:
                        positions.append(end)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens (undoing the index entries of the rest, newest first)."""
        toks, index = self._tokens, self._index
        length = max(0, length)
        while len(toks) > length:
            end = len(toks) - 2
            for n, table in index.items():
                if end >= n - 1:
                    key = tuple(toks[end - n + 1 : end + 1])
                    positions = table[key]
                    positions.pop()  # the newest entry is this one: positions only ever grow at the end
                    if not positions:
                        del table[key]
            toks.pop()

    def sync(self, tokens: Sequence[int]) -> None:
        """Make the indexed sequence equal ``tokens``: append what is new; on a difference before the end, roll back
        to the common prefix first. Checks only the last indexed token in the usual (appending) case."""
        mine = self._tokens
        have = len(mine)
        if len(tokens) >= have and (have == 0 or int(tokens[have - 1]) == mine[-1]):
            if len(tokens) > have:
                self.extend(tokens[have:])
            return
        same = 0
        limit = min(have, len(tokens))
        while same < limit and int(tokens[same]) == mine[same]:
            same += 1
        log.debug("draft index re-synchronised from position %d (had %d tokens, now %d)", same, have, len(tokens))
        self.truncate(same)
        self.extend(tokens[same:])

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens to draft after ``tokens``: what followed the most recent earlier occurrence of its last
        n tokens, for the largest n in ``n_max .. n_min`` that occurs (but the ``shared`` cache's guess, if any,
        before a match shorter than ``n_max``); else ``cache``'s guess; else []."""
        self.sync(tokens)
        return self.draft(k)

    def draft(self, k: int) -> list[int]:
        """``propose`` on the sequence as already indexed."""
        self.match_n = 0
        toks = self._tokens
        size = len(toks)
        if k <= 0 or size == 0:
            return []
        shared = self.shared
        for n in range(min(self.n_max, size), self.n_min - 1, -1):
            if n < self.n_max and shared is not None:
                guess = shared.lookup(toks, k)
                if guess:
                    self.match_n = -2
                    return guess
                shared = None  # looked up once
            positions = self._index[n].get(tuple(toks[size - n :]))
            if positions:
                start = positions[-1] + 1  # <= size - 1: entries always have a successor
                self.match_n = n
                return toks[start : min(start + k, size)]
        if shared is not None:  # no match at all (or n_min == n_max)
            guess = shared.lookup(toks, k)
            if guess:
                self.match_n = -2
                return guess
        if self.cache is not None:
            guess = self.cache.lookup(toks, k)
            if guess:
                self.match_n = -1
            return guess
        return []


class AdaptiveK:
    """The draft length of one sequence, from its acceptance history (the policy is in the module docstring).

    Call ``next_k()`` once per decode step (0: do not draft this step) and, after a step that verified a draft,
    ``update(drafted, accepted)``. ``drafted``/``accepted`` totals are kept for the response's timings."""

    def __init__(
        self,
        k_max: int = 8,
        k_start: int = 4,
        miss_limit: int = 3,
        cooldown: int = 16,
        cooldown_max: int = 256,
        probe_k: int = 2,
    ) -> None:
        if not 1 <= k_start <= k_max or miss_limit < 1 or not 1 <= cooldown <= cooldown_max or not 1 <= probe_k:
            raise ValueError(
                "AdaptiveK needs 1 <= k_start <= k_max, miss_limit >= 1, 1 <= cooldown <= cooldown_max, probe_k >= 1"
            )
        self.k_max = k_max
        self.k_start = k_start
        self.miss_limit = miss_limit
        self.cooldown_base = cooldown
        self.cooldown_max = cooldown_max
        self.probe_k = min(probe_k, k_max)
        self.k = k_start  # the length of the next draft (while not cooling down)
        self.misses = 0  # rejected drafts in a row
        self.cold_steps = 0  # steps left without drafting
        self._cooldown = cooldown  # the next cool-down's length
        self.drafted = 0
        self.accepted = 0

    @property
    def cooling(self) -> bool:
        return self.cold_steps > 0

    def next_k(self) -> int:
        """The number of tokens to draft at this step; counts a cool-down step down."""
        if self.cold_steps > 0:
            self.cold_steps -= 1
            return 0
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        """A verified draft of ``drafted`` tokens, of which the first ``accepted`` matched."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"accepted must be within 0..drafted, got {accepted} of {drafted}")
        if drafted == 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.k = min(self.k_max, 2 * self.k)
        elif accepted > 0:
            self.k = min(self.k_max, accepted + 1)
        else:
            self.misses += 1
            self.k = max(1, self.k // 2)
            if self.misses >= self.miss_limit:
                self.cold_steps = self._cooldown
                self._cooldown = min(self.cooldown_max, 2 * self._cooldown)
                self.k = self.probe_k
                self.misses = self.miss_limit - 1  # the probe gets one chance
            return
        self.misses = 0
        self._cooldown = self.cooldown_base

    @property
    def acceptance(self) -> float:
        """Accepted / drafted so far (0.0 before any draft)."""
        return self.accepted / self.drafted if self.drafted else 0.0
