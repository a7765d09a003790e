"""Drop two indexes no query needs: every write paid for them.

Revision ID: 0009
Revises: 0008

* ``ix_tx_stage_process_state`` (process, platform, stage, state): no query looks stages up
  that way (claims use ``ix_tx_stage_runnable``, reports ``ix_tx_stage_window``), yet every
  change of a stage's state rewrote an entry of it.
* ``ix_tx_process_created_at``: ``ix_tx_process_window`` starts with ``created_at`` and
  serves every query it did.
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain DROP INDEX (no batch mode): SQLite needs no table rebuild for it.
    op.drop_index("ix_tx_stage_process_state", table_name="tx_stage")
    op.drop_index("ix_tx_process_created_at", table_name="tx_process")


def downgrade() -> None:
    op.create_index("ix_tx_process_created_at", "tx_process", ["created_at"])
    op.create_index(
        "ix_tx_stage_process_state", "tx_stage", ["process_code", "platform", "stage", "state"]
    )
