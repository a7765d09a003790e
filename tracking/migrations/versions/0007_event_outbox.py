"""The event outbox: a cursor per emitter over the audit trail (``tracking.store.outbox``).

* ``tx_event_cursor``: how far an emitter (``prefect``: the Prefect events of business
  outcomes) has read ``tx_event``, and who holds it while sending. The ``prefect`` cursor
  starts at the end of the audit trail as it is now: an upgraded database sends the outcomes
  from now on, not its whole history (a missing cursor starts at the beginning: delete the
  row to send the whole history).
* ``tx_overdue_sent``: the transactions whose going overdue (``v_overdue`` of 0006) was sent,
  with the due time it was sent for; deleted with their transaction (ON DELETE CASCADE).
* SQLite reuses the highest row id after it is deleted (``tx_event`` has no AUTOINCREMENT):
  when a purge deletes the newest events, a trigger lowers every cursor to the highest id
  left, so the ids written next are read, and takes it from the emitter holding it (which
  may have read past ids about to be used again: it must not move the cursor there).
  PostgreSQL's sequence never goes back.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

import tracking.models

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_SQLITE_TRIGGER = """CREATE TRIGGER tx_event_cursor_follows_delete AFTER DELETE ON tx_event
   WHEN OLD.id > (SELECT coalesce(max(id), 0) FROM tx_event)
   BEGIN
     UPDATE tx_event_cursor
        SET last_event_id = min(last_event_id, (SELECT coalesce(max(id), 0) FROM tx_event)),
            owner = NULL, lease_expires_at = NULL;
   END"""


def upgrade() -> None:
    op.create_table(
        "tx_event_cursor",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("last_event_id", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=100), nullable=True),
        sa.Column("lease_expires_at", tracking.models.UTCDateTime(timezone=True),
                  nullable=True),
        sa.Column("sent", sa.Integer(), nullable=False),
        sa.Column("updated_at", tracking.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "tx_overdue_sent",
        sa.Column("uuid", sa.String(length=36), nullable=False),
        sa.Column("due_at", tracking.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("sent_at", tracking.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["uuid"], ["tx_process.uuid"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("uuid"),
    )
    # CURRENT_TIMESTAMP is UTC on both (naive on SQLite, as UTCDateTime stores it there).
    op.execute(
        "INSERT INTO tx_event_cursor (name, last_event_id, sent, updated_at) "
        "SELECT 'prefect', coalesce(max(id), 0), 0, CURRENT_TIMESTAMP FROM tx_event"
    )
    if op.get_bind().dialect.name == "sqlite":
        op.execute(_SQLITE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS tx_event_cursor_follows_delete")
    op.drop_table("tx_overdue_sent")
    op.drop_table("tx_event_cursor")
