"""The serial engine: one llama-cpp-python ``Llama`` per model and one worker thread that serves its requests one
after another, in arrival order. Simple and robust; the batched engine is the fast one.

Every model's decoding runs on one shared thread (``decoder``): llama.cpp's OpenMP team belongs to the thread that
decodes, and a second team (a second model with its own thread) made libgomp oversubscribe the cores and both
models decode ~3x slower. Workers hand each step of their generation to that thread."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from edgellm.serve.engine.base import (
    EngineOverloadedError,
    EngineStats,
    EngineUnavailableError,
    Finished,
    FinishReason,
    Generation,
    GenerationRequest,
    InvalidRequestError,
    SlotInfo,
    TextDelta,
    Timings,
)
from edgellm.serve.engine.pool import Job, ModelPool
from edgellm.serve.engine.prompt import ChatTemplate
from edgellm.serve.engine.specs import ModelSpec
from edgellm.serve.engine.structured import needs_plan
from edgellm.serve.engine.tokens import PromptTokenizer

log = logging.getLogger(__name__)


class _TokenClock:
    """A logits processor that counts sampled tokens and stamps the first one (prompt time vs decode time)."""

    def __init__(self) -> None:
        self.n = 0
        self.first: float | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.first is None:
            self.first = time.perf_counter()
        self.n += 1
        return scores


class SerialModel:
    """A loaded GGUF and its worker thread. Nothing a request does (an event loop gone, an error) stops the worker;
    ``close`` ends the running request at its next token and frees the model only once the worker has stopped."""

    join_timeout_s = 30.0  # close(): how long to wait for the worker; after it, the model is left allocated

    def __init__(self, spec: ModelSpec, queue_size: int, decoder: ThreadPoolExecutor | None = None) -> None:
        from llama_cpp import Llama

        self.spec = spec
        self._owns_decoder = decoder is None
        self._decoder = decoder or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"decode-{spec.name}")
        threads = spec.threads()
        self.llm = Llama(
            model_path=str(spec.path),
            n_ctx=spec.n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=spec.n_gpu_layers,
            n_batch=spec.n_batch,
            verbose=False,
        )
        self.prompts = PromptTokenizer.from_vocab(
            self.llm._model.vocab, self.llm._model, self.llm.metadata.get("general.name", "")
        )
        self.template = ChatTemplate.for_model(self.llm.metadata, self.prompts, spec.chat_template)
        self.created = int(time.time())
        self._queue_size = queue_size
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False  # a request is being generated
        self._current: Job | None = None
        self.stuck = False  # close() gave up on the worker: the model (and the decoder thread) are left alone
        self._thread = threading.Thread(target=self._run, name=f"serial-{spec.name}", daemon=True)
        self._thread.start()

    # -- request side (event loop) ------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """A raw (completion) prompt's ids, as llama-server tokenizes it; chats go through ``template.tokens``."""
        return self.prompts.completion(text)

    def enqueue(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) >= self._queue_size and self._busy:
                raise EngineOverloadedError(
                    f"model {self.spec.name!r} has {len(self._waiting)} requests waiting (queue_size); retry shortly"
                )
            self._waiting.append(job)
            self._cond.notify()

    def stats(self) -> EngineStats:
        return EngineStats(
            model=self.spec.name, slots_total=1, slots_busy=int(self._busy), waiting=len(self._waiting)
        )

    def slot_info(self) -> list[SlotInfo]:
        job = self._current
        return [
            SlotInfo(model=self.spec.name, id=0, n_ctx=self.spec.n_ctx, is_processing=self._busy,
                     n_cached=0, n_prompt=len(job.tokens) if job is not None else 0)
        ]

    # -- worker thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if self._closing:
                    for job in self._waiting:
                        job.fail(EngineUnavailableError("the server is shutting down"))
                    self._waiting.clear()
                    return
                job = self._waiting.popleft()
                self._busy = True
                self._current = job
            try:
                if not job.cancelled.is_set():
                    self._generate(job)
            except Exception as e:  # a failure of one request must not stop the worker
                log.exception("generation failed")
                job.fail(e)
            finally:
                with self._cond:
                    self._busy = False
                    self._current = None

    def _generate(self, job: Job) -> None:
        p = job.params
        clock = _TokenClock()
        from llama_cpp import LogitsProcessorList

        t0 = time.perf_counter()
        chunks = self._on_decoder(
            self.llm.create_completion,
            prompt=job.tokens,
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            min_p=p.min_p,
            repeat_penalty=p.repeat_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            stop=list(p.stop),
            seed=p.seed,
            stream=True,
            logits_processor=LogitsProcessorList([clock]),
        )
        finish: FinishReason = "length"
        try:
            for raw in self._steps(chunks):
                chunk = cast(dict[str, Any], raw)
                if job.cancelled.is_set():
                    log.debug("request cancelled after %d tokens", clock.n)
                    if self._closing:
                        job.fail(EngineUnavailableError("the server is shutting down"))
                    return
                choice = chunk["choices"][0]
                if choice["text"]:
                    job.emit(TextDelta(choice["text"]))
                if choice["finish_reason"]:
                    finish = "stop" if choice["finish_reason"] == "stop" else "length"
        finally:
            self._on_decoder(chunks.close)
        t1 = time.perf_counter()
        first = clock.first or t1
        job.emit(
            Finished(
                finish_reason=finish,
                prompt_tokens=len(job.tokens),
                completion_tokens=clock.n,
                timings=Timings(
                    prompt_n=len(job.tokens),
                    prompt_ms=(first - t0) * 1000,
                    predicted_n=clock.n,
                    predicted_ms=(t1 - first) * 1000,
                ),
            )
        )

    def _on_decoder(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self._decoder.submit(fn, *args, **kwargs).result()

    def _steps(self, chunks: Any) -> Iterator[Any]:
        """The chunks of a streamed completion, each computed on the decoder thread."""
        end = object()
        while (chunk := self._on_decoder(next, chunks, end)) is not end:
            yield chunk

    def close(self) -> None:
        """Fail the waiting requests, end the running one at its next token, and free the model once the worker
        has stopped. A worker still inside a decode after ``join_timeout_s`` keeps the model: it is left allocated
        (and logged) rather than freed under a running decode."""
        with self._cond:
            self._closing = True
            if self._current is not None:
                self._current.cancelled.set()
            self._cond.notify_all()
        self._thread.join(timeout=self.join_timeout_s)
        if self._thread.is_alive():
            self.stuck = True
            log.error(
                "the worker of %s is still decoding after %.0f s; not freeing the model under it",
                self.spec.name,
                self.join_timeout_s,
            )
            return
        self.llm.close()
        if self._owns_decoder:
            self._decoder.shutdown(wait=False)


class SerialEngine(ModelPool):
    """Serves each model's requests one at a time, in arrival order, off the event loop."""

    def __init__(self, specs: list[ModelSpec], queue_size: int = 64) -> None:
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serial-decoder")

        self._serial: list[SerialModel] = []

        def load(spec: ModelSpec) -> SerialModel:
            log.info("loading %s from %s", spec.name, spec.path)
            model = SerialModel(spec, queue_size, self._decoder)
            self._serial.append(model)
            return model

        try:
            super().__init__(specs, load)
        except BaseException:
            self._decoder.shutdown(wait=False)
            raise

    async def submit_loaded(self, request: GenerationRequest) -> Generation:
        """Plain generation only: structured output, grammars and tools run in the batched engine's sampler
        chains, so the serial engine refuses them (400) rather than answer unconstrained."""
        if needs_plan(request):
            self._model(request.model)  # UnknownModelError first
            raise InvalidRequestError(
                "structured output (response_format json_object/json_schema, grammar, json_schema), tools and tool "
                "messages need the batched engine; serve with `--engine batched` (the default)",
                field="engine",
            )
        params = request.params
        batched_only = [f for f, asked in (("n", request.n > 1), ("logprobs", params.logprobs is not None),
                                           ("logit_bias", bool(params.logit_bias)), ("lora", bool(request.lora)),
                                           ("max_words", params.max_words is not None),
                                           ("forbidden_phrases", bool(params.forbidden_phrases))) if asked]
        if batched_only:
            self._model(request.model)
            raise InvalidRequestError(
                "needs the batched engine; serve with `--engine batched` (the default)", field=batched_only[0]
            )
        return await super().submit_loaded(request)

    async def close(self) -> None:
        await super().close()
        # a model whose worker is stuck in a decode: do not wait for the decoder thread either
        self._decoder.shutdown(wait=not any(m.stuck for m in self._serial))


__all__ = ["SerialEngine"]
