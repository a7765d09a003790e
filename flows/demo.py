"""The demo: the order-cancellation process end to end on the embedded default.

``make demo`` (``python -m flows.demo``) takes ``flows/data/cancellations.csv`` in, runs the
hourly resume flow three times (so retries show) and prints the reports. The process itself
is ``flows/order_cancellation.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flows.order_cancellation import SAMPLE_FILE, process

__all__ = ["SAMPLE_FILE", "main", "process", "run_demo"]


def main(runs: int = 3, database_url: str | None = None) -> int:
    """Intake the sample file, run the resume flow a few times, print the reports.

    ``database_url`` defaults to ``TRACKING_DATABASE_URL`` (the settings, read here: this is
    the demo's entry point). Without ``PREFECT_API_URL`` the flows run on Prefect's temporary
    server, started here with its telemetry off (it would contend for the server's SQLite
    database and log a traceback) and stopped before returning.
    """
    from tracking.prefect_server import temporary_server
    from tracking.settings import Settings

    url = database_url or Settings().database_url
    with temporary_server() as server:
        server.start()
        return run_demo(runs, url)


def run_demo(runs: int, database_url: str) -> int:
    """The demo itself, on whatever Prefect server the settings name."""
    from rich.console import Console
    from rich.table import Table

    from tracking import Reports, connect
    from tracking.flows import intake_flow, resume_flow
    from tracking.settings import use_database

    console = Console()
    started = datetime.now(UTC) - timedelta(seconds=1)
    code = process.code
    # The demo sets its database up; flows and most commands only check the schema.
    connect(database_url, migrate=True).dispose()
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
