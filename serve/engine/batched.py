"""The batched engine: continuous batching on llama-cpp-python's low-level API, sampling in llama.cpp's own
sampler chains.

Per model: one llama context with ``slots`` sequences; one scheduler thread serves all models. Each step of a model

1. admits waiting requests into free slots (the slot whose cached tokens share the longest prefix with the
   prompt, so the next turn of a chat reuses its KV instead of recomputing it; ties go to the lowest slot),
2. frees the slots of cancelled requests (client gone),
3. builds one ``llama_batch``: the last sampled token of every generating sequence, then prompt tokens of the
   sequences still reading their prompt, oldest request first (a whole ``n_batch`` when nobody is generating, at
   most ``prompt_chunk`` otherwise, so a long prompt slows the other streams down instead of freezing them). A
   step starts the next prompt only while it holds fewer than ``prompt_min_batch`` prompt tokens: on a CPU a
   prompt token costs about the same in a batch of 40 as in one of 500, so four 40-token prompts arriving together
   get their first tokens after ~1, 2, 3 and 4 prompt times rather than all after 4 (TTFT p50 at four cold
   streams here: 438 ms with all prompts in one step, 353 ms read one after another; llama-server 326-439 ms),
4. runs one ``llama_decode``, samples each sequence that has an output with its own sampler chain
   (``llama_sampler_sample`` in C, no copy of the logits), detokenizes incrementally and emits the text.

Context sizing: ``ModelSpec.n_ctx`` is what one request can hold. The llama context has ``n_ctx * slots`` cells
and ``n_seq_max = slots``; by default the KV cache is split per sequence (``kv_unified=False``: each slot owns a
stream of ``n_ctx`` cells, padded to 256), so a request that fits is never short of cells, and each sequence's
attention sees only its own cells in position order: a greedy answer does not depend on what else is in the batch
(with the unified cache it does; see the tests). llama.cpp decodes one ubatch per run of consecutive sequence ids
with equal token counts, so the batch lists sequences in id order and new requests take the lowest free slot
among those with the longest cached prefix. ``kv_unified=True`` is llama-server's default (one shared buffer).
Memory: the KV cache is ``slots`` times the serial engine's (SmolLM2-135M at n_ctx=4096, 4 slots: ~360 MiB f16).

One thread for all models (``Scheduler``): llama.cpp's OpenMP threads belong to the thread that calls
``llama_decode``. A second decoding thread brings a second team; libgomp then manages more threads than there are
cores, stops spinning at its barriers and sleeps instead, and every model decodes ~3x slower (measured on 2 cores:
one model alone 80-90 tok/s, two models with a thread each 30-32 tok/s, even taking turns). So the engine's models
share one scheduler thread, and busy models take turns, one step each.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque

from edgellm.serve.engine.base import (
    EngineOverloadedError,
    EngineUnavailableError,
    Event,
    Finished,
    FinishReason,
    TextDelta,
    Timings,
)
from edgellm.serve.engine.detok import Detokenizer, PieceTable, StopMatcher
from edgellm.serve.engine.pool import Job, ModelPool
from edgellm.serve.engine.prompt import ChatTemplate
from edgellm.serve.engine.sampling import SamplerChain
from edgellm.serve.engine.specs import ModelSpec, default_threads

log = logging.getLogger(__name__)


def _emit(job: Job, event: Event) -> None:
    try:
        job.stream.emit(event)
    except RuntimeError:  # the request's event loop is gone: nobody is listening any more
        job.cancelled.set()


def _fail(job: Job, exc: BaseException) -> None:
    try:
        job.stream.fail(exc)
    except RuntimeError:
        job.cancelled.set()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Slot:
    """One sequence of the context: the tokens its KV holds, and the request it serves (if any)."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.cache: list[int] = []  # tokens whose K/V this sequence holds, at positions 0..len-1
        self.job: Job | None = None
        # the request being served
        self.pending: list[int] = []  # prompt tokens not evaluated yet
        self.next_token = -1  # sampled, to be evaluated at the next step
        self.out_index = -1  # batch index of this sequence's logits in the current step
        self.chain: SamplerChain | None = None
        self.detok: Detokenizer | None = None
        self.stop: StopMatcher | None = None
        self.max_tokens = 0
        self.n_decoded = 0
        self.n_cached = 0
        self.n_evaluated = 0
        self.t_start = 0.0
        self.t_first = 0.0


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
    ) -> None:
        import llama_cpp as ll
        from llama_cpp._internals import LlamaModel
        from llama_cpp._logger import set_verbose

        self._ll = ll
        self.spec = spec
        self.slots_n = slots
        self._queue_size = queue_size
        self.n_batch = max(spec.n_batch, slots)  # room for every sequence's next token in one batch
        self.prompt_chunk = max(1, min(prompt_chunk, self.n_batch))
        self.prompt_min_batch = max(1, prompt_min_batch)
        set_verbose(False)
        ll.llama_backend_init()

        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = spec.n_gpu_layers
        self._model = LlamaModel(path_model=str(spec.path), params=mparams, verbose=False)
        self._vocab = self._model.vocab
        self.n_vocab = self._model.n_vocab()

        threads = spec.n_threads or default_threads()
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = spec.n_ctx * slots
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = slots
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = kv_unified
        if flash_attn is not None:
            cparams.flash_attn_type = (
                ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        cparams.no_perf = True
        self._ctx = ll.llama_init_from_model(self._model.model, cparams)
        if not self._ctx:
            self._model.close()
            raise RuntimeError(f"llama_init_from_model failed for {spec.path} (n_ctx={cparams.n_ctx})")
        self._mem = ll.llama_get_memory(self._ctx)
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)

        bos, eos = self._model.token_bos(), self._model.token_eos()
        bos_text = self._model.token_get_text(bos) if bos >= 0 else ""
        eos_text = self._model.token_get_text(eos) if eos >= 0 else ""
        self.template = ChatTemplate.from_metadata(self._model.metadata(), bos_text, eos_text)
        is_eog = ll.llama_vocab_is_eog
        self._eog = frozenset(t for t in range(self.n_vocab) if is_eog(self._vocab, t))
        self._pieces = PieceTable(self._vocab, self.n_vocab)
        self._copy_min_tokens = 1 if kv_unified else self._min_tokens_worth_copying(spec.n_ctx)
        self.created = int(time.time())

        self._slots = [_Slot(i) for i in range(slots)]
        self._active: list[_Slot] = []  # in seq_id order (the batch's order)
        self._waiting: deque[Job] = deque()
        self._closing = False
        self._service_s = 2.0  # moving average of a request's time in a slot, for Retry-After
        self._scheduler = scheduler or Scheduler()
        self._cond = self._scheduler.cond  # guards _waiting and _closing
        self._scheduler.attach(self)

    def _min_tokens_worth_copying(self, n_ctx: int) -> int:
        """Prefix tokens above which copying a slot's KV (``n_ctx`` cells of K and V in f16) is cheaper than
        recomputing them (~2 FLOPs per parameter and token), taking 100 GFLOP/s and 10 GB/s as a CPU's ratio.
        SmolLM2-135M at n_ctx 1024: 23 KB of KV per token, a copy costs as much as ~1 token: the floor of 16 wins."""
        ll, m = self._ll, self._model.model
        n_head = max(1, ll.llama_model_n_head(m))
        head_dim = ll.llama_model_n_embd(m) // n_head
        kv_bytes = 2 * ll.llama_model_n_layer(m) * head_dim * ll.llama_model_n_head_kv(m) * 2
        n_params = max(1, ll.llama_model_n_params(m))
        return max(16, math.ceil(n_ctx * kv_bytes * 5 / n_params))

    # -- request side (event loop, or any thread) ---------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def enqueue(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise EngineUnavailableError(f"model {self.spec.name!r} is shutting down")
            if any(j.cancelled.is_set() for j in self._waiting):
                self._waiting = deque(j for j in self._waiting if not j.cancelled.is_set())
            free = self.slots_n - len(self._active)
            if len(self._waiting) >= self._queue_size + free:
                rounds = math.ceil((len(self._waiting) + 1) / self.slots_n)
                retry_after = min(60, max(1, math.ceil(self._service_s * rounds)))
                raise EngineOverloadedError(
                    f"model {self.spec.name!r} has {len(self._waiting)} requests waiting for its "
                    f"{self.slots_n} slots (queue_size {self._queue_size}); retry in {retry_after} s",
                    retry_after=retry_after,
                )
            self._waiting.append(job)
            self._cond.notify()

    def close(self) -> None:
        """Stop serving: running and waiting requests fail with 503; the context is freed once the scheduler let go."""
        if not self._scheduler.detach(self, timeout=60):  # a decode that never returns: leak rather than free under it
            log.error("the scheduler did not let go of %s; not freeing its context", self.spec.name)
            return
        ll = self._ll
        for slot in self._slots:
            if slot.chain is not None:
                slot.chain.close()
        ll.llama_batch_free(self._batch)
        ll.llama_free(self._ctx)
        self._model.close()

    # -- scheduler thread ---------------------------------------------------------------------------------------
    def _busy(self) -> bool:
        return bool(self._waiting or self._active)

    def _work(self, admitted: list[_Slot]) -> None:
        """One step of this model: set up the admitted requests, drop the cancelled ones, decode and sample."""
        for slot in admitted:
            try:
                self._start(slot)
            except Exception as e:
                log.exception("starting a request failed")
                self._abort(slot, e)
        try:
            self._drop_cancelled()
            if self._active:
                self._step()
        except Exception as e:  # one failure must not stop the scheduler: fail the running requests, go on
            log.exception("batched step failed")
            for slot in list(self._active):
                self._abort(slot, e)

    def _shutdown(self) -> None:
        """Fail every running and waiting request (the model is closing)."""
        shutdown = EngineUnavailableError("the server is shutting down")
        for slot in list(self._active):
            self._abort(slot, shutdown)
        with self._cond:
            for job in self._waiting:
                _fail(job, shutdown)
            self._waiting.clear()

    def _admit(self) -> list[_Slot]:
        """Move waiting jobs into free slots (called with the lock held); the slot's state is set up later."""
        admitted: list[_Slot] = []
        free = [s for s in self._slots if s.job is None]
        while self._waiting and free:
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                continue
            best = max(free, key=lambda s: (_common_prefix(s.cache, job.tokens), -s.seq_id))
            free.remove(best)
            best.job = job
            self._active.append(best)
            self._active.sort(key=lambda s: s.seq_id)
            admitted.append(best)
        return admitted

    def _start(self, slot: _Slot) -> None:
        """Set up a newly admitted slot: keep the cached prefix it shares with the prompt, drop the rest."""
        job = slot.job
        assert job is not None
        tokens = job.tokens
        slot.t_start = time.perf_counter()
        keep = min(_common_prefix(slot.cache, tokens), len(tokens) - 1)  # evaluate >= 1 token to get logits
        copied = self._copy_prefix(slot, tokens, keep)
        if copied:
            keep = copied
        elif keep < len(slot.cache):
            if not self._ll.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1):
                self._ll.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                keep = 0
            del slot.cache[keep:]
        slot.pending = tokens[keep:]
        slot.n_cached = keep
        slot.n_evaluated = len(slot.pending)
        slot.chain = SamplerChain(job.params, self.n_vocab, self.spec.n_ctx)
        slot.chain.accept_prompt(tokens)
        slot.detok = Detokenizer(self._pieces)
        slot.stop = StopMatcher(job.params.stop)
        slot.max_tokens = job.params.max_tokens
        slot.n_decoded = 0
        slot.next_token = -1
        slot.out_index = -1
        if keep:
            log.debug("slot %d: reusing %d cached tokens of %d", slot.seq_id, keep, len(tokens))

    def _copy_prefix(self, slot: _Slot, tokens: list[int], keep: int) -> int:
        """If another slot holds a longer prefix of ``tokens`` (the same system prompt, another user), copy its KV
        into ``slot`` instead of recomputing it; returns the tokens now cached, or 0 if nothing was copied.

        Across the per-sequence KV streams llama.cpp copies a whole stream (``seq_cp`` with p0 = p1 = -1, applied at
        the next decode, before it computes), then the tail past the shared prefix is removed. Copying a slot's
        ``n_ctx`` cells beats recomputing once the gain passes ``_copy_min_tokens``."""
        best: _Slot | None = None
        shared = 0
        for other in self._slots:
            if other is slot or not other.cache:
                continue
            n = _common_prefix(other.cache, tokens)
            if n > shared:
                best, shared = other, n
        shared = min(shared, len(tokens) - 1)
        if best is None or shared - keep < self._copy_min_tokens:
            return 0
        ll, mem = self._ll, self._mem
        ll.llama_memory_seq_cp(mem, best.seq_id, slot.seq_id, -1, -1)
        if not ll.llama_memory_seq_rm(mem, slot.seq_id, shared, -1):  # a memory without partial removal
            ll.llama_memory_seq_rm(mem, slot.seq_id, -1, -1)
            slot.cache.clear()
            return 0
        slot.cache = best.cache[:shared]
        log.debug("slot %d: copied %d cached tokens from slot %d", slot.seq_id, shared, best.seq_id)
        return shared

    def _drop_cancelled(self) -> None:
        for slot in list(self._active):
            assert slot.job is not None
            if slot.job.cancelled.is_set():
                log.debug("slot %d: cancelled after %d tokens", slot.seq_id, slot.n_decoded)
                self._release(slot)

    def _step(self) -> None:
        ll = self._ll
        batch = self._batch
        tok, pos, nseq, seq, out = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        n = 0
        generating = [s for s in self._active if not s.pending]
        for s in generating:
            tok[n] = s.next_token
            pos[n] = len(s.cache)
            nseq[n] = 1
            seq[n][0] = s.seq_id
            out[n] = 1
            s.out_index = n
            n += 1
        budget = self.n_batch - n
        if n:
            budget = min(budget, self.prompt_chunk)
        reading: list[tuple[_Slot, int]] = []
        taken = 0
        for s in sorted((s for s in self._active if s.pending), key=lambda s: s.t_start):
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
        rc = ll.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {n} tokens")
        for s in generating:
            s.cache.append(s.next_token)
        sampled = list(generating)
        for s, take in reading:
            s.cache.extend(s.pending[:take])
            del s.pending[:take]
            if not s.pending:
                sampled.append(s)
        sample = ll.llama_sampler_sample
        ctx = self._ctx
        for s in sampled:
            assert s.chain is not None
            self._on_token(s, sample(s.chain.ptr, ctx, s.out_index))

    def _on_token(self, s: _Slot, token: int) -> None:
        if s.n_decoded == 0:
            s.t_first = time.perf_counter()
        s.n_decoded += 1
        job = s.job
        assert job is not None and s.detok is not None and s.stop is not None
        if token in self._eog:
            self._finish(s, "stop")
            return
        text, stopped = s.stop.push(s.detok.push(token))
        if text:
            _emit(job, TextDelta(text))
        if stopped:
            self._finish(s, "stop", stopped_by_string=True)
        elif s.n_decoded >= s.max_tokens:
            self._finish(s, "length")
        else:
            s.next_token = token

    def _finish(self, s: _Slot, reason: FinishReason, stopped_by_string: bool = False) -> None:
        job = s.job
        assert job is not None and s.detok is not None and s.stop is not None
        if not stopped_by_string:
            text, stopped = s.stop.push(s.detok.flush())
            if not stopped:
                text += s.stop.flush()
            if text:
                _emit(job, TextDelta(text))
        now = time.perf_counter()
        _emit(
            job,
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
            )
        )
        self._service_s = 0.8 * self._service_s + 0.2 * (now - s.t_start)
        self._release(s)

    def _abort(self, s: _Slot, exc: BaseException) -> None:
        """Fail a slot's request and forget its KV (its state is unknown after an error)."""
        if s.job is not None:
            _fail(s.job, exc)
        self._ll.llama_memory_seq_rm(self._mem, s.seq_id, -1, -1)
        s.cache.clear()
        self._release(s)

    def _release(self, s: _Slot) -> None:
        """Free the slot for the next request; its KV (``s.cache``) stays for prefix reuse."""
        if s.chain is not None:
            s.chain.close()
            s.chain = None
        s.job = None
        s.pending = []
        s.detok = None
        s.stop = None
        if s in self._active:
            self._active.remove(s)


class Scheduler:
    """The one thread that runs llama.cpp for all the models attached to it (see the module docstring).

    Each round it admits waiting requests of every model (under ``cond``), then runs one step of each busy model.
    The thread starts with the first model attached and ends when the last one is detached."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._models: list[BatchedModel] = []
        self._thread: threading.Thread | None = None

    def attach(self, model: BatchedModel) -> None:
        with self.cond:
            self._models.append(model)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="batched-scheduler", daemon=True)
                self._thread.start()

    def detach(self, model: BatchedModel, timeout: float) -> bool:
        """Have the thread fail the model's requests and let go of it; False if it did not within ``timeout``."""
        with self.cond:
            model._closing = True
            self.cond.notify_all()
            return self.cond.wait_for(lambda: model not in self._models, timeout=timeout)

    def _run(self) -> None:
        while True:
            with self.cond:
                while True:
                    closing = [m for m in self._models if m._closing]
                    busy = [m for m in self._models if m._busy()]
                    if closing or busy:
                        break
                    if not self._models:
                        self._thread = None
                        return
                    self.cond.wait()
                admitted = {m: m._admit() for m in busy if not m._closing}
            for m in closing:
                try:
                    m._shutdown()
                except Exception:
                    log.exception("failing the requests of %s failed", m.spec.name)
                finally:
                    with self.cond:
                        self._models.remove(m)
                        self.cond.notify_all()
            for m, slots in admitted.items():
                m._work(slots)


class BatchedEngine(ModelPool):
    """Serves each model's requests in ``slots`` concurrent sequences, continuously batched, off the event loop."""

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

        def load(spec: ModelSpec) -> BatchedModel:
            log.info("loading %s from %s (%d slots of %d tokens)", spec.name, spec.path, slots, spec.n_ctx)
            return BatchedModel(
                spec,
                slots,
                queue_size,
                scheduler,
                prompt_chunk=prompt_chunk,
                kv_unified=kv_unified,
                flash_attn=flash_attn,
            )

        super().__init__(specs, load)


__all__ = ["BatchedEngine", "BatchedModel", "Scheduler"]
