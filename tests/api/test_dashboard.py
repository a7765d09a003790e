"""The live dashboard: GET /dashboard (the HTML report, window selector, auto-refresh) and
GET /dashboard/transactions/{uuid} (stages, audit trail, Prefect UI links), checked against
the database; escaping, errors, the key; and a real browser (headless Chromium over the
DevTools Protocol) that follows a link from the dashboard to a transaction's page."""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime, timedelta
from html.parser import HTMLParser

import pytest
import sqlalchemy as sa
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

from tests.api.browser import Chromium, serve
from tests.api.helpers import P, fake_runner, settings_for
from tools.report_screenshot import find_chromium
from tracking import ExecutionResult, Reports, Tracker
from tracking.api import create_app
from tracking.api.dashboard import prefect_ui_url
from tracking.models import TxProcess
from tracking.report_html import render_html

UI = "http://prefect.test:4200"
FLOW_RUN = "0b3f6c1e-7a2d-4c55-9b1e-2f4d8a6c9e01"
TASK_RUN = "5d6e7f80-1a2b-4c3d-8e9f-a0b1c2d3e4f5"
HOSTILE = "<script>alert('x')</script>&\"quoted\""


# -- the scenario ----------------------------------------------------------------------------


def scenario(tracker: Tracker, clock) -> dict[str, str]:
    """Four transactions at 09:00, two more two days later (the clock ends a minute after)."""
    start = tracker.start_or_resume
    done, _ = start(P, {"request_id": "DONE-1"})
    for platform, stage in (("A", None), ("B", "process"), ("B", "confirm"), ("C", None)):
        tracker.complete_stage(done, platform, 0, stage=stage)
    rejected, _ = start(P, {"request_id": "REJ-1"})
    tracker.complete_stage(rejected, "A", ExecutionResult(7, "customer is blocked"))
    retry, _ = start(P, {"request_id": "RETRY-1"})
    tracker.complete_stage(retry, "A", 0)
    tracker.complete_stage(retry, "B", ExecutionResult(-5, "SAP <b>timeout</b>"),
                           stage="process", flow_run_id=FLOW_RUN, task_run_id=TASK_RUN)
    hostile, _ = start(P, {"request_id": HOSTILE})
    clock.advance(2 * 86_400)
    new = [start(P, {"request_id": f"NEW-{i}"})[0] for i in range(2)]
    clock.advance(60)
    return {"done": done, "rejected": rejected, "retry": retry, "hostile": hostile,
            "new-0": new[0], "new-1": new[1]}


def db_counts(tracker: Tracker, start: datetime, end: datetime) -> Counter[str]:
    """Transactions created in ``[start, end)`` by state, straight from the table."""
    q = (sa.select(TxProcess.state, sa.func.count())
         .where(TxProcess.created_at >= start, TxProcess.created_at < end)
         .group_by(TxProcess.state))
    with tracker.engine.connect() as conn:
        return Counter({str(state): n for state, n in conn.execute(q)})


# -- reading the pages -----------------------------------------------------------------------


class Page(HTMLParser):
    """The tables of a page, by the heading of their section: rows of cell texts, and the
    links (``(href, text)``) of each row."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.links: dict[str, list[list[tuple[str, str]]]] = {}
        self.all_links: list[tuple[str, str]] = []
        self._heading: str | None = None
        self._h2: list[str] | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._row_links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._link_text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "h2":
            self._h2 = []
        elif tag == "tr" and self._heading is not None:
            self._row, self._row_links = [], []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "a":
            self._href, self._link_text = dict(attrs).get("href") or "", []

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2" and self._h2 is not None:
            self._heading = " ".join("".join(self._h2).split())
            self._h2 = None
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._heading is not None:
            self.tables.setdefault(self._heading, []).append(self._row)
            self.links.setdefault(self._heading, []).append(self._row_links)
            self._row = None
        elif tag == "a" and self._href is not None:
            link = (self._href, "".join(self._link_text))
            self.all_links.append(link)
            if self._row is not None:
                self._row_links.append(link)
            self._href = None

    def handle_data(self, data: str) -> None:
        for part in (self._h2, self._cell):
            if part is not None:
                part.append(data)
        if self._href is not None:
            self._link_text.append(data)

    def table(self, heading: str) -> list[list[str]]:
        """The body rows of the table under the heading that starts with ``heading``."""
        return next(rows[1:] for h, rows in self.tables.items() if h.startswith(heading))

    def row_links(self, heading: str) -> list[list[tuple[str, str]]]:
        return next(rows[1:] for h, rows in self.links.items() if h.startswith(heading))


def kpis(html: str) -> dict[str, int]:
    found = re.findall(r'<div class="label">(\w+)</div>\s*<div class="value">([\d,]+)</div>', html)
    return {label: int(value.replace(",", "")) for label, value in found}


def expected_kpis(counts: Counter[str]) -> dict[str, int]:
    return {
        "Transactions": sum(counts.values()),
        "Completed": counts["COMPLETED"], "Rejected": counts["REJECTED"],
        "Exhausted": counts["EXHAUSTED"], "Cancelled": counts["CANCELLED"],
        "Waiting": counts["PENDING"] + counts["IN_PROGRESS"] + counts["TERMINATED"],
    }


def refresh_of(html: str) -> int | None:
    match = re.search(r'<meta http-equiv="refresh" content="(\d+)">', html)
    return int(match[1]) if match else None


def assert_error_page(response, status: int, code: str) -> str:
    """An HTML error page with the status, the code and the request id of the response."""
    assert response.status_code == status, response.text[-500:]
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert f"<h1>{status} {code}</h1>" in html
    assert f"request id {response.headers['x-request-id']}" in html
    assert "Traceback" not in html and "<script" not in html
    return re.search(r'<p class="message">(.*?)</p>', html, re.S)[1]


# -- the dashboard ---------------------------------------------------------------------------


def test_dashboard_shows_the_report_of_the_database(client, tracker, clock):
    uuids = scenario(tracker, clock)
    response = client.get("/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    assert "script-src" not in response.headers["content-security-policy"]  # none allowed
    html = response.text
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html
    assert "<link" not in html and "http://" not in html and "https://" not in html
    assert html.count("<svg") == 2  # the report's two charts
    end = clock.now
    counts = db_counts(tracker, end - timedelta(days=7), end + timedelta(microseconds=1))
    assert kpis(html) == expected_kpis(counts) and sum(counts.values()) == 6

    page = Page(html)  # the oldest waiting items link to their pages
    aging = page.table("Oldest waiting transactions")
    aging_links = page.row_links("Oldest waiting transactions")
    waiting_uuids = [uuids[k] for k in ("retry", "hostile", "new-0", "new-1")]
    assert len(aging) == 4
    assert sorted(href for (href, _), in aging_links) == sorted(
        f"/dashboard/transactions/{u}" for u in waiting_uuids
    )
    recent = page.table("Transactions created in the window")
    recent_links = {text: href for [(href, text)] in page.row_links("Transactions created")}
    assert len(recent) == 6
    for uuid in uuids.values():
        tx = tracker.get_transaction(uuid)
        assert recent_links[tx.business_key] == f"/dashboard/transactions/{uuid}"
        row = next(r for r in recent if r[0] == tx.business_key)
        assert row[1:3] == [tx.process_code, tx.state.value]
    assert sorted(r[:3] for r in page.table("Top errors")) == [["A", "7", "1"], ["B", "-5", "1"]]
    assert refresh_of(html) == 60


def test_dashboard_has_the_content_of_the_html_report(client, tracker, clock):
    """The same page as `tracking report html` of the window (its charts, totals, tables),
    with links added to the waiting items."""
    scenario(tracker, clock)
    html = client.get("/dashboard", params={"last": "24h"}).text
    now = clock.now + timedelta(microseconds=1)
    report = render_html(Reports(tracker.engine), now - timedelta(hours=24), now,
                         title="Tracking dashboard", now=now)

    def parts(page: str) -> list[str]:
        return re.findall(r'<div class="kpis">.*?</div>\n</div>|<svg.*?</svg>'
                          r'|<h2>Top errors</h2>.*?</section>', page, re.S)

    assert len(parts(report)) == 4 and parts(html) == parts(report)
    assert Page(html).table("Oldest waiting") == Page(report).table("Oldest waiting")
    linked = [text for [(_, text)] in Page(html).row_links("Oldest waiting")]
    assert linked == [r[0] for r in Page(report).table("Oldest waiting")] and len(linked) == 4


def test_window_selector_and_presets(client, tracker, clock):
    scenario(tracker, clock)
    now = clock.now
    for params, start in (({"last": "24h"}, now - timedelta(hours=24)),
                          ({"last": "30m"}, now - timedelta(minutes=30)),
                          ({}, now - timedelta(days=7))):
        html = client.get("/dashboard", params=params).text
        assert kpis(html) == expected_kpis(
            db_counts(tracker, start, now + timedelta(microseconds=1))
        ), params
    assert kpis(client.get("/dashboard", params={"last": "24h"}).text)["Transactions"] == 2

    # An explicit window [from, to): naive values are UTC; `last` only sizes a missing from.
    fixed = {"from": "2026-01-05T08:00", "to": "2026-01-05 10:00:00+00:00", "last": "1h"}
    response = client.get("/dashboard", params=fixed)
    html = response.text
    assert kpis(html) == expected_kpis(db_counts(
        tracker, datetime.fromisoformat("2026-01-05T08:00+00:00"),
        datetime.fromisoformat("2026-01-05T10:00+00:00"),
    ))
    assert kpis(html)["Transactions"] == 4
    assert "transactions created 2026-01-05 08:00 to 2026-01-05 10:00" in html
    assert 'name="from" value="2026-01-05T08:00"' in html  # the form keeps what was asked
    assert kpis(client.get("/dashboard", params={"to": "2026-01-05T10:00", "last": "1h"})
                .text)["Transactions"] == 4

    # Presets: relative links that keep the other parameters and drop from/to.
    html = client.get("/dashboard", params={"process": P, "refresh": "300", "last": "24h"}).text
    presets = re.search(r'<p class="presets">(.*?)</p>', html, re.S)[1]
    assert '<a href="?last=1h&amp;process=CANCELLATION&amp;refresh=300">1 h</a>' in presets
    assert "<strong>24 h</strong>" in presets
    assert f'<option value="{P}" selected>' in html
    assert '<option value="24h" selected>' in html and '<option value="300" selected>' in html
    assert refresh_of(html) == 300

    # One process: an unknown one is a 422 page; a known one counts only its transactions.
    message = assert_error_page(client.get("/dashboard", params={"process": "NOPE"}), 422,
                                "VALIDATION_ERROR")
    assert message.startswith("process: unknown process &#x27;NOPE&#x27;")
    assert kpis(client.get("/dashboard", params={"process": P}).text)["Transactions"] == 6


def test_auto_refresh(client, tracker, clock):
    scenario(tracker, clock)
    assert refresh_of(client.get("/dashboard").text) == 60
    assert refresh_of(client.get("/dashboard?refresh=5").text) == 5
    html = client.get("/dashboard?refresh=0").text
    assert refresh_of(html) is None and "Automatic reload is off." in html
    assert '<option value="0" selected>off</option>' in html
    # empty form fields count as not given
    assert kpis(client.get("/dashboard?from=&to=&last=&process=&refresh=").text)[
        "Transactions"] == 6


@pytest.mark.parametrize("query, field", [
    ("from=yesterday", "from"),
    ("to=2026-13-01", "to"),
    ("from=2026-01-06&to=2026-01-05", "from"),
    ("last=0h", "last"),
    ("last=7 days", "last"),
    ("last=99999d", "last"),
    ("refresh=2", "refresh"),
    ("refresh=-1", "refresh"),
    ("refresh=soon", "refresh"),
    ("process=" + "P" * 65, "process"),
    ("from=9999-12-31T23:59&last=1h", "from"),
])
def test_bad_parameters_get_a_422_page(client, query, field):
    message = assert_error_page(client.get(f"/dashboard?{query}"), 422, "VALIDATION_ERROR")
    assert message.startswith(f"{field}: ")
    assert len(message) < 300


def test_the_dashboard_is_no_api_operation(client):
    spec = client.get("/openapi.json").json()
    assert not any(path.startswith("/dashboard") for path in spec["paths"])


# -- a transaction's page --------------------------------------------------------------------


def test_transaction_page_shows_stages_and_events_of_the_database(client, tracker, clock):
    uuids = scenario(tracker, clock)
    client.app.dependency_overrides[prefect_ui_url] = lambda: UI
    response = client.get(f"/dashboard/transactions/{uuids['retry']}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    html = response.text
    tx = tracker.get_transaction(uuids["retry"])
    assert f"<h1>Transaction {tx.business_key}</h1>" in html
    page = Page(html)

    for label, value in (("Process", tx.process_code), ("Business key", tx.business_key),
                         ("State", tx.state.value), ("UUID", tx.uuid),
                         ("Created", tx.created_at.strftime("%Y-%m-%d %H:%M:%S")),
                         ("Updated", tx.updated_at.strftime("%Y-%m-%d %H:%M:%S"))):
        assert re.search(rf"<dt>{label}</dt>\s*<dd>(<span[^>]*>)?{value}", html), label

    stages = page.table("Stages, in order")
    assert [r[:4] for r in stages] == [
        [s.platform, s.stage, s.state.value,
         f"{s.attempt} / {'∞' if s.attempts_allowed is None else s.attempts_allowed}"]
        for s in tx.stages
    ]
    failed = next(r for r in stages if r[1] == "process")
    assert failed[5] == "-5: SAP <b>timeout</b>"  # the text, escaped in the page
    assert failed[4] == next(s for s in tx.stages if s.stage == "process").next_attempt_at \
        .strftime("%Y-%m-%d %H:%M:%S")

    events = page.table("Audit trail")
    assert page.tables and f"Audit trail · {len(tx.events)} events" in page.tables
    assert [(r[1], r[2]) for r in events] == [
        (e.kind.value, ".".join(p for p in (e.platform, e.stage) if p)) for e in tx.events
    ]
    attempt = events[-1]
    assert attempt[3:7] == ["1", "SYSTEM_ERROR", "-5", "SAP <b>timeout</b>"]
    assert attempt[10:] == [FLOW_RUN, TASK_RUN]
    assert page.row_links("Audit trail")[-1] == [
        (f"{UI}/runs/flow-run/{FLOW_RUN}", FLOW_RUN), (f"{UI}/runs/task-run/{TASK_RUN}", TASK_RUN)
    ]
    assert "SAP &lt;b&gt;timeout&lt;/b&gt;" in html and "<b>timeout" not in html
    assert ("/dashboard", "← Dashboard") in page.all_links
    assert refresh_of(html) == 60  # TERMINATED: not final, it reloads
    assert refresh_of(client.get(f"/dashboard/transactions/{uuids['retry']}?refresh=0")
                      .text) is None


def test_without_the_prefect_ui_address_run_ids_are_text(client, tracker, clock):
    uuids = scenario(tracker, clock)
    client.app.dependency_overrides[prefect_ui_url] = lambda: None
    html = client.get(f"/dashboard/transactions/{uuids['retry']}").text
    page = Page(html)
    assert page.table("Audit trail")[-1][10:] == [FLOW_RUN, TASK_RUN]
    assert page.row_links("Audit trail")[-1] == []
    assert "/runs/" not in html and "address is not known" in html


def test_the_prefect_ui_address_comes_from_prefects_settings():
    with temporary_settings(updates={PREFECT_UI_URL: "http://ui.test:4200"}):
        assert prefect_ui_url() == "http://ui.test:4200"
    with temporary_settings(updates={PREFECT_API_URL: "http://prefect.test:4200/api"},
                            restore_defaults={PREFECT_UI_URL}):
        assert prefect_ui_url() == "http://prefect.test:4200"  # Prefect derives it
    with temporary_settings(updates={PREFECT_UI_URL: "javascript:alert(1)"}):
        assert prefect_ui_url() is None


def test_a_final_transaction_page_does_not_reload(client, tracker, clock):
    uuids = scenario(tracker, clock)
    for key in ("done", "rejected"):
        html = client.get(f"/dashboard/transactions/{uuids[key]}").text
        assert refresh_of(html) is None
        tx = tracker.get_transaction(uuids[key])
        assert f"<dt>Finished</dt>\n    <dd>{tx.finished_at:%Y-%m-%d %H:%M:%S}</dd>" in html
    rejected = Page(client.get(f"/dashboard/transactions/{uuids['rejected']}").text)
    assert [r[2] for r in rejected.table("Stages")] == [
        "REJECTED", "CANCELLED", "CANCELLED", "CANCELLED"
    ]


def test_everything_from_the_database_is_escaped(client, tracker, clock):
    uuids = scenario(tracker, clock)
    dashboard = client.get("/dashboard").text
    page = client.get(f"/dashboard/transactions/{uuids['hostile']}").text
    escaped = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;quoted&quot;"
    for html in (dashboard, page):
        assert "<script" not in html and "alert('x')" not in html
        assert escaped in html
    assert f"<h1>Transaction {escaped}</h1>" in page
    assert HOSTILE in [r[0] for r in Page(dashboard).table("Transactions created")]
    assert "&quot;request_id&quot;: &quot;&lt;script&gt;" in page  # the payload too


@pytest.mark.parametrize("path", [
    "/dashboard/transactions/00000000-0000-4000-8000-000000000000",
    "/dashboard/transactions/not-a-uuid",
    "/dashboard/transactions/%3Cscript%3Ealert(1)%3C%2Fscript%3E",
])
def test_an_unknown_transaction_is_a_404_page(client, path):
    message = assert_error_page(client.get(path), 404, "TRANSACTION_NOT_FOUND")
    assert message.startswith("no transaction ")
    assert "<script" not in message


# -- the key ---------------------------------------------------------------------------------


def test_the_dashboard_follows_the_rule_of_the_reads(make_client, tracker, clock):
    uuids = scenario(tracker, clock)
    pages = ["/dashboard", f"/dashboard/transactions/{uuids['done']}"]
    writes_only = make_client(api_key="s3cret")  # reads are open: so is the dashboard
    for path in pages:
        assert writes_only.get(path).status_code == 200

    client = make_client(api_key="s3cret", api_key_for_reads=True)
    for path in pages:
        refused = client.get(path)
        assert_error_page(refused, 401, "UNAUTHORIZED")
        assert refused.headers["www-authenticate"].startswith('Basic realm="prefect-tracking')
        assert client.get(path, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get(path, auth=("anyone", "s3cret")).status_code == 200  # the browser's
        assert_error_page(client.get(path, auth=("anyone", "wrong")), 401, "UNAUTHORIZED")
        assert_error_page(client.get(path, headers={"X-API-Key": "s3cre"}), 401, "UNAUTHORIZED")
        assert_error_page(client.get(path, headers={"Authorization": "Basic %%%"}), 401,
                          "UNAUTHORIZED")
    # the key is checked before anything else: no 404 or 422 leaks without it
    assert_error_page(client.get("/dashboard/transactions/nope"), 401, "UNAUTHORIZED")
    assert_error_page(client.get("/dashboard?from=bad"), 401, "UNAUTHORIZED")


# -- in a real browser -----------------------------------------------------------------------


KPIS_JS = """Object.fromEntries(Array.from(document.querySelectorAll('.kpi')).map(
    k => [k.querySelector('.label').textContent, Number(
        k.querySelector('.value').textContent.replace(/,/g, ''))]))"""
ROWS_JS = """Array.from(document.querySelectorAll('h2')).filter(
    h => h.textContent.startsWith(%r))[0].parentElement.querySelectorAll('tbody tr').length"""
TABLE_JS = """Array.from(Array.from(document.querySelectorAll('h2')).filter(
    h => h.textContent.startsWith(%r))[0].parentElement.querySelectorAll('tbody tr')).map(
    tr => Array.from(tr.cells).map(td => td.textContent.trim()))"""


@pytest.mark.skipif(find_chromium() is None,
                    reason="no chromium binary found (chromium, chromium-browser or "
                    "google-chrome; .ci/run installs it)")
def test_chromium_follows_a_link_from_the_dashboard_to_a_transaction(tracker, clock, db_url):
    uuids = scenario(tracker, clock)
    app = create_app(settings_for(db_url), tracker, process_runner=fake_runner(tracker))
    app.dependency_overrides[prefect_ui_url] = lambda: UI
    retry = tracker.get_transaction(uuids["retry"])
    with serve(app) as base, Chromium.launch() as browser:
        browser.navigate(f"{base}/dashboard?refresh=0")
        assert browser.evaluate("document.title") == "Tracking dashboard: all processes"
        now = clock.now
        everything = db_counts(tracker, now - timedelta(days=7), now + timedelta(microseconds=1))
        assert browser.evaluate(KPIS_JS) == expected_kpis(everything)
        assert browser.evaluate("document.scripts.length") == 0
        text = browser.evaluate("document.body.innerText")
        assert HOSTILE in text  # shown as text, not run

        # Follow the link of a waiting item to its page.
        link = browser.evaluate(
            "Array.from(document.querySelectorAll('a')).filter("
            f"a => a.textContent === {retry.business_key!r}).map(a => a.href)"
        )
        assert link and link[0] == f"{base}/dashboard/transactions/{retry.uuid}"
        browser.act_and_wait(
            "Array.from(document.querySelectorAll('a')).filter("
            f"a => a.textContent === {retry.business_key!r})[0].click()"
        )
        assert browser.evaluate("location.pathname") == f"/dashboard/transactions/{retry.uuid}"
        text = browser.evaluate("document.body.innerText")
        assert f"Transaction {retry.business_key}" in text and retry.uuid in text
        stages = browser.evaluate(TABLE_JS % "Stages")
        assert [r[:4] for r in stages] == [
            [s.platform, s.stage, s.state.value,
             f"{s.attempt} / {'∞' if s.attempts_allowed is None else s.attempts_allowed}"]
            for s in retry.stages
        ]
        events = browser.evaluate(TABLE_JS % "Audit trail")
        assert [r[1] for r in events] == [e.kind.value for e in retry.events]
        assert events[-1][6] == "SAP <b>timeout</b>"
        hrefs = browser.evaluate(
            "Array.from(document.querySelectorAll('a')).map(a => a.href)"
            ".filter(h => h.includes('/runs/'))"
        )
        assert hrefs == [f"{UI}/runs/flow-run/{FLOW_RUN}", f"{UI}/runs/task-run/{TASK_RUN}"]

        # Back to the dashboard, and pick another window with its form.
        browser.act_and_wait("document.querySelector('nav.top a').click()")
        assert browser.evaluate("location.pathname") == "/dashboard"
        browser.act_and_wait(
            "document.querySelector('select[name=last]').value = '24h';"
            "document.querySelector('select[name=refresh]').value = '0';"
            "document.querySelector('form.window').requestSubmit()"
        )
        query = browser.evaluate("location.search")
        assert "last=24h" in query and "refresh=0" in query
        last_day = db_counts(tracker, now - timedelta(hours=24), now + timedelta(microseconds=1))
        assert browser.evaluate(KPIS_JS) == expected_kpis(last_day)
        assert browser.evaluate(ROWS_JS % "Transactions created") == sum(last_day.values()) == 2
