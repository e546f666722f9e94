"""The bench stage's one error type."""

from __future__ import annotations

from edgellm.errors import EdgeLLMError


class BenchError(EdgeLLMError):
    """A benchmark cannot run; the message says why and what to do."""
