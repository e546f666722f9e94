"""The batched engine: continuous batching on llama-cpp-python's low-level API, sampling in llama.cpp's own
sampler chains. This module composes the pieces; each lives in a module of its own:

- ``context.py``: the loaded GGUF and its llama context with ``slots`` sequences (and how it is sized),
- ``slots.py``: the slot table: the KV each sequence holds, the choice of slot, prefix reuse and copy,
- ``batch.py``: building one step's ``llama_batch`` (decode tokens, then prompt chunks, oldest request first),
- ``sampling.py``: each request's llama.cpp sampler chain (and grammar sampler, parsed once per model),
- ``structured.py``: structured output and tool calling (grammars, the fallback tool prompt, tool-call parsing),
- ``detok.py``: incremental detokenization and stop strings,
- ``scheduler.py``: the one decoding thread that all the engine's models take turns on.

``BatchedModel`` is one model: its wait queue (admission, 503 with Retry-After when full) and its step. Each step

1. admits waiting requests into free slots (``SlotTable.assign``: the longest cached prefix wins),
2. frees the slots of cancelled requests (client gone),
3. builds one ``llama_batch`` (``BatchBuilder``),
4. runs one ``llama_decode``, samples each sequence that has an output with its own sampler chain, detokenizes
   incrementally and emits the text (with the tokens' logprobs, for the requests that asked: ``logprobs.py``).

**Speculative decoding from the context** (``speculative.py``, on unless ``draft=None``): before the batch is
built, each generating slot may draft up to ``DraftPolicy.n_max`` tokens copied from its prompt and output (n-gram
lookup, with a per-slot adaptive length, as long as its acceptance repays the measured cost of a row: every decode
step that reads no prompt is timed for that). They ride in the batch after its ``next_token``, each row with logits;
``_sample`` then samples the rows in order with the request's own chain and emits each token through ``_on_token``
(stop strings, ``max_tokens``, end of generation, logprobs and persona filters end the request exactly where step
by step decoding would), stopping at the first token that differs from the draft; the KV of the rows after it is
removed (``SlotTable.truncate``) so ``slot.cache`` holds accepted tokens only. Greedy output is the same as without
drafts (up to llama.cpp's batch-shape rounding at near ties); sampled requests keep their distribution (a
point-mass draft accepted exactly when the sampler drew it). **Jump-forward under grammars** (``jump_forward``, on
by default): the text a request's grammar forces next (``forced.py``) is tokenized and proposed as a draft, verified
the same way, so a run of forced tokens is appended in one batch and the output equals step-by-step constrained
decoding. ``Timings.draft_n`` /
``draft_n_accepted`` report it per response; ``EngineStats`` totals it for /metrics.

LoRA adapters (``ModelSpec.loras``, chosen per request by ``GenerationRequest.lora``): llama.cpp applies one adapter
set to a whole batch, so a step decodes one batch per adapter set among the active slots, starting with the set
already applied (switching costs a graph reservation: each step switches at most once per extra set). Requests on
one set batch together as before; a slot's KV counts for prefix reuse only under the set it was computed with.

A persona's ``max_words`` and ``forbidden_phrases`` filter each choice's text after the stop strings
(``textfilters.py``).

A request with ``n`` choices waits until ``n`` slots are free and takes them together: one reads the prompt, the
others get a copy of its KV and sample from its logits (``SlotTable.fork``), each with its own sampler chain.

``BatchedEngine.submit`` plans a request that asks for structured output or tools (``StructuredOutput.plan``:
its grammar parsed and checked before anything is queued, its messages rewritten for a template without tool
support) and wraps the generation in a tool-call parser when the answer may call tools.

Usable from Python without a server::

    engine = BatchedEngine([ModelSpec(name="m", path=Path("model.gguf"))], slots=4)
    generation = await engine.submit(GenerationRequest(model="m", prompt="Once upon a time"))
    async for event in generation: ...
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque

from edgellm.serve.engine.base import (
    EngineOverloadedError,
    EngineStats,
    EngineUnavailableError,
    Finished,
    FinishReason,
    Generation,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    SlotInfo,
    TextDelta,
    Timings,
    TokenLogprob,
)
from edgellm.serve.engine.batch import PROMPT_CHUNK, BatchBuilder
from edgellm.serve.engine.context import LlamaContext
from edgellm.serve.engine.detok import Detokenizer, StopMatcher
from edgellm.serve.engine.grammar import GrammarCache
from edgellm.serve.engine.logprobs import LogprobQueue, token_logprob
from edgellm.serve.engine.persona_filters import TextFilters
from edgellm.serve.engine.pool import Job, ModelPool
from edgellm.serve.engine.sampling import Candidates, CompiledGrammars, SamplerChain
from edgellm.serve.engine.scheduler import Scheduler
from edgellm.serve.engine.slots import LoraKey, Slot, SlotTable, copy_threshold, lora_key
from edgellm.serve.engine.specs import ModelSpec
from edgellm.serve.engine.speculative import DEFAULT_DRAFT, DraftPolicy, Speculator
from edgellm.serve.engine.structured import StructuredOutput, needs_plan

log = logging.getLogger(__name__)


def retry_after(service_s: float, waiting: int, slots: int) -> int:
    """Seconds after which one more request is likely to find a slot: the rounds of ``slots`` requests ahead of it
    times a request's average time in a slot, between 1 and 60."""
    rounds = math.ceil((waiting + 1) / slots)
    return min(60, max(1, math.ceil(service_s * rounds)))


class BatchedModel:
    """A loaded GGUF and its context with ``slots`` sequences, served by a ``Scheduler`` thread (its own by
    default; the engine's models share one)."""

    def __init__(
        self,
        spec: ModelSpec,
        slots: int,
        queue_size: int,
        scheduler: Scheduler | None = None,
        prompt_chunk: int = PROMPT_CHUNK,
        prompt_min_batch: int = 32,
        kv_unified: bool = False,
        flash_attn: bool | None = None,
        grammar_cache: GrammarCache | None = None,
        draft: DraftPolicy | None = DEFAULT_DRAFT,
    ) -> None:
        self.spec = spec
        self.slots_n = slots
        self._queue_size = queue_size
        n_batch = max(spec.n_batch, slots)  # room for every sequence's next token in one batch
        self.llama = LlamaContext(spec, n_seq=slots, n_batch=n_batch, kv_unified=kv_unified, flash_attn=flash_attn)
        self._kv_unified = kv_unified
        try:
            self._batch = BatchBuilder(n_batch, prompt_chunk, prompt_min_batch)
        except BaseException:
            self.llama.close()
            raise
        self.template = self.llama.template
        self.grammars = CompiledGrammars(self.llama.vocab)
        self._candidates: Candidates | None = None  # for grammar sampling, made on first use
        self._special_pieces: dict[int, str] = {}
        self._logprob_pieces: dict[int, bytes] = {}
        self.structured = StructuredOutput(
            self.template, self._markup_tokens, self.grammars, grammar_cache or GrammarCache()
        )
        copy_min = (
            1
            if kv_unified
            else copy_threshold(spec.n_ctx, self.llama.kv_bytes_per_token(), self.llama.n_params())
        )
        self._slots = SlotTable(slots, self.llama, copy_min)
        self._speculator = self._make_speculator(draft)
        self.n_drafted = 0  # draft tokens verified, and accepted (for /metrics)
        self.n_draft_accepted = 0
        self.created = int(time.time())

        self._waiting: deque[Job] = deque()
        self._admitted: list[list[Slot]] = []  # each request's slots, admitted by the scheduler, started next step
        self.closing = False
        self._service_s = 2.0  # moving average of a request's time in a slot, for Retry-After
        self._scheduler = scheduler or Scheduler()
        self._cond = self._scheduler.cond  # guards _waiting and closing
        self._slot_limit = slots  # set_limits: slots new requests may fill (running ones keep theirs)
        self._threads = spec.threads()
        self._want_threads: int | None = None  # applied by the scheduler thread before its next decode
        self.n_decode = 0  # llama_decode calls, and the sequences they carried (for /metrics)
        self.n_decoded_seqs = 0
        self._scheduler.attach(self)

    @property
    def name(self) -> str:
        return self.spec.name

    def _make_speculator(self, draft: DraftPolicy | None) -> Speculator | None:
        if draft is None:
            return None
        if not self.llama.can_truncate():
            log.info("%s: no speculative decoding (its KV cannot drop rejected draft tokens)", self.spec.name)
            return None
        return draft.speculator(split=not self._kv_unified, vocab=self.llama.draft_vocab())

    # -- request side (event loop, or any thread) ---------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.llama.tokenize(text)

    def _encode_text(self, text: str) -> list[int]:
        """Plain text's ids (no BOS, special tokens as text)."""
        return self.llama.prompts.encode(text, add_special=False, parse_special=False)

    def _markup_tokens(self, text: str) -> list[int]:
        """The ids of a piece of markup (special tokens parsed, no BOS)."""
        return [int(t) for t in self.llama.model.tokenize(text.encode("utf-8"), add_bos=False, special=True)]

    def enqueue(self, job: Job) -> None:
        with self._cond:
            if self.closing:
                raise EngineUnavailableError(f"model {self.spec.name!r} is shutting down")
            if any(j.cancelled.is_set() for j in self._waiting):
                self._waiting = deque(j for j in self._waiting if not j.cancelled.is_set())
            if len(self._waiting) >= self._queue_size + self._slots.n_free():
                seconds = retry_after(self._service_s, len(self._waiting), self.slots_n)
                raise EngineOverloadedError(
                    f"model {self.spec.name!r} has {len(self._waiting)} requests waiting for its "
                    f"{self.slots_n} slots (queue_size {self._queue_size}); retry in {seconds} s",
                    retry_after=seconds,
                )
            self._waiting.append(job)
            self._cond.notify()

    def stats(self) -> EngineStats:
        """A snapshot for /metrics, read without the scheduler's lock (each figure is a single read)."""
        slots = self._slots.slots
        return EngineStats(
            model=self.spec.name,
            slots_total=len(slots),
            slots_busy=sum(s.job is not None for s in slots),
            waiting=len(self._waiting) + sum(len(g) for g in self._admitted),
            n_decode=self.n_decode,
            busy_slots_per_decode=self.n_decoded_seqs / self.n_decode if self.n_decode else 0.0,
            kv_tokens=sum(len(s.cache) for s in slots),
            kv_capacity=len(slots) * self.spec.n_ctx,
            draft_n=self.n_drafted,
            draft_n_accepted=self.n_draft_accepted,
        )

    def slot_info(self) -> list[SlotInfo]:
        return [
            SlotInfo(
                model=self.spec.name,
                id=s.seq_id,
                n_ctx=self.spec.n_ctx,
                is_processing=s.job is not None,
                n_cached=len(s.cache),
                n_prompt=len(s.job.tokens) if s.job is not None else 0,
                n_decoded=s.n_decoded if s.job is not None else 0,
                n_remain=max(0, s.max_tokens - s.n_decoded) if s.job is not None else 0,
                choice=s.choice,
            )
            for s in list(self._slots.slots)
        ]

    def set_limits(self, threads: int | None = None, slots: int | None = None) -> None:
        """Throttle (or restore): decode with ``threads`` threads and admit new requests into at most ``slots``
        slots; None restores the configured value. Running requests keep their slots; the thread count changes
        before the next decode. Any thread."""
        with self._cond:
            self._slot_limit = max(1, min(self.slots_n, slots or self.slots_n))
            self._want_threads = max(1, threads or self.spec.threads())
            self._cond.notify()

    @property
    def limits(self) -> tuple[int, int]:
        """(threads, slots) in use now."""
        return self._threads, self._slot_limit

    def close(self) -> None:
        """Stop serving: running and waiting requests fail with 503; the context is freed once the scheduler let go."""
        if not self._scheduler.detach(self, timeout=60):  # a decode that never returns: leak rather than free under it
            log.error("the scheduler did not let go of %s; not freeing its context", self.spec.name)
            return
        self._slots.close()
        self._batch.close()
        if self._candidates is not None:
            self._candidates.close()
        self.grammars.close()
        self.llama.close()

    # -- scheduler thread (scheduler.ScheduledModel) ------------------------------------------------------------
    def busy(self) -> bool:
        return bool(self._waiting or self._slots.active)

    def admit(self) -> None:
        """Move waiting jobs into free slots, in arrival order, a job of ``n`` choices once ``n`` slots are free
        (called with the lock held); the slots' state is set up at the step."""
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled.is_set():
                self._waiting.popleft()
                continue
            if self._slots.n_free() < job.n:
                return
            if self._slots.active and len(self._slots.active) + job.n > self._slot_limit:
                return  # throttled (set_limits); a request larger than the limit runs alone
            self._waiting.popleft()
            self._admitted.append([self._slots.assign(job) for _ in range(job.n)])

    def step(self) -> None:
        """One step of this model: set up the admitted requests, drop the cancelled ones, decode and sample."""
        admitted, self._admitted = self._admitted, []
        want, self._want_threads = self._want_threads, None
        if want is not None and want != self._threads:
            self.llama.set_threads(want)
            self._threads = want
        for group in admitted:
            try:
                self._start(group)
            except Exception as e:
                log.exception("starting a request failed")
                for slot in group:
                    self._abort(slot, e)
        try:
            self._drop_cancelled()
            if self._slots.active:
                self._decode()
        except Exception as e:  # one failure must not stop the scheduler: fail the running requests, go on
            log.exception("batched step failed")
            for slot in list(self._slots.active):
                self._abort(slot, e)

    def fail_all(self) -> None:
        """Fail every running and waiting request (the model is closing)."""
        shutdown = EngineUnavailableError("the server is shutting down")
        for slot in list(self._slots.active):
            self._abort(slot, shutdown)
        with self._cond:
            for job in self._waiting:
                job.fail(shutdown)
            self._waiting.clear()

    def _start(self, group: list[Slot]) -> None:
        """Set up a newly admitted request's slots. The first keeps the cached prefix it shares with the prompt and
        drops the rest; the others (``n > 1``) are emptied, to get its KV once it has read the prompt."""
        leader = group[0]
        job = leader.job
        assert job is not None
        tokens = job.tokens
        t_start = time.perf_counter()
        key = lora_key(job.lora)
        keep = self._slots.reuse_prefix(leader, tokens, key)
        for i, slot in enumerate(group):
            slot.t_start = t_start
            slot.choice = i
            params = job.choice_params(i)
            slot.chain = self._sampler_chain(params)
            slot.chain.accept_prompt(tokens)
            slot.detok = Detokenizer(self.llama.pieces)
            slot.stop = StopMatcher(job.params.stop)
            slot.filters = TextFilters.for_params(job.params.max_words, job.params.forbidden_phrases)
            slot.logprobs = LogprobQueue() if job.params.logprobs is not None else None
            slot.max_tokens = job.params.max_tokens
            slot.n_decoded = 0
            slot.next_token = -1
            slot.out_index = -1
            slot.n_cached = slot.n_evaluated = 0
            speculator = self._speculator
            g = params.grammar
            shape = self.grammars.shape(g) if speculator is not None and g is not None else None
            slot.drafting = speculator.start(len(tokens), g, shape) if speculator is not None else None
            if i:
                self._slots.forget(slot)
                slot.kv_key = key
                slot.pending = []
                slot.leader = leader
        leader.pending = tokens[keep:]
        leader.n_cached = keep
        leader.n_evaluated = len(leader.pending)
        leader.followers = group[1:]
        if keep:
            log.debug("slot %d: reusing %d cached tokens of %d", leader.seq_id, keep, len(tokens))

    def _sampler_chain(self, params: SamplingParams) -> SamplerChain:
        g = params.grammar
        if g is None:
            return SamplerChain(params, self.llama.n_vocab, self.spec.n_ctx)
        if self._candidates is None:
            self._candidates = Candidates(self.llama.n_vocab, self.llama.pieces, self.llama.eog)
        grammar = self.grammars.instantiate(g)
        try:
            shape = self.grammars.shape(g) if g.json else None
            return SamplerChain(
                params, self.llama.n_vocab, self.spec.n_ctx, grammar, self._candidates, shape, self._encode_text
            )
        except BaseException:
            import llama_cpp

            llama_cpp.llama_sampler_free(grammar)
            raise

    def _special_piece(self, token: int) -> str:
        piece = self._special_pieces.get(token)
        if piece is None:
            raw = self.llama.model.token_to_piece(token, special=True)
            piece = raw.rstrip(b"\0").decode("utf-8", errors="replace")
            self._special_pieces[token] = piece
        return piece

    def _logprob_piece(self, token: int) -> bytes:
        """A token's bytes for logprobs (special tokens as their text)."""
        piece = self._logprob_pieces.get(token)
        if piece is None:
            piece = self.llama.model.token_to_piece(token, special=True).rstrip(b"\0")
            self._logprob_pieces[token] = piece
        return piece

    def _token_logprob(self, s: Slot, token: int) -> TokenLogprob:
        """The sampled token's logprob from the logits row it was sampled from."""
        import llama_cpp
        import numpy as np

        logits = llama_cpp.llama_get_logits_ith(self.llama.ctx, s.out_index)
        row = np.ctypeslib.as_array(logits, shape=(self.llama.n_vocab,))
        assert s.job is not None and s.job.params.logprobs is not None
        return token_logprob(row, token, s.job.params.logprobs, self._logprob_piece)

    def _drop_cancelled(self) -> None:
        for slot in list(self._slots.active):
            assert slot.job is not None
            if slot.job.cancelled.is_set():
                log.debug("slot %d: cancelled after %d tokens", slot.seq_id, slot.n_decoded)
                self._slots.release(slot)

    def _decode(self) -> None:
        """Decode every active slot: one batch per LoRA adapter set, the set applied now first."""
        groups: dict[LoraKey, list[Slot]] = {}
        for s in self._slots.active:
            groups.setdefault(s.kv_key, []).append(s)
        if len(groups) == 1:
            key, slots = next(iter(groups.items()))
            self.llama.set_adapters(key)
            self._decode_batch(slots)
            return
        current = self.llama.lora_key
        for key in sorted(groups, key=lambda k: k != current):
            self.llama.set_adapters(key)
            self._decode_batch(groups[key])

    def _decode_batch(self, slots: list[Slot]) -> None:
        """Decode one batch of these slots (one adapter set), then sample the slots that have logits in it."""
        self._propose(slots)
        step = self._batch.build(slots)
        if not step.n_tokens:
            return
        timed = self._speculator is not None and not step.reading  # what a row costs, for the drafts' worth
        rows = [1 + (len(s.drafting.draft) if s.drafting is not None else 0) for s in step.generating] if timed else []
        before = sum(s.n_decoded for s in step.generating) if timed else 0
        t0 = time.perf_counter()
        self.llama.decode(self._batch.batch)
        self.n_decode += 1
        self.n_decoded_seqs += len(slots)
        ctx = self.llama.ctx
        sampled = step.commit()
        for leader in [s for s in sampled if s.followers]:  # read its prompt: its choices start from its KV
            for f in leader.followers:
                self._slots.fork(leader, f)
                sampled.append(f)
            leader.followers = []
        for s in sampled:
            if s.job is None:  # its request ended while an earlier choice was sampled: drop any draft rows
                self._slots.truncate(s, len(s.cache))
                continue
            self._sample(s, ctx)
        if timed:  # decoded and sampled
            assert self._speculator is not None
            emitted = sum(s.n_decoded for s in step.generating) - before
            self._speculator.observe(rows, time.perf_counter() - t0, emitted)

    def _propose(self, slots: list[Slot]) -> None:
        """Choose the generating slots' drafts for this step: within the batch (drafts come before prompt chunks),
        the tokens left (``max_tokens``) and the context left."""
        speculator = self._speculator
        if speculator is None:
            return
        generating = self._batch.generating(slots)
        n_ctx = self.spec.n_ctx
        speculator.propose(
            [
                (s.drafting, s.cache, s.next_token, min(s.max_tokens - s.n_decoded - 1, n_ctx - len(s.cache) - 2))
                for s in generating
                if s.drafting is not None
            ],
            room=self._batch.n_batch - len(generating),
            reading=any(s.pending for s in slots),
        )

    def _sample(self, s: Slot, ctx: object) -> None:
        """Sample a slot's rows in order (``next_token``'s, then each drafted token's) with its own chain, emitting
        each token through ``_on_token``, while the sampled token equals the draft and the request goes on. Then the
        accepted draft tokens join ``slot.cache`` and the KV of the rejected rows is removed."""
        assert s.chain is not None
        sd = s.drafting
        draft = sd.draft if sd is not None else []
        rows = sd.rows if sd is not None and draft else [s.out_index]
        emitted: list[int] = []
        for i, row in enumerate(rows):
            s.out_index = row  # logprobs read the row the token was sampled from
            try:
                token = s.chain.sample(ctx, row, s.max_tokens - s.n_decoded)
            except InvalidRequestError as e:  # a grammar with no way forward: this request ends, the others go on
                self._abort(s, e)
                return
            emitted.append(token)
            matched = i < len(draft) and token == draft[i]
            if matched:
                assert sd is not None
                sd.n_accepted += 1
            self._on_token(s, token)
            if not matched or s.job is None:
                break
        if sd is None:
            return
        accepted = sd.settle(emitted)
        self.n_drafted += len(draft)
        self.n_draft_accepted += accepted
        s.cache.extend(draft[:accepted])
        if accepted < len(draft):
            self._slots.truncate(s, len(s.cache))
        if s.job is None and self._speculator is not None:
            self._speculator.finish(sd)

    def _on_token(self, s: Slot, token: int) -> None:
        if s.n_decoded == 0:
            s.t_first = time.perf_counter()
        s.n_decoded += 1
        job = s.job
        assert job is not None and s.detok is not None and s.stop is not None
        if token in self.llama.eog:
            self._finish(s, "length" if s.chain is not None and s.chain.closing else "stop")
            return
        text = s.detok.push(token)
        if token in job.params.preserved_tokens:
            text += self._special_piece(token)
        if s.logprobs is not None:
            self._on_token_logprobs(s, token, text)
            return
        text, stopped = s.stop.push(text)
        capped = False
        if s.filters is not None:
            text, capped = s.filters.push(text, final=stopped)
        if text:
            job.emit(TextDelta(text, s.choice))
        if capped:
            self._finish(s, "length", flushed=True)
            return
        self._go_on(s, token, stopped)

    def _on_token_logprobs(self, s: Slot, token: int, text: str) -> None:
        """``_on_token`` for a request with logprobs: each delta carries the logprobs of the tokens it completes."""
        job, queue = s.job, s.logprobs
        assert job is not None and queue is not None and s.stop is not None
        queue.push(self._token_logprob(s, token), len(text))
        text, stopped = s.stop.push(text)
        logprobs = queue.take(len(text))
        if stopped:
            queue.drop()
        if text or logprobs:
            job.emit(TextDelta(text, s.choice, logprobs))
        self._go_on(s, token, stopped)

    def _go_on(self, s: Slot, token: int, stopped: bool) -> None:
        if stopped:
            self._finish(s, "stop", flushed=True)
        elif s.n_decoded >= s.max_tokens:
            self._finish(s, "length")
        else:
            s.next_token = token

    def _finish(self, s: Slot, reason: FinishReason, flushed: bool = False) -> None:
        """End a slot's request; ``flushed``: its text is all out (a stop string or a word cap ended it)."""
        job = s.job
        assert job is not None and s.detok is not None and s.stop is not None
        if not flushed:
            text, stopped = s.stop.push(s.detok.flush())
            if not stopped:
                text += s.stop.flush()
            if s.filters is not None:
                text, capped = s.filters.push(text, final=True)
                reason = "length" if capped else reason
            logprobs = s.logprobs.take_all() if s.logprobs is not None and not stopped else ()
            if text or logprobs:
                job.emit(TextDelta(text, s.choice, logprobs))
        now = time.perf_counter()
        job.emit(
            Finished(
                finish_reason=reason,
                prompt_tokens=len(job.tokens),
                completion_tokens=s.n_decoded,
                timings=Timings(
                    prompt_n=s.n_evaluated,
                    prompt_ms=(s.t_first - s.t_start) * 1000,
                    predicted_n=s.n_decoded,
                    predicted_ms=(now - s.t_first) * 1000,
                    cache_n=s.n_cached,
                    draft_n=s.drafting.n_drafted if s.drafting is not None else 0,
                    draft_n_accepted=s.drafting.n_accepted if s.drafting is not None else 0,
                ),
                choice=s.choice,
            ),
        )
        self._service_s = 0.8 * self._service_s + 0.2 * (now - s.t_start)
        self._slots.release(s)

    def _abort(self, s: Slot, exc: BaseException) -> None:
        """Fail a slot's request and forget its KV (its state is unknown after an error); the request's other
        choices are dropped at the next step."""
        if s.job is not None:
            s.job.fail(exc)
            s.job.cancelled.set()
        self._slots.forget(s)
        self._slots.release(s)


class BatchedEngine(ModelPool):
    """Serves each model's requests in ``slots`` concurrent sequences, continuously batched, off the event loop;
    all its models decode on one ``Scheduler`` thread."""

    def __init__(
        self,
        specs: list[ModelSpec],
        slots: int = 4,
        queue_size: int = 64,
        prompt_chunk: int = PROMPT_CHUNK,
        kv_unified: bool = False,
        flash_attn: bool | None = None,
        draft: DraftPolicy | None = DEFAULT_DRAFT,
    ) -> None:
        scheduler = Scheduler()
        self.grammar_cache = GrammarCache()
        self._batched: dict[str, BatchedModel] = {}

        def load(spec: ModelSpec) -> BatchedModel:
            log.info("loading %s from %s (%d slots of %d tokens)", spec.name, spec.path, slots, spec.n_ctx)
            model = BatchedModel(
                spec,
                slots,
                queue_size,
                scheduler,
                prompt_chunk=prompt_chunk,
                kv_unified=kv_unified,
                flash_attn=flash_attn,
                grammar_cache=self.grammar_cache,
                draft=draft,
            )
            self._batched[spec.name] = model
            return model

        super().__init__(specs, load)

    async def submit_loaded(self, request: GenerationRequest) -> Generation:
        """Queue a request (see ``ModelPool.submit``); structured output and tools are planned first, off the
        event loop (schema conversion and grammar parsing), and may raise ``InvalidRequestError``."""
        self._model(request.model)  # UnknownModelError before anything else
        model = self._batched[request.model]
        check_request(request, model.slots_n, model.llama.n_vocab, model.llama.n_loras)
        if not needs_plan(request):
            return await super().submit_loaded(request)
        plan = await asyncio.to_thread(model.structured.plan, request)
        if plan.tool_format is not None and request.n > 1:
            raise InvalidRequestError("n > 1 cannot be combined with tools the answer may call", "n")
        if plan.tool_format is not None and request.params.logprobs is not None:
            raise InvalidRequestError("logprobs cannot be combined with tools the answer may call", "logprobs")
        return plan.wrap(await super().submit_loaded(plan.request))


def check_request(request: GenerationRequest, slots: int, n_vocab: int, n_loras: int = 0) -> None:
    """What only the model can check: ``n`` against its slots, ``logit_bias`` ids against its vocabulary, ``lora``
    ids against its adapters; and what the engine cannot combine (logprobs with a persona's text filters)."""
    if request.n < 1 or request.n > slots:
        raise InvalidRequestError(
            f"{request.n} choices need as many slots; this model has {slots} (serve with more `slots`)", "n"
        )
    for token, _ in request.params.logit_bias:
        if not 0 <= token < n_vocab:
            raise InvalidRequestError(f"token id {token} is not in the vocabulary (0..{n_vocab - 1})", "logit_bias")
    ids = [i for i, _ in request.lora]
    for i, scale in request.lora:
        if not 0 <= i < n_loras:
            have = f"0..{n_loras - 1}" if n_loras else "none"
            raise InvalidRequestError(f"LoRA adapter id {i} is not loaded with this model (ids: {have})", "lora")
        if not math.isfinite(scale):
            raise InvalidRequestError(f"LoRA adapter {i}: scale must be a finite number", "lora")
    if len(set(ids)) != len(ids):
        raise InvalidRequestError("each LoRA adapter id may appear once", "lora")
    params = request.params
    if params.logprobs is not None and (params.max_words is not None or params.forbidden_phrases):
        raise InvalidRequestError(
            "logprobs cannot be combined with a persona's max_words or forbidden_phrases (the text is rewritten)",
            "logprobs",
        )


__all__ = ["BatchedEngine", "BatchedModel", "check_request", "retry_after"]
