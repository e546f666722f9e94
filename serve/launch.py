"""Start `edgellm serve` as a subprocess on a free loopback port and wait until /health says ready.

Used by benchmarks and tests that need a real server; stops it with SIGINT (graceful), then SIGKILL."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def running_server(
    *args: str,
    timeout: float = 120.0,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    log: IO[bytes] | None = None,
) -> Iterator[str]:
    """Run ``edgellm serve --host 127.0.0.1 --port <free> *args``; yield its base URL once /health is 200."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgellm", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=cwd,
        env=env,
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"edgellm serve exited with {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"edgellm serve was not ready within {timeout:.0f}s")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
