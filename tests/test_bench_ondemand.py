"""`edgellm bench ondemand` with tiny settings against a real server it starts over two real GGUFs: every figure is
measured (a cold first token, decode beside a load, RSS around a keep_alive 0 unload) and the report files are
written. No figure is judged: the machine is shared."""

from __future__ import annotations

import json
import math
from pathlib import Path

from edgellm.bench.ondemand import bench_ondemand


def test_a_short_ondemand_bench(default_gguf: Path, tmp_path: Path) -> None:
    result = bench_ondemand(streamer=default_gguf, rounds=1, tokens=64, n_ctx=256, threads=1, out=tmp_path)
    print("\n" + Path(result.files["table"]).read_text())
    assert len(result.cold_ttft_s) == len(result.warm_ttft_s) == len(result.alone_tps) == 1
    assert result.cold_ttft_s[0] > 0 and result.warm_ttft_s[0] > 0 and result.load_s[0] > 0
    assert result.alone_tps[0] > 0 and (math.isnan(result.during_load_tps[0]) or result.during_load_tps[0] > 0)
    assert result.rss_one_mb > 50 and result.rss_two_mb > 50 and result.rss_after_unload_mb > 50
    assert result.estimate_mb > 90  # the second model's file and KV cache
    saved = json.loads((tmp_path / "ondemand.json").read_text())
    assert saved["cold_ttft_s"] == result.cold_ttft_s and "decode_ratio" in saved
    assert (tmp_path / "ondemand.png").stat().st_size > 10_000
