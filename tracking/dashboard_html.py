"""The live dashboard's pages: the HTML report with a window selector and auto-refresh, a
page per transaction, and the error page. Plain HTML and CSS (no scripts, nothing fetched).

The dashboard is the report of ``report_html`` (the same ``collect``, the same template
``report.html.j2``, extended by ``dashboard.html.j2``) plus a GET form to pick the window
(``DashboardQuery``: ``from``, ``to``, ``last``, ``process``, ``refresh``), a
``<meta http-equiv="refresh">``, the newest transactions of the window, and links from every
transaction listed to its page (``transaction.html.j2``: stages, audit trail, links to the
Prefect UI). The HTTP API serves them (``tracking/api/dashboard.py``); nothing here knows
HTTP: the addresses of the pages are given by the caller.

Example:
    query = DashboardQuery.parse({"last": "24h", "process": "ORDER_CANCELLATION"})
    html = dashboard_page(Reports(engine), query, now=utcnow(),
                          transaction_href=lambda uuid: f"/dashboard/transactions/{uuid}")
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from tracking.errors import UnknownProcessError
from tracking.models import TxEvent, TxProcess, TxStage
from tracking.report_html import Link, collect, context, template
from tracking.reports import Reports
from tracking.reports.window import DEFAULT_REPORT_WINDOW, report_window
from tracking.states import FINAL_TX_STATES

TITLE = "Tracking dashboard"
PRESETS = (("1h", "1 h"), ("24h", "24 h"), ("7d", "7 days"), ("30d", "30 days"))
DEFAULT_LAST = "7d"  # the one window rule's default, as `tracking report html`
DEFAULT_REFRESH = 60
REFRESH_CHOICES = ((0, "off"), (30, "30 s"), (60, "1 min"), (300, "5 min"))
MIN_REFRESH, MAX_REFRESH = 5, 86_400
MAX_LAST = timedelta(days=3660)
RECENT_LIMIT = 20
MAX_PARAM_LENGTH = 64
_DURATION = re.compile(r"(\d{1,5})([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class BadParameter(ValueError):
    """A query parameter of a dashboard page that cannot be used; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "...")


def parse_refresh(value: str | None) -> int | None:
    """Seconds between reloads: ``0`` is off, else 5 to 86400; None when not given."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if not text.isdigit() or len(text) > 6:
        raise BadParameter("refresh", f"a number of seconds (0: off), got {_shown(value)}")
    seconds = int(text)
    if seconds and not MIN_REFRESH <= seconds <= MAX_REFRESH:
        raise BadParameter(
            "refresh", f"0 (off) or {MIN_REFRESH} to {MAX_REFRESH} seconds, got {seconds}"
        )
    return seconds


def _parse_when(name: str, value: str | None) -> datetime | None:
    if value is None or not value.strip():
        return None
    try:
        return datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadParameter(
            name, f"an ISO 8601 date-time (2026-01-05T09:00, UTC without an offset), "
            f"got {_shown(value)}"
        ) from None


def _parse_last(value: str | None) -> timedelta | None:
    if value is None or not value.strip():
        return None
    match = _DURATION.fullmatch(value.strip())
    length = timedelta(**{_UNITS[match[2]]: int(match[1])}) if match else None
    if length is None or not timedelta(0) < length <= MAX_LAST:
        raise BadParameter(
            "last", f"a duration such as 30m, 24h, 7d or 2w (at most {MAX_LAST.days} days), "
            f"got {_shown(value)}"
        )
    return length


@dataclass(frozen=True)
class DashboardQuery:
    """What the dashboard is asked for, from its query parameters (all optional):

    * ``from`` / ``to``: the window ``[from, to)`` (ISO 8601; naive values are UTC);
    * ``last``: the window's length when ``from`` is not given (``30m``, ``24h``, ``7d``,
      ``2w``; default 7 days): the one window rule (``report_window``), with ``last`` as its
      default length, so ``?last=24h`` is the last 24 hours up to now;
    * ``process``: one process code (default: all);
    * ``refresh``: seconds between automatic reloads, ``0`` for none (default 60).

    Empty values (what an empty form field sends) count as not given.
    """

    start: datetime | None = None
    end: datetime | None = None
    last: timedelta | None = None
    process: str | None = None
    refresh: int = DEFAULT_REFRESH
    given: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> DashboardQuery:
        """``BadParameter`` (naming the parameter) for a value that cannot be used."""
        given = {k: params[k].strip() for k in ("from", "to", "last", "process", "refresh")
                 if k in params and params[k].strip()}
        for name, value in given.items():
            if len(value) > MAX_PARAM_LENGTH:
                raise BadParameter(name, f"longer than {MAX_PARAM_LENGTH} characters")
        refresh = parse_refresh(given.get("refresh"))
        return cls(
            start=_parse_when("from", given.get("from")),
            end=_parse_when("to", given.get("to")),
            last=_parse_last(given.get("last")),
            process=given.get("process"),
            refresh=DEFAULT_REFRESH if refresh is None else refresh,
            given=given,
        )

    def window(self, now: datetime) -> tuple[datetime, datetime]:
        """``[from, to)`` by the one window rule; ``BadParameter`` when it is reversed."""
        try:
            return report_window(self.start, self.end, now=now,
                                 default=self.last or DEFAULT_REPORT_WINDOW)
        except ValueError as exc:
            raise BadParameter("from" if self.start is not None else "to", str(exc)) from None

    def href(self, **changes: str | int | None) -> str:
        """This query with ``changes`` (None drops a parameter), as ``?...`` (relative)."""
        values: dict[str, Any] = {**self.given, **changes}
        return "?" + urlencode({k: v for k, v in values.items() if v not in (None, "")})


# -- the dashboard ---------------------------------------------------------------------------


def dashboard_page(
    reports: Reports,
    query: DashboardQuery,
    *,
    now: datetime,
    transaction_href: Callable[[str], str],
) -> str:
    """The dashboard of ``query``'s window, ``now`` being the time of its defaults and of
    the waiting items' ages. ``transaction_href(uuid)`` is the address of a transaction's
    page. ``BadParameter`` for an unknown process or a reversed window."""
    try:
        reports.check_process(query.process)
    except UnknownProcessError as exc:
        raise BadParameter("process", str(exc)) from None
    start, end = query.window(now)
    data = collect(reports, start, end, query.process, title=TITLE, now=now)
    recent = reports.list_transactions(
        process=query.process, created_from=start, created_to=end, limit=RECENT_LIMIT
    )
    total = sum(r.count for r in data.by_state)
    last = query.given.get("last", "" if query.start else DEFAULT_LAST)
    relative = query.start is None and query.end is None
    return template("dashboard.html.j2").render(
        **context(data, link_transaction=transaction_href),
        refresh=query.refresh,
        processes=reports.process_codes(),
        process=query.process or "",
        given=query.given,
        last=last,
        presets=[dict(value=value, label=label, current=relative and value == last,
                      href=query.href(last=value, **{"from": None, "to": None}))
                 for value, label in PRESETS],
        refresh_choices=REFRESH_CHOICES,
        recent=[[Link(tx.business_key, transaction_href(tx.uuid)), tx.process_code,
                 tx.state.value, tx.source or "", tx.created_at, tx.updated_at,
                 tx.finished_at or ""] for tx in recent],
        recent_note=(f"the {len(recent)} newest of {total:,}" if total > len(recent)
                     else f"all {len(recent)}"),
    )


# -- a transaction ---------------------------------------------------------------------------


def prefect_run_link(ui_url: str | None, kind: str, run_id: str | None) -> Any:
    """A link to a flow run (``kind="flow-run"``) or task run in the Prefect UI; the id as
    text when the UI's address is unknown; "" without an id."""
    if not run_id:
        return ""
    if not ui_url:
        return run_id
    return Link(run_id, f"{ui_url.rstrip('/')}/runs/{kind}/{run_id}")


def _at(value: datetime | None) -> str:
    """A time of the transaction page: UTC, to the second ("" for None)."""
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _attempts(stage: TxStage) -> str:
    allowed = "∞" if stage.attempts_allowed is None else str(stage.attempts_allowed)
    return f"{stage.attempt} / {allowed}"


def _error(code: int | None, description: str | None) -> str:
    """``code: description`` of a failed attempt ("" for a success without description)."""
    if not code:
        return description or ""
    return f"{code}: {description}" if description else str(code)


def _stage_row(stage: TxStage) -> list[Any]:
    lease = (f"{stage.lease_owner} until {_at(stage.lease_expires_at)}"
             if stage.lease_owner else "")
    return [stage.platform, stage.stage, stage.state.value, _attempts(stage),
            _at(stage.next_attempt_at), _error(stage.error_code, stage.error_description),
            lease, _at(stage.finished_at)]


def _event_row(event: TxEvent, ui_url: str | None) -> dict[str, Any]:
    where = ".".join(p for p in (event.platform, event.stage) if p)
    change = f"{event.from_state} → {event.to_state}" if event.from_state or event.to_state else ""
    return dict(
        cells=[_at(event.created_at), event.kind.value, where,
               "" if event.attempt is None else event.attempt,
               event.outcome.value if event.outcome else "",
               "" if event.error_code is None else event.error_code, event.description or "",
               change,
               event.tx_state.value if event.tx_state else "", event.actor or ""],
        flow_run=prefect_run_link(ui_url, "flow-run", event.flow_run_id),
        task_run=prefect_run_link(ui_url, "task-run", event.task_run_id),
        traceback=event.traceback or "",
    )


def transaction_page(
    tx: TxProcess,
    *,
    now: datetime,
    dashboard_href: str,
    prefect_ui_url: str | None = None,
    refresh: int | None = None,
) -> str:
    """One transaction (``Tracker.get_transaction``: stages and events loaded): its details,
    its stages in order, its audit trail with links to the Prefect UI runs the events name
    (``prefect_ui_url``, e.g. ``PREFECT_UI_URL``; ids as text when None). Reloads every
    ``refresh`` seconds (default 60) while the transaction is not final."""
    final = tx.state in FINAL_TX_STATES
    return template("transaction.html.j2").render(
        title=f"Transaction {tx.business_key}",
        tx=tx,
        state=tx.state.value,
        details=[("Process", tx.process_code), ("Business key", tx.business_key),
                 ("State", tx.state.value), ("Source", tx.source or ""),
                 ("Created", _at(tx.created_at)), ("Updated", _at(tx.updated_at)),
                 ("Finished", _at(tx.finished_at)), ("UUID", tx.uuid)],
        payload=json.dumps(tx.payload, indent=2, ensure_ascii=False, sort_keys=True,
                           default=str),
        stages=[_stage_row(s) for s in tx.stages],
        events=[_event_row(e, prefect_ui_url) for e in tx.events],
        prefect_ui_url=prefect_ui_url or "",
        refresh=0 if final else (DEFAULT_REFRESH if refresh is None else refresh),
        dashboard_href=dashboard_href,
        generated_at=now,
    )


def error_page(status: int, code: str, message: str, *, request_id: str | None,
               dashboard_href: str) -> str:
    """The page of a dashboard request that failed: status, code, message, request id."""
    return template("dashboard_error.html.j2").render(
        title=f"{status} {code}", status=status, code=code, message=message,
        request_id=request_id or "", dashboard_href=dashboard_href,
    )
