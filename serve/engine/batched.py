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
from edgellm.serve.engine.batch import BatchBuilder
from edgellm.serve.engine.context import LlamaContext
from edgellm.serve.engine.detok import Detokenizer, StopMatcher
from edgellm.serve.engine.grammar import GrammarCache
from edgellm.serve.engine.logprobs import LogprobQueue, token_logprob
from edgellm.serve.engine.pool import Job, ModelPool
from edgellm.serve.engine.sampling import Candidates, CompiledGrammars, SamplerChain
from edgellm.serve.engine.scheduler import Scheduler
from edgellm.serve.engine.slots import Slot, SlotTable, copy_threshold
from edgellm.serve.engine.specs import ModelSpec
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
        prompt_chunk: int = 128,
        prompt_min_batch: int = 32,
        kv_unified: bool = False,
        flash_attn: bool | None = None,
        grammar_cache: GrammarCache | None = None,
    ) -> None:
        self.spec = spec
        self.slots_n = slots
        self._queue_size = queue_size
        n_batch = max(spec.n_batch, slots)  # room for every sequence's next token in one batch
        self.llama = LlamaContext(spec, n_seq=slots, n_batch=n_batch, kv_unified=kv_unified, flash_attn=flash_attn)
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
        self.created = int(time.time())

        self._waiting: deque[Job] = deque()
        self._admitted: list[list[Slot]] = []  # each request's slots, admitted by the scheduler, started next step
        self.closing = False
        self._service_s = 2.0  # moving average of a request's time in a slot, for Retry-After
        self._scheduler = scheduler or Scheduler()
        self._cond = self._scheduler.cond  # guards _waiting and closing
        self.n_decode = 0  # llama_decode calls, and the sequences they carried (for /metrics)
        self.n_decoded_seqs = 0
        self._scheduler.attach(self)

    @property
    def name(self) -> str:
        return self.spec.name

    # -- request side (event loop, or any thread) ---------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.llama.tokenize(text)

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
            self._waiting.popleft()
            self._admitted.append([self._slots.assign(job) for _ in range(job.n)])

    def step(self) -> None:
        """One step of this model: set up the admitted requests, drop the cancelled ones, decode and sample."""
        admitted, self._admitted = self._admitted, []
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
        keep = self._slots.reuse_prefix(leader, tokens)
        for i, slot in enumerate(group):
            slot.t_start = t_start
            slot.choice = i
            slot.chain = self._sampler_chain(job.choice_params(i))
            slot.chain.accept_prompt(tokens)
            slot.detok = Detokenizer(self.llama.pieces)
            slot.stop = StopMatcher(job.params.stop)
            slot.logprobs = LogprobQueue() if job.params.logprobs is not None else None
            slot.max_tokens = job.params.max_tokens
            slot.n_decoded = 0
            slot.next_token = -1
            slot.out_index = -1
            slot.n_cached = slot.n_evaluated = 0
            if i:
                self._slots.forget(slot)
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
            return SamplerChain(params, self.llama.n_vocab, self.spec.n_ctx, grammar, self._candidates)
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
        """Decode one batch of every active slot, then sample the slots that have logits in it."""
        step = self._batch.build(self._slots.active)
        self.llama.decode(self._batch.batch)
        self.n_decode += 1
        self.n_decoded_seqs += len(self._slots.active)
        ctx = self.llama.ctx
        sampled = step.commit()
        for leader in [s for s in sampled if s.followers]:  # read its prompt: its choices start from its KV
            for f in leader.followers:
                self._slots.fork(leader, f)
                sampled.append(f)
            leader.followers = []
        for s in sampled:
            if s.job is None:  # its request ended while an earlier choice was sampled
                continue
            assert s.chain is not None
            try:
                token = s.chain.sample(ctx, s.out_index, s.max_tokens - s.n_decoded)
            except InvalidRequestError as e:  # a grammar with no way forward: this request ends, the others go on
                self._abort(s, e)
                continue
            self._on_token(s, token)

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
        if text:
            job.emit(TextDelta(text, s.choice))
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
            self._finish(s, "stop", stopped_by_string=True)
        elif s.n_decoded >= s.max_tokens:
            self._finish(s, "length")
        else:
            s.next_token = token

    def _finish(self, s: Slot, reason: FinishReason, stopped_by_string: bool = False) -> None:
        job = s.job
        assert job is not None and s.detok is not None and s.stop is not None
        if not stopped_by_string:
            text, stopped = s.stop.push(s.detok.flush())
            if not stopped:
                text += s.stop.flush()
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
        prompt_chunk: int = 128,
        kv_unified: bool = False,
        flash_attn: bool | None = None,
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
            )
            self._batched[spec.name] = model
            return model

        super().__init__(specs, load)

    async def submit_loaded(self, request: GenerationRequest) -> Generation:
        """Queue a request (see ``ModelPool.submit``); structured output and tools are planned first, off the
        event loop (schema conversion and grammar parsing), and may raise ``InvalidRequestError``."""
        self._model(request.model)  # UnknownModelError before anything else
        model = self._batched[request.model]
        check_request(request, model.slots_n, model.llama.n_vocab)
        if not needs_plan(request):
            return await super().submit_loaded(request)
        plan = await asyncio.to_thread(model.structured.plan, request)
        if plan.tool_format is not None and request.n > 1:
            raise InvalidRequestError("n > 1 cannot be combined with tools the answer may call", "n")
        if plan.tool_format is not None and request.params.logprobs is not None:
            raise InvalidRequestError("logprobs cannot be combined with tools the answer may call", "logprobs")
        return plan.wrap(await super().submit_loaded(plan.request))


def check_request(request: GenerationRequest, slots: int, n_vocab: int) -> None:
    """What only the model can check: ``n`` against its slots, ``logit_bias`` ids against its vocabulary."""
    if request.n < 1 or request.n > slots:
        raise InvalidRequestError(
            f"{request.n} choices need as many slots; this model has {slots} (serve with more `slots`)", "n"
        )
    for token, _ in request.params.logit_bias:
        if not 0 <= token < n_vocab:
            raise InvalidRequestError(f"token id {token} is not in the vocabulary (0..{n_vocab - 1})", "logit_bias")


__all__ = ["BatchedEngine", "BatchedModel", "check_request", "retry_after"]
