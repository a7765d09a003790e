"""The error envelope and the exception handlers that produce it.

Every error response of the API has one shape::

    {"error": {"code": "TRANSACTION_NOT_FOUND", "message": "...", "details": {}},
     "request_id": "..."}

``ApiError`` carries a code, an HTTP status, a message and details; the handlers installed
by ``install_handlers`` turn it, FastAPI's validation errors, Starlette's HTTP errors (unknown
routes, wrong methods) and the tracker's errors into that envelope. Unexpected exceptions
are turned into ``INTERNAL_ERROR`` by the request middleware (see ``middleware.py``), so the
request id header is set on them too and no stack trace reaches the client.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy.exc as sa_exc
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tracking.api.logs import current_request_id
from tracking.errors import InvalidTransition, TransactionNotFound, UnknownProcessError

logger = logging.getLogger("tracking.api")

# HTTP statuses Starlette/FastAPI raise on their own, and the code each gets.
_STATUS_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    406: "NOT_ACCEPTABLE",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "VALIDATION_ERROR",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
}


class ApiError(Exception):
    """An error with its place in the envelope.

    Args:
        status: the HTTP status.
        code: the machine-readable code (``TRANSACTION_NOT_FOUND``).
        message: a human-readable message.
        details: anything JSON-serialisable that helps the client (a field, a state...).
        headers: extra response headers (``Retry-After``...).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers


def validation_error(message: str, **details: Any) -> ApiError:
    """A 422 ``VALIDATION_ERROR``."""
    return ApiError(422, "VALIDATION_ERROR", message, details)


def envelope(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The error body, with the current request's id."""
    return {
        "error": {"code": code, "message": message, "details": details or {}},
        "request_id": current_request_id(),
    }


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A JSON response holding the envelope."""
    body = envelope(code, message, jsonable_encoder(details) if details else None)
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


def _clean_validation_errors(errors: Any) -> list[dict[str, Any]]:
    """Pydantic's error list without documentation URLs, echoed inputs cut short."""
    cleaned = []
    for err in errors:
        item = {
            "loc": list(err.get("loc", ())),
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        ctx = err.get("ctx")
        if ctx:
            item["ctx"] = {k: str(v)[:200] for k, v in ctx.items()}
        cleaned.append(item)
    return cleaned


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _clean_validation_errors(exc.errors())
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return error_response(422, "VALIDATION_ERROR", message, {"errors": errors})


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, "HTTP_ERROR")
    if exc.status_code == 404:
        message = "no such route"
    elif exc.status_code == 405:
        message = "method not allowed on this route"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _not_found(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(404, "TRANSACTION_NOT_FOUND", str(exc))


async def _unknown_process(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(422, "VALIDATION_ERROR", str(exc), {"field": "process"})


async def _invalid_transition(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(409, "INVALID_TRANSITION", str(exc))


async def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    # Connection refused, database locked for too long...: the client may retry later.
    logger.error("database unavailable: %s", type(exc).__name__, exc_info=exc)
    return error_response(
        503, "DATABASE_UNAVAILABLE", "the tracking database is unavailable; retry later",
        headers={"Retry-After": "5"},
    )


def install_handlers(app: FastAPI) -> None:
    """Register the envelope-producing exception handlers on ``app``."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(TransactionNotFound, _not_found)
    app.add_exception_handler(UnknownProcessError, _unknown_process)
    app.add_exception_handler(InvalidTransition, _invalid_transition)
    app.add_exception_handler(sa_exc.OperationalError, _database_error)
    app.add_exception_handler(sa_exc.InterfaceError, _database_error)
