"""Log-probabilities of sampled tokens, for the requests that ask for them (``SamplingParams.logprobs``).

**Which distribution.** As llama-server (``populate_token_probs`` without ``post_sampling_probs``): the model's own
next-token distribution, the log-softmax of the raw logits over the whole vocabulary, before anything of the
sampler chain (``logit_bias``, penalties, temperature, top-k/p, min-p, grammar). A token the chain could never have
picked still has its model log-probability; greedy decoding picks the top entry.

Computed with numpy from the logits row llama.cpp already holds for the sequence (``llama_get_logits_ith``), only
for the slots that asked: about a pass over the vocabulary per token, nothing for the others.

**Which delta carries a token's logprob.** A token's text can be held back (the first bytes of a character split
over tokens, or the start of what may be a stop string). ``LogprobQueue`` keeps each token's logprob with the
character offset where its text starts, and hands it to the first text delta that sends that character; tokens whose
text a stop string cut off are dropped, like their text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgellm.serve.engine.base import TokenLogprob

MAX_TOP_LOGPROBS = 20


def token_logprob(logits: Any, token: int, k: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """``token``'s log-probability under ``softmax(logits)`` (a float32 row of the vocabulary) and the ``k`` likeliest
    tokens, best first (ties: lower id first)."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float32)
    m = float(x.max())
    lse = m + float(np.log(np.exp(x - m, dtype=np.float64).sum()))
    top: tuple[TokenLogprob, ...] = ()
    if k > 0:
        k = min(k, x.size)
        idx = np.argpartition(-x, k - 1)[:k]
        idx = idx[np.lexsort((idx, -x[idx]))]
        top = tuple(TokenLogprob(int(t), piece(int(t)), float(x[t]) - lse) for t in idx)
    return TokenLogprob(token, piece(token), float(x[token]) - lse, top)


class LogprobQueue:
    """One choice's token logprobs waiting for their text to be sent (see the module docstring)."""

    def __init__(self) -> None:
        self._items: list[TokenLogprob] = []
        self._produced = 0  # characters of text the tokens made so far
        self._sent = 0  # characters sent

    def push(self, entry: TokenLogprob, n_chars: int) -> None:
        """A sampled token whose text (as the detokenizer gave it, possibly empty) is ``n_chars`` long."""
        self._items.append(TokenLogprob(entry.token, entry.piece, entry.logprob, entry.top, self._produced))
        self._produced += n_chars

    def take(self, n_chars: int) -> tuple[TokenLogprob, ...]:
        """``n_chars`` more characters are sent: the logprobs of the tokens whose text starts within them."""
        self._sent += n_chars
        i = 0
        items = self._items
        while i < len(items) and items[i].offset < self._sent:
            i += 1
        out, self._items = tuple(items[:i]), items[i:]
        return out

    def take_all(self) -> tuple[TokenLogprob, ...]:
        out, self._items = tuple(self._items), []
        return out

    def drop(self) -> None:
        """The rest of the text was cut by a stop string."""
        self._items = []


__all__ = ["MAX_TOP_LOGPROBS", "LogprobQueue", "token_logprob"]
