"""`edgellm bench serve`: loopback only, errors counted by kind, and a real `edgellm serve` measured.

The SSE parsing and error kinds are checked against a tiny stdlib HTTP server that misbehaves on purpose; the
real measurement runs against `edgellm serve` with the default GGUF.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edgellm.bench.errors import BenchError
from edgellm.bench.loadtest import bench_serve, check_loopback
from tests.conftest import free_port

# -- loopback only ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, base",
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.2:8000/v1/", "http://127.0.0.2:8000"),
        ("http://localhost:9000", "http://localhost:9000"),
        ("http://[::1]:8000/v1", "http://[::1]:8000"),
    ],
)
def test_loopback_urls_are_accepted(url: str, base: str) -> None:
    assert check_loopback(url) == base


@pytest.mark.parametrize(
    "url", ["http://192.168.1.10:8000", "http://example.com", "https://api.openai.com/v1", "ftp://127.0.0.1", "127.0.0.1:8000"]
)
def test_other_hosts_are_refused_before_any_request(url: str) -> None:
    with pytest.raises(BenchError):
        bench_serve(url, concurrency=[1], requests=1)


# -- error counting -----------------------------------------------------------------------------------------------


def test_a_refusing_server_is_counted_as_connect_errors(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    report = bench_serve(url, concurrency=[1, 2], requests=3, timeout=5, out=tmp_path)
    assert report.model == "default"  # /v1/models did not answer either
    for level in report.levels:
        assert level.requests == 3 and level.ok == 0
        assert level.errors == {"connect": 3}
        assert level.completion_tokens == 0 and level.tokens_per_s == 0 and level.ttft_p50_s is None
    data = json.loads((tmp_path / "serve_results.json").read_text())
    assert [lv["errors"] for lv in data["levels"]] == [{"connect": 3}, {"connect": 3}]
    assert "connect: 3" in (tmp_path / "serve_results.md").read_text()
    assert (tmp_path / "serve_chart.png").read_bytes()[:4] == b"\x89PNG"


class _FakeHandler(BaseHTTPRequestHandler):
    mode = "ok"

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self.send_error(404)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        if self.mode == "500":
            self.send_error(500, "boom")
            return
        if self.mode == "drop":  # hang up without a status line, like a server that crashed
            self.close_connection = True
            return
        if self.mode == "hang":
            time.sleep(2.0)
            self.send_error(503)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()

        def send(obj: object) -> None:
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        send({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for word in ("one", " two", " three"):
            time.sleep(0.02)
            send({"choices": [{"index": 0, "delta": {"content": word}}]})
        if self.mode == "truncate":
            self.close_connection = True
            return  # no finish, no usage, no [DONE]
        if self.mode == "ok":
            send({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            send({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})
        else:  # "no_usage": a server that ignores stream_options
            send({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out and left is expected here


@contextmanager
def fake_server(mode: str) -> Iterator[str]:
    handler = type("Handler", (_FakeHandler,), {"mode": mode})
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "mode, kind, timeout",
    [("500", "http_500", 5.0), ("truncate", "truncated", 5.0), ("drop", "disconnected", 5.0), ("hang", "timeout", 0.5)],
)
def test_errors_are_counted_by_kind(mode: str, kind: str, timeout: float) -> None:
    with fake_server(mode) as url:
        report = bench_serve(url, concurrency=[2], requests=2, timeout=timeout, model="m")
    (level,) = report.levels
    assert level.ok == 0 and level.errors == {kind: 2}


def test_stream_parsing_counts_usage_tokens_and_chunk_gaps() -> None:
    with fake_server("ok") as url:
        report = bench_serve(url, concurrency=[1], requests=2, model="m")
    (level,) = report.levels
    assert level.ok == 2 and level.errors == {}
    assert level.completion_tokens == 14 and level.tokens_from_usage == 2  # from the usage chunk, not the 3 chunks
    assert level.ttft_p50_s is not None and level.itl_p50_s is not None
    assert 0.01 < level.itl_p50_s < 1.0  # the fake server sleeps 20 ms between content chunks

    with fake_server("no_usage") as url:
        report = bench_serve(url, concurrency=[1], requests=2, model="m")
    (level,) = report.levels
    assert level.completion_tokens == 6 and level.tokens_from_usage == 0  # 3 content chunks per request


def test_the_whole_run_is_bounded_in_time() -> None:
    with fake_server("hang") as url:
        t0 = time.perf_counter()
        report = bench_serve(url, concurrency=[1], requests=5, timeout=30, max_seconds=0.5, model="m")
        elapsed = time.perf_counter() - t0
    (level,) = report.levels
    assert level.ok == 0 and level.errors == {"deadline": 1, "not_started": 4}
    assert elapsed < 5


# -- a real server ------------------------------------------------------------------------------------------------


def test_bench_serve_measures_edgellm_serve(chat_server: str, tmp_path: Path) -> None:
    report = bench_serve(chat_server, concurrency=[1, 2], requests=3, max_tokens=8, timeout=120, out=tmp_path)
    assert report.model == "smollm2-135m-instruct"  # found through /v1/models
    for level in report.levels:
        assert level.errors == {}, level.error_examples
        assert level.ok == 3
        assert level.tokens_from_usage == 3
        assert 3 <= level.completion_tokens <= 3 * 8
        assert level.ttft_p50_s is not None and level.ttft_p95_s is not None
        assert level.ttft_p50_s <= level.ttft_p95_s
        assert level.tokens_per_s > 0
    print((tmp_path / "serve_results.md").read_text())
