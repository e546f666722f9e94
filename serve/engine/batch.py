"""One step's ``llama_batch``: the last sampled token of every generating sequence (followed by its drafted tokens,
``Slot.drafting.draft``, each row with logits: ``speculative.py``), then prompt tokens of the sequences still
reading their prompt. Drafts are chosen before the batch is built, within ``n_batch``; prompts take what is left.

Prompts are read oldest request first: a whole ``n_batch`` when nobody is generating, at most ``prompt_chunk``
otherwise, so a long prompt slows the other streams down instead of freezing them. A step starts the next prompt
only while it holds fewer than ``prompt_min_batch`` prompt tokens: on a CPU a prompt token costs about the same in a
batch of 40 as in one of 500, so four 40-token prompts arriving together get their first tokens after ~1, 2, 3 and
4 prompt times rather than all after 4 (TTFT p50 at four cold streams here: 438 ms with all prompts in one step,
353 ms read one after another; llama-server 326-439 ms).

Sequences appear in the batch in the order of ``active`` (seq_id order): llama.cpp decodes one ubatch per run of
consecutive sequence ids with equal token counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgellm.serve.engine.slots import Slot

# prompt tokens a slot reads per step (the serve setting ``prompt_chunk``). Reading a prompt costs ~3.3 ms a token at
# 256-token chunks against ~3.8 at 128 here (SmolLM2-135M, 2 threads), and the v2 workloads at four streams ran
# 0.98-1.19x (1.06x on the rewrite, answers within 2 tokens) against 128 in one run; the price is a longer pause of
# ~0.85 s in the streams decoding beside a cold prompt
PROMPT_CHUNK = 256


@dataclass
class Step:
    """What one batch holds: the generating slots (one token each, plus their drafts) and the prompt tokens taken
    from each reading slot. Each slot with logits in the batch has its ``out_index`` set (a drafting slot: the row
    of ``next_token``; ``drafting.rows`` lists it and its draft's rows)."""

    generating: list[Slot]
    reading: list[tuple[Slot, int]]
    n_tokens: int

    def commit(self) -> list[Slot]:
        """After a successful decode: the evaluated tokens join each slot's cache. Returns the slots to sample now,
        in batch order (the generating ones, then those that finished reading their prompt)."""
        for s in self.generating:
            s.cache.append(s.next_token)
        sampled = list(self.generating)
        for s, take in self.reading:
            s.cache.extend(s.pending[:take])
            del s.pending[:take]
            if not s.pending:
                sampled.append(s)
        return sampled


class BatchBuilder:
    """Owns one ``llama_batch`` of ``n_batch`` tokens and fills it for each step; ``close()`` frees it."""

    def __init__(self, n_batch: int, prompt_chunk: int = PROMPT_CHUNK, prompt_min_batch: int = 32) -> None:
        import llama_cpp as ll

        self._ll = ll
        self.n_batch = n_batch
        self.prompt_chunk = max(1, min(prompt_chunk, n_batch))
        self.prompt_min_batch = max(1, prompt_min_batch)
        self.batch: Any = ll.llama_batch_init(n_batch, 0, 1)

    @staticmethod
    def generating(active: list[Slot]) -> list[Slot]:
        """The slots that put their next token in the batch (followers wait for their leader's prompt)."""
        return [s for s in active if not s.pending and s.leader is None]

    def build(self, active: list[Slot]) -> Step:
        """Fill the batch from the active slots (in their order); sets ``batch.n_tokens``."""
        batch = self.batch
        tok, pos, nseq, seq, out = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        n = 0
        generating = self.generating(active)
        for s in generating:
            s.out_index = n
            draft = s.drafting.draft if s.drafting is not None else ()
            p0 = len(s.cache)
            sid = s.seq_id
            for i, t in enumerate((s.next_token, *draft)):
                tok[n] = t
                pos[n] = p0 + i
                nseq[n] = 1
                seq[n][0] = sid
                out[n] = 1
                n += 1
            if s.drafting is not None:
                s.drafting.rows = list(range(s.out_index, n))
        budget = self.n_batch - n
        if n:
            budget = min(budget, self.prompt_chunk)
        reading: list[tuple[Slot, int]] = []
        taken = 0
        for s in sorted((s for s in active if s.pending), key=lambda s: s.t_start):
            if budget <= 0 or taken >= self.prompt_min_batch:
                break
            take = min(len(s.pending), budget)
            taken += take
            p0 = len(s.cache)
            sid = s.seq_id
            chunk = s.pending
            for i in range(take):
                tok[n + i] = chunk[i]
                pos[n + i] = p0 + i
                nseq[n + i] = 1
                seq[n + i][0] = sid
                out[n + i] = 0
            n += take
            budget -= take
            if take == len(s.pending):
                out[n - 1] = 1
                s.out_index = n - 1
            else:
                s.out_index = -1
            reading.append((s, take))
        batch.n_tokens = n
        return Step(generating=generating, reading=reading, n_tokens=n)

    def close(self) -> None:
        if self.batch is not None:
            self._ll.llama_batch_free(self.batch)
            self.batch = None


__all__ = ["BatchBuilder", "Step"]
