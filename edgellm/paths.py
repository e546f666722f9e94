"""Where things live: the repository's models/ and configs/ folders, overridable by environment."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def models_dir() -> Path:
    """The folder that holds model files (``EDGELLM_MODELS_DIR``, default ``<repo>/models``)."""
    return Path(os.environ.get("EDGELLM_MODELS_DIR", REPO_ROOT / "models"))


def configs_dir() -> Path:
    return REPO_ROOT / "configs"


def cache_dir() -> Path:
    """Downloaded tools (llama.cpp's converter) live here (``EDGELLM_CACHE_DIR``, default ``<repo>/.cache``)."""
    return Path(os.environ.get("EDGELLM_CACHE_DIR", REPO_ROOT / ".cache"))
