"""Retention: a retention per process in the catalog, the purge audit trail, and events that
a purge (and only a purge) may delete.

* ``tx_catalog_process.retention_seconds``: ``Process(retention=...)``; NULL keeps forever.
* ``tx_purge``: one row per purge run and process, updated with each deleted chunk.
* ``tx_purging``: the transactions a purge is deleting, inside its database transaction.
* ``ix_tx_process_finished``: a purge walks finished transactions oldest first.
* The append-only trigger of ``tx_event`` still refuses every update, and every delete
  except of the events of a transaction listed in ``tx_purging``.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

import tracking.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_MESSAGE = "tx_event is append-only (only tracking purge deletes, with its transaction)"

_SQLITE_DELETE_TRIGGER = f"""CREATE TRIGGER tx_event_no_delete BEFORE DELETE ON tx_event
   WHEN NOT EXISTS (SELECT 1 FROM tx_purging WHERE tx_purging.uuid = OLD.uuid)
   BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END"""
_SQLITE_DELETE_TRIGGER_0001 = """CREATE TRIGGER tx_event_no_delete BEFORE DELETE ON tx_event
   BEGIN SELECT RAISE(ABORT, 'tx_event is append-only'); END"""

_POSTGRES_FUNCTION = f"""CREATE OR REPLACE FUNCTION tx_event_append_only() RETURNS trigger
   LANGUAGE plpgsql AS $$
   BEGIN
     IF TG_OP = 'DELETE' AND EXISTS (SELECT 1 FROM tx_purging WHERE uuid = OLD.uuid) THEN
       RETURN OLD;
     END IF;
     RAISE EXCEPTION '{_MESSAGE}';
   END $$"""
_POSTGRES_FUNCTION_0001 = """CREATE OR REPLACE FUNCTION tx_event_append_only() RETURNS trigger
   LANGUAGE plpgsql AS $$
   BEGIN RAISE EXCEPTION 'tx_event is append-only'; END $$"""


def upgrade() -> None:
    # Plain ADD COLUMN (no batch mode): SQLite needs no table rebuild, so the views stay.
    op.add_column("tx_catalog_process", sa.Column("retention_seconds", sa.Float(), nullable=True))
    op.create_index(
        "ix_tx_process_finished", "tx_process", ["process_code", "finished_at"], unique=False,
        sqlite_where=sa.text("finished_at IS NOT NULL"),
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )
    op.create_table(
        "tx_purge",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("process_code", sa.String(length=64), nullable=False),
        sa.Column("older_than_seconds", sa.Float(), nullable=False),
        sa.Column("cutoff", tracking.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("started_at", tracking.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("purged_at", tracking.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", tracking.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("transactions", sa.Integer(), nullable=False),
        sa.Column("stages", sa.Integer(), nullable=False),
        sa.Column("events", sa.Integer(), nullable=False),
        sa.Column("oldest_finished_at", tracking.models.UTCDateTime(timezone=True),
                  nullable=True),
        sa.Column("newest_finished_at", tracking.models.UTCDateTime(timezone=True),
                  nullable=True),
        sa.Column("archive_path", sa.Text(), nullable=True),
        sa.Column("archive_format", sa.String(length=8), nullable=True),
        sa.Column("actor", sa.String(length=100), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_tx_purge_process_started", "tx_purge", ["process_code", "started_at"],
                    unique=False)
    op.create_table(
        "tx_purging",
        sa.Column("uuid", sa.String(length=36), nullable=False),
        sa.Column("purge_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("uuid"),
    )
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER tx_event_no_delete")
        op.execute(_SQLITE_DELETE_TRIGGER)
    else:
        op.execute(_POSTGRES_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER tx_event_no_delete")
        op.execute(_SQLITE_DELETE_TRIGGER_0001)
    else:
        op.execute(_POSTGRES_FUNCTION_0001)
    op.drop_table("tx_purging")
    op.drop_index("ix_tx_purge_process_started", table_name="tx_purge")
    op.drop_table("tx_purge")
    op.drop_index("ix_tx_process_finished", table_name="tx_process",
                  sqlite_where=sa.text("finished_at IS NOT NULL"),
                  postgresql_where=sa.text("finished_at IS NOT NULL"))
    op.drop_column("tx_catalog_process", "retention_seconds")
