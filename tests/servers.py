"""Run a real `edgellm serve` on a free loopback port for a test (its log goes to a file shown on failure)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgellm import launch

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def running_server(*args: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``edgellm serve --port <free> *args`` from the repository; yield its base URL once /health is 200."""
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgellm-serve-{os.getpid()}-{id(args)}.log"
    with open(log_path, "wb") as log:
        try:
            with launch.running_server(
                *args, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})}, log=log
            ) as url:
                yield url
        except (RuntimeError, TimeoutError) as e:
            log.flush()
            raise type(e)(f"{e}:\n{log_path.read_text(errors='replace')}") from None
