"""Context sizes chosen for the machine: a model configured with ``n_ctx: null`` gets the context it was trained
for, halved until every slot's KV cache fits in the memory left after the weights (with a margin); an explicit
``n_ctx`` is kept, with a warning when it does not fit. The plan is logged at start, with how each figure was
chosen.

The KV cache of one token is K and V for every layer, ``head_count_kv x key_length`` (and ``value_length``) values
each, in f16 (llama.cpp's default cache type): 23 KB for SmolLM2-135M (30 layers, 3 KV heads of 64). The batched
engine gives each of its ``slots`` sequences ``n_ctx`` cells.
"""

from __future__ import annotations

import logging
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


__all__ = ["ModelPlan", "kv_bytes_per_token", "plan_contexts"]
