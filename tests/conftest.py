"""Shared fixtures: the real default GGUF (pulled through the catalog), free loopback ports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgellm.launch import free_port

__all__ = ["free_port"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The real default model file (`edgellm models pull default` runs in `make setup`)."""
    from edgellm.catalog import pull

    return pull("default")

