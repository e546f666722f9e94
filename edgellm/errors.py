"""The error types every stage shares. The CLI reports these as one clear line (exit 2) instead of a traceback.

This module imports nothing: the server's error path must not pull in the catalog, pydantic or tqdm.
"""

from __future__ import annotations


class EdgeLLMError(RuntimeError):
    """Base class for errors whose message tells a person what went wrong and what to do."""


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and, for files, the line."""


class CatalogError(EdgeLLMError):
    """A model cannot be listed or pulled; the message says why and what to do."""


UserFacingError: tuple[type[BaseException], ...] = (EdgeLLMError, ConfigError, FileNotFoundError)
