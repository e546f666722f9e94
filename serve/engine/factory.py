"""Engine kind + model specs -> a loaded engine. The only place that knows which engine classes exist."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from edgellm.serve.engine.base import Engine
from edgellm.serve.engine.batch import PROMPT_CHUNK
from edgellm.serve.engine.specs import ModelSpec
from edgellm.serve.engine.speculative import DEFAULT_DRAFT, DraftPolicy

if TYPE_CHECKING:
    from edgellm.serve.engine.batched import BatchedEngine
    from edgellm.serve.engine.serial import SerialEngine

EngineKind = Literal["serial", "batched"]


def build_engine(
    kind: EngineKind,
    specs: Sequence[ModelSpec],
    *,
    slots: int = 4,
    prompt_chunk: int = PROMPT_CHUNK,
    kv_unified: bool = False,
    queue_size: int = 64,
    catalog: Callable[[], list[ModelSpec]] | None = None,
    max_loaded: int = 2,
    keep_alive: float = 300.0,
    load_timeout: float = 120.0,
    draft: DraftPolicy | None = DEFAULT_DRAFT,
) -> Engine:
    """Load every model (blocking: call it off the event loop). ``batched``: continuous batching, ``slots``
    sequences per model (one KV buffer for all with ``kv_unified``), reading at most ``prompt_chunk`` prompt tokens
    per step while others generate; ``serial``: one request at a time per model (``slots``, ``prompt_chunk`` and
    ``kv_unified`` are ignored). ``queue_size`` requests may wait per model; beyond that, ``submit`` raises
    ``EngineOverloadedError``.

    ``draft`` (batched only): how speculative decoding from the context (and jump-forward under grammars) drafts,
    ``None`` for not at all; see ``speculative.py``.

    ``catalog``: further models, loaded on their first request (``ModelPool.serve_on_demand``: at most
    ``max_loaded`` at once, unloaded after ``keep_alive`` idle seconds, a request waits ``load_timeout`` s)."""
    if kind not in ("serial", "batched"):
        raise ValueError(f"unknown engine {kind!r}; expected 'serial' or 'batched'")
    for spec in specs:
        if not spec.path.is_file():
            raise FileNotFoundError(
                f"model file {spec.path} (model {spec.name!r}) does not exist; "
                "run `edgellm models pull default` or fix its path in the settings"
            )
    if kind == "batched":
        from edgellm.serve.engine.batched import BatchedEngine

        engine: BatchedEngine | SerialEngine = BatchedEngine(
            list(specs),
            slots=slots,
            prompt_chunk=prompt_chunk,
            kv_unified=kv_unified,
            queue_size=queue_size,
            draft=draft,
        )
    else:
        from edgellm.serve.engine.serial import SerialEngine

        engine = SerialEngine(list(specs), queue_size=queue_size)
    if catalog is not None:
        engine.serve_on_demand(catalog, max_loaded=max_loaded, keep_alive=keep_alive, load_timeout=load_timeout)
    return engine
