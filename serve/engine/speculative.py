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
order, ``": "``, closing brackets. Each request with a (non-lazy) grammar gets a ``ForcedDrafter`` (``forced.py``):
a Python recognizer follows its output character by character through the GBNF and walks ahead while only one
character is allowed (at a whitespace choice, the whitespace this output used there before). That text, tokenized,
is the step's guess, ahead of the n-gram drafter's (``match_n`` ``FORCED``), and goes through the same verification
as any draft: a run of forced tokens is appended in one batch, and the output is exactly what step-by-step
constrained decoding gives (a guess in other tokens than the model's, or the wrong whitespace, is a rejected draft
token). Asking llama.cpp's grammar sampler instead which *tokens* it allows would cost a pass over the whole
vocabulary per position (measured 3.2 ms at best for SmolLM2's 49k tokens on a loaded 2-core box: as much as a
decode step); following the text costs ~10 microseconds a character. It uses nothing but the request's own grammar
and output, so it is on by default.

``jump_forward_learned`` (off by default) adds the older guesser: each grammar keeps an ``NgramCache`` of the
outputs produced under it (the last ``n`` tokens -> what followed), consulted when the slot's own context has no
match. It is shared by the requests using the same grammar, so, as ``draft.py`` says of ``NgramCache``: how fast an
answer comes out may reveal whether another client's answer under the same schema continued the same way; keep it
off when mutually untrusted clients share a server.

**Is a draft worth its rows?** Verifying a drafted token is not free on a CPU. ``StepCost`` keeps the measured time
of a step by its number of rows (every decode step that reads no prompt is timed): for SmolLM2-135M on 2 cores,
1 row takes ~10 ms, 2 rows ~16 ms, then each row ~5 ms more, so a small model's draft pays only when it is likely to
be accepted, and less so with several streams in the batch, since each extra row delays them all.

How likely is learned from *every* guess the drafter makes, drafted or not (``AcceptanceModel``): at each step the
drafter's guess for a slot (what it would copy) is compared with the tokens the model then emitted, which costs
nothing when the guess was not drafted. The odds of a guess depend mostly on how it is doing: after a run of right
guesses the sequence is copying (a quote, the unchanged part of a rewrite) and the next guess is nearly always right;
after a miss, or on a 2-token match in free chat, it rarely is. So the model keeps counts keyed by the slot's
*streak* (right guesses in a row before this one, capped at ``STREAK_CAP``) and the length of the n-gram matched,
shared by the model's requests and slowly forgetting (counts halve past ``HALF_LIFE``). Token ``j`` of a draft is
right with the probability at streak ``s + j``, given the ones before it were. Each request scales the shared odds
by its own record (right guesses / the odds they were given: ``SlotDraft.calibration``), so a workload whose
guesses fare worse than the mix drafts less.

Each step, ``choose_drafts`` picks the drafts that make the step yield the most tokens per second, ``(tokens +
expected accepted) / time(step)``, over drafts of one length ``k``. One length because of the KV layout: with the
cache split per sequence (the default), llama.cpp decodes a batch in passes of equal rows per sequence, so one
stream drafting beside three that do not costs a second pass (``step_seconds``), while four streams drafting 2
tokens each cost one pass of 12 rows; so with a split cache all generating streams draft or none (measured:
partial drafts at four streams lost up to 16% against drafting off even with the extra pass priced in), and a
step that also reads a prompt chunk does not draft. Only one-pass steps teach
``StepCost``. And the estimates are checked against what happens (``RealizedYield``): per number of streams, the
tokens per second of the steps that drafted against those that did not; where drafted steps yield less, drafts stop
but for an occasional probe. Free chat thus decodes as without drafting (its guesses are seen to miss, at no cost), a copy starts
drafting within a few tokens of starting, and the drafts are as long as the measured costs say they pay.
(Measured on this box, rewrite at one stream: 1.26-1.34x the speed with drafting off, against 1.03-1.05x with the earlier
per-stream acceptance and probes.)

**Budget.** A slot drafts at most ``min(k, tokens left - 1, context left - 2)`` tokens, so neither ``max_tokens``
nor ``n_ctx`` can be passed, and drafts take batch rows before prompt chunks do.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from edgellm.serve.engine.base import Grammar
from edgellm.serve.engine.draft import AdaptiveK, NgramCache, NgramDrafter
from edgellm.serve.engine.forced import DraftVocab, ForcedDrafter, Gbnf, ModelHabits

log = logging.getLogger(__name__)

GRAMMAR_NGRAM = 3  # tokens of context that key a grammar's learned continuation (``"name": "`` -> ...)
GRAMMAR_CACHES = 32  # grammars whose continuations are kept (least recently used out)
FORCED = -3  # ``SlotDraft.match_n`` of a jump-forward draft (the text the grammar forces)
FORCED_SEAM = -4  # ... of one that begins with a choice about whitespace (the style's guess: less sure)
SHARED_NGRAMS = 65536  # n-grams the shared cache keeps (least recently used out; ~20 MB)
STREAK_CAP = 8  # right guesses in a row beyond this count as this many (the odds stop changing)
HALF_LIFE = 512  # a key's counts halve past this many guesses: the model follows a change of workload
DRAFT_MARGIN = 1.05  # a step drafts only when expected to yield this much more per second than without
CALIBRATION_PRIOR = 4.0  # guesses' weight of the prior that a request's guesses fare as the shared odds say
REALIZED_MIN = 24  # steps of each kind (drafted, not) at a number of streams before their yields are compared
REALIZED_DECAY = 0.05  # weight of a step in the moving mean of realised tokens per second
REALIZED_PROBE = 8  # while drafts yield less than no drafts, one chosen draft in this many still goes (to re-measure)


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


class AcceptanceModel:
    """The odds that a drafter's guess is right, by the slot's streak (right guesses in a row before it, up to
    ``STREAK_CAP``) and the n-gram length it matched (``NgramDrafter.match_n``): counts of right and wrong guesses
    per key (halved when a key passes ``HALF_LIFE`` guesses), each key's prior the odds at one streak less. One per model, used
    by the scheduler thread only."""

    def __init__(self) -> None:
        self._right: dict[tuple[int, int], float] = {}
        self._seen: dict[tuple[int, int], float] = {}

    def p(self, streak: int, match_n: int) -> float:
        """The odds of a guess at this streak and match length: its counts, with two guesses' weight of the odds
        at one streak less (1/2 at streak 0): a longer streak is taken to be as good until seen otherwise, so a
        copy's first right guesses already raise the odds of the next ones."""
        streak = min(streak, STREAK_CAP)
        prior = 0.5
        for s in range(streak + 1):
            key = (s, match_n)
            prior = (self._right.get(key, 0.0) + 2.0 * prior) / (self._seen.get(key, 0.0) + 2.0)
        return prior

    def observe(self, streak: int, match_n: int, right: bool) -> None:
        key = (min(streak, STREAK_CAP), match_n)
        seen = self._seen.get(key, 0.0) + 1.0
        got = self._right.get(key, 0.0) + (1.0 if right else 0.0)
        if seen > HALF_LIFE:
            seen, got = seen / 2, got / 2
        self._seen[key], self._right[key] = seen, got

    def gains(self, streak: int, match_n: int, k: int, scale: float = 1.0) -> list[float]:
        """Expected accepted tokens of a draft of 1, 2, ... k guessed tokens: token j is accepted if it and all
        before it are right, each with the odds at the streak it would extend (times ``scale``, at most 1)."""
        out: list[float] = []
        chance, total = 1.0, 0.0
        for j in range(k):
            chance *= min(1.0, scale * self.p(streak + j, match_n))
            total += chance
            out.append(total)
        return out


class RealizedYield:
    """The check on the estimates: tokens emitted per second by the steps that drafted and by those that did not,
    per number of generating streams (moving means). The odds and costs behind ``choose_drafts`` are estimates, and
    at several streams with prompts arriving they erred (rewrite at four streams: 0.88-0.91x of drafting off in two
    runs); where drafted steps are seen to yield less than undrafted ones, drafts stop there but for one probe in
    ``REALIZED_PROBE`` that keeps the drafted mean current."""

    def __init__(self) -> None:
        self._rate: dict[tuple[int, bool], float] = {}
        self._count: dict[tuple[int, bool], int] = {}
        self._skipped: dict[int, int] = {}

    def observe(self, streams: int, drafted: bool, emitted: int, seconds: float) -> None:
        if seconds <= 0 or emitted <= 0:
            return
        key = (streams, drafted)
        rate, old = emitted / seconds, self._rate.get(key)
        n = self._count[key] = self._count.get(key, 0) + 1
        # the plain mean until the moving mean's horizon, then the moving mean
        self._rate[key] = rate if old is None else old + max(REALIZED_DECAY, 1 / n) * (rate - old)

    def rate(self, streams: int, drafted: bool) -> float | None:
        """The realised tokens per second, once ``REALIZED_MIN`` such steps were seen."""
        key = (streams, drafted)
        return self._rate[key] if self._count.get(key, 0) >= REALIZED_MIN else None

    def drafts_pay(self, streams: int) -> bool:
        """Whether a draft chosen at ``streams`` generating streams should go: yes until both kinds of step are
        measured, then while drafted steps yield at least as much as undrafted ones; else one in ``REALIZED_PROBE``."""
        with_drafts, without = self.rate(streams, True), self.rate(streams, False)
        if with_drafts is None or without is None or with_drafts >= without:
            return True
        skipped = self._skipped[streams] = self._skipped.get(streams, 0) + 1
        return skipped % REALIZED_PROBE == 0


def step_seconds(cost: StepCost, lengths: list[int], split: bool) -> float:
    """The expected time of a step whose generating sequences put ``lengths`` rows each in the batch (1 + draft).
    With the KV cache split per sequence (``split``), llama.cpp decodes a batch in passes that take the same number
    of rows from every sequence still having some, so uneven drafts cost extra passes: ``[2, 1, 1, 1]`` is a pass of
    4 rows and a pass of 1 (measured here: 33.9 ms against 23.1 for ``[1, 1, 1, 1]`` and 40.3 for ``[2, 2, 2, 2]``).
    Unmeasured cost: a row taken as half of a one-row step."""

    def seconds(rows: int) -> float:
        t = cost.seconds(rows)
        return t if t is not None else 1.0 + 0.5 * (rows - 1)

    if not split or len(lengths) < 2:
        return seconds(sum(lengths))
    total, done = 0.0, 0
    levels = sorted(lengths)
    for i, level in enumerate(levels):
        if level > done:
            total += seconds((level - done) * (len(levels) - i))
            done = level
    return total


def choose_drafts(cost: StepCost, gains: list[list[float]], room: int, split: bool) -> tuple[int, list[int]]:
    """The drafts that make a step yield the most tokens per second: ``gains[i][k-1]`` is the tokens a k-token
    draft of generating sequence ``i`` is expected to add (an empty list: it has nothing to draft). Drafts are of
    one length ``k``: with a split KV cache, for all sequences or none (one pass; measured here, drafts beside
    sequences that did not draft lost up to 16% at four streams even with the extra pass priced in); with one
    cache, for those expected to gain most at that length. At most ``room`` rows in all; expected to beat no draft
    by ``DRAFT_MARGIN`` (estimates err, and a draft that does not pay costs more than one skipped). Returns
    ``(k, chosen)``; ``(0, [])``: none."""
    n = len(gains)
    best_rate, best_k, best_set = DRAFT_MARGIN * n / step_seconds(cost, [1] * n, split), 0, []
    for k in range(1, max((len(g) for g in gains), default=0) + 1):
        able = sorted((i for i in range(n) if len(gains[i]) >= k), key=lambda i: -gains[i][k - 1])
        if split and len(able) < n:
            continue
        for m in [n] if split else range(1, len(able) + 1):  # how many of ``able`` draft
            if m * k > room:
                break
            lengths, tokens = [1] * n, float(n)
            for i in able[:m]:
                lengths[i] = 1 + k
                tokens += gains[i][k - 1]
            rate = tokens / step_seconds(cost, lengths, split)
            if rate > best_rate:
                best_rate, best_k, best_set = rate, k, able[:m]
    return best_k, best_set


@dataclass
class SlotDraft:
    """One request's drafting state in a slot: its drafter (indexed over prompt + accepted output + next token),
    its k policy (when drafting is not cost-aware), the drafter's guess at this step (``guess``, of which ``draft``
    went into the batch, with the batch rows of ``next_token`` and each draft token) and its streak of right
    guesses."""

    drafter: NgramDrafter
    k: AdaptiveK
    n_prompt: int
    odds: AcceptanceModel
    grammar: Grammar | None = None  # the grammar whose learned continuations it drafts from (and teaches)
    forced: ForcedDrafter | None = None  # jump-forward: what its own grammar forces next
    guess: list[int] = field(default_factory=list)
    match_n: int = 0
    draft: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    streak: int = 0  # the drafter's right guesses in a row, up to this step
    right: float = 0.0  # this request's right guesses, and the odds the model gave them (its calibration)
    expected: float = 0.0
    n_drafted: int = 0  # for the response's timings: tokens drafted, and drafted tokens the sampler confirmed
    n_accepted: int = 0

    def lookup(self, k: int) -> list[int]:
        """Up to ``k`` tokens to guess next: the text the grammar forces, if any, else the n-gram drafter's guess
        (``match_n`` says which)."""
        if self.forced is not None:
            forced = self.forced.draft(k)
            if forced:
                self.match_n = FORCED_SEAM if self.forced.seam else FORCED
                return forced
        guess = self.drafter.draft(k)
        self.match_n = self.drafter.match_n
        return guess

    def settle(self, emitted: list[int]) -> int:
        """After verification: ``emitted`` are the tokens sampled from this step's rows (1 .. len(draft) + 1).
        Returns how many drafted tokens were accepted (their KV stays); scores the step's guess against what was
        emitted (drafted or not: a guess not drafted is still a free lesson), updates k and the index."""
        draft = self.draft
        matched = 0
        while matched < min(len(draft), len(emitted)) and emitted[matched] == draft[matched]:
            matched += 1
        accepted = min(matched, len(emitted) - 1)
        self.k.update(len(draft), accepted)
        if not self.guess:
            self.streak = 0  # no match: whatever was being copied lost its anchor
        for guessed, got in zip(self.guess, emitted, strict=False):
            right = guessed == got
            self.expected += self.odds.p(self.streak, self.match_n)
            self.right += right
            self.odds.observe(self.streak, self.match_n, right)
            if not right:
                self.streak = 0
                break
            self.streak += 1
        if len(self.drafter):  # not indexed yet: the first ``propose`` indexes the whole sequence
            self.drafter.extend(emitted)
            if self.forced is not None:
                self.forced.push(emitted)
        self.draft = []
        self.guess = []
        return accepted

    @property
    def calibration(self) -> float:
        """How this request's guesses fare against the shared odds: right / expected so far, from a prior of
        ``CALIBRATION_PRIOR`` guesses at 1 (a workload the shared odds overrate drafts less)."""
        return (self.right + CALIBRATION_PRIOR) / (self.expected + CALIBRATION_PRIOR)


@dataclass(frozen=True)
class DraftPolicy:
    """How a batched model drafts (``None`` instead of a policy: it does not). ``n_max`` tokens at most per slot and
    step; n-gram matches of ``ngram_max`` down to ``ngram_min`` tokens; ``jump_forward``: under a grammar, draft
    the text it forces next (``forced.py``; the request's own grammar and output only); ``cost_aware``: draft only
    the tokens worth their rows (False: whatever ``AdaptiveK`` allows, for tests and measurements); ``shared``: also
    draft from the model's finished requests (an ``NgramCache`` of their prompts and answers, shared across
    requests and clients); ``jump_forward_learned``: also learn each grammar's continuations from earlier answers
    under it (shared across clients); ``jump_forward_spellings``: draft forced text in the tokens the model wrote
    it in before (``forced.ModelHabits``: keys and punctuation, no values; shared across clients);
    ``forced_drafter``: who drafts a request's forced text (``ForcedDrafter``; ``bench/jump_forward.py`` measures
    the ceiling with drafters that know the answers)."""

    n_max: int = 8
    ngram_max: int = 4
    ngram_min: int = 2
    jump_forward: bool = True
    cost_aware: bool = True
    shared: bool = False
    jump_forward_learned: bool = False
    jump_forward_spellings: bool = True
    forced_drafter: Callable[[Gbnf, DraftVocab, ModelHabits], ForcedDrafter] = ForcedDrafter

    def speculator(self, split: bool = True, vocab: DraftVocab | None = None) -> Speculator:
        """The policy for one model (``split``: its KV cache is split per sequence; ``vocab``: its vocabulary, for
        jump-forward; None: no jump-forward)."""
        return Speculator(
            self.n_max,
            self.ngram_max,
            self.ngram_min,
            self.jump_forward_learned,
            self.cost_aware,
            split,
            self.shared,
            vocab if self.jump_forward else None,
            self.jump_forward_spellings,
            self.forced_drafter,
        )


DEFAULT_DRAFT = DraftPolicy()


class Speculator:
    """One model's drafting policy: ``n_max`` tokens at most per slot and step, n-gram matches of ``ngram_max``
    down to ``ngram_min`` tokens; ``learned``: learn each grammar's continuations; ``cost_aware``: draft only
    the tokens worth their rows (``StepCost``; False drafts whatever ``AdaptiveK`` allows); ``shared``: keep an
    ``NgramCache`` of the finished requests for all to draft from; ``vocab``: the model's vocabulary, to draft what
    a request's grammar forces next (None: no such drafts). See the module docstring. Used by the scheduler
    thread only."""

    def __init__(
        self,
        n_max: int = 8,
        ngram_max: int = 4,
        ngram_min: int = 2,
        learned: bool = False,
        cost_aware: bool = True,
        split: bool = True,
        shared: bool = False,
        vocab: DraftVocab | None = None,
        spellings: bool = True,
        forced_drafter: Callable[[Gbnf, DraftVocab, ModelHabits], ForcedDrafter] = ForcedDrafter,
    ) -> None:
        if n_max < 1:
            raise ValueError(f"draft n_max must be >= 1, got {n_max}")
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"draft needs 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.n_max = n_max
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min
        self.learned = learned
        self.cost_aware = cost_aware
        self.split = split  # the KV cache is split per sequence (llama.cpp decodes uneven rows in passes)
        self.cost = StepCost()
        self.odds = AcceptanceModel()
        self.realized = RealizedYield()
        self._grammar_caches: OrderedDict[Grammar, NgramCache] = OrderedDict()
        self.shared = NgramCache(n=ngram_max, m=n_max, capacity=SHARED_NGRAMS) if shared else None
        self.vocab = vocab
        self.forced_drafter = forced_drafter
        self.habits = ModelHabits(vocab.eot if vocab is not None else None, spell=spellings)  # its answers' form

    def start(self, n_prompt: int, grammar: Grammar | None, shape: Gbnf | None = None) -> SlotDraft:
        """A new request's drafting state (``grammar``: the one its output follows, if any; ``shape``: that grammar
        parsed by ``forced.py``, for jump-forward; None: no jump-forward)."""
        cache = self._grammar_cache(grammar) if grammar is not None and self.learned else None
        parsed = shape if grammar is not None and self.vocab is not None else None
        k_start = min(4, self.n_max)
        return SlotDraft(
            NgramDrafter(self.ngram_max, self.ngram_min, cache, self.shared),
            AdaptiveK(k_max=self.n_max, k_start=k_start, probe_k=min(2, self.n_max)),
            n_prompt,
            self.odds,
            grammar if cache is not None else None,
            self.forced_drafter(parsed, self.vocab, self.habits) if parsed is not None and self.vocab is not None else None,
        )

    def propose(
        self, slots: list[tuple[SlotDraft, list[int], int, int]], room: int, reading: bool = False
    ) -> None:
        """Choose this step's drafts (each slot's ``draft``): ``slots`` are the step's generating slots as
        ``(drafting state, KV tokens, next_token to evaluate now, most tokens it may draft)`` (the caller's budget:
        tokens left, context left); ``room``: batch rows free for drafts in all; ``reading``: the step also reads a
        prompt, so with a split KV cache a draft would add a pass beside it (no drafts then; guesses still learn)."""
        gains: list[list[float]] = []
        for sd, cache, next_token, limit in slots:
            if len(sd.drafter) == 0:  # first step: index the prompt (and a reused prefix) once
                sd.drafter.extend(cache)
                sd.drafter.extend([next_token])
                if sd.forced is not None:
                    sd.forced.push([next_token])
            sd.draft = []
            if not self.cost_aware:  # the grammar's forced text whenever there is some, else what AdaptiveK allows
                forced = sd.forced.draft(min(self.n_max, limit, room)) if sd.forced is not None else []
                k = min(sd.k.next_k(), limit, room)
                sd.guess = sd.draft = sd.lookup(len(forced) if forced else k) if forced or k > 0 else []
                room -= len(sd.draft)
                continue
            sd.guess = sd.lookup(self.n_max)  # scored after the step whether drafted or not
            cap = min(len(sd.guess), limit)
            gains.append(self.odds.gains(sd.streak, sd.match_n, cap, sd.calibration) if cap > 0 else [])
        if self.cost_aware and not (reading and self.split):
            k, chosen = choose_drafts(self.cost, gains, room, self.split)
            if chosen and not self.realized.drafts_pay(len(slots)):
                chosen = []
            for i in chosen:
                sd = slots[i][0]
                sd.draft = sd.guess[:k]
        for sd, *_ in slots:
            sd.n_drafted += len(sd.draft)

    def observe(self, lengths: list[int], seconds: float, emitted: int | None = None) -> None:
        """A decode step that read no prompt took ``seconds`` (decoding and sampling) with these rows per generating
        sequence and ``emitted`` tokens: learned as the cost of its rows if llama.cpp did it in one pass, and as the
        realised yield of a step with or without drafts at that many streams."""
        if not self.split or len(set(lengths)) == 1:
            self.cost.observe(sum(lengths), seconds)
        if emitted is not None and lengths:
            self.realized.observe(len(lengths), any(n > 1 for n in lengths), emitted, seconds)

    def finish(self, sd: SlotDraft) -> None:
        """A request ended (its last tokens settled): with the shared cache, remember its prompt and answer for the
        next requests; under a grammar, what its output continued with, from the last few prompt tokens (the
        template's assistant header) on, for the next requests under it."""
        if sd.forced is not None:
            sd.forced.finish()
        if len(sd.drafter) <= sd.n_prompt:
            return
        if self.shared is not None:
            self.shared.add(sd.drafter.tokens)
        cache = self._grammar_caches.get(sd.grammar) if sd.grammar is not None else None
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
    "AcceptanceModel",
    "GRAMMAR_NGRAM",
    "DraftPolicy",
    "RealizedYield",
    "SlotDraft",
    "Speculator",
    "StepCost",
    "choose_drafts",
    "step_seconds",
]
