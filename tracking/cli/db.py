"""``tracking db``: the tracking database. ``db upgrade`` is the one command that migrates;
every other command opens the database as it is and refuses an empty or old schema."""

from __future__ import annotations

from cyclopts import App

from tracking.cli.common import EXIT_OK, BadInput, Cli
from tracking.db import current_revision, head_revision, upgrade

app = App(name="db", help="The tracking database (migrations).")


@app.command(name="upgrade")
def db_upgrade(revision: str = "head", *, cli: Cli) -> int:
    """Apply the Alembic migrations (tables and reporting views) up to REVISION.

    Parameters
    ----------
    revision
        Target revision (default: the latest).
    """
    engine = cli.app(schema=False).engine
    try:
        before = current_revision(engine)
        upgrade(engine, revision)
        after = current_revision(engine)
    except Exception as exc:  # alembic raises several types for bad revisions
        if "revision" in str(exc).lower() and "Can't locate" in str(exc):
            raise BadInput(f"unknown revision {revision!r}") from None
        raise
    cli.out.print(
        f"database at revision {after} (was {before or 'empty'}; head {head_revision()})"
    )
    return EXIT_OK
