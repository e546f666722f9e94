"""The one percentile of every benchmark: linear interpolation between sorted values (numpy's default, and
llama.cpp's in llama-perplexity), so a p95 of TTFT and a p99 of KL divergence mean the same thing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``; raises ``ValueError`` when there are none."""
    if len(values) == 0:
        raise ValueError("percentile of no values")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
