"""The shared frame of the bench reports: ``bench/tables.py`` (Markdown tables) and ``bench/charts.py`` (headless
matplotlib, atomic PNG writes). Fast: no model, no server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.bench.charts import pyplot, save_png, subplots
from edgellm.bench.tables import markdown_table


def test_a_table_is_its_header_alignment_and_rows() -> None:
    assert markdown_table(["name", "tok/s"], "lr", [["a", "1.0"], ["b", "22.5"]]) == [
        "| name | tok/s |",
        "|---|--:|",
        "| a | 1.0 |",
        "| b | 22.5 |",
    ]


def test_wide_right_alignment_and_blank_cells() -> None:
    """``None`` is written ``| |``; an empty string keeps its two spaces, as the reports have always written them."""
    lines = markdown_table(["x", "y", "z"], "lrr", [["a", None, ""]], right="---:")
    assert lines == ["| x | y | z |", "|---|---:|---:|", "| a | |  |"]


def test_no_rows_is_a_header_alone() -> None:
    assert markdown_table(["x"], "r", iter([])) == ["| x |", "|--:|"]


@pytest.mark.parametrize("align", ["l", "lrr", "lc"])
def test_an_alignment_that_does_not_fit_the_header_is_refused(align: str) -> None:
    with pytest.raises(ValueError, match="align"):
        markdown_table(["x", "y"], align, [])


def test_importing_the_bench_reports_does_not_import_matplotlib() -> None:
    """matplotlib loads only when a chart is drawn (checked in a clean interpreter)."""
    code = (
        "import sys; import edgellm.bench.charts, edgellm.bench.tables, edgellm.bench.report, "
        "edgellm.bench.ondemand, edgellm.bench.personas, edgellm.bench.soak, edgellm.bench.retrieval_speed, "
        "edgellm.bench.grammar_speed, edgellm.bench.workloads, edgellm.bench.engine_speed; "
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'matplotlib']; assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_save_png_writes_in_place_and_closes_the_figure(tmp_path: Path) -> None:
    fig, ax = subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    out = tmp_path / "sub" / "chart.png"
    save_png(fig, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["chart.png"]  # no temporary file left beside it
    assert fig.number not in pyplot().get_fignums()
    assert pyplot().get_backend().lower() == "agg"
