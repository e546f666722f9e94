"""The slot table: one slot per sequence of a model's llama context, the tokens whose KV each one holds, and which
slot a new request gets.

A slot keeps its KV after its request ends, so the next request that shares a prefix with it does not recompute
that prefix:

- **choice of slot**: a request takes the free slot that keeps the most of its prompt and loses the least of what
  others may reuse: the cached tokens it shares with the prompt, less half of those it would overwrite, except in
  the least recently used free slot, whose tokens are the ones to lose (the next turn of a chat takes its own slot;
  a new conversation takes an empty slot or the least recently used one, rather than a slot holding another
  conversation that only shares the system prompt, whose few shared tokens a prefix copy brings over anyway; and a
  long cache nobody came back to is the first to go, not the short recent one). Ties go to the lowest slot;
- **prefix copy**: if another slot holds a longer prefix (the same system prompt, another user), its KV is copied
  into the chosen slot instead of being recomputed, when that is cheaper (``copy_threshold``);
- whatever the slot holds past the shared prefix is removed from its KV;
- **LoRA adapters**: KV computed with one adapter set (``Job.lora``) is not the KV of another, so a slot's cache
  counts (and is copied) only for requests with the same set (``Slot.kv_key``); otherwise it is dropped.

The table also holds each slot's per-request state (pending prompt tokens, the sampled token, its sampler chain,
detokenizer and stop matcher, counters for the timings); ``release`` frees a slot for the next request.

A request with ``n`` choices holds ``n`` slots: the first (the leader) reads the prompt; the others (followers) wait
with an empty KV until it has, then ``fork`` copies the leader's KV into each of them (the prompt is evaluated once)
and every choice samples its first token from the leader's logits.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Protocol

from edgellm.serve.engine.detok import Detokenizer, StopMatcher
from edgellm.serve.engine.logprobs import LogprobQueue
from edgellm.serve.engine.pool import Job
from edgellm.serve.engine.sampling import SamplerChain

if TYPE_CHECKING:
    from edgellm.serve.engine.persona_filters import TextFilters
    from edgellm.serve.engine.speculative import SlotDraft

log = logging.getLogger(__name__)


class KVMemory(Protocol):
    """The KV operations the table needs (llama.cpp's ``llama_memory_seq_*`` on one context)."""

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        """Remove positions ``[p0, p1)`` of a sequence (-1: open end); False if the memory cannot do a partial removal."""
        ...

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Copy positions ``[p0, p1)`` of sequence ``src`` into ``dst`` (-1, -1: all of it)."""
        ...


LoraKey = tuple[tuple[int, float], ...]


def lora_key(lora: LoraKey) -> LoraKey:
    """A request's adapter set in one canonical form: by adapter id, zero scales dropped (llama.cpp ignores them)."""
    return tuple(sorted((i, float(s)) for i, s in lora if s != 0.0))


def _shared(slot: Slot, tokens: list[int], key: LoraKey) -> int:
    return common_prefix(slot.cache, tokens) if slot.kv_key == key else 0


def _fit(slot: Slot, tokens: list[int], key: LoraKey, expendable: bool) -> tuple[float, int, int]:
    """How well a free slot suits a prompt (higher is better): cached tokens kept, less half of those overwritten
    unless the slot is ``expendable`` (the least recently used); then the least recently used; then the lowest."""
    shared = _shared(slot, tokens, key)
    lost = 0 if expendable else (len(slot.cache) - shared) / 2
    return (shared - lost, -slot.last_used, -slot.seq_id)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def copy_threshold(n_ctx: int, kv_bytes_per_token: int, n_params: int) -> int:
    """Prefix tokens above which copying a slot's KV (``n_ctx`` cells of K and V) is cheaper than recomputing them
    (~2 FLOPs per parameter and token), taking 100 GFLOP/s and 10 GB/s as a CPU's ratio.
    SmolLM2-135M at n_ctx 1024: 23 KB of KV per token, a copy costs as much as ~1 token: the floor of 16 wins."""
    return max(16, math.ceil(n_ctx * kv_bytes_per_token * 5 / max(1, n_params)))


class Slot:
    """One sequence of the context: the tokens its KV holds, and the request it serves (if any)."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.cache: list[int] = []  # tokens whose K/V this sequence holds, at positions 0..len-1
        self.kv_key: LoraKey = ()  # the LoRA adapter set that KV was computed with
        self.last_used = 0  # when a request last took this slot (the table's counter)
        self.job: Job | None = None
        # the request being served
        self.pending: list[int] = []  # prompt tokens not evaluated yet
        self.next_token = -1  # sampled, to be evaluated at the next step
        self.out_index = -1  # batch index of this sequence's logits in the current step
        self.drafting: SlotDraft | None = None  # speculative decoding state (None: this request does not draft)
        self.chain: SamplerChain | None = None
        self.detok: Detokenizer | None = None
        self.stop: StopMatcher | None = None
        self.filters: TextFilters | None = None  # a persona's word cap and phrase filter
        self.logprobs: LogprobQueue | None = None  # only for a request that asked for logprobs
        self.choice = 0  # which of the request's n choices this slot generates
        self.leader: Slot | None = None  # a follower waiting for this slot to read the prompt
        self.followers: list[Slot] = []  # a leader's followers, until they are forked
        self.max_tokens = 0
        self.n_decoded = 0
        self.n_cached = 0
        self.n_evaluated = 0
        self.t_start = 0.0
        self.t_first = 0.0


class SlotTable:
    """The ``n`` slots of one context and its KV memory; ``active`` lists the slots serving a request, in seq_id
    order (the batch's order). ``copy_min_tokens``: see ``copy_threshold`` (1 with a unified KV cache, where a
    copy shares cells instead of copying them)."""

    def __init__(self, n: int, memory: KVMemory, copy_min_tokens: int) -> None:
        self.slots = [Slot(i) for i in range(n)]
        self.active: list[Slot] = []
        self._memory = memory
        self._copy_min_tokens = copy_min_tokens
        self._uses = 0

    def n_free(self) -> int:
        return len(self.slots) - len(self.active)

    def assign(self, job: Job) -> Slot:
        """Give ``job`` the free slot that suits its prompt best (see the module docstring: the most of its prompt
        cached under its adapter set, the least of other prompts lost; then the least recently used)."""
        free = [s for s in self.slots if s.job is None]
        if not free:
            raise RuntimeError("no free slot")  # callers check n_free() first
        key = lora_key(job.lora)
        lru = min(free, key=lambda s: (len(s.cache) > 0, s.last_used, s.seq_id))  # an empty one, else the LRU
        best = max(free, key=lambda s: _fit(s, job.tokens, key, s is lru))
        self._uses += 1
        best.last_used = self._uses
        best.job = job
        self.active.append(best)
        self.active.sort(key=lambda s: s.seq_id)
        return best

    def reuse_prefix(self, slot: Slot, tokens: list[int], key: LoraKey = ()) -> int:
        """Make ``slot``'s KV hold the longest cached prefix of ``tokens`` computed with adapter set ``key`` it can
        (its own, or copied from another slot) and nothing past it; returns the number of tokens kept. At least one
        token is left to evaluate, for its logits."""
        if slot.kv_key != key:
            self.forget(slot)
            slot.kv_key = key
        keep = min(common_prefix(slot.cache, tokens), len(tokens) - 1)
        copied = self._copy_prefix(slot, tokens, keep)
        if copied:
            return copied
        keep = min(keep, len(slot.cache))  # a copy that failed half-way leaves the slot empty
        if keep < len(slot.cache):
            if not self._memory.seq_rm(slot.seq_id, keep, -1):
                self._memory.seq_rm(slot.seq_id, -1, -1)
                keep = 0
            del slot.cache[keep:]
        return keep

    def _copy_prefix(self, slot: Slot, tokens: list[int], keep: int) -> int:
        """If another slot holds a longer prefix of ``tokens``, copy its KV into ``slot`` instead of recomputing
        it; returns the tokens now cached, or 0 if nothing was copied.

        Across the per-sequence KV streams llama.cpp copies a whole stream (``seq_cp`` with p0 = p1 = -1, applied at
        the next decode, before it computes), then the tail past the shared prefix is removed. Copying a slot's
        ``n_ctx`` cells beats recomputing once the gain passes ``copy_min_tokens``."""
        best: Slot | None = None
        shared = 0
        for other in self.slots:
            if other is slot or not other.cache or other.kv_key != slot.kv_key:
                continue
            n = common_prefix(other.cache, tokens)
            if n > shared:
                best, shared = other, n
        shared = min(shared, len(tokens) - 1)
        if best is None or shared - keep < self._copy_min_tokens:
            return 0
        memory = self._memory
        # Empty the slot first: per-sequence streams are replaced whole by the copy, but in a unified cache the
        # copied cells would sit beside the slot's own at the same positions.
        memory.seq_rm(slot.seq_id, -1, -1)
        slot.cache.clear()
        memory.seq_cp(best.seq_id, slot.seq_id, -1, -1)
        if not memory.seq_rm(slot.seq_id, shared, -1):  # a memory without partial removal
            memory.seq_rm(slot.seq_id, -1, -1)
            slot.cache.clear()
            return 0
        slot.cache = best.cache[:shared]
        log.debug("slot %d: copied %d cached tokens from slot %d", slot.seq_id, shared, best.seq_id)
        return shared

    def fork(self, leader: Slot, follower: Slot) -> None:
        """The leader has read the prompt: give ``follower`` (empty, see ``forget``) a copy of its KV, to sample its
        first token from the leader's logits. A whole-stream copy across per-sequence KV streams (applied at the next
        decode, before it computes), shared cells in a unified cache."""
        self._memory.seq_cp(leader.seq_id, follower.seq_id, -1, -1)
        follower.cache = list(leader.cache)
        follower.kv_key = leader.kv_key
        follower.out_index = leader.out_index
        follower.leader = None

    def truncate(self, slot: Slot, n_keep: int) -> None:
        """Drop the slot's KV from position ``n_keep`` on (rejected draft rows) and its cache past it; a memory
        without partial removal (recurrent models: never drafted, see ``LlamaContext.can_truncate``) loses it all."""
        if not self._memory.seq_rm(slot.seq_id, n_keep, -1):
            self._memory.seq_rm(slot.seq_id, -1, -1)
            n_keep = 0
        del slot.cache[n_keep:]

    def forget(self, slot: Slot) -> None:
        """Drop everything the slot's KV holds (its state is unknown after an error)."""
        self._memory.seq_rm(slot.seq_id, -1, -1)
        slot.cache.clear()

    def release(self, slot: Slot) -> None:
        """Free the slot for the next request; its KV (``slot.cache``) stays for prefix reuse."""
        if slot.chain is not None:
            slot.chain.close()
            slot.chain = None
        slot.job = None
        slot.pending = []
        slot.detok = None
        slot.stop = None
        slot.filters = None
        slot.logprobs = None
        slot.drafting = None
        slot.choice = 0
        slot.leader = None
        slot.followers = []
        if slot in self.active:
            self.active.remove(slot)

    def close(self) -> None:
        """Free the sampler chains still held (the model is closing)."""
        for slot in self.slots:
            if slot.chain is not None:
                slot.chain.close()


__all__ = ["KVMemory", "LoraKey", "Slot", "SlotTable", "common_prefix", "copy_threshold", "lora_key"]
