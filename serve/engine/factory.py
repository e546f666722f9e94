"""Settings -> engine. The only place that knows which engine classes exist."""

from __future__ import annotations

from edgellm.serve.engine.base import Engine
from edgellm.serve.engine.specs import ModelSpec
from edgellm.serve.settings import ServeSettings


def model_specs(settings: ServeSettings) -> list[ModelSpec]:
    return [
        ModelSpec(
            name=m.name,
            path=m.path,
            n_ctx=m.n_ctx,
            n_threads=m.n_threads,
            n_gpu_layers=m.n_gpu_layers,
            n_batch=m.n_batch,
        )
        for m in settings.models
    ]


def build_engine(settings: ServeSettings) -> Engine:
    """Load every configured model (blocking: call it off the event loop)."""
    specs = model_specs(settings)
    for spec in specs:
        if not spec.path.is_file():
            raise FileNotFoundError(
                f"model file {spec.path} (model {spec.name!r}) does not exist; "
                "run `edgellm models pull default` or fix its path in the settings"
            )
    if settings.engine == "batched":
        from edgellm.serve.engine.batched import BatchedEngine

        return BatchedEngine(specs, slots=settings.slots, queue_size=settings.queue_size)
    from edgellm.serve.engine.serial import SerialEngine

    return SerialEngine(specs, queue_size=settings.queue_size)
