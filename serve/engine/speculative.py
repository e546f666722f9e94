"""Speculative decoding from the context, and jump-forward under grammars, for the batched engine: which tokens a
generating slot drafts at a step (``Speculator.propose``), and the bookkeeping after the batch verified them
(``SlotDraft.settle``). The verification itself (sampling each drafted row with the request's own sampler chain)
is in ``batched.py``; the drafters are in ``draft.py``.

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

**Is a draft worth its rows?** Verifying a drafted token is not free on a CPU. ``StepCost`` keeps the measured time
of a step by its number of rows (every decode step that reads no prompt is timed): for SmolLM2-135M on 2 cores,
1 row takes ~10 ms, 2 rows ~20 ms (llama.cpp computes a lone row with a faster kernel), then each row ~5.5 ms more,
so a small model's draft pays only when it is likely to be accepted, and less so with several streams in the batch,
since each extra row delays them all. Each step, slot after slot, ``best_draft`` picks the draft length that makes
the step yield the most tokens per second: ``(tokens + alpha + alpha^2 + ... + alpha^k) / time(rows + k)``, with
``alpha`` the slot's own per-token acceptance (recent drafts weigh most, a prior of 1/2) and the step's rows and
expected tokens including the drafts already chosen (``StepPlan``). A slot whose drafts do not pay sends a one-token
probe now and then (after 4 steps with a match, then 8, 16, ... 256 while probes keep failing; at once again after
an accepted one, whose row brought a token) to notice when copying starts, but only where a draft would pay for a
good copy (95% per token): with four streams in the batch on this box, a row costs so much that nothing drafts or
probes. Free chat thus decodes as without drafting, and a copy drafts where the measured costs say it pays.

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
ALPHA_DECAY = 0.9  # weight of a slot's earlier drafts in its acceptance estimate, per verified draft
PROBE_GAP = (4, 256)  # steps with a match between probes of a slot that does not draft: first, longest
ALPHA_COPY = 0.95  # per-token acceptance of a good copy: a slot probes only where a draft would pay at this rate


class StepCost:
    """What a decode step costs as a function of its rows: the moving mean time of each row count seen (up to
    ``max_rows``, steps that read prompt tokens excluded), and between or beyond them a line whose slope is fitted
    over the counts from 2 up (llama.cpp computes one row with a different kernel than several: on a 2-core box
    SmolLM2-135M takes ~10 ms for 1 row, ~20 for 2, then ~5.5 more per row). Before a slope is known, a row is
    taken to cost half of a one-row step."""

    def __init__(self, max_rows: int = 64, decay: float = 0.1, min_count: int = 3) -> None:
        self.max_rows = max_rows
        self.decay = decay
        self.min_count = min_count
        self._mean: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self._known: list[int] = []  # row counts seen min_count times, ascending
        self._slope: float | None = None
        self._stale = 0

    def observe(self, rows: int, seconds: float) -> None:
        if not 0 < rows <= self.max_rows or seconds <= 0:
            return
        mean = self._mean.get(rows)
        self._mean[rows] = seconds if mean is None else mean + self.decay * (seconds - mean)
        count = self._count[rows] = min(self._count.get(rows, 0) + 1, 32)
        self._stale += 1
        if count == self.min_count or self._stale >= 16:
            self._refit()

    def _refit(self) -> None:
        self._stale = 0
        self._known = sorted(n for n, c in self._count.items() if c >= self.min_count)
        pts = [(n, self._mean[n], float(self._count[n])) for n in self._known if n >= 2]
        w = sum(c for _, _, c in pts)
        if len(pts) < 2 or w <= 0:
            return
        mx = sum(n * c for n, _, c in pts) / w
        my = sum(t * c for _, t, c in pts) / w
        sxx = sum(c * (n - mx) ** 2 for n, _, c in pts)
        if sxx > 0:
            self._slope = max(0.0, sum(c * (n - mx) * (t - my) for n, t, c in pts) / sxx)

    def seconds(self, rows: int) -> float | None:
        """The expected time of a step of ``rows`` rows; None before any row count is known."""
        known = self._known
        if not known:
            return None
        if rows in self._mean and self._count[rows] >= self.min_count:
            return self._mean[rows]
        below = [n for n in known if n < rows]
        anchor = below[-1] if below else known[0]
        slope = self._slope if self._slope is not None else 0.5 * self._mean[known[0]] / known[0]
        return max(1e-9, self._mean[anchor] + slope * (rows - anchor))


@dataclass
class StepPlan:
    """The drafts chosen so far for one step: its rows and the tokens they are expected to yield (each generating
    slot's own token, plus its draft's expected accepted tokens)."""

    rows: int
    tokens: float


def expected_accepted(alpha: float, k: int) -> float:
    """Tokens a k-token draft is expected to add when each is accepted with probability ``alpha`` (given the ones
    before it were): alpha + alpha^2 + ... + alpha^k."""
    return sum(alpha**i for i in range(1, k + 1))


def best_draft(cost: StepCost, plan: StepPlan, alpha: float, k_max: int) -> int:
    """The draft length (0..k_max) that makes this step yield the most tokens per second, given the drafts already
    in ``plan``. Unmeasured cost: a row taken as half of a one-row step."""

    def seconds(rows: int) -> float:
        t = cost.seconds(rows)
        return t if t is not None else 1.0 + 0.5 * (rows - 1)

    best_k, best_rate = 0, plan.tokens / seconds(plan.rows)
    for k in range(1, k_max + 1):
        rate = (plan.tokens + expected_accepted(alpha, k)) / seconds(plan.rows + k)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k


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
    hits: float = 0.0  # decayed counts of accepted draft tokens and of rejections: ``alpha``
    misses: float = 0.0
    probe_gap: int = PROBE_GAP[0]  # steps with a match before the next probe, while not worth drafting
    idle: int = PROBE_GAP[0]  # steps with a match since the last draft (the first match may probe at once)
    probing: bool = False

    @property
    def alpha(self) -> float:
        """This request's per-token draft acceptance: accepted / (accepted + rejections), recent drafts weighing
        most, starting from 1/2."""
        return (self.hits + 1.0) / (self.hits + self.misses + 2.0)

    def settle(self, emitted: list[int]) -> int:
        """After verification: ``emitted`` are the tokens sampled from this step's rows (1 .. len(draft) + 1).
        Returns how many drafted tokens were accepted (their KV stays), updates k and the index."""
        draft = self.draft
        matched = 0
        while matched < min(len(draft), len(emitted)) and emitted[matched] == draft[matched]:
            matched += 1
        accepted = min(matched, len(emitted) - 1)
        self.k.update(len(draft), accepted)
        if draft:
            rejected = matched < len(draft) and len(emitted) > matched  # the model chose another token
            self.hits = ALPHA_DECAY * self.hits + accepted
            self.misses = ALPHA_DECAY * self.misses + (1.0 if rejected else 0.0)
            if self.probing:  # an accepted probe costs nothing (its row brought a token): probe again at once
                self.probe_gap = PROBE_GAP[0] if accepted else min(PROBE_GAP[1], 2 * self.probe_gap)
                self.idle = self.probe_gap if accepted else 0
                self.probing = False
        if len(self.drafter):  # not indexed yet: the first ``propose`` indexes the whole sequence
            self.drafter.extend(emitted)
        self.draft = []
        return accepted


@dataclass(frozen=True)
class DraftPolicy:
    """How a batched model drafts (``None`` instead of a policy: it does not). ``n_max`` tokens at most per slot and
    step; n-gram matches of ``ngram_max`` down to ``ngram_min`` tokens; ``jump_forward``: learn each grammar's
    continuations; ``cost_aware``: draft only the tokens worth their rows (False: whatever ``AdaptiveK`` allows, for
    tests and measurements)."""

    n_max: int = 8
    ngram_max: int = 4
    ngram_min: int = 2
    jump_forward: bool = False
    cost_aware: bool = True

    def speculator(self) -> Speculator:
        return Speculator(self.n_max, self.ngram_max, self.ngram_min, self.jump_forward, self.cost_aware)


DEFAULT_DRAFT = DraftPolicy()


class Speculator:
    """One model's drafting policy: ``n_max`` tokens at most per slot and step, n-gram matches of ``ngram_max``
    down to ``ngram_min`` tokens; ``jump_forward``: learn each grammar's continuations; ``cost_aware``: draft only
    the tokens worth their rows (``StepCost``; False drafts whatever ``AdaptiveK`` allows). See the module docstring.
    Used by the scheduler thread only."""

    def __init__(
        self,
        n_max: int = 8,
        ngram_max: int = 4,
        ngram_min: int = 2,
        jump_forward: bool = False,
        cost_aware: bool = True,
    ) -> None:
        if n_max < 1:
            raise ValueError(f"draft n_max must be >= 1, got {n_max}")
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"draft needs 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.n_max = n_max
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min
        self.jump_forward = jump_forward
        self.cost_aware = cost_aware
        self.cost = StepCost()
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

    def plan(self, n_seqs: int) -> StepPlan:
        """A step's draft plan, before any slot drafted: ``n_seqs`` generating sequences, a row and a token each."""
        return StepPlan(rows=n_seqs, tokens=float(n_seqs))

    def propose(
        self, sd: SlotDraft, cache: list[int], next_token: int, limit: int, plan: StepPlan | None = None
    ) -> list[int]:
        """The draft of one generating slot whose KV holds ``cache`` and whose sampled ``next_token`` is to be
        evaluated now; at most ``limit`` tokens (budget, tokens left, context left: the caller's). ``plan``: the
        step's drafts so far (see ``plan``), which this one is weighed against and added to."""
        if len(sd.drafter) == 0:  # first step: index the prompt (and a reused prefix) once
            sd.drafter.extend(cache)
            sd.drafter.extend([next_token])
        k = min(sd.k.next_k(), limit)
        sd.draft = []
        if k <= 0:
            return sd.draft
        if not self.cost_aware:
            sd.draft = sd.drafter.draft(k)
        else:
            plan = plan if plan is not None else self.plan(1)
            worth = best_draft(self.cost, plan, sd.alpha, k)
            if worth > 0:
                sd.draft = sd.drafter.draft(worth)
                sd.idle = 0
            elif sd.drafter.draft(1) and best_draft(self.cost, plan, ALPHA_COPY, k):
                # a match, not worth its rows at this slot's acceptance, but it would be for a copy: probe now and then
                sd.idle += 1
                if sd.idle > sd.probe_gap:
                    sd.draft = sd.drafter.draft(1)
                    sd.idle = 0
                    sd.probing = True
            if sd.draft:
                plan.rows += len(sd.draft)
                plan.tokens += expected_accepted(sd.alpha, len(sd.draft))
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


__all__ = [
    "DEFAULT_DRAFT",
    "GRAMMAR_NGRAM",
    "DraftPolicy",
    "SlotDraft",
    "Speculator",
    "StepCost",
    "StepPlan",
    "best_draft",
    "expected_accepted",
]
