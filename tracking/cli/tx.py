"""Transactions by uuid (``tracking tx show|cancel|requeue|defer``) and the bulk
``tracking requeue``.

The operator actions are ``App.cancel_many`` / ``App.requeue_many`` / ``App.defer_many``;
here they are checked (every uuid known, else nothing changes), called and rendered: a ✓ or
✗ line per transaction, exit code 1 if any failed.
"""

from __future__ import annotations

from collections.abc import Sequence

from cyclopts import App

from tracking.app import ActionResult
from tracking.cli import render
from tracking.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    BadInput,
    Cli,
    Invocation,
    ShowFormat,
    actor,
    bad_input,
    positive,
)
from tracking.models import TxState
from tracking.reports import as_dicts
from tracking.states import REQUEUABLE_TX_STATES

app = App(name="tx", help="One or more transactions by uuid: show, cancel, requeue, defer.")


@app.command(name="show")
def tx_show(uuid: str, /, *, format: ShowFormat = "table", cli: Cli) -> int:
    """One transaction: its stages and its audit trail.

    Parameters
    ----------
    uuid
        Transaction uuid.
    """
    tx = cli.app().operator().get_transaction(uuid)  # TransactionNotFound: exit 2
    if format == "json":
        data = as_dicts([tx])[0] | {"stages": as_dicts(tx.stages), "events": as_dicts(tx.events)}
        render.write_json(data)
        return EXIT_OK
    cli.out.print(render.table(f"Transaction {tx.uuid}", ["", "Value"], [
        ["process", tx.process_code], ["business key", tx.business_key], ["state", tx.state],
        ["source", tx.source], ["priority", tx.priority], ["not before", tx.not_before],
        ["deadline", tx.deadline], ["due (deadline or SLA)", tx.due_at],
        ["created", tx.created_at], ["updated", tx.updated_at],
        ["finished", tx.finished_at], ["payload", tx.payload],
    ]))
    cli.out.print(render.table("Stages", [
        "#", "Platform", "Stage", "State", "Attempts", "Allowed", "Next attempt", "Error",
        "Description",
    ], [
        [s.seq, s.platform, s.stage, s.state, s.attempt,
         "∞" if s.attempts_allowed is None else s.attempts_allowed, s.next_attempt_at,
         s.error_code, s.error_description]
        for s in tx.stages
    ]))
    cli.out.print(render.table("Audit trail", [
        "Time", "Event", "Platform.stage", "Try", "Outcome", "Code", "Change", "Actor",
        "Description",
    ], [
        [e.created_at, e.kind, f"{e.platform}.{e.stage}" if e.platform else "", e.attempt,
         e.outcome, e.error_code, f"{e.from_state or ''} → {e.to_state or ''}".strip(" →"),
         e.actor, e.description]
        for e in tx.events
    ]))
    return EXIT_OK


def _known(cli: Invocation, uuids: Sequence[str]) -> None:
    if not uuids:
        raise BadInput("give at least one transaction uuid")
    cli.app().check_transactions(uuids)  # TransactionNotFound naming them: exit 2


def _shown(cli: Invocation, results: Sequence[ActionResult], verb: str) -> int:
    return EXIT_OK if render.action_results(cli.out, cli.err, results, verb) else EXIT_FAILED


@app.command(name="cancel")
def tx_cancel(*uuids: str, reason: str, cli: Cli) -> int:
    """Cancel transactions: their open stages become CANCELLED (audited with the reason).

    Parameters
    ----------
    uuids
        Transaction uuids.
    reason
        Why (kept in the audit trail).
    """
    _known(cli, uuids)
    with bad_input():  # a blank reason: refused before any change
        results = cli.app().cancel_many(uuids, reason=reason, actor=actor())
    return _shown(cli, results, "cancelled")


@app.command(name="requeue")
def tx_requeue(*uuids: str, reason: str = "requeued from the CLI", cli: Cli) -> int:
    """Requeue stopped transactions (EXHAUSTED, TERMINATED, REJECTED, CANCELLED).

    The stage that stopped and every later one get a fresh set of attempts, due now.

    Parameters
    ----------
    uuids
        Transaction uuids.
    reason
        Why (kept in the audit trail).
    """
    _known(cli, uuids)
    return _shown(cli, cli.app().requeue_many(uuids, reason=reason, actor=actor()), "requeued")


@app.command(name="defer")
def tx_defer(*uuids: str, until: str, reason: str = "deferred from the CLI", cli: Cli) -> int:
    """Postpone waiting transactions (PENDING, IN_PROGRESS, TERMINATED): the next stage of
    each is not due before --until (a later retry time is kept); audited with the reason.

    Parameters
    ----------
    uuids
        Transaction uuids.
    until
        Not before then: ISO date or date-time (2026-12-03T08:00Z, 2026-12-03T08:00+01:00;
        naive values are UTC, a date alone is 00:00 UTC).
    reason
        Why (kept in the audit trail).
    """
    _known(cli, uuids)
    with bad_input():  # a bad or past --until: refused before any change
        results = cli.app().defer_many(uuids, until=until, reason=reason, actor=actor())
    return _shown(cli, results, "deferred")


def requeue(
    *,
    process: str,
    platform: str | None = None,
    state: str = TxState.EXHAUSTED.value,
    limit: int | None = None,
    yes: bool = False,
    reason: str = "bulk requeue from the CLI",
    cli: Cli,
) -> int:
    """Requeue every transaction of a process in a state (a dry run unless --yes).

    Parameters
    ----------
    process
        Process code.
    platform
        Only transactions with a stage of this platform in that state.
    state
        EXHAUSTED, TERMINATED, REJECTED or CANCELLED.
    limit
        At most this many (oldest first).
    yes
        Requeue them; without it nothing changes.
    reason
        Kept in the audit trail.
    """
    proc = cli.process(process)
    if platform is not None:
        with bad_input():
            proc.get_platform(platform)
    allowed = sorted(s.value for s in REQUEUABLE_TX_STATES)
    if state.upper() not in allowed:
        raise BadInput(f"--state must be one of {', '.join(allowed)}, got {state!r}")
    positive("--limit", limit)
    app = cli.app()
    found = app.reports().requeue_candidates(process, state.upper(), platform=platform,
                                             limit=limit)
    where = f"{process} in {state.upper()}" + (f" at {platform}" if platform else "")
    if not found:
        cli.out.print(f"nothing to requeue: no transaction of {where}")
        return EXIT_OK
    rows = [[c.uuid, c.business_key, c.state, f"{c.platform}.{c.stage}", c.error_code,
             c.error_description, c.updated_at] for c in found[: render.SHOWN_ROWS]]
    cli.out.print(render.table(
        f"{len(found)} transaction(s) of {where}",
        ["uuid", "Business key", "State", "Stopped at", "Code", "Error", "Since"], rows,
    ))
    if len(found) > render.SHOWN_ROWS:
        cli.out.print(f"... and {len(found) - render.SHOWN_ROWS} more")
    if not yes:
        cli.out.print(f"dry run: nothing changed; add --yes to requeue these {len(found)}")
        return EXIT_OK
    results = app.requeue_many([c.uuid for c in found], reason=reason, actor=actor())
    return _shown(cli, results, "requeued")
