"""Context sizes chosen for the machine: a model configured with ``n_ctx: null`` gets the context it was trained
for, halved until every slot's KV cache fits in the memory left after the weights (with a margin); an explicit
``n_ctx`` is kept, with a warning when it does not fit. The plan is logged at start, with how each figure was
chosen.

The KV cache of one token is K and V for every layer, ``head_count_kv x key_length`` (and ``value_length``) values
each, in f16 (llama.cpp's default cache type): 23 KB for SmolLM2-135M (30 layers, 3 KV heads of 64). The batched
engine gives each of its ``slots`` sequences ``n_ctx`` cells.

The same arithmetic estimates what a model takes in RAM once loaded (``estimate_memory``: its file, memory-mapped,
plus its KV cache), which the on-demand pool weighs against ``memory_budget`` (``parse_memory_budget``: bytes, a
size such as ``"6GB"``, or a share of the available memory such as ``"75%"``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.gguf import read_header
from edgellm.hardware import available_memory

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.75  # of the available memory, for weights and KV together: the rest for the process and the OS
MIN_CTX = 512
F16_BYTES = 2


@dataclass(frozen=True)
class ModelPlan:
    name: str
    n_ctx: int
    weights_bytes: int
    kv_bytes_per_token: int
    kv_bytes: int  # slots x n_ctx x kv_bytes_per_token
    why: str


def kv_bytes_per_token(meta: dict[str, Any]) -> int:
    """f16 K and V of one token over all layers, from the GGUF's attention metadata."""
    arch = meta["general.architecture"]
    layers = int(meta[f"{arch}.block_count"])
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta[f"{arch}.embedding_length"]) // heads
    k = int(meta.get(f"{arch}.attention.key_length", head_dim))
    v = int(meta.get(f"{arch}.attention.value_length", head_dim))
    return layers * kv_heads * (k + v) * F16_BYTES


def plan_contexts(
    models: list[tuple[str, Path, int | None]], slots: int, available: int | None = None
) -> list[ModelPlan]:
    """``models``: (name, GGUF path, configured n_ctx or None). All models share ``available`` bytes (default: what
    the OS reports as available now)."""
    available = available_memory() if available is None else available
    headers = [(name, path, n_ctx, read_header(path, with_tensors=False).meta) for name, path, n_ctx in models]
    weights = {name: path.stat().st_size for name, path, _, _ in headers}
    budget = int(available * MEMORY_SHARE) - sum(weights.values())
    auto = [h for h in headers if h[2] is None]
    fixed_kv = sum(slots * n_ctx * kv_bytes_per_token(meta) for _, _, n_ctx, meta in headers if n_ctx is not None)
    share = max(0, budget - fixed_kv) // max(1, len(auto))  # what each auto-sized model's KV may take
    plans = []
    for name, _path, n_ctx, meta in headers:
        per_token = kv_bytes_per_token(meta)
        trained = int(meta.get(f"{meta['general.architecture']}.context_length", 4096))
        if n_ctx is None:
            n_ctx, why = trained, "the model's trained context"
            while n_ctx > MIN_CTX and slots * n_ctx * per_token > share:
                n_ctx //= 2
                why = f"the trained {trained} halved until {slots} slots' KV fits in the memory left"
            if slots * n_ctx * per_token > share:
                log.warning("%s: even n_ctx %d x %d slots needs %.0f MB of KV, more than the %.0f MB left", name,
                            n_ctx, slots, slots * n_ctx * per_token / 1e6, share / 1e6)
        else:
            why = "configured"
            if slots * n_ctx * per_token > budget:
                log.warning("%s: n_ctx %d x %d slots needs %.0f MB of KV; about %.0f MB are left after the weights; "
                            "lower n_ctx or slots, or set n_ctx: null to size it to this machine", name, n_ctx, slots,
                            slots * n_ctx * per_token / 1e6, max(0, budget) / 1e6)
        plans.append(ModelPlan(name, n_ctx, weights[name], per_token, slots * n_ctx * per_token, why))
    for p in plans:
        log.info("%s: n_ctx %d (%s): KV %.0f MB (%d slots x %d tokens x %.1f KB f16), weights %.0f MB; %.1f GB "
                 "available", p.name, p.n_ctx, p.why, p.kv_bytes / 1e6, slots, p.n_ctx, p.kv_bytes_per_token / 1e3,
                 p.weights_bytes / 1e6, available / 1e9)
    return plans


@dataclass(frozen=True)
class MemoryEstimate:
    """What a loaded model takes in RAM, estimated: its GGUF file (memory-mapped weights) and its f16 KV cache
    (``slots x n_ctx x kv_bytes_per_token``). llama.cpp's compute buffers (a few tens of MB) come on top."""

    weights_bytes: int
    kv_bytes: int
    n_layers: int

    @property
    def total(self) -> int:
        return self.weights_bytes + self.kv_bytes

    def offloaded(self, n_gpu_layers: int) -> int:
        """The share on a GPU with ``n_gpu_layers`` layers offloaded (-1: all), KV offloaded with its layers."""
        if n_gpu_layers < 0 or (self.n_layers and n_gpu_layers >= self.n_layers):
            return self.total
        return self.total * n_gpu_layers // self.n_layers if self.n_layers else 0


def estimate_memory(path: Path, n_ctx: int, slots: int) -> MemoryEstimate:
    """A model's RAM once loaded with ``slots`` sequences of ``n_ctx`` tokens (reads the GGUF header: blocking)."""
    meta = read_header(path, with_tensors=False).meta
    arch = meta["general.architecture"]
    return MemoryEstimate(
        weights_bytes=Path(path).stat().st_size,
        kv_bytes=slots * n_ctx * kv_bytes_per_token(meta),
        n_layers=int(meta.get(f"{arch}.block_count", 0)),
    )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_memory_budget(value: int | str | None, available: int | None = None) -> int | None:
    """``memory_budget`` in bytes: None (no budget), a number of bytes, a size (``"6GB"``, ``"512MiB"``, ``"2g"``)
    or a percentage of ``available`` (default: the memory available now, ``hardware.available_memory``) such as
    ``"75%"``. ``ValueError`` says what is wrong with anything else."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"memory_budget: expected bytes, a size such as '6GB' or a share such as '75%', got {value!r}")
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError(f"memory_budget: must be more than 0 bytes, got {value!r}")
        return int(value)
    text = value.strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            raise ValueError(f"memory_budget: {value!r} is not a percentage such as '75%'") from None
        if not 0 < share <= 100:
            raise ValueError(f"memory_budget: a share of the available memory must be in (0, 100]%, got {value!r}")
        return int((available_memory() if available is None else available) * share / 100)
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"memory_budget: expected bytes, a size such as '6GB' or '512MiB', or a share of the "
                         f"available memory such as '75%'; got {value!r}")
    unit = (m.group(2) or "").lower().removesuffix("b")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory_budget: must be more than 0 bytes, got {value!r}")
    return size


__all__ = [
    "MemoryEstimate",
    "ModelPlan",
    "estimate_memory",
    "kv_bytes_per_token",
    "parse_memory_budget",
    "plan_contexts",
]
