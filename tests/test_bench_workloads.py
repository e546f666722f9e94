"""`edgellm bench workloads`: the shipped request set, and short real runs against a real `edgellm serve` (and
llama-server when its binary is there). Structure only: no timing is asserted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgellm.bench.errors import BenchError
from edgellm.bench.workloads import (
    COPY_HEAVY,
    WARMUP,
    WORKLOADS,
    bench_workloads,
    count_repeats,
    load_requests,
    parse_variant,
    schedule,
    workloads_table,
)

LLAMA_SERVER = Path(__file__).resolve().parents[2] / "shared" / "tools" / "llama-server" / "llama-server"


def test_the_shipped_set_has_several_requests_of_every_workload() -> None:
    reqs = load_requests()
    assert len({r.id for r in reqs}) == len(reqs)
    for w in WORKLOADS:
        mine = [r for r in reqs if r.workload == w]
        assert len(mine) >= 3, w
        assert len({r.max_tokens for r in mine}) == 1, f"{w}: one max_tokens per workload"
    assert set(COPY_HEAVY) < set(WORKLOADS)
    for r in reqs:
        body = r.body("m")
        assert body["temperature"] == 0.0 and body["stream"] is True
        if r.workload == "extract":
            assert body["response_format"]["type"] == "json_schema"
            assert body["response_format"]["json_schema"]["schema"]["type"] == "object"
        else:
            assert "response_format" not in body
    assert any(m["role"] == "assistant" for r in reqs if r.workload == "multiturn" for m in r.messages)


def test_each_level_goes_on_where_the_last_stopped_so_the_default_run_sends_no_request_twice() -> None:
    reqs = load_requests()
    chat = [r for r in reqs if r.workload == "chat"]
    plan = schedule(chat, [1, 4], 3)
    assert [[[r.id for r in b] for b in level] for level in plan] == [
        [["chat-1"], ["chat-2"], ["chat-3"]],
        [["chat-4", "chat-5", "chat-6", "chat-7"], ["chat-8", "chat-9", "chat-10", "chat-11"],
         ["chat-12", "chat-13", "chat-14", "chat-15"]],
    ]  # fmt: skip
    # the defaults (levels 1 and 4, 3 rounds) on the shipped set: nothing a server could replay from an earlier answer
    assert count_repeats([schedule([r for r in reqs if r.workload == w], [1, 4], 3) for w in WORKLOADS]) == 0
    assert WARMUP.id not in {r.id for r in reqs}
    # a small set wraps around, and the repeats are counted
    assert count_repeats([schedule(chat[:4], [1, 4], 3)]) == 11


def test_a_bad_request_line_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "set.jsonl"
    bad.write_text('{"id": "a", "workload": "chat", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}\n'
                   '{"id": "b", "workload": "poetry", "max_tokens": 8, "messages": []}\n')  # fmt: skip
    with pytest.raises(BenchError, match=r"set.jsonl:2: workload must be one of"):
        load_requests(bad)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({}, "no server to run against"),
        ({"llama_server": Path("/nonexistent/llama-server")}, "not an executable llama-server"),
        ({"servers": {"a": "http://127.0.0.1:1"}, "workloads": ["poetry"]}, "workloads must be some of"),
        ({"servers": {"a": "http://127.0.0.1:1"}, "levels": [0]}, ">= 1"),
        ({"edgellm": {"x": []}, "model": Path("/nonexistent.gguf")}, "no such GGUF file"),
        ({"servers": {"edgellm": "http://127.0.0.1:1"}, "edgellm": {"edgellm": []}}, "names must differ"),
    ],
)
def test_bad_options_are_refused_before_anything_runs(kwargs: dict, fragment: str) -> None:
    with pytest.raises(BenchError, match=fragment):
        bench_workloads(**kwargs)


def test_variants_parse_into_set_overrides() -> None:
    assert parse_variant("fast:a.b=1,c=2") == ("fast", ["--set", "a.b=1", "--set", "c=2"])
    assert parse_variant("plain") == ("plain", [])
    with pytest.raises(BenchError, match="NAME:KEY=VALUE"):
        parse_variant("x:novalue")


def test_a_short_run_against_edgellm(default_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    r = bench_workloads(
        edgellm={"edgellm": []},
        model=default_gguf,
        threads=1,
        slots=2,
        n_ctx=1024,
        levels=[1, 2],
        rounds=1,
        workloads=["rewrite", "extract"],
        per_workload=2,
        out=out,
    )
    assert list(r.servers) == ["edgellm"] and r.request_set == "workloads-v2.jsonl"
    assert r.repeats == 2  # per workload: level 1 sends request 1, level 2 requests 2 and 1 again (of 2)
    assert [(c.workload, c.streams) for c in r.cells] == [("rewrite", 1), ("rewrite", 2), ("extract", 1), ("extract", 2)]
    for c in r.cells:
        assert c.requests == c.streams and c.tokens > 0 and c.aggregate > 0 and 0 < c.ttft_p50 <= c.ttft_p95
        assert c.samples and all(c.samples)
        if c.draft_n is not None:
            assert 0 <= (c.draft_n_accepted or 0) <= c.draft_n
    # edgellm drafts (at least its probes) when it rewrites a paragraph, and the streamed timings say so
    rewrite = r.cell("edgellm", "rewrite", 1)
    assert rewrite is not None and rewrite.draft_n, rewrite
    extract = [c for c in r.cells if c.workload == "extract"]
    assert all(c.json_ok == c.requests for c in extract), [c.samples for c in extract]
    for c in extract:
        for text in c.samples:
            assert isinstance(json.loads(text), dict)
    table = (out / "workloads.md").read_text()
    assert table == workloads_table(r)
    assert "| extract | 2 | edgellm |" in table and "2 request(s) sent a second time" in table
    data = json.loads((out / "workloads.json").read_text())
    assert data["cells"][0]["server"] == "edgellm" and "acceptance" in data["cells"][0]
    assert (out / "workloads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


@pytest.mark.skipif(
    not (LLAMA_SERVER.is_file() and os.access(LLAMA_SERVER, os.X_OK)),
    reason=f"no llama-server binary at {LLAMA_SERVER} (a benchmark reference, see its README)",
)
def test_one_workload_against_llama_server_drafting_off_and_on(default_gguf: Path) -> None:
    r = bench_workloads(
        llama_server=LLAMA_SERVER,
        model=default_gguf,
        threads=1,
        slots=1,
        n_ctx=1024,
        levels=[1],
        rounds=1,
        workloads=["rewrite"],
        per_workload=1,
    )
    assert list(r.servers) == ["llama-server", "llama-server-ngram"]
    assert "--spec-type" in r.servers["llama-server-ngram"] and "--spec-type" not in r.servers["llama-server"]
    off, on = (r.cell(s, "rewrite", 1) for s in r.servers)
    assert off is not None and on is not None and off.tokens > 0 and on.tokens > 0
    assert off.draft_n is None  # no drafting, no draft counts
    # greedy both ways: drafting changes the speed, not the answer (llama.cpp's batch-size rounding aside)
    assert on.samples[0][:20] == off.samples[0][:20]


def test_sigterm_stops_the_servers_a_bench_started(default_gguf: Path, tmp_path: Path) -> None:
    """`kill` (or a CI timeout) on a running bench unwinds it like Ctrl-C: the servers it started do not outlive it."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    children: list[psutil.Process] = []
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgellm", "bench", "workloads", "--edgellm", "--model", str(default_gguf),
         "--threads", "1", "--slots", "1", "--ctx", "1024", "--levels", "1", "--rounds", "50",
         "--workloads", "chat", "--requests", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not children:
            assert proc.poll() is None and time.monotonic() < deadline, "the bench ended before starting a server"
            children = [c for c in psutil.Process(proc.pid).children(recursive=True) if "serve" in c.cmdline()]
            time.sleep(0.2)
        time.sleep(2)  # let it get going
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err.decode()[-2000:]
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"servers left running after the bench was stopped: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for c in children:
            if c.is_running():
                c.kill()
