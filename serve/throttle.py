"""Throttling on a laptop: fewer decoding threads and fewer slots while the machine runs on battery or while the
rest of the machine is busy, restored when that ends. Off by default (``throttle.enabled``).

A ``Throttle`` reads the machine with a *probe* (a function returning a ``Reading``; ``PsutilProbe`` by default,
a fake one in tests) every ``interval`` seconds, in a worker thread, and sets ``set_limits(threads, slots)`` on each
loaded model that has limits (the batched engine's ``BatchedModel``), ``set_limits(None, None)`` to restore. A model
loaded while throttled is throttled at the next check. The serial engine has no such limits: its models are left
alone (logged once at start).

CPU: the share of the CPU the *other* processes use (the machine's use minus this server's), so that the server's own
decoding never throttles it (it would then drop below the ceiling, be restored, and go round again).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reading:
    """One look at the machine: on battery (None: no battery), and the CPU share (percent of all cores) used by
    every process but this server (None: not measured)."""

    on_battery: bool | None = None
    others_cpu_percent: float | None = None


Probe = Callable[[], Reading]


@runtime_checkable
class Limitable(Protocol):
    """A loaded model whose decoding threads and open slots can be limited (``BatchedModel``)."""

    def set_limits(self, threads: int | None = None, slots: int | None = None) -> None: ...

    @property
    def limits(self) -> tuple[int, int]: ...


class PsutilProbe:
    """The machine as psutil sees it: ``sensors_battery()`` (None on a machine without one) and the CPU used since
    the previous reading by the machine and by this process (the first reading has no CPU figure)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._cpus = psutil.cpu_count() or 1
        self._started = False

    def __call__(self) -> Reading:
        psutil = self._psutil
        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        machine = psutil.cpu_percent(interval=None)  # since the previous call, all cores: 0..100
        mine = self._me.cpu_percent(interval=None) / self._cpus  # since the previous call: 0..100 of all cores
        started, self._started = self._started, True
        return Reading(
            on_battery=None if battery is None else not battery.power_plugged,
            others_cpu_percent=max(0.0, machine - mine) if started else None,
        )


class Throttle:
    """Applies ``threads``/``slots`` limits to ``models()`` while ``probe()`` says to (see the module)."""

    def __init__(
        self,
        probe: Probe,
        models: Callable[[], Iterable[object]],
        *,
        threads: int = 1,
        slots: int = 1,
        on_battery: bool = True,
        cpu_percent: float | None = None,
        interval: float = 5.0,
    ) -> None:
        self._probe, self._models = probe, models
        self.threads, self.slots = threads, slots
        self.on_battery, self.cpu_percent, self.interval = on_battery, cpu_percent, interval
        self.reason: str | None = None  # why it is throttled now; None: not throttled
        self.last: Reading | None = None
        self._applied: weakref.WeakSet[Limitable] = weakref.WeakSet()

    @property
    def throttled(self) -> bool:
        return self.reason is not None

    def why(self, reading: Reading) -> str | None:
        """The reason to throttle given ``reading``, or None."""
        if self.on_battery and reading.on_battery:
            return "on battery"
        cpu = reading.others_cpu_percent
        if self.cpu_percent is not None and cpu is not None and cpu > self.cpu_percent:
            return f"other processes use {cpu:.0f}% of the CPU (ceiling {self.cpu_percent:g}%)"
        return None

    def check(self, reading: Reading | None = None) -> bool:
        """Read the machine (``reading``, else the probe: blocking) and apply or lift the limits; returns whether
        throttled. Any thread."""
        reading = self._probe() if reading is None else reading
        self.last = reading
        reason = self.why(reading)
        if reason != self.reason:
            if reason is None:
                log.info("throttling lifted: %s no more", self.reason)
            else:
                log.info("throttling (%s): %d threads, %d slots per model", reason, self.threads, self.slots)
        self.reason = reason
        models = [m for m in self._models() if isinstance(m, Limitable)]
        if reason is not None:
            for m in models:
                if m not in self._applied:
                    m.set_limits(threads=self.threads, slots=self.slots)
                    self._applied.add(m)
        elif len(self._applied):
            for m in models:
                if m in self._applied:
                    m.set_limits(None, None)
            self._applied = weakref.WeakSet()
        return reason is not None

    async def run(self) -> None:
        """Check every ``interval`` seconds until cancelled (the probe runs in a worker thread)."""
        while True:
            try:
                await asyncio.to_thread(self.check)
            except Exception:  # a probe that fails once must not end throttling for good
                log.exception("throttle check failed")
            await asyncio.sleep(self.interval)

    def families(self) -> Iterable[Metric]:
        """``edgellm:throttled`` (0/1) and the last reading, for /metrics."""
        yield GaugeMetricFamily("edgellm:throttled", "1 while throttled (on battery or a busy machine)",
                                value=float(self.throttled))
        if self.last is not None and self.last.others_cpu_percent is not None:
            yield GaugeMetricFamily("edgellm:throttle_other_cpu_percent",
                                    "CPU share used by other processes at the last check", value=self.last.others_cpu_percent)
        if self.last is not None and self.last.on_battery is not None:
            yield GaugeMetricFamily("edgellm:on_battery", "1 while on battery at the last check",
                                    value=float(self.last.on_battery))


__all__ = ["Limitable", "Probe", "PsutilProbe", "Reading", "Throttle"]
