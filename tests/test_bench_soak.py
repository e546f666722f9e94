"""`edgellm bench soak` for ~20 s against a real server it starts (the default GGUF, the configured reranker and
embedder): every kind of request is sent, the malformed ones get 4xx, nothing gets a 5xx or a dropped connection,
the server's RSS and descriptors are sampled, and the report files are written."""

from __future__ import annotations

import json
from pathlib import Path

from edgellm.bench.soak import MIX, bench_soak


def test_a_short_soak(default_gguf: Path, tmp_path: Path) -> None:
    # 6 clients: the first 6 requests are one of each kind, however slow the machine is
    result = bench_soak(minutes=20 / 60, chat_model=default_gguf, concurrency=6, max_tokens=8, sample_s=2.0, threads=1,
                        out=tmp_path)
    print("\n" + Path(result.files["table"]).read_text())
    assert {k.kind for k in result.kinds} == set(MIX)  # the server has a reranker and an embedder
    assert result.server_errors == 0 and result.healthy_after
    for k in result.kinds:
        assert set(k.outcomes) == {"ok"}, k  # bad bodies: 4xx with the error shape; disconnects: after a token
    assert len(result.samples) >= 5 and all(s.rss_mb > 50 and s.fds > 3 for s in result.samples)
    assert result.samples[-1].requests <= result.requests
    assert result.rss_growth_pct is not None and result.p95_ms is not None
    saved = json.loads((tmp_path / "soak.json").read_text())
    assert saved["requests"] == result.requests == sum(k.requests for k in result.kinds)
    assert (tmp_path / "soak.png").stat().st_size > 10_000
