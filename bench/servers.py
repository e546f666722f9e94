"""The servers a benchmark compares, each started on a free loopback port and stopped when the block ends: a real
``edgellm serve`` and llama.cpp's own ``llama-server`` with the same model, threads, slots and per-slot context.

Used by ``bench engines`` and ``bench workloads``; ``extra`` adds arguments (``--set`` overrides for ours, e.g.
``--spec-type ngram-simple`` for llama-server)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from edgellm.bench.errors import BenchError
from edgellm.launch import free_port, running_process, running_server


def server_env() -> dict[str, str]:
    """The servers' environment: ours, offline unless it says otherwise (a benchmark reaches no hub)."""
    return {"HF_HUB_OFFLINE": "1", **os.environ}


@contextmanager
def edgellm_server(
    model: Path, threads: int, slots: int, n_ctx: int, engine: str = "batched", extra: Sequence[str] = ()
) -> Iterator[str]:
    """``edgellm serve`` with ``model`` (``n_ctx`` tokens per slot); yields its base URL once it is ready."""
    args = [
        "--engine", engine, "--set", f"models.0.path={model}", "--set", f"models.0.n_threads={threads}",
        "--set", f"models.0.n_ctx={n_ctx}", "--set", f"slots={slots}", "--log-level", "warning",
        "--no-reranker", *extra,
    ]  # fmt: skip
    with running_server(*args, env=server_env()) as url:
        yield url


@contextmanager
def llama_server(
    binary: Path, model: Path, threads: int, slots: int, n_ctx: int, extra: Sequence[str] = ()
) -> Iterator[str]:
    """llama.cpp's server with the same model, threads, slots and per-slot context as ours."""
    port = free_port()
    cmd = [
        str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(threads), "-tb", str(threads), "-np", str(slots),
        "-c", str(n_ctx * slots), "--no-webui", *extra,
    ]  # fmt: skip
    with running_process(cmd, port, env=server_env()) as url:
        yield url


def server_pid(url: str) -> int:
    """The pid of the server this process started on ``url``'s port (a child process)."""
    from urllib.parse import urlsplit

    import psutil

    port = str(urlsplit(url).port)
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if "serve" in cmdline and port in cmdline:
            return int(child.pid)
    raise BenchError(f"no child process serves {url}")


def rss_mb(pid: int) -> float:
    """A process's resident memory in MB (10^6 bytes)."""
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 1e6
