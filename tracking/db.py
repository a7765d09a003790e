"""Engines and migrations.

``connect(url)`` returns a SQLAlchemy engine on the tracking database; it migrates only when
asked (``migrate=True``: ``tracking db upgrade``, the demo, the API's startup, tests), and the
flows check that the schema is current (``check_schema``) instead of changing it.

SQLite (the embedded default) is set up for several threads and processes writing one
database (``tracking.sqlite``). PostgreSQL uses psycopg 3, each connection planning every
statement with its own parameters. Transactions on either: ``tracking.connections``.

Example:
    engine = connect("sqlite:///tracking.db", migrate=True)   # created and migrated
    engine = connect("postgresql://postgres@127.0.0.1:5432/tracking")
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine, make_url

from tracking.connections import read_only
from tracking.errors import TrackingError
from tracking.sqlite import sqlite_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def normalise_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (psycopg2 is not a dependency)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str) -> Engine:
    """An engine configured for the tracking store, without running migrations."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return sqlite_engine(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(
            f"unsupported database {parsed.get_backend_name()!r}: use sqlite:/// or postgresql://"
        )
    return _postgresql_engine(url)


def _postgresql_engine(url: str) -> Engine:
    engine = sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # psycopg prepares a statement run five times, and PostgreSQL may then plan it once
        # for any parameters: a batch's ``uuid IN (...500 values)`` got a plan made from the
        # statistics of an empty table (a scan of every stage, ~20x slower at 60k stages).
        # A plan per execution costs well under a millisecond for these statements.
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        dbapi_connection.execute("SET plan_cache_mode = force_custom_plan")
        dbapi_connection.autocommit = autocommit

    return engine


def _alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    with read_only(engine) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the migrations; safe when several processes do it at once."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Serialise concurrent upgrades; SQLite's BEGIN IMMEDIATE already does.
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7316001)")
        command.upgrade(_alembic_config(conn), revision)


def check_schema(engine: Engine) -> None:
    """Refuse a database whose schema is not the code's (a ``TrackingError`` that says how
    to fix it), rather than work on tables that may lack columns."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        where = engine.url.render_as_string(hide_password=True)
        raise TrackingError(
            f"the tracking database {where} is at schema revision {current or 'none (empty)'}"
            f", this code needs {head}: run `tracking db upgrade`"
        )


def connect(url: str, *, migrate: bool = False) -> Engine:
    """An engine on the tracking database.

    Args:
        url: a SQLAlchemy URL (an entry point takes it from its settings:
            ``Settings().database_url``, ``TRACKING_DATABASE_URL``).
        migrate: bring the schema up to date first (the database is created on first use
            for SQLite). Default: leave it alone.
    """
    engine = create_engine(url)
    if migrate and current_revision(engine) != head_revision():
        upgrade(engine)
    return engine
