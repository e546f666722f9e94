"""`edgellm bench personas` for real, briefly: two GGUF LoRA adapters on the default GGUF against two merged-size
copies, each configuration a real server; the report's shape and files (its speeds are figures, not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgellm.bench.errors import BenchError
from edgellm.bench.personas import adapters_from, bench_personas, table


def test_bench_personas_reports_every_configuration(
    default_gguf: Path, smollm2_adapters: list[Path], tmp_path: Path
) -> None:
    result = bench_personas(default_gguf, smollm2_adapters[:2], rounds=1, max_tokens=8, threads=2, n_ctx=256,
                            out=tmp_path)
    assert [c.name for c in result.configs] == ["base", "1 persona", "2 personas", "2 merged"]
    for c in result.configs:
        assert len(c.tok_s) == 1 and c.tok_s[0] > 0 and c.errors == 0 and c.rss_mb > 0
    assert result.configs[2].streams == ["p0", "p1"]
    data = json.loads((tmp_path / "personas.json").read_text())
    assert set(data["tok_s_median"]) == {"base", "1 persona", "2 personas", "2 merged"}
    assert (tmp_path / "personas.png").stat().st_size > 0
    assert "| 2 personas |" in table(result)


def test_bench_personas_refuses_too_few_adapters(smollm2_adapters: list[Path], tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="at least 2"):
        adapters_from(smollm2_adapters[:1])
    with pytest.raises(BenchError, match="no such"):
        adapters_from([tmp_path / "missing.gguf", *smollm2_adapters])
