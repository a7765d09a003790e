"""The API key: FastAPI's ``APIKeyHeader`` security scheme and the dependency that checks it.

When ``TRACKING_API_KEY`` is set, ``create_app`` puts ``require_api_key`` on every write
(the routers of ``routes.py``) and, with ``TRACKING_API_KEY_FOR_READS``, on every read except
``/health``; the docs and ``/openapi.json`` are FastAPI's own routes and stay open. Because
it is a ``Security`` dependency, the OpenAPI document declares the scheme (``ApiKey``, the
``X-API-Key`` header) and marks exactly the operations that need it.

The key is compared in constant time (``secrets.compare_digest`` on bytes). A missing or
wrong key is ``401 UNAUTHORIZED`` in the usual error envelope, with ``WWW-Authenticate:
ApiKey``.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Security
from fastapi.security import APIKeyHeader

from tracking.api.errors import ApiError
from tracking.settings import Settings

api_key_header = APIKeyHeader(
    name="X-API-Key",
    scheme_name="ApiKey",
    description="The key of `TRACKING_API_KEY`: needed by writes, and by reads when "
    "`TRACKING_API_KEY_FOR_READS` is true.",
    auto_error=False,  # a missing key gets the envelope below, not FastAPI's own 401/403
)


def key_matches(given: str | None, expected: str, encoding: str = "latin-1") -> bool:
    """Whether ``given`` is the key, compared in constant time. Header values arrive decoded
    as latin-1 (back to their bytes, whatever they are); HTTP Basic passwords as UTF-8."""
    return given is not None and secrets.compare_digest(
        given.encode(encoding, "replace"), expected.encode("utf-8")
    )


def settings_of(app: FastAPI) -> Settings:
    """The app's settings; ``503 SERVICE_STARTING`` before they are known (startup)."""
    settings: Settings | None = app.state.settings
    if settings is None:
        raise ApiError(503, "SERVICE_STARTING", "the service is not started yet")
    return settings


async def current_settings(request: Request) -> Settings:
    """The app's settings, as a dependency (async: no worker thread for an attribute)."""
    return settings_of(request.app)


async def require_api_key(
    settings: Annotated[Settings, Depends(current_settings)],
    given: Annotated[str | None, Security(api_key_header)],
) -> None:
    """Let the request on only with the configured key (any request when none is set)."""
    expected = settings.api_key
    if not expected:
        return
    if key_matches(given, expected):
        return
    raise ApiError(
        401, "UNAUTHORIZED",
        "missing or wrong X-API-Key header" if given else "X-API-Key header required",
        headers={"WWW-Authenticate": "ApiKey"},
    )


ApiKey = Security(require_api_key)
"""The dependency to put on a router or route: ``dependencies=[ApiKey]``."""
