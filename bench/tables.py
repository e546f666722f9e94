"""The Markdown tables of the bench reports: one way to write the header, alignment and body rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_LEFT = "---"


def _row(cells: Sequence[str | None]) -> str:
    """``| a | b |``: each cell as given between ``| `` and `` |``; a ``None`` cell is left blank (``| |``)."""
    return "|" + "|".join(" " if cell is None else f" {cell} " for cell in cells) + "|"


def markdown_table(
    header: Sequence[str], align: str, rows: Iterable[Sequence[str | None]], *, right: str = "--:"
) -> list[str]:
    """The lines of a Markdown table: the header row, the alignment row, then one line per row.

    ``align`` has one letter per column, ``l`` (written ``---``) or ``r`` (written ``right``: ``--:`` unless a report
    writes ``---:``). Cells are already formatted strings; an empty string keeps its two spaces (``|  |``), ``None``
    is written ``| |``. The caller joins the lines (and any text around them) with newlines.
    """
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r} needs one of 'l' or 'r' per column of {list(header)}")
    marks = [right if a == "r" else _LEFT for a in align]
    return [_row(header), "|" + "|".join(marks) + "|", *(_row(row) for row in rows)]


__all__ = ["markdown_table"]
