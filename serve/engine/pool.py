"""What every engine shares: a set of loaded models, one worker each, and the admission checks a request passes
before it is queued (known model, chat template, tokenization off the event loop, context size, max_tokens
clamped to the room left). Engines differ only in their workers' scheduling.

On demand (``serve_on_demand``): besides the models loaded at start (kept loaded), a *catalog* of further specs
(a models folder, rescanned when asked for a name it does not know) whose models load on their first request (off
the event loop; concurrent requests wait for the one load, at most ``load_timeout`` s, then 503 with Retry-After).
At most ``max_loaded`` of them stay loaded (loading one more unloads the least recently used idle one; all busy:
503), and one idle longer than ``keep_alive`` seconds (the server's, or the model's own set by ``set_keep_alive``:
Ollama's per-request ``keep_alive``) is unloaded by a background task.

Memory (``configure_memory``): every loaded model has an estimated size (its file plus its KV cache,
``sizing.estimate_memory``); with a ``memory_budget``, loading a model first unloads least recently used idle
on-demand models until the loaded estimates and the new one fit (``plan_evictions``). A model that cannot fit even
with every on-demand model unloaded is refused (``ModelTooLargeError``, 503 naming the budget and the sizes); one
that would fit once busy models are done gets 503 with Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from edgellm.serve.engine.base import (
    ContextOverflowError,
    EngineOverloadedError,
    EngineStats,
    EngineUnavailableError,
    Event,
    Generation,
    GenerationRequest,
    InvalidPromptError,
    ModelInfo,
    SamplingParams,
    SlotInfo,
    UnknownModelError,
)
from edgellm.serve.engine.prompt import ChatTemplate
from edgellm.serve.engine.specs import ModelSpec
from edgellm.serve.engine.stream import EventStream

if TYPE_CHECKING:
    from edgellm.serve.sizing import MemoryEstimate

log = logging.getLogger(__name__)

MB = 1_000_000


@dataclass(eq=False)
class Job:
    """A request admitted to a model's worker: its prompt tokens, sampling, and where its events go. ``n``
    choices (each a slot of the batched engine); choice ``i`` samples with ``choice_params(i)``."""

    tokens: list[int]
    params: SamplingParams
    stream: EventStream
    cancelled: threading.Event = field(default_factory=threading.Event)
    n: int = 1
    lora: tuple[tuple[int, float], ...] = ()  # the adapter set its tokens are decoded with (batched engine)

    def emit(self, event: Event) -> None:
        """Send an event from a worker thread; if the request's event loop is gone, nobody listens: cancel it."""
        try:
            self.stream.emit(event)
        except RuntimeError:
            self.cancelled.set()

    def fail(self, exc: BaseException) -> None:
        """End the request with ``exc`` from a worker thread (cancelled instead if its event loop is gone)."""
        try:
            self.stream.fail(exc)
        except RuntimeError:
            self.cancelled.set()

    def choice_params(self, i: int) -> SamplingParams:
        """Choice ``i``'s sampling: its own seed stream (``seed + i``) when a seed is given."""
        if i == 0 or self.params.seed is None:
            return self.params
        return replace(self.params, seed=self.params.seed + i)


class ModelWorker(Protocol):
    """One loaded model and the thread that generates for it."""

    spec: ModelSpec
    template: ChatTemplate
    created: int

    def tokenize(self, text: str) -> list[int]:
        """A raw (completion) prompt's ids."""
        ...

    def enqueue(self, job: Job) -> None: ...

    def close(self) -> None: ...

    def stats(self) -> EngineStats: ...

    def slot_info(self) -> list[SlotInfo]: ...


def prompt_tokens(model: ModelWorker, request: GenerationRequest) -> list[int]:
    """A request's prompt ids: messages (and tools) through the model's chat template, a raw prompt as llama-server
    tokenizes it (``tokens.py``). Blocking: called off the event loop."""
    if request.messages is not None:
        return model.template.tokens(request.messages, getattr(request, "tools", None))
    return model.tokenize(request.prompt or "")


@dataclass(frozen=True)
class CatalogEntry:
    """A model this pool can serve: loaded or not (``pinned``: loaded at start, never unloaded by the pool)."""

    info: ModelInfo
    loaded: bool
    pinned: bool


class ModelTooLargeError(EngineUnavailableError):
    """A model whose estimated size does not fit in ``memory_budget`` even with every on-demand model unloaded."""


@dataclass(frozen=True)
class Loaded:
    """A loaded model as eviction sees it: its estimated bytes, whether it may be unloaded now, when last used."""

    name: str
    bytes: int
    busy: bool
    last_used: float
    pinned: bool = False


def plan_evictions(loaded: list[Loaded], need: int, budget: int | None, max_loaded: int) -> list[str] | None:
    """The models to unload, least recently used idle on-demand ones first, so that one more on-demand model of
    ``need`` bytes fits both ``max_loaded`` (on-demand models) and ``budget`` (bytes of every loaded model; None: no
    budget). ``[]``: it fits as things are; None: it would not fit even with every idle one unloaded."""
    idle = sorted((m for m in loaded if not m.busy and not m.pinned), key=lambda m: m.last_used)
    count = sum(not m.pinned for m in loaded)
    used = sum(m.bytes for m in loaded)
    victims: list[str] = []
    for m in [None, *idle]:
        if m is not None:
            victims.append(m.name)
            count -= 1
            used -= m.bytes
        if count < max_loaded and (budget is None or used + need <= budget):
            return victims
    return None


def _worker_busy(worker: ModelWorker) -> bool:
    """Whether a worker has requests queued or running; read under its scheduling lock when it has one (a request
    moving from the queue into a slot is then never seen in neither)."""
    lock = getattr(worker, "_cond", None)
    with lock if lock is not None else contextlib.nullcontext():
        s = worker.stats()
    return bool(s.slots_busy or s.waiting)


class ModelPool:
    """An ``Engine`` over one worker per model; ``load`` builds a worker from a spec (blocking).

    Subclasses queue a request in ``submit_loaded`` (the model is loaded and held for it); ``submit`` loads the
    model first when it is in the catalog but not loaded."""

    def __init__(self, specs: list[ModelSpec], load: Callable[[ModelSpec], ModelWorker]) -> None:
        self._models: dict[str, ModelWorker] = {}
        self._load = load
        self._pinned = {s.name for s in specs}
        self._specs: dict[str, ModelSpec] = {s.name: s for s in specs}
        self._catalog: Callable[[], list[ModelSpec]] | None = None
        self._max_loaded = 2
        self._keep_alive = -1.0
        self._load_timeout = 120.0
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._load_lock: asyncio.Lock | None = None  # made on the event loop, at the first load
        self._inflight: Counter[str] = Counter()  # requests between arrival and their model's queue
        self._last_used: dict[str, float] = {}
        self._keep_alive_for: dict[str, float] = {}  # set_keep_alive: a model's own keep_alive (Ollama's)
        self._estimate: Callable[[ModelSpec], MemoryEstimate] | None = None
        self._estimates: dict[tuple[str, str, int], MemoryEstimate] = {}
        self._budget: int | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        try:
            for spec in specs:
                self._models[spec.name] = load(spec)
        except BaseException:
            for m in self._models.values():
                m.close()
            raise

    def serve_on_demand(
        self,
        catalog: Callable[[], list[ModelSpec]],
        max_loaded: int = 2,
        keep_alive: float = 300.0,
        load_timeout: float = 120.0,
    ) -> None:
        """Serve the models ``catalog()`` lists (blocking, cheap: called again to find new ones) on demand."""
        self._catalog = catalog
        self._max_loaded = max_loaded
        self._keep_alive = keep_alive
        self._load_timeout = load_timeout
        self.rescan()

    def configure_memory(self, estimate: Callable[[ModelSpec], MemoryEstimate], budget: int | None = None) -> None:
        """Estimate each model's RAM with ``estimate`` (blocking; once per spec) and, with a ``budget`` in bytes,
        keep the loaded estimates within it by unloading idle on-demand models (see the module). Blocking: estimates
        the models loaded at start."""
        self._estimate, self._budget = estimate, budget
        for worker in list(self._models.values()):
            self.memory_estimate(worker.spec)
        if budget is not None:
            pinned = sum(self._bytes(n) for n in self._models)
            log.info("memory_budget %.0f MB; the models loaded at start take about %.0f MB of it", budget / MB,
                     pinned / MB)
            if pinned > budget:
                log.warning("the models loaded at start (about %.0f MB) exceed memory_budget (%.0f MB): no model "
                            "from models_dir can be loaded", pinned / MB, budget / MB)

    @property
    def memory_budget(self) -> int | None:
        return self._budget

    def memory_estimate(self, spec: ModelSpec) -> MemoryEstimate | None:
        """``spec``'s estimated RAM once loaded (None without ``configure_memory``). Blocking the first time."""
        if self._estimate is None:
            return None
        key = (spec.name, str(spec.path), spec.n_ctx)
        est = self._estimates.get(key)
        if est is None:
            est = self._estimates[key] = self._estimate(spec)
        return est

    def loaded_memory(self) -> dict[str, int]:
        """The estimated bytes of each loaded model whose estimate is known."""
        out = {}
        for name, worker in self._models.items():
            est = self._estimates.get((name, str(worker.spec.path), worker.spec.n_ctx))
            if est is not None:
                out[name] = est.total
        return out

    def _bytes(self, name: str) -> int:
        est = self.memory_estimate(self._models[name].spec)
        return est.total if est is not None else 0

    def spec_of(self, name: str) -> ModelSpec | None:
        """Model ``name``'s spec: the loaded one, else the catalog's; None if unknown."""
        m = self._models.get(name)
        return m.spec if m is not None else self._specs.get(name)

    def loaded_workers(self) -> list[ModelWorker]:
        """The workers of the loaded models (a snapshot): for throttling."""
        return list(self._models.values())

    def set_keep_alive(self, name: str, seconds: float | None) -> None:
        """Model ``name``'s own keep_alive (negative: forever; 0: unload as soon as it is idle), used instead of the
        server's until it is unloaded; None: the server's again. Models loaded at start are never unloaded."""
        if seconds is None:
            self._keep_alive_for.pop(name, None)
        else:
            self._keep_alive_for[name] = seconds
            self._start_reaper()

    def keep_alive_of(self, name: str) -> float:
        """Model ``name``'s keep_alive in seconds (negative: never unloaded for idleness)."""
        if name in self._pinned:
            return -1.0
        return self._keep_alive_for.get(name, self._keep_alive)

    def expires_in(self, name: str) -> float | None:
        """Seconds until loaded model ``name`` is unloaded if no request comes (busy: counted from now); None: never."""
        keep = self.keep_alive_of(name)
        if keep < 0 or name not in self._models:
            return None
        if self.busy(name):
            return keep
        return max(0.0, self._last_used.get(name, time.monotonic()) + keep - time.monotonic())

    def is_pinned(self, name: str) -> bool:
        return name in self._pinned

    def rescan(self) -> None:
        """Refresh the catalog (models found since appear; a model whose file is gone stays while loaded)."""
        if self._catalog is None:
            return
        try:
            found = {s.name: s for s in self._catalog() if s.name not in self._pinned}
        except Exception:
            log.exception("scanning the models catalog failed")
            return
        pinned = {n: s for n, s in self._specs.items() if n in self._pinned}
        loaded = {n: m.spec for n, m in self._models.items() if n not in found and n not in pinned}
        self._specs = {**pinned, **found, **loaded}

    def models(self) -> list[ModelInfo]:
        """The loaded models."""
        return [
            ModelInfo(name=n, path=str(m.spec.path), n_ctx=m.spec.n_ctx, created=m.created)
            for n, m in self._models.items()
        ]

    def catalog(self, rescan: bool = True) -> list[CatalogEntry]:
        """Every model this pool serves, loaded or not: those loaded at start first, then by name."""
        if rescan:
            self.rescan()
        entries = []
        for name, spec in self._specs.items():
            m = self._models.get(name)
            info = ModelInfo(name=name, path=str(spec.path), n_ctx=spec.n_ctx, created=m.created if m else 0)
            entries.append(CatalogEntry(info=info, loaded=m is not None, pinned=name in self._pinned))
        return sorted(entries, key=lambda e: (not e.pinned, e.info.name))

    def has_model(self, name: str) -> bool:
        if name in self._models or name in self._specs:
            return True
        self.rescan()
        return name in self._specs

    def is_loaded(self, name: str) -> bool:
        return name in self._models

    def busy(self, name: str) -> bool:
        """Whether a request is on its way to model ``name`` (loading it, tokenizing) or queued or running in it."""
        m = self._models.get(name)
        return self._inflight[name] > 0 or (m is not None and _worker_busy(m))

    @contextlib.asynccontextmanager
    async def holding(self, name: str) -> AsyncIterator[None]:
        """Model ``name`` loaded (loading it if need be) and not unloaded by the pool while inside."""
        self._inflight[name] += 1
        try:
            await self.load_model(name)
            yield
        finally:
            self._inflight[name] -= 1
            if not self._inflight[name]:
                del self._inflight[name]
            self._last_used[name] = time.monotonic()

    def _forget_load(self, name: str, task: asyncio.Future[None]) -> None:
        """A load ended (done, failed or cancelled): the next request for ``name`` starts a new one."""
        if self._loading.get(name) is task:
            del self._loading[name]

    async def load_model(self, name: str) -> None:
        """Load model ``name`` unless it is loaded: ``UnknownModelError`` if the catalog has no such model,
        ``EngineOverloadedError`` (503 with Retry-After) if it is not loaded within ``load_timeout`` or every loaded
        model is busy, ``EngineUnavailableError`` if loading failed."""
        if name in self._models:
            self._last_used[name] = time.monotonic()
            return
        if not self.has_model(name):
            self._model(name)  # raises UnknownModelError, naming what is available
        task = self._loading.get(name)
        if task is None:
            task = asyncio.ensure_future(self._load_on_demand(self._specs[name]))
            self._loading[name] = task
            task.add_done_callback(functools.partial(self._forget_load, name))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: waiters may be gone
        try:
            await asyncio.wait_for(asyncio.shield(task), self._load_timeout)
        except TimeoutError:
            raise EngineOverloadedError(
                f"model {name!r} is still loading after {self._load_timeout:g} s (load_timeout); retry shortly",
                retry_after=5,
            ) from None

    async def _load_on_demand(self, spec: ModelSpec) -> None:
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:  # one load at a time: the room made for it is still there when it lands
            if spec.name in self._models:
                return
            if self._closed:
                raise EngineUnavailableError("the server is shutting down")
            await self._make_room(spec)
            started = time.monotonic()
            log.info("loading %s on demand from %s", spec.name, spec.path)
            try:
                worker = await asyncio.to_thread(self._load, spec)
            except Exception as e:
                log.exception("loading %s failed", spec.name)
                raise EngineUnavailableError(f"model {spec.name!r} failed to load: {e}") from e
            if self._closed:
                await asyncio.to_thread(worker.close)
                raise EngineUnavailableError("the server is shutting down")
            self._models[spec.name] = worker
            self._last_used[spec.name] = time.monotonic()
            log.info("loaded %s in %.2f s", spec.name, time.monotonic() - started)
        self._start_reaper()

    def _start_reaper(self) -> None:
        if self._reaper is None and not self._closed and self._catalog is not None:
            self._reaper = asyncio.create_task(self._reap_idle())

    async def _make_room(self, spec: ModelSpec) -> None:
        """Unload least recently used idle on-demand models until one more fits ``max_loaded`` and the memory
        budget (``plan_evictions``, planned again after each unload: a model may have become busy meanwhile)."""
        name = spec.name
        if name in self._pinned:
            return
        try:
            est = await asyncio.to_thread(self.memory_estimate, spec)  # kept: /metrics and /api/ps read it
        except Exception as e:  # an unreadable header: the load itself says what is wrong with the file
            log.warning("cannot estimate the memory of %s: %s", name, e)
            est = None
        need = est.total if est is not None else 0
        if est is not None and self._budget is not None:
            pinned = sum(self._bytes(n) for n in self._models if n in self._pinned)
            if pinned + need > self._budget:
                taken = f", {pinned / MB:.0f} MB of it taken by the models loaded at start" if pinned else ""
                raise ModelTooLargeError(
                    f"model {name!r} cannot be loaded: it needs about {need / MB:.0f} MB (file {est.weights_bytes / MB:.0f}"
                    f" MB + KV cache {est.kv_bytes / MB:.0f} MB for n_ctx {spec.n_ctx}) and memory_budget is "
                    f"{self._budget / MB:.0f} MB{taken}; raise memory_budget, or lower n_ctx (model_defaults.n_ctx) "
                    "or slots"
                )
        while True:
            now = time.monotonic()
            loaded = [
                Loaded(n, self._bytes(n) if self._budget is not None else 0, self.busy(n),
                       self._last_used.get(n, now), n in self._pinned)
                for n in self._models
            ]
            victims = plan_evictions(loaded, need, self._budget, self._max_loaded)
            if victims is None:
                on_demand = sum(not m.pinned for m in loaded)
                if on_demand >= self._max_loaded:
                    why = f"the {on_demand} models loaded (max_loaded_models) are all serving requests"
                else:
                    used = sum(m.bytes for m in loaded)
                    why = (f"it needs about {need / MB:.0f} MB and {used / MB:.0f} MB of memory_budget "
                           f"{(self._budget or 0) / MB:.0f} MB are taken by models serving requests")
                raise EngineOverloadedError(f"model {name!r} cannot be loaded now: {why}; retry shortly", retry_after=5)
            if not victims:
                return
            log.info("unloading %s (least recently used) to load %s", victims[0], name)
            await self._unload_now(victims[0])

    async def unload_model(self, name: str) -> bool:
        """Unload model ``name``: False if it was not loaded; ``UnknownModelError`` if unknown,
        ``EngineOverloadedError`` (503) while it serves requests."""
        if not self.has_model(name):
            self._model(name)
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            if name not in self._models:
                return False
            if self.busy(name):
                raise EngineOverloadedError(f"model {name!r} is serving requests; retry once they are done", 5)
            await self._unload_now(name)
            return True

    async def _unload_now(self, name: str) -> None:
        worker = self._models.pop(name)  # from here on, requests for it load it anew
        self._last_used.pop(name, None)
        self._keep_alive_for.pop(name, None)  # a model's own keep_alive lasts while it is loaded
        await asyncio.to_thread(worker.close)
        log.info("unloaded %s", name)

    def _reap_period(self) -> float:
        """A few checks per the shortest keep_alive of the loaded on-demand models (0.2 to 5 s)."""
        keeps = [k for n in self._models if (k := self.keep_alive_of(n)) >= 0]
        return min(5.0, max(0.2, min(keeps, default=20.0) / 4))

    async def _reap_idle(self) -> None:
        """Unload on-demand models idle longer than their keep_alive, checking a few times per keep_alive."""
        while not self._closed:
            await asyncio.sleep(self._reap_period())
            now = time.monotonic()
            for name in [n for n in self._models if n not in self._pinned]:
                keep = self.keep_alive_of(name)
                if self.busy(name):
                    self._last_used[name] = now  # idle time counts from the end of its last request
                elif keep >= 0 and now - self._last_used.get(name, now) > keep:
                    if self._load_lock is None:
                        self._load_lock = asyncio.Lock()
                    async with self._load_lock:
                        if name in self._models and not self.busy(name):
                            log.info("unloading %s: idle for more than keep_alive (%g s)", name, keep)
                            await self._unload_now(name)

    def stats(self) -> list[EngineStats]:
        return [m.stats() for m in self._models.values()]

    def slots(self) -> list[SlotInfo]:
        return [s for m in self._models.values() for s in m.slot_info()]

    def template(self, name: str) -> ChatTemplate:
        """Model ``name``'s chat template, bound to its tokenizer (``template.tokenizer``): for /apply-template,
        /tokenize and /detokenize. Both are thread-safe; call them off the event loop."""
        return self._model(name).template

    def _model(self, name: str) -> ModelWorker:
        try:
            return self._models[name]
        except KeyError:
            if name in self._specs:
                raise UnknownModelError(
                    f"model {name!r} is not loaded; send a request to it or POST /models/load first"
                ) from None
            raise UnknownModelError(
                f"model {name!r} is not served here; available: {', '.join(self._specs or self._models)}"
            ) from None

    async def submit(self, request: GenerationRequest) -> Generation:
        """Load the model if need be (see ``load_model``), then queue the request (``submit_loaded``)."""
        async with self.holding(request.model):
            return await self.submit_loaded(request)

    async def submit_loaded(self, request: GenerationRequest) -> Generation:
        model = self._model(request.model)
        tokens = await asyncio.to_thread(prompt_tokens, model, request)
        if not tokens:
            raise InvalidPromptError("the prompt is empty")
        n_ctx = model.spec.n_ctx
        if len(tokens) + 1 > n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(tokens)} tokens but a request's context holds {n_ctx} (n_ctx); "
                "shorten the prompt or serve the model with a larger n_ctx",
                len(tokens),
                n_ctx,
            )
        params = request.params
        room = n_ctx - len(tokens)
        if params.max_tokens > room:
            params = replace(params, max_tokens=room)
        stream = EventStream(asyncio.get_running_loop(), prompt_tokens=len(tokens), n_choices=request.n)
        job = Job(tokens=tokens, params=params, stream=stream, n=request.n, lora=request.lora)
        stream.on_close(job.cancelled.set)
        model.enqueue(job)
        return stream

    async def close(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for m in self._models.values():
            await asyncio.to_thread(m.close)
        self._models.clear()
