"""Comparing greedy answers across batch shapes. llama.cpp's results depend slightly on how a batch is laid out (a
prompt read in one batch or a token at a time, beside other sequences or alone: other kernels, other rounding), so
two greedy runs of one request may part where the model's top two tokens were nearly tied. A difference is accepted
only there: at the first differing character, the token the reference run chose there had a runner-up within
``MARGIN`` nats (its logprobs, from the reference run)."""

from __future__ import annotations

from collections.abc import Sequence

MARGIN = 0.25  # nats; SmolLM2-135M Q4_1 with LoRA adapters: flips seen at margins 0.0 and 0.085
# two random (untrained) LoRA adapters applied at once move the logits more with the batch's layout: a flip seen at
# 0.363 nats ("royal jelly, and honey" / "royal jelly, honey, and", 4 December); an adapter applied to the wrong
# tokens moves them by nats
MIXED_ADAPTERS_MARGIN = 0.5


def first_difference(a: str, b: str) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def near_tie_at(index: int, tokens: Sequence[tuple[int, float]], margin: float = MARGIN) -> bool:
    """``tokens``: (character offset, top-1 minus top-2 logprob) of each token of the reference answer."""
    chosen = [m for offset, m in tokens if offset <= index]
    return bool(chosen) and chosen[-1] < margin


def same_or_near_tie(reference: str, got: str, tokens: Sequence[tuple[int, float]], margin: float = MARGIN) -> bool:
    """``got`` equals the reference answer, or departs from it first where the reference had a near tie (top two
    within ``margin`` nats)."""
    index = first_difference(reference, got)
    return index is None or near_tie_at(index, tokens, margin)


def openai_token_margins(logprobs: object) -> list[tuple[int, float]]:
    """(offset, margin) per token from an OpenAI chat ``choice.logprobs`` (asked with ``top_logprobs >= 2``)."""
    out: list[tuple[int, float]] = []
    offset = 0
    for t in getattr(logprobs, "content", None) or []:
        top = sorted((x.logprob for x in t.top_logprobs), reverse=True)
        out.append((offset, top[0] - top[1] if len(top) > 1 else float("inf")))
        offset += len(t.token)
    return out
