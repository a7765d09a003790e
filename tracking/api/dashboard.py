"""The live dashboard's routes: HTML pages for a browser, built by ``tracking.dashboard_html``.

* ``GET /dashboard``: the HTML report of a window (``from``, ``to``, ``last``, ``process``,
  ``refresh``: see ``dashboard_html.DashboardQuery``), reloading itself;
* ``GET /dashboard/transactions/{uuid}``: one transaction, its stages and audit trail
  (``refresh`` too), with links to the Prefect UI (``PREFECT_UI_URL``, which Prefect derives
  from ``PREFECT_API_URL``; no links when neither is set).

They are pages, not API operations: they are left out of the OpenAPI document, and their
errors are HTML pages (``dashboard_error.html.j2``) with the status, code, message and
request id the error envelope would carry (422 ``VALIDATION_ERROR`` for a bad parameter,
404 ``TRANSACTION_NOT_FOUND``, 401 ``UNAUTHORIZED``).

The key follows the rule of the other reads: needed only when ``TRACKING_API_KEY`` is set
and ``TRACKING_API_KEY_FOR_READS`` is true. A browser cannot add an ``X-API-Key`` header, so
the pages also take the key as the password of HTTP Basic authentication (any user name): a
401 asks for it with ``WWW-Authenticate: Basic``, and the browser shows its login prompt.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import HTMLResponse

from tracking import dashboard_html
from tracking.api.logs import current_request_id
from tracking.api.routes import Service
from tracking.api.schemas import is_uuid
from tracking.api.security import api_key_header, current_settings, key_matches
from tracking.errors import TransactionNotFound
from tracking.settings import Settings

REALM = 'Basic realm="prefect-tracking dashboard", charset="UTF-8"'
# The pages need no script and fetch nothing: the browser is told so (inline CSS only).
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class PageError(Exception):
    """A dashboard request that fails: shown as an HTML error page with this status."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _basic_password(authorization: str | None) -> str | None:
    """The password of an ``Authorization: Basic`` header (None if there is none). Not
    FastAPI's ``HTTPBasic``: it refuses non-ASCII passwords and answers a malformed header
    with its own JSON 401 instead of this page's."""
    if not authorization or not authorization[:6].lower() == "basic ":
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] if ":" in decoded else None


async def require_dashboard_key(
    settings: Annotated[Settings, Depends(current_settings)],
    header: Annotated[str | None, Depends(api_key_header)],
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """The reads' rule: the key only when set and ``api_key_for_reads``; taken from
    ``X-API-Key`` or as the password of HTTP Basic authentication."""
    expected = settings.api_key
    if not (expected and settings.api_key_for_reads):
        return
    password = _basic_password(authorization)
    if key_matches(header, expected) or key_matches(password, expected, "utf-8"):
        return
    raise PageError(
        401, "UNAUTHORIZED",
        "this page needs the API key: give it as the password (any user name) when the "
        "browser asks, or in the X-API-Key header",
        headers={"WWW-Authenticate": REALM},
    )


def prefect_ui_url() -> str | None:
    """The Prefect UI's address (``PREFECT_UI_URL``, by default derived by Prefect from
    ``PREFECT_API_URL``), or None when unknown or not an http(s) URL."""
    try:
        from prefect.settings import get_current_settings

        url = get_current_settings().ui_url
    except Exception:  # Prefect misconfigured: no links, the page still shows
        return None
    return url if url and url.startswith(("http://", "https://")) else None


PrefectUi = Annotated[str | None, Depends(prefect_ui_url)]
router = APIRouter(include_in_schema=False, dependencies=[Depends(require_dashboard_key)])


def _dashboard_href(request: Request) -> str:
    return request.url_for("dashboard").path


def _page(html: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(html, status_code=status, headers={**HEADERS, **(headers or {})})


@contextmanager
def _bad_parameters() -> Iterator[None]:
    try:
        yield
    except dashboard_html.BadParameter as exc:
        raise PageError(422, "VALIDATION_ERROR", str(exc)) from None


@router.get("/dashboard", name="dashboard")
def dashboard(request: Request, service: Service) -> HTMLResponse:
    """The HTML report of the window, with the window selector and auto-refresh."""
    base = _dashboard_href(request)
    with _bad_parameters():
        query = dashboard_html.DashboardQuery.parse(request.query_params)
        # ``to`` defaults to now, inclusive (as the JSON reports: ApiService.window).
        html = dashboard_html.dashboard_page(
            service.reports, query, now=service.tracker.clock() + timedelta(microseconds=1),
            transaction_href=lambda uuid: f"{base}/transactions/{uuid}",
        )
    return _page(html)


@router.get("/dashboard/transactions/{uuid:path}", name="dashboard_transaction")
def transaction(
    uuid: str, request: Request, service: Service, ui_url: PrefectUi
) -> HTMLResponse:
    """One transaction: details, stages in order, audit trail, Prefect UI links."""
    with _bad_parameters():
        refresh = dashboard_html.parse_refresh(request.query_params.get("refresh"))
    try:
        if not is_uuid(uuid):
            raise TransactionNotFound(f"no transaction {uuid[:80]!r}")
        tx = service.tracker.get_transaction(uuid)
    except TransactionNotFound as exc:
        raise PageError(404, "TRANSACTION_NOT_FOUND", str(exc)) from None
    return _page(dashboard_html.transaction_page(
        tx, now=service.tracker.clock(), dashboard_href=_dashboard_href(request),
        prefect_ui_url=ui_url, refresh=refresh,
    ))


async def _page_error(request: Request, exc: Exception) -> HTMLResponse:
    assert isinstance(exc, PageError)
    html = dashboard_html.error_page(
        exc.status, exc.code, exc.message, request_id=current_request_id(),
        dashboard_href=_dashboard_href(request),
    )
    return _page(html, exc.status, exc.headers)


def install_dashboard(app: FastAPI) -> None:
    """Add the dashboard's routes and its error page to ``app`` (``create_app`` does)."""
    app.include_router(router)
    app.add_exception_handler(PageError, _page_error)
