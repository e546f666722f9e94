"""`edgellm bench engines`: raw llama.cpp decode vs the engines, one real (tiny) run through real servers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.bench.engine_speed import compare_engines
from edgellm.bench.errors import BenchError
from edgellm.bench.report import engines_table


def test_a_tiny_comparison_writes_its_table_json_and_chart(default_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    r = compare_engines(default_gguf, ["batched"], levels=[1, 2], n_tokens=8, rounds=1, out=out)
    assert list(r.rows) == ["batched"]
    assert [x.streams for x in r.rows["batched"]] == [1, 2]
    for x in r.rows["batched"]:
        assert x.tokens > 0 and x.aggregate > 0 and 0 < x.ttft_p50 <= x.ttft_p95
    assert r.raw_tg > 0 and r.raw_prompt_ms > 0 and r.prompt_tokens > 10
    table = (out / "engines.md").read_text()
    assert table == engines_table(r)
    assert "| batched | 2 |" in table and "| raw llama_decode | 1 |" in table
    data = json.loads((out / "engines.json").read_text())
    assert data["rows"]["batched"][1]["streams"] == 2
    assert (out / "engines.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"llama_server": Path("/nonexistent/llama-server")}, "not an executable llama-server"),
        ({"llama_server": Path(sys.executable), "mode": "engine"}, "only be compared over HTTP"),
        ({"mode": "grpc"}, "mode must be"),
        ({"engines": ["turbo"]}, "engines must be some of serial, batched"),
        ({"levels": [0]}, ">= 1"),
    ],
)
def test_bad_options_are_refused_before_anything_runs(default_gguf: Path, kwargs: dict, fragment: str) -> None:
    with pytest.raises(BenchError, match=fragment):
        compare_engines(default_gguf, **{"engines": ["batched"], "levels": [1], **kwargs})


def test_cli_names_a_missing_model(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgellm", "bench", "engines", "--model", str(tmp_path / "none.gguf")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "none.gguf: no such GGUF file" in proc.stderr
