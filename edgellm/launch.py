"""Start `edgellm serve` (or any server with a ``/health`` route, such as llama.cpp's ``llama-server``) as a
subprocess on a free loopback port and wait until /health says ready.

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
    cmd = [sys.executable, "-m", "edgellm", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with running_process(cmd, port, timeout=timeout, cwd=cwd, env=env, log=log) as url:
        yield url


@contextmanager
def running_process(
    cmd: list[str],
    port: int,
    timeout: float = 120.0,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    log: IO[bytes] | None = None,
) -> Iterator[str]:
    """Run a server command that listens on 127.0.0.1:``port``; yield its base URL once /health is 200."""
    name = Path(cmd[0]).name if cmd[0] != sys.executable else " ".join(cmd[2:4])
    proc = subprocess.Popen(
        cmd,
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
                raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} was not ready within {timeout:.0f}s")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
