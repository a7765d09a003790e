"""The demo process: cancelling customer orders across three simulated systems.

A cancellation request passes through

1. ``CRM``  – validate the customer (blocked customers are rejected: business error 10),
2. ``SAP``  – two stages: ``cancel_order`` (shipped orders are rejected: 20; flaky orders hit
   an RFC timeout twice before they go through) and ``refund`` (refunds above 2,000 need an
   approval: business error 21),
3. ``MAIL`` – notify the customer (the mail server is down for some items on the first try).

Outcomes are deterministic: they follow the columns of ``flows/data/cancellations.csv``.
Run it end to end with ``make demo`` (or ``python -m flows.demo``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from tracking import BusinessError, ExecutionResult, KeyFields, Process, RetryPolicy, TxContext

SAMPLE_FILE = Path(__file__).parent / "data" / "cancellations.csv"
REFUND_APPROVAL_LIMIT = 2000

process = Process(
    "ORDER_CANCELLATION",
    dedup=KeyFields("request_id"),
    description="Cancel a customer order in CRM and SAP, refund it and tell the customer.",
)


@process.platform("CRM", order=1, retry=RetryPolicy(max_attempts=3, delay=60))
def validate_customer(tx: TxContext) -> int:
    """Business rule: blocked customers cannot cancel orders themselves."""
    if tx.payload.get("customer_status") == "blocked":
        raise BusinessError(10, f"customer {tx.payload.get('customer')} is blocked in CRM")
    return 0


@process.platform(
    "SAP",
    order=2,
    stages=("cancel_order", "refund"),
    retry=RetryPolicy(max_attempts=4, delay=0, backoff=2),
    retries=1,  # one quick in-run retry of system errors; later runs do the rest
)
def sap(tx: TxContext) -> ExecutionResult | int:
    """Cancel the sales order, then book the refund."""
    if tx.stage == "cancel_order":
        if tx.payload.get("order_status") == "shipped":
            return ExecutionResult(20, f"order {tx.payload.get('order_id')} already shipped")
        if tx.payload.get("sap_flaky") and tx.attempt < 3:
            return ExecutionResult(-5, "SAP RFC timeout")
        return 0
    if float(tx.payload.get("amount") or 0) > REFUND_APPROVAL_LIMIT:
        return ExecutionResult(21, f"refund above the approval limit of {REFUND_APPROVAL_LIMIT}")
    return 0


@process.platform("MAIL", order=3, retry=RetryPolicy(delay=0))
def notify_customer(tx: TxContext) -> int:
    """Send the confirmation mail (unlimited retries: the mail must go out)."""
    if tx.payload.get("mail_flaky") and tx.attempt == 1:
        raise ConnectionError("SMTP server unavailable")
    tx.logger.info("mail sent for %s", tx.business_key)
    return 0


def main(runs: int = 3, database_url: str | None = None) -> int:
    """Intake the sample file, run the resume flow a few times, print the reports.

    Without ``PREFECT_API_URL`` the flows run on Prefect's temporary server, started here
    with its telemetry off (it would contend for the server's SQLite database and log a
    traceback) and stopped before returning.
    """
    from tracking.prefect_server import temporary_server

    with temporary_server() as server:
        server.start()
        return run_demo(runs, database_url)


def run_demo(runs: int = 3, database_url: str | None = None) -> int:
    """The demo itself, on whatever Prefect server the settings name."""
    from rich.console import Console
    from rich.table import Table

    from tracking import Reports, connect
    from tracking.runner import intake_flow, resume_flow
    from tracking.settings import use_database

    console = Console()
    started = datetime.now(UTC) - timedelta(seconds=1)
    code = process.code
    with use_database(database_url):  # the URL is never a flow parameter
        intake = intake_flow(process=code, path=str(SAMPLE_FILE))
        console.print(
            f"[bold]intake[/]: {intake['total']} items, {intake['new']} new, "
            f"{intake['duplicates']} duplicates"
        )
        for run in range(1, runs + 1):
            summary = resume_flow(process=code)
            outcomes = ", ".join(
                f"{p} {dict(sorted(c.items()))}" for p, c in summary["by_platform"].items()
            ) or "nothing to run"
            console.print(
                f"[bold]resume run {run}[/]: {summary['stages_run']} stages: {outcomes}"
            )

    engine = connect(database_url)
    reports = Reports(engine)
    end = datetime.now(UTC) + timedelta(seconds=1)
    since = started - timedelta(days=365)  # everything this database holds for the process
    table = Table(title=f"{code}: transactions by state")
    table.add_column("state")
    table.add_column("count", justify="right")
    for row in reports.summary_by_state(since, end, process=code):
        table.add_row(row.state.value, str(row.count))
    console.print(table)
    stages = Table(title="stages by platform, stage and state")
    for column in ("platform", "stage", "state", "count"):
        stages.add_column(column, justify="right" if column == "count" else "left")
    for row in reports.stage_summary_by_platform_and_stage(since, end, process=code):
        stages.add_row(row.platform, row.stage, row.state.value, str(row.count))
    console.print(stages)
    errors = Table(title="top error codes")
    for column in ("platform", "code", "count", "description"):
        errors.add_column(column)
    for e in reports.top_errors(since, end, process=code):
        errors.add_row(e.platform, str(e.error_code), str(e.count), e.description or "")
    console.print(errors)
    engine.dispose()
    console.print(
        "\nSee the flow runs, task runs and artifacts in the Prefect UI: run "
        "[bold]prefect server start[/] and open http://127.0.0.1:4200/runs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
