"""The one thread that runs llama.cpp for every model of a batched engine: busy models take turns, one step each.

Why one thread: llama.cpp's OpenMP threads belong to the thread that calls ``llama_decode``. A second decoding
thread brings a second team; libgomp then manages more threads than there are cores, stops spinning at its barriers
and sleeps instead, and every model decodes ~3x slower (measured on 2 cores: one model alone 80-90 tok/s, two models
with a thread each 30-32 tok/s, even taking turns). So the engine's models share one scheduler thread.

Each round the thread admits waiting requests of every busy model (under ``cond``, which also guards each model's
wait queue), fails the requests of the models that are closing and lets go of them, then runs one ``step`` of each
busy model. It starts with the first model attached and ends when the last one is detached.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger(__name__)


class ScheduledModel(Protocol):
    """What the scheduler needs from a model. ``busy`` and ``admit`` are called with the scheduler's ``cond``
    held; ``step`` and ``fail_all`` without it, always on the scheduler thread."""

    closing: bool

    @property
    def name(self) -> str: ...

    def busy(self) -> bool:
        """Requests are waiting or running."""
        ...

    def admit(self) -> None:
        """Move waiting requests into free slots; they start at the next ``step``."""
        ...

    def step(self) -> None:
        """Start the admitted requests, drop the cancelled ones, decode one batch and sample."""
        ...

    def fail_all(self) -> None:
        """Fail every running and waiting request (the model is closing)."""
        ...


class Scheduler:
    """The decoding thread shared by the models attached to it (see the module docstring)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._models: list[ScheduledModel] = []
        self._thread: threading.Thread | None = None

    def attach(self, model: ScheduledModel) -> None:
        with self.cond:
            self._models.append(model)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="batched-scheduler", daemon=True)
                self._thread.start()

    def detach(self, model: ScheduledModel, timeout: float) -> bool:
        """Have the thread fail the model's requests and let go of it; False if it did not within ``timeout``."""
        with self.cond:
            model.closing = True
            self.cond.notify_all()
            return self.cond.wait_for(lambda: model not in self._models, timeout=timeout)

    def _run(self) -> None:
        while True:
            with self.cond:
                while True:
                    closing = [m for m in self._models if m.closing]
                    busy = [m for m in self._models if m.busy()]
                    if closing or busy:
                        break
                    if not self._models:
                        self._thread = None
                        return
                    self.cond.wait()
                stepping = [m for m in busy if not m.closing]
                for m in stepping:
                    m.admit()
            for m in closing:
                try:
                    m.fail_all()
                except Exception:
                    log.exception("failing the requests of %s failed", m.name)
                finally:
                    with self.cond:
                        self._models.remove(m)
                        self.cond.notify_all()
            for m in stepping:
                m.step()


__all__ = ["ScheduledModel", "Scheduler"]
