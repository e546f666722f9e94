"""A request's sampling parameters as one of llama.cpp's native sampler chains (``llama_sampler_*``), built in the
order llama-server uses (common/sampling.cpp): penalties -> top_k -> top_p -> min_p -> temperature -> dist.
Greedy (``temperature <= 0``) is penalties -> argmax. The chain samples and accepts in C:
``llama_sampler_sample(chain, ctx, batch_index)``. The batched engine keeps one chain per running request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgellm.serve.engine.base import SamplingParams


class SamplerChain:
    """Owns one ``llama_sampler`` chain; ``close()`` frees it (exactly once)."""

    def __init__(self, params: SamplingParams, n_vocab: int, n_ctx: int) -> None:
        import llama_cpp as ll

        self._ll = ll
        chain_params = ll.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.ptr: Any = ll.llama_sampler_chain_init(chain_params)
        if not self.ptr:
            raise MemoryError("llama_sampler_chain_init failed")
        p = params
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

    def sample(self, ctx: Any, index: int) -> int:
        """Sample the next token from the logits at batch ``index`` of ``ctx``'s last decode, and accept it (in C, no
        copy of the logits)."""
        token: int = self._ll.llama_sampler_sample(self.ptr, ctx, index)
        return token

    def close(self) -> None:
        if self.ptr:
            self._ll.llama_sampler_free(self.ptr)
            self.ptr = None
