"""Speculative decoding from the context, and jump-forward under grammars, for the batched engine: which tokens a
generating slot drafts at a step (``Speculator.propose``), and the bookkeeping after the batch verified them
(``SlotDraft.settle``). The verification itself (sampling each drafted row with the request's own sampler chain)
is in ``batched.py``; the drafters are in ``draft.py``; the design in ``.wip-notes/h18-design.md``.

**Drafts.** Each generating slot with a request gets an ``NgramDrafter`` (prompt lookup over its prompt and
accepted output) and an ``AdaptiveK`` (draft length from its acceptance). A step puts ``next_token`` and up to ``k``
drafted tokens in the batch, all with logits; row ``i`` is sampled with the request's sampler chain (grammar,
penalties, logit bias, seed: everything as when decoding step by step), emitted, and compared with ``draft[i]``;
the first mismatch (or the end of the request) stops the loop, the KV of the rows after it is removed. The chain
only ever sees emitted tokens, so it needs no rollback.

**Sampled requests** draft too. The draft is a deterministic function of the context, i.e. a point-mass draft
distribution; accepting it exactly when the request's own sampler drew the same token is speculative sampling with
that draft (accept with probability p(d), else a draw from p without d): **the output distribution is unchanged**.
``dist`` draws one random number per emitted token, in order, so a seeded request even produces the same tokens as
without drafting (up to llama.cpp's batch-shape-dependent rounding).

**Jump-forward under grammars.** A grammar (a JSON schema, a tool call) forces much of its text: keys in a fixed
order, ``": "``, closing brackets. Detecting "exactly one allowed token" directly would cost a grammar pass over the
whole vocabulary per position (measured 3.2 ms at best for SmolLM2's 49k tokens on a loaded 2-core box: as much as
a decode step), and forced *text* is often not one token (after ``{"name`` the grammar allows 3 tokens, spellings
of ``"``), so instead the forced text is *learned and verified*: each grammar has an ``NgramCache`` of the outputs produced under it (the
last ``n`` tokens -> what followed), consulted when the slot's own context has no match. Its proposals go through
the same verification as any draft, so a run of forced tokens is appended in one batch and the output is exactly
what step-by-step constrained decoding gives (a wrong guess is just a rejected draft). The cache is shared by the
requests using the same grammar, so, as ``draft.py`` says of ``NgramCache``: how fast an answer comes out may
reveal whether another client's answer under the same schema continued the same way; and its gain is not proven
yet on this box (acceptance under a schema rose from 39 to 153 of 208 tokens, tok/s within the noise of a loaded
2-core box). So it is off by default (``jump_forward=True`` turns it on); keep it off when mutually untrusted
clients share a server.

**Budget.** A slot drafts at most ``min(k, tokens left - 1, context left - 2)`` tokens, so neither ``max_tokens``
nor ``n_ctx`` can be passed, and drafts take batch rows before prompt chunks do.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from edgellm.serve.engine.base import Grammar
from edgellm.serve.engine.draft import AdaptiveK, NgramCache, NgramDrafter

log = logging.getLogger(__name__)

GRAMMAR_NGRAM = 3  # tokens of context that key a grammar's learned continuation (``"name": "`` -> ...)
GRAMMAR_CACHES = 32  # grammars whose continuations are kept (least recently used out)


@dataclass
class SlotDraft:
    """One request's drafting state in a slot: its drafter (indexed over prompt + accepted output + next token),
    its k policy, and the draft in the current batch (with the batch rows of ``next_token`` and each draft token)."""

    drafter: NgramDrafter
    k: AdaptiveK
    n_prompt: int
    grammar: Grammar | None = None
    draft: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    n_drafted: int = 0  # for the response's timings: tokens drafted, and drafted tokens the sampler confirmed
    n_accepted: int = 0

    def settle(self, emitted: list[int]) -> int:
        """After verification: ``emitted`` are the tokens sampled from this step's rows (1 .. len(draft) + 1).
        Returns how many drafted tokens were accepted (their KV stays), updates k and the index."""
        draft = self.draft
        matched = 0
        while matched < min(len(draft), len(emitted)) and emitted[matched] == draft[matched]:
            matched += 1
        accepted = min(matched, len(emitted) - 1)
        self.k.update(len(draft), accepted)
        if len(self.drafter):  # not indexed yet: the first ``propose`` indexes the whole sequence
            self.drafter.extend(emitted)
        self.draft = []
        return accepted


class Speculator:
    """One model's drafting policy: ``n_max`` tokens at most per slot and step, n-gram matches of ``ngram_max``
    down to ``ngram_min`` tokens; ``jump_forward``: learn each grammar's continuations (see the module docstring).
    Used by the scheduler thread only."""

    def __init__(self, n_max: int = 8, ngram_max: int = 4, ngram_min: int = 2, jump_forward: bool = False) -> None:
        if n_max < 1:
            raise ValueError(f"draft n_max must be >= 1, got {n_max}")
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"draft needs 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.n_max = n_max
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min
        self.jump_forward = jump_forward
        self._grammar_caches: OrderedDict[Grammar, NgramCache] = OrderedDict()

    def start(self, n_prompt: int, grammar: Grammar | None) -> SlotDraft:
        """A new request's drafting state (``grammar``: the one its output follows, if any)."""
        cache = self._grammar_cache(grammar) if grammar is not None and self.jump_forward else None
        k_start = min(4, self.n_max)
        return SlotDraft(
            NgramDrafter(self.ngram_max, self.ngram_min, cache),
            AdaptiveK(k_max=self.n_max, k_start=k_start, probe_k=min(2, self.n_max)),
            n_prompt,
            grammar if cache is not None else None,
        )

    def propose(self, sd: SlotDraft, cache: list[int], next_token: int, limit: int) -> list[int]:
        """The draft of one generating slot whose KV holds ``cache`` and whose sampled ``next_token`` is to be
        evaluated now; at most ``limit`` tokens (budget, tokens left, context left: the caller's)."""
        if len(sd.drafter) == 0:  # first step: index the prompt (and a reused prefix) once
            sd.drafter.extend(cache)
            sd.drafter.extend([next_token])
        k = sd.k.next_k()
        sd.draft = sd.drafter.draft(min(k, limit)) if k > 0 and limit > 0 else []
        sd.n_drafted += len(sd.draft)
        return sd.draft

    def finish(self, sd: SlotDraft) -> None:
        """A request under a grammar ended (its last tokens settled): remember what its output continued with, from
        the last few prompt tokens (the template's assistant header) on, for the next requests under it."""
        if sd.grammar is None or len(sd.drafter) <= sd.n_prompt:
            return
        cache = self._grammar_caches.get(sd.grammar)
        if cache is not None:
            cache.add(sd.drafter.tokens[max(0, sd.n_prompt - GRAMMAR_NGRAM) :])

    def _grammar_cache(self, grammar: Grammar) -> NgramCache:
        caches = self._grammar_caches
        cache = caches.get(grammar)
        if cache is None:
            cache = caches[grammar] = NgramCache(n=GRAMMAR_NGRAM, m=self.n_max, capacity=4096)
            while len(caches) > GRAMMAR_CACHES:
                caches.popitem(last=False)
        caches.move_to_end(grammar)
        return cache


__all__ = ["GRAMMAR_NGRAM", "SlotDraft", "Speculator"]
