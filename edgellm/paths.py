"""Where things live, for any installed copy (editable or not).

Two kinds of places:

- **Working folders** of the person running edgellm, relative to the current directory unless the environment
  says otherwise: ``models/`` (``EDGELLM_MODELS_DIR``), ``.cache/`` (``EDGELLM_CACHE_DIR``), ``runs/``.
- **Shipped files** that install with the package: ``configs/``, ``models/catalog.yaml``, the demo data under
  ``train/data/`` and ``bench/data/``. ``shipped("configs/serve.yaml")`` finds them in the installed package,
  whatever the current directory; ``resolve_input(path)`` prefers the person's own file and falls back to the
  shipped one, so that ``path: train/data/hammy.jsonl`` in a recipe works from a clone and from a wheel alike.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_SHIPPED = ("configs", "models", "train", "bench")


def shipped(relative: str | Path) -> Path:
    """The installed copy of a file that ships with edgellm, named as in the repository (``configs/serve.yaml``).

    An installed wheel holds them under the package (``edgellm/configs/serve.yaml``); a source tree (an editable
    install, a clone) next to it (``<repo>/configs/serve.yaml``).
    """
    rel = Path(relative)
    if rel.is_absolute() or not rel.parts or rel.parts[0] not in _SHIPPED:
        raise ValueError(f"{relative}: not a shipped path (expected one under {', '.join(_SHIPPED)}/)")
    installed = _PACKAGE_DIR / rel
    if installed.exists() or not (_PACKAGE_DIR.parent / "pyproject.toml").is_file():
        return installed
    return _PACKAGE_DIR.parent / rel


def resolve_input(path: str | Path) -> Path:
    """An input path from a config or the command line: absolute as is; relative to the current directory if
    that exists; else the shipped file of that name if there is one; else the current-directory path (so that
    the error names what the person wrote)."""
    path = Path(path)
    if path.is_absolute():
        return path
    local = Path.cwd() / path
    if local.exists():
        return local
    try:
        candidate = shipped(path)
    except ValueError:
        return local
    return candidate if candidate.exists() else local


def models_dir() -> Path:
    """The folder that holds model files (``EDGELLM_MODELS_DIR``, default ``./models``)."""
    return Path(os.environ.get("EDGELLM_MODELS_DIR") or Path.cwd() / "models")


def configs_dir() -> Path:
    """The shipped configs (``configs/`` of the repository, installed as ``edgellm.configs``)."""
    return shipped("configs")


def catalog_path() -> Path:
    """The model catalog (``EDGELLM_CATALOG``, default the shipped ``models/catalog.yaml``)."""
    env = os.environ.get("EDGELLM_CATALOG")
    return Path(env) if env else shipped("models/catalog.yaml")


def cache_dir() -> Path:
    """Fetched tools (llama.cpp's converter) live here (``EDGELLM_CACHE_DIR``, default ``./.cache``)."""
    return Path(os.environ.get("EDGELLM_CACHE_DIR") or Path.cwd() / ".cache")
