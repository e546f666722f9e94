"""Every error the server returns has one shape, built here and nowhere else:
``{"error": {"code": <status>, "message": "...", "type": "..."}}`` with llama.cpp server's error types."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgellm.serve.engine.base import (
    ContextOverflowError,
    EngineError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidPromptError,
    InvalidRequestError,
    UnknownModelError,
)

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
AUTHENTICATION = "authentication_error"
SERVER = "server_error"
UNAVAILABLE = "unavailable_error"
NOT_SUPPORTED = "not_supported_error"
EXCEED_CONTEXT = "exceed_context_size_error"


class APIError(Exception):
    """An error raised by a route, already carrying its HTTP status and type."""

    def __init__(
        self, status: int, message: str, type: str = INVALID_REQUEST, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.headers = headers or {}


def error_body(status: int, message: str, type: str) -> dict[str, dict[str, object]]:
    return {"error": {"code": status, "message": message, "type": type}}


def error_response(status: int, message: str, type: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, type), status_code=status, headers=headers)


def _engine_error_to_api(exc: EngineError) -> APIError:
    if isinstance(exc, UnknownModelError):
        return APIError(404, str(exc), NOT_FOUND)
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), EXCEED_CONTEXT)
    if isinstance(exc, InvalidPromptError | InvalidRequestError):
        return APIError(400, str(exc), INVALID_REQUEST)
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, str(exc), UNAVAILABLE, {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, EngineUnavailableError):
        return APIError(503, str(exc), UNAVAILABLE, {"Retry-After": "1"})
    return APIError(500, str(exc), SERVER)


def to_api_error(exc: Exception) -> APIError:
    """Map any exception a route can raise to an APIError (used by handlers and inside streams)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineError):
        return _engine_error_to_api(exc)
    from edgellm.serve.engine.rerank import RerankError, RerankInputError

    if isinstance(exc, RerankInputError):
        return APIError(400, str(exc), INVALID_REQUEST)
    if isinstance(exc, RerankError):
        return APIError(500, str(exc), SERVER)
    log.exception("unhandled error", exc_info=exc)
    return APIError(500, "internal server error; see the server log", SERVER)


async def _api_error_handler(request: Request, exc: Exception) -> Response:
    err = to_api_error(exc)
    return error_response(err.status, err.message, err.type, err.headers)


async def _http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 404:
        message, type = f"no such endpoint: {request.method} {request.url.path}", NOT_FOUND
    elif status == 405:
        message, type = f"method {request.method} is not allowed on {request.url.path}", INVALID_REQUEST
    else:
        message, type = str(exc.detail), INVALID_REQUEST if status < 500 else SERVER
    return error_response(status, message, type, dict(exc.headers or {}))


def exception_handlers() -> dict[type[Exception] | int, object]:
    return {
        HTTPException: _http_exception_handler,
        APIError: _api_error_handler,
        EngineError: _api_error_handler,
        Exception: _api_error_handler,
    }
