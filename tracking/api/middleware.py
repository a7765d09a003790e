"""The request middleware: request id, access log, body size, last-resort 500.

It is plain ASGI (no ``BaseHTTPMiddleware``), the outermost layer inside Starlette's own
error middleware, and does for every HTTP request, in this order:

1. takes ``X-Request-ID`` (echoed when safe, a UUID4 otherwise), sets it in the logging
   context and on the response;
2. reads the body of writes up front, refusing more than ``api_max_body_bytes`` (413, from
   ``Content-Length`` or from the bytes actually received);
3. turns any exception that escapes the app into a 500 ``INTERNAL_ERROR`` envelope (the
   traceback goes to the log, never to the client);
4. logs one line: method, path, status, duration_ms (and the request id).

The ``X-API-Key`` check is not here: it is a FastAPI security dependency on the routes that
need it (``security.py``), so the OpenAPI document shows it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tracking.api.errors import ApiError, error_response
from tracking.api.logs import accept_request_id, reset_request_id, set_request_id

logger = logging.getLogger("tracking.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # no body to read up front


class _TooLarge(Exception):
    pass


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


class RequestMiddleware:
    """See the module docstring.

    Args:
        app: the wrapped ASGI app.
        get_settings: returns the current ``Settings`` (they are known only after startup).
    """

    def __init__(self, app: ASGIApp, get_settings: Callable[[], Any]) -> None:
        self.app = app
        self.get_settings = get_settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        raw_id = _header(scope, b"x-request-id")
        request_id = accept_request_id(raw_id.decode("latin-1") if raw_id is not None else None)
        token = set_request_id(request_id)
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != id_header[0]]
                message["headers"] = [*headers, id_header]
            await send(message)

        try:
            settings = self.get_settings()
            if scope["method"] not in READ_METHODS:
                try:
                    receive = await self._buffer_body(scope, receive, settings.api_max_body_bytes)
                except _TooLarge:
                    refusal = error_response(
                        413, "PAYLOAD_TOO_LARGE",
                        f"request body is larger than {settings.api_max_body_bytes} bytes",
                        {"max_bytes": settings.api_max_body_bytes},
                    )
                    await refusal(scope, receive, send_with_id)
                    return
            await self.app(scope, receive, send_with_id)
        except ApiError as exc:  # raised before the app (settings not loaded yet)
            if response_started:
                raise
            await error_response(exc.status, exc.code, exc.message)(scope, receive, send_with_id)
        except Exception:
            logger.exception(
                "unhandled error on %s %s", scope.get("method"), scope.get("path")
            )
            if response_started:
                raise
            response = error_response(
                500, "INTERNAL_ERROR", "an unexpected error occurred; quote the request_id"
            )
            await response(scope, receive, send_with_id)
        finally:
            duration_ms = round((time.perf_counter() - started) * 1000, 2)
            logger.info(
                "request",
                extra={
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "status": status,
                    "duration_ms": duration_ms,
                },
            )
            reset_request_id(token)

    @staticmethod
    async def _buffer_body(scope: Scope, receive: Receive, limit: int) -> Receive:
        """Read the whole body (at most ``limit`` bytes) and return a receive that replays it."""
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client went away: let the app see the disconnect.
                pending: list[Message] = [message]
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay() -> Message:
            if pending:
                return pending.pop(0)
            return await receive()

        return replay
