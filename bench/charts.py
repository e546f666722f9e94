"""The frame of every bench chart: headless matplotlib, imported only when a chart is drawn, and an atomic PNG write.

    fig, axes = subplots(1, 2, figsize=(10, 4))
    ...  # draw on axes
    save_png(fig, path)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm.fsutil import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed); the first call imports matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """``plt.subplots`` of :func:`pyplot`: a new figure and its axes."""
    return pyplot().subplots(nrows, ncols, **kwargs)


def save_png(fig: Figure, path: Path, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` as a PNG through a temporary file renamed into place, then close the figure."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)


__all__ = ["pyplot", "save_png", "subplots"]
