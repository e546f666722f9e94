"""Engine kind + model specs -> a loaded engine. The only place that knows which engine classes exist."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from edgellm.serve.engine.base import Engine
from edgellm.serve.engine.specs import ModelSpec

EngineKind = Literal["serial", "batched"]


def build_engine(
    kind: EngineKind, specs: Sequence[ModelSpec], *, slots: int = 4, queue_size: int = 64
) -> Engine:
    """Load every model (blocking: call it off the event loop). ``batched``: continuous batching, ``slots``
    sequences per model; ``serial``: one request at a time per model (``slots`` is ignored). ``queue_size``
    requests may wait per model; beyond that, ``submit`` raises ``EngineOverloadedError``."""
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

        return BatchedEngine(list(specs), slots=slots, queue_size=queue_size)
    from edgellm.serve.engine.serial import SerialEngine

    return SerialEngine(list(specs), queue_size=queue_size)
