"""Shared fixtures: the real default GGUF (pulled through the catalog), free loopback ports."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The real default model file (`edgellm models pull default` runs in `make setup`)."""
    from edgellm.catalog import pull

    return pull("default")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
