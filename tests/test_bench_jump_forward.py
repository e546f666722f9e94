"""`edgellm bench jump-forward`: a one-request run of every variant on the real default model. Structure only (no
timing is asserted): every variant answers, the oracles' drafts are the answer's own tokens, the files are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgellm.bench.errors import BenchError
from edgellm.bench.jump_forward import VARIANTS, bench_jump_forward, jump_forward_table


def test_one_request_every_variant(default_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    r = bench_jump_forward(default_gguf, threads=2, rounds=1, requests=1, out=out)
    rows = {x.variant: x for x in r.rows}
    assert list(rows) == list(VARIANTS)
    # greedy, the same request: every variant writes the same answer (near ties aside: within a token or two)
    lengths = {x.tokens for x in r.rows}
    assert max(lengths) - min(lengths) <= 2, lengths
    assert rows["off"].drafted == 0 and all(x.tps > 0 for x in r.rows)
    for x in r.rows:
        assert 0 <= x.accepted <= x.drafted
    # the oracles draft forced text in the tokens the first pass wrote (besides the context's n-gram drafts): more
    # accepted draft tokens than the context alone
    print(jump_forward_table(r))
    for name in ("tokenizer", "spelled-new", "spelled-seen", "own-tokens", "ceiling"):
        assert rows[name].accepted > rows["ngram"].accepted, (name, r.rows)
    assert (out / "jump-forward.md").read_text() == jump_forward_table(r)
    assert json.loads((out / "jump-forward.json").read_text())["rows"][0]["variant"] == "off"
    assert (out / "jump-forward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs", [{"rounds": 0}, {"requests": 0}, {"model": Path("no/such.gguf")}])
def test_bad_options_are_refused_before_anything_runs(default_gguf: Path, kwargs: dict) -> None:
    args = {"model": default_gguf, "rounds": 1, "requests": 1, **kwargs}
    with pytest.raises(BenchError):
        bench_jump_forward(**args)
