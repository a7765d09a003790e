"""``tracking events``: the business outcomes as Prefect events (``tracking.prefect_events``).

``events send`` sends what was not sent yet (each resume run does it as it ends; this is for
catching up, or for setups with ``TRACKING_SEND_EVENTS=false``), ``--dry-run`` lists it;
``events status`` shows how far the sending is.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from cyclopts import App

from tracking.cli import render
from tracking.cli.common import EXIT_OK, BadInput, Cli, Failed, ShowFormat, positive
from tracking.prefect_events import event_id, event_name
from tracking.store.outbox import MAX_BATCH, DeliveryFailed

app = App(name="events", help="Business outcomes as Prefect events (tracking.transaction.*).")


@app.command(name="send")
def send(
    *,
    batch_size: int = 500,
    max_events: int | None = None,
    wait: float = 30.0,
    dry_run: bool = False,
    limit: int = 50,
    format: ShowFormat = "table",
    cli: Cli,
) -> int:
    """Send the business outcomes not sent yet (completed, rejected, exhausted, cancelled and
    overdue transactions) as Prefect events to the server of PREFECT_API_URL, one API call
    per batch. Without PREFECT_API_URL a temporary Prefect server is started, as for `run`.

    Parameters
    ----------
    batch_size
        Events per API call.
    max_events
        Stop after this many.
    wait
        Seconds to wait for another run that is sending them right now.
    dry_run
        Only list what would be sent (at most --limit), send nothing.
    limit
        Rows of --dry-run.
    """
    positive("--batch-size", batch_size)
    positive("--max-events", max_events)
    positive("--limit", limit)
    if batch_size > MAX_BATCH:
        raise BadInput(f"--batch-size must be at most {MAX_BATCH}, got {batch_size}")
    app_ = cli.app()
    if dry_run:
        rows = [_row(o) for o in app_.pending_events(limit=min(limit, MAX_BATCH))]
        if format == "json":
            render.write_json(rows)
        else:
            cli.out.print(render.table(
                f"Outcome events to send ({len(rows)}{'+' if len(rows) == limit else ''})",
                ["Event", "Process", "Business key", "Platform", "Occurred", "Uuid"],
                [[r["event"], r["process"], r["business_key"], r["platform"] or "",
                  r["occurred"], r["uuid"]] for r in rows],
            ))
        return EXIT_OK
    from tracking.prefect_server import quiet_settings

    try:
        with quiet_settings():
            delivery = app_.send_events(batch_size=batch_size, max_events=max_events,
                                        wait_seconds=max(0.0, wait))
    except DeliveryFailed as exc:
        raise Failed(f"{exc} (the rest is sent next time)") from exc
    result = asdict(delivery)
    if format == "json":
        render.write_json(result)
    elif delivery.busy:
        cli.out.print("another run is sending the outcome events: nothing sent here")
    else:
        cli.out.print(
            f"sent {render.count(delivery.sent, 'outcome event')} in "
            f"{delivery.batches} batch{'' if delivery.batches == 1 else 'es'} "
            f"({delivery.overdue} overdue); "
            f"audit trail read up to event {delivery.position}"
        )
    return EXIT_OK


@app.command(name="status")
def status(*, format: ShowFormat = "table", cli: Cli) -> int:
    """How far the outcomes were sent: the cursor in the audit trail, who is sending, and how
    many outcomes wait."""
    state = asdict(cli.app().events_status())
    if format == "json":
        render.write_json(state)
    else:
        cli.out.print(render.table("Outcome events", ["", "Value"],
                                   [[k, "" if v is None else v] for k, v in state.items()]))
    return EXIT_OK


def _row(outcome: Any) -> dict[str, Any]:
    return {
        "event": event_name(outcome), "id": str(event_id(outcome)),
        "process": outcome.process_code, "business_key": outcome.business_key,
        "platform": outcome.platform, "stage": outcome.stage, "state": outcome.state,
        "occurred": outcome.occurred.isoformat(), "uuid": outcome.uuid,
        "audit_event_id": outcome.audit_id,
    }
