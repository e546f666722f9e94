"""Errors the CLI reports as one clear line (exit 2) instead of a traceback."""

from __future__ import annotations

from edgellm.catalog import CatalogError
from edgellm.config import ConfigError


class EdgeLLMError(RuntimeError):
    """Base class for errors whose message tells a person what went wrong and what to do."""


UserFacingError: tuple[type[BaseException], ...] = (EdgeLLMError, ConfigError, CatalogError, FileNotFoundError)
