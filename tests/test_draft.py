"""`serve/engine/draft.py`: n-gram drafts from a sequence's own context, the shared cache, and the adaptive draft
length. Pure Python, no model: examples, then hypothesis properties against a from-scratch reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgellm.serve.engine.draft import AdaptiveK, NgramCache, NgramDrafter


def reference_propose(tokens: list[int], k: int, n_max: int = 4, n_min: int = 2) -> list[int]:
    """The definition, by brute force: for the largest n that occurs, the continuation of the most recent earlier
    occurrence of the last n tokens."""
    size = len(tokens)
    if k <= 0:
        return []
    for n in range(min(n_max, size), n_min - 1, -1):
        suffix = tokens[size - n :]
        for end in range(size - 2, n - 2, -1):  # an occurrence ending at `end` with a known successor
            if tokens[end - n + 1 : end + 1] == suffix:
                return tokens[end + 1 : min(end + 1 + k, size)]
    return []


# -- examples -------------------------------------------------------------------------------------------------------
def test_copies_what_followed_the_last_occurrence() -> None:
    passage = [10, 11, 12, 13, 14, 15, 16, 17]
    seq = [1, 2, *passage, 3, 4, 10, 11, 12]  # the answer started quoting the passage
    assert NgramDrafter().propose(seq, 4) == [13, 14, 15, 16]
    assert NgramDrafter().propose(seq, 100) == [13, 14, 15, 16, 17, 3, 4, 10, 11, 12]


def test_prefers_the_longest_match_then_the_most_recent() -> None:
    # [7, 8] occurs twice; only the first is preceded by 6, so the 3-gram [6, 7, 8] picks it over the later one
    seq = [6, 7, 8, 1, 2, 9, 7, 8, 3, 4, 6, 7, 8]
    d = NgramDrafter()
    assert d.propose(seq, 2) == [1, 2] and d.match_n == 3
    # with only a 2-gram match, the most recent occurrence wins
    seq2 = [5, 7, 8, 1, 9, 7, 8, 3, 0, 7, 8]
    d2 = NgramDrafter()
    assert d2.propose(seq2, 2) == [3, 0] and d2.match_n == 2


def test_no_match_no_draft() -> None:
    d = NgramDrafter()
    assert d.propose(list(range(50)), 8) == [] and d.match_n == 0
    assert d.propose([], 8) == [] and d.propose([1], 8) == []
    assert NgramDrafter().propose([1, 2, 1, 2], 0) == []


def test_a_one_token_match_is_not_enough_by_default() -> None:
    assert NgramDrafter().propose([5, 6, 7, 5], 3) == []
    assert NgramDrafter(n_min=1).propose([5, 6, 7, 5], 3) == [6, 7, 5]


def test_the_draft_stops_at_the_end_of_the_sequence() -> None:
    # a run of one token: the most recent earlier [9, 9] ends one before the end, so one token follows it
    assert NgramDrafter().propose([9, 9, 9, 9, 9], 8) == [9]


def test_incremental_use_indexes_only_what_is_new() -> None:
    d = NgramDrafter()
    seq = [1, 2, 3, 4, 5, 6, 1, 2]
    assert d.propose(seq, 3) == [3, 4, 5]
    seq += [3, 4]  # the engine's list, grown by the accepted tokens
    assert d.propose(seq, 3) == [5, 6, 1]
    assert len(d) == len(seq)


def test_rollback_and_divergence_resynchronise() -> None:
    d = NgramDrafter()
    seq = [1, 2, 3, 4, 5, 1, 2, 3, 9, 9]
    d.propose(seq, 4)
    d.truncate(7)  # back to [1, 2, 3, 4, 5, 1, 2]
    assert d.tokens == seq[:7] and d.draft(4) == [3, 4, 5, 1]
    # a list that changed before its end (not just grew) is followed too
    other = [1, 2, 3, 4, 5, 1, 7, 7, 1, 2]
    assert d.propose(other, 4) == reference_propose(other, 4)
    assert d.tokens == other
    assert d.propose([1, 2], 4) == []  # shorter


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="n_min <= n_max"):
        NgramDrafter(n_max=2, n_min=3)
    with pytest.raises(ValueError, match="n_min"):
        NgramDrafter(n_min=0)


def test_a_step_costs_the_same_at_any_context_length() -> None:
    """Not a timing assertion: counts that an appended token is indexed once, never rescanned."""
    d = NgramDrafter()
    seq = [i % 997 for i in range(4000)]
    d.propose(seq, 8)
    sizes = {n: sum(len(v) for v in table.values()) for n, table in d._index.items()}
    for _ in range(100):
        seq.append(len(seq) % 997)
        d.propose(seq, 8)
    after = {n: sum(len(v) for v in table.values()) for n, table in d._index.items()}
    assert all(after[n] - sizes[n] == 100 for n in sizes)


def test_shared_cache_fills_in_when_the_context_has_nothing() -> None:
    cache = NgramCache(n=3, m=5, capacity=100)
    cache.add([40, 41, 42, 43, 44, 45, 46, 47])
    d = NgramDrafter(cache=cache)
    assert d.propose([1, 2, 40, 41, 42], 3) == [43, 44, 45] and d.match_n == -1
    # the sequence's own context wins over the cache
    assert d.propose([40, 41, 42, 7, 40, 41, 42], 3) == [7, 40, 41] and d.match_n == 3
    assert NgramDrafter().propose([1, 2, 40, 41, 42], 3) == []


def test_shared_cache_is_bounded_least_recently_used_out() -> None:
    cache = NgramCache(n=2, m=2, capacity=3)
    cache.add([1, 2, 3, 4, 5])  # [1,2]->[3,4], [2,3]->[4,5], [3,4]->[5]
    assert len(cache) == 3
    assert cache.lookup([1, 2], 2) == [3, 4]  # touch [1, 2]
    cache.add([8, 9, 10])  # [8, 9] -> [10] pushes out the least recently used, [2, 3]
    assert len(cache) == 3
    assert cache.lookup([2, 3], 2) == [] and cache.lookup([1, 2], 1) == [3] and cache.lookup([8, 9], 5) == [10]
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        NgramCache(n=0)


# -- AdaptiveK -------------------------------------------------------------------------------------------------------
def test_full_acceptance_grows_k_to_its_cap() -> None:
    ak = AdaptiveK(k_max=8, k_start=2)
    ks = []
    for _ in range(4):
        k = ak.next_k()
        ks.append(k)
        ak.update(k, k)
    assert ks == [2, 4, 8, 8]
    assert ak.acceptance == 1.0 and ak.drafted == ak.accepted == 22


def test_partial_acceptance_sets_k_to_accepted_plus_one() -> None:
    ak = AdaptiveK(k_max=8, k_start=8)
    ak.update(8, 2)
    assert ak.next_k() == 3 and ak.misses == 0


def test_repeated_misses_stop_drafting_then_probe_with_growing_pauses() -> None:
    ak = AdaptiveK(k_max=8, k_start=4, miss_limit=3, cooldown=4, cooldown_max=16, probe_k=2)
    for _ in range(3):
        ak.update(ak.next_k(), 0)
    assert ak.cooling
    assert [ak.next_k() for _ in range(4)] == [0, 0, 0, 0]
    assert ak.next_k() == 2  # the probe
    ak.update(2, 0)  # missed: cool down again, twice as long
    assert [ak.next_k() for _ in range(8)] == [0] * 8 and ak.next_k() == 2
    ak.update(2, 0)
    assert [ak.next_k() for _ in range(16)] == [0] * 16  # capped at cooldown_max
    ak.update(0, 0)  # no draft this step: nothing learned
    assert ak.next_k() == 2
    ak.update(2, 1)  # a hit resets the misses and the pause length
    assert ak.misses == 0 and not ak.cooling and ak.next_k() == 2
    for _ in range(3):
        ak.update(ak.next_k(), 0)
    assert [ak.next_k() for _ in range(4)] == [0] * 4 and ak.next_k() == 2


def test_nothing_to_copy_costs_little() -> None:
    """Chat where every draft is rejected: the drafted tokens over 500 steps stay a few percent of the steps."""
    ak = AdaptiveK()
    drafted = 0
    for _ in range(500):
        k = ak.next_k()
        if k:
            ak.update(k, 0)
            drafted += k
    assert drafted < 0.05 * 500, drafted


def test_bad_updates_and_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="within 0..drafted"):
        AdaptiveK().update(2, 3)
    with pytest.raises(ValueError):
        AdaptiveK(k_start=9, k_max=8)


# -- properties -------------------------------------------------------------------------------------------------------
# a small alphabet so that n-grams repeat; sequences long enough to hold copies
sequences = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=120)


@settings(max_examples=300, deadline=None)
@given(seq=sequences, k=st.integers(min_value=0, max_value=12))
def test_property_a_draft_is_a_continuation_seen_earlier(seq: list[int], k: int) -> None:
    d = NgramDrafter()
    draft = d.propose(seq, k)
    assert len(draft) <= k
    if draft:
        n = d.match_n
        assert 2 <= n <= 4
        suffix = seq[len(seq) - n :]
        starts = [
            end + 1
            for end in range(n - 1, len(seq) - 1)
            if seq[end - n + 1 : end + 1] == suffix and seq[end + 1 : end + 1 + len(draft)] == draft
        ]
        assert starts, "the draft did not follow an earlier occurrence of the last n tokens"
        # and it is the most recent occurrence of the longest n-gram that occurs
        assert draft == reference_propose(seq, k)


@settings(max_examples=200, deadline=None)
@given(seq=sequences, cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=6), k=st.integers(1, 10))
def test_property_incremental_equals_from_scratch(seq: list[int], cuts: list[int], k: int) -> None:
    """Growing the sequence piece by piece (as the engine does) drafts what a fresh drafter drafts at every step."""
    d = NgramDrafter()
    grown: list[int] = []
    for cut in [*sorted(cuts), len(seq)]:
        grown = seq[: max(len(grown), cut)]
        assert d.propose(grown, k) == NgramDrafter().propose(grown, k) == reference_propose(grown, k)
    for t in range(len(seq)):  # one token at a time, as decoding appends them
        assert d.propose(seq[: t + 1], k) == reference_propose(seq[: t + 1], k)


@settings(max_examples=200, deadline=None)
@given(seq=sequences, keep=st.integers(0, 120), tail=sequences, k=st.integers(1, 10))
def test_property_rollback_equals_from_scratch(seq: list[int], keep: int, tail: list[int], k: int) -> None:
    """Truncating (KV rollback) and growing again leaves the index as if built from scratch."""
    d = NgramDrafter(n_max=5, n_min=2)
    d.propose(seq, k)
    d.truncate(keep)
    now = seq[:keep] + tail
    fresh = NgramDrafter(n_max=5, n_min=2)
    assert d.propose(now, k) == fresh.propose(now, k) == reference_propose(now, k, n_max=5)
    assert d._index == fresh._index


@settings(max_examples=200, deadline=None)
@given(outcomes=st.lists(st.tuples(st.integers(0, 16), st.floats(0, 1)), max_size=200))
def test_property_adaptive_k_stays_in_range(outcomes: list[tuple[int, float]]) -> None:
    ak = AdaptiveK(k_max=8)
    for available, frac in outcomes:
        k = ak.next_k()
        assert 0 <= k <= 8
        drafted = min(k, available)
        ak.update(drafted, int(drafted * frac))
        assert 1 <= ak.k <= 8 and 0 <= ak.cold_steps <= ak.cooldown_max
    assert ak.accepted <= ak.drafted


def test_a_long_context_grown_token_by_token() -> None:
    """4k tokens appended one at a time to the same list (the engine's way): the drafts stay the reference's."""
    source = [(i * 7) % 301 for i in range(4096)]
    seq: list[int] = []
    d = NgramDrafter()
    for t in source:
        seq.append(t)
        d.propose(seq, 8)
    assert len(d) == 4096 and d.propose(seq, 8) == reference_propose(seq, 8)


# -- speculative.py: is a draft worth its rows? ------------------------------------------------------------------
def measured(cost, times: dict[int, float]) -> None:
    for _ in range(4):
        for rows, t in times.items():
            cost.observe(rows, t)


# what this box measured for SmolLM2-135M at 2 threads: a lone row is cheap, then ~5.5 ms a row
SMOLLM2 = {1: 0.0103, 2: 0.0201, 3: 0.0261, 5: 0.0353, 9: 0.0570}


def test_step_cost_uses_measured_row_counts_and_a_fitted_slope_between_them() -> None:
    from edgellm.serve.engine.speculative import StepCost

    cost = StepCost()
    assert cost.seconds(3) is None  # nothing measured
    cost.observe(1, 0.010)
    cost.observe(1, 0.010)
    assert cost.seconds(1) is None, "a row count counts once it was seen 3 times"
    cost.observe(1, 0.010)
    assert cost.seconds(1) == pytest.approx(0.010)
    assert cost.seconds(3) == pytest.approx(0.010 + 2 * 0.005)  # before a slope: a row is half a one-row step
    measured(cost, SMOLLM2)
    assert cost.seconds(2) == pytest.approx(0.0201, rel=0.05)
    assert cost.seconds(4) == pytest.approx(0.0261 + 0.0055, rel=0.1)  # from 3 rows on the fitted slope
    assert cost.seconds(16) == pytest.approx(0.0570 + 7 * 0.0055, rel=0.1)
    cost.observe(200, 9.0)  # a prompt-sized step is not a draft's business: ignored
    cost.observe(0, 1.0)
    cost.observe(2, -1.0)
    assert cost.seconds(200) == pytest.approx(0.0570 + 191 * 0.0055, rel=0.1)


def gains(p: float, k: int = 8) -> list[float]:
    """Expected accepted tokens of drafts of 1..k tokens, every token right with odds p."""
    return [sum(p**i for i in range(1, j + 1)) for j in range(1, k + 1)]


def test_one_stream_drafts_the_length_that_maximises_the_steps_tokens_per_second() -> None:
    from edgellm.serve.engine.speculative import StepCost, choose_drafts

    cost = StepCost()
    measured(cost, SMOLLM2)
    assert choose_drafts(cost, [gains(0.5)], 512, split=True) == (0, [])  # chat: a second row costs as much
    assert choose_drafts(cost, [gains(0.75)], 512, split=True) == (0, [])
    k, chosen = choose_drafts(cost, [gains(0.95)], 512, split=True)
    assert 3 <= k <= 8 and chosen == [0]  # a copy: long drafts pay
    assert choose_drafts(cost, [gains(0.95, k=2)], 512, split=True) == (2, [0])  # no longer than the guess
    assert choose_drafts(cost, [[]], 512, split=True) == (0, [])
    assert choose_drafts(cost, [gains(0.95)], 2, split=True) == (2, [0])  # the batch's room
    free = StepCost()
    measured(free, {1: 0.010, 2: 0.0101, 3: 0.0102, 5: 0.0104, 9: 0.0108})  # a big model: rows are nearly free
    assert choose_drafts(free, [gains(0.5)], 512, split=True)[0] >= 4


# four streams on this box, split KV: 1 row 10.9 ms ... [1,1,1,1] 23.1, [2,2,2,2] 40.3, [3,3,3,3] 54.6, [5]*4 94
FOUR = {1: 0.0109, 2: 0.0166, 3: 0.0219, 4: 0.0231, 5: 0.0311, 8: 0.0403, 9: 0.047, 12: 0.0546, 20: 0.094}


def test_a_split_cache_costs_a_pass_per_draft_length() -> None:
    from edgellm.serve.engine.speculative import StepCost, step_seconds

    cost = StepCost()
    measured(cost, FOUR)
    assert step_seconds(cost, [1, 1, 1, 1], split=True) == pytest.approx(0.0231)
    assert step_seconds(cost, [3, 3, 3, 3], split=True) == pytest.approx(0.0546)
    # [2, 1, 1, 1]: a pass of 4 rows, then one of 1 (measured 33.9 ms); [5, 1, 1, 1]: 4 + 4 (measured 45.8 ms)
    assert step_seconds(cost, [2, 1, 1, 1], split=True) == pytest.approx(0.0231 + 0.0109)
    assert step_seconds(cost, [1, 5, 1, 1], split=True) == pytest.approx(0.0231 + 0.0231)
    assert step_seconds(cost, [3, 2, 1, 1], split=True) == pytest.approx(0.0231 + 0.0166 + 0.0109)
    assert step_seconds(cost, [2, 1, 1, 1], split=False) == pytest.approx(0.0311)  # one cache: rows only


def test_four_streams_draft_together_or_not_at_all() -> None:
    from edgellm.serve.engine.speculative import StepCost, choose_drafts

    cost = StepCost()
    measured(cost, FOUR)
    k, chosen = choose_drafts(cost, [gains(0.9)] * 4, 512, split=True)
    assert k == 2 and sorted(chosen) == [0, 1, 2, 3]  # four copies: one pass of 12 rows
    assert choose_drafts(cost, [gains(0.9), [], [], []], 512, split=True) == (0, [])  # one copy: not worth a pass
    assert choose_drafts(cost, [gains(0.5)] * 4, 512, split=True) == (0, [])  # free chat
    # all or none: one stream with nothing to guess keeps the others from drafting
    assert choose_drafts(cost, [gains(0.99), gains(0.99), gains(0.99), []], 512, split=True) == (0, [])
    k, chosen = choose_drafts(cost, [gains(0.9), gains(0.99), gains(0.3), []], 512, split=False)
    assert chosen[:1] == [1] and 2 not in chosen and 3 not in chosen  # one cache: the likeliest first
    k, chosen = choose_drafts(cost, [gains(0.9)] * 4, 4, split=True)
    assert k * len(chosen) <= 4


def test_acceptance_odds_by_streak_and_match_length() -> None:
    from edgellm.serve.engine.speculative import HALF_LIFE, STREAK_CAP, AcceptanceModel

    odds = AcceptanceModel()
    assert odds.p(0, 2) == 0.5  # the prior
    for _ in range(18):
        odds.observe(5, 4, True)
    odds.observe(5, 4, False)
    for _ in range(9):
        odds.observe(0, 2, False)
    assert odds.p(5, 4) == pytest.approx(19 / 21)
    assert odds.p(0, 2) == pytest.approx(1 / 11)
    assert odds.p(0, 4) == 0.5  # keys are separate
    assert odds.p(5, 2) == pytest.approx(1 / 11)  # an unseen streak takes the odds of the streak below it
    odds.observe(STREAK_CAP + 40, 3, True)
    assert odds.p(STREAK_CAP, 3) == odds.p(STREAK_CAP + 7, 3) == pytest.approx(2 / 3)  # long streaks share a key
    g = odds.gains(4, 4, 3)  # token j extends the streak to 4 + j: (4 -> 1/2), (5 -> 19/21), (6 -> as 5)
    q = 19 / 21
    assert g == pytest.approx([0.5, 0.5 + 0.5 * q, 0.5 + 0.5 * q + 0.5 * q * q])
    for _ in range(4 * HALF_LIFE):  # counts halve: a change of workload shows within a few hundred guesses
        odds.observe(0, 2, True)
    assert odds.p(0, 2) > 0.95


def propose(spec, sd, cache: list[int], next_token: int, limit: int = 8) -> list[int]:  # type: ignore[no-untyped-def]
    """One generating slot's step: its draft."""
    spec.propose([(sd, cache, next_token, limit)], room=512)
    return list(sd.draft)


def test_guesses_teach_whether_drafted_or_not_and_a_copy_drafts_long() -> None:
    from edgellm.serve.engine.speculative import Speculator

    spec = Speculator(n_max=8)
    measured(spec.cost, SMOLLM2)
    seq = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]  # "4 5 6 ..." follows "1 2 3"
    # free chat: the drafter guesses "4", the model says "0": at the prior's odds nothing is drafted, and the miss
    # is learned at no cost
    for _ in range(10):
        sd = spec.start(n_prompt=len(seq), grammar=None)
        assert propose(spec, sd, seq[:-1], seq[-1], limit=8) == [] and sd.guess == [4, 5, 6, 7, 8, 9, 1, 2]
        sd.settle([0])
        assert sd.streak == 0
    assert spec.odds.p(0, 3) < 0.1 and sd.n_drafted == 0
    # a copy: right guesses (not drafted) grow the streak; the odds learned at each streak make drafts pay
    copy = list(range(100, 140))
    prompt = [*copy, 7, 7, *copy[:3]]
    for _ in range(6):  # six answers copying the passage, one token per step until drafting pays
        sd = spec.start(n_prompt=len(prompt), grammar=None)
        out = list(prompt)
        while len(out) - len(prompt) + 3 < len(copy) - 9:
            d = propose(spec, sd, out[:-1], out[-1], limit=8)
            emitted = copy[len(out) - len(prompt) + 3 :][: len(d) + 1]
            sd.settle(emitted)
            out.extend(emitted)
    assert spec.odds.p(6, 4) > 0.9  # 4-token matches, once the copy is 4 tokens in
    quoting = [*copy, 7, 7, *copy[:4]]  # an answer 4 tokens into a quote, its last 4 guesses right
    sd = spec.start(n_prompt=len(quoting), grammar=None)
    sd.streak = 4
    assert len(propose(spec, sd, quoting[:-1], quoting[-1], limit=8)) >= 4
    assert propose(spec, sd, quoting[:-1], quoting[-1], limit=2) == copy[4:6]  # the budget caps it


def test_without_the_cost_model_every_match_is_drafted() -> None:
    from edgellm.serve.engine.speculative import Speculator

    spec = Speculator(n_max=8, cost_aware=False)
    seq = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    sd = spec.start(n_prompt=len(seq), grammar=None)
    assert propose(spec, sd, seq[:-1], seq[-1]) == [4, 5, 6, 7]  # AdaptiveK's first k


def test_a_step_of_four_streams_drafts_in_one_length() -> None:
    from edgellm.serve.engine.speculative import Speculator

    spec = Speculator(n_max=8)
    measured(spec.cost, FOUR)
    for _ in range(200):  # a reliable copy at every streak
        for streak in range(9):
            spec.odds.observe(streak, 3, True)
    seq = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    sds = [spec.start(n_prompt=len(seq), grammar=None) for _ in range(4)]
    spec.propose([(sd, seq[:-1], seq[-1], 8) for sd in sds], room=508)
    lengths = {len(sd.draft) for sd in sds}
    assert len(lengths) == 1 and lengths.pop() >= 1 and all(sd.draft == seq[3 : 3 + len(sd.draft)] for sd in sds)
    assert all(sd.n_drafted == len(sd.draft) for sd in sds)
    before = spec.cost.seconds(6)
    spec.observe([3, 1, 1, 1], 0.9)  # two passes: not the cost of 6 rows in one
    assert spec.cost.seconds(6) == before
    for _ in range(3):
        spec.observe([2, 2, 2], 0.9)  # one pass of 6 rows: learned
    assert spec.cost.seconds(6) == pytest.approx(0.9)
    lone = [spec.start(n_prompt=len(seq), grammar=None) for _ in range(4)]
    spec.propose([(lone[0], seq[:-1], seq[-1], 8)] + [(sd, [5, 6], 7, 8) for sd in lone[1:]], room=508)
    assert all(sd.draft == [] for sd in lone[1:])  # nothing to copy


def test_a_request_whose_guesses_fare_worse_than_the_shared_odds_drafts_less() -> None:
    from edgellm.serve.engine.speculative import CALIBRATION_PRIOR, Speculator

    spec = Speculator(n_max=8)
    measured(spec.cost, SMOLLM2)
    for _ in range(200):  # the mix so far: guesses at streak >= 1 on 3-token matches are right
        for streak in range(1, 9):
            spec.odds.observe(streak, 3, True)
    seq = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    fresh = spec.start(n_prompt=len(seq), grammar=None)
    assert fresh.calibration == 1.0
    fresh.streak = 3
    assert len(propose(spec, fresh, seq[:-1], seq[-1])) >= 4
    # this request's guesses at streak 1 keep failing where the shared odds say ~99%
    poor = spec.start(n_prompt=len(seq), grammar=None)
    for _ in range(12):
        poor.guess, poor.match_n, poor.streak = [4], 3, 1
        poor.settle([0])
    assert poor.calibration == pytest.approx(CALIBRATION_PRIOR / (CALIBRATION_PRIOR + 12 * spec.odds.p(1, 3)), rel=0.2)
    poor.streak = 3
    assert propose(spec, poor, seq[:-1], seq[-1]) == []


def test_no_drafts_beside_a_prompt_with_a_split_cache_but_guesses_still_learn() -> None:
    from edgellm.serve.engine.speculative import Speculator

    seq = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    for split, drafts in ((True, False), (False, True)):
        spec = Speculator(n_max=8, split=split)
        measured(spec.cost, SMOLLM2)
        for _ in range(200):
            for streak in range(9):
                spec.odds.observe(streak, 3, True)
        sd = spec.start(n_prompt=len(seq), grammar=None)
        sd.streak = 5
        spec.propose([(sd, seq[:-1], seq[-1], 8)], room=384, reading=True)
        assert bool(sd.draft) == drafts and sd.guess[:3] == [4, 5, 6]
        seen = spec.odds._seen.get((5, 3), 0.0)
        sd.settle([4])
        assert spec.odds._seen[(5, 3)] == seen + 1  # scored all the same


def test_the_shared_cache_comes_after_the_longest_own_match_and_before_shorter_ones() -> None:
    shared = NgramCache(n=4, m=5, capacity=100)
    shared.add([50, 40, 41, 42, 43, 44, 45, 46])  # another request's text: 40 41 42 43 -> 44 45 46
    grammar = NgramCache(n=3, m=5, capacity=100)
    grammar.add([41, 42, 43, 90, 91])
    d = NgramDrafter(cache=grammar, shared=shared)
    # own 4-gram match wins
    assert d.propose([40, 41, 42, 43, 7, 8, 40, 41, 42, 43], 3) == [7, 8, 40] and d.match_n == 4
    # own 3-gram match (42 43 -> 9) loses to the shared 4-gram
    assert d.propose([1, 42, 43, 9, 40, 41, 42, 43], 3) == [44, 45, 46] and d.match_n == -2
    # no own match, no shared match: the grammar's cache
    assert d.propose([1, 2, 41, 42, 43], 2) == [90, 91] and d.match_n == -1
    # a 4-gram the shared cache lacks: the own shorter match
    assert d.propose([5, 42, 43, 9, 6, 42, 43], 2) == [9, 6] and d.match_n == 2
    # n_min == n_max: the shared cache is still consulted after the own match fails
    d4 = NgramDrafter(n_max=4, n_min=4, shared=shared)
    assert d4.propose([9, 40, 41, 42, 43], 2) == [44, 45] and d4.match_n == -2


def test_a_finished_request_teaches_the_next_through_the_shared_cache() -> None:
    from edgellm.serve.engine.speculative import Speculator

    prompt, answer = [1, 2, 3, 4, 5, 6], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]
    for shared, expected in ((False, []), (True, answer[:4])):  # AdaptiveK starts at 4 tokens
        spec = Speculator(n_max=8, cost_aware=False, shared=shared)
        first = spec.start(n_prompt=len(prompt), grammar=None)
        propose(spec, first, prompt[:-1], prompt[-1], limit=8)
        first.settle([answer[0]])
        first.drafter.extend(answer[1:])
        spec.finish(first)
        again = spec.start(n_prompt=len(prompt), grammar=None)  # the same request again
        guess = propose(spec, again, prompt[:-1], prompt[-1], limit=8)
        assert guess == expected
        assert (spec.shared is not None and len(spec.shared) > 0) == shared


def test_the_shared_cache_is_a_setting_off_by_default() -> None:
    from edgellm.serve.settings import DraftSettings

    assert DraftSettings().policy().speculator().shared is None  # type: ignore[union-attr]
    spec = DraftSettings(shared=True).policy().speculator()  # type: ignore[union-attr]
    assert isinstance(spec.shared, NgramCache) and spec.shared.n == 4 and spec.shared.m == 8


def test_drafts_stop_where_drafted_steps_are_seen_to_yield_less_than_undrafted_ones() -> None:
    from edgellm.serve.engine.speculative import REALIZED_MIN, REALIZED_PROBE, RealizedYield

    r = RealizedYield()
    assert r.drafts_pay(4) and r.rate(4, True) is None  # nothing measured: the estimates decide
    for _ in range(REALIZED_MIN):
        r.observe(4, False, 4, 0.025)  # 160 tok/s without drafts
        r.observe(4, True, 6, 0.050)  # 120 tok/s with them
        r.observe(1, False, 1, 0.011)
        r.observe(1, True, 3, 0.020)  # 150 against 91: drafts pay at one stream
    assert r.rate(4, False) == pytest.approx(160) and r.rate(4, True) == pytest.approx(120)
    assert all(r.drafts_pay(1) for _ in range(20))
    verdicts = [r.drafts_pay(4) for _ in range(4 * REALIZED_PROBE)]
    assert sum(verdicts) == 4  # one probe in REALIZED_PROBE keeps the drafted mean current
    for _ in range(60):  # the probes find drafts paying again (a copy-heavy stretch): they go on
        r.observe(4, True, 12, 0.050)
    assert r.drafts_pay(4)


def test_the_speculator_holds_back_drafts_its_realised_yield_says_do_not_pay() -> None:
    from edgellm.serve.engine.speculative import REALIZED_MIN, Speculator

    spec = Speculator(n_max=8)
    measured(spec.cost, SMOLLM2)
    copy = list(range(100, 140))
    seq = [*copy, 7, 7, *copy[:6]]
    sd = spec.start(n_prompt=len(seq), grammar=None)
    sd.streak = 8
    for _ in range(50):
        spec.odds.observe(8, 4, True)
    assert propose(spec, sd, seq[:-1], seq[-1]) != []  # the estimates say a draft pays
    for _ in range(REALIZED_MIN):
        spec.observe([1], 0.011, emitted=1)
        spec.observe([5], 0.040, emitted=2)  # but drafted steps were seen yielding 50 tok/s against 91
    assert propose(spec, sd, seq[:-1], seq[-1]) == [] and sd.guess  # still guessed (and scored), not drafted
