"""Covering indexes for the summary reports (index-only scans of a time window).

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain CREATE INDEX (no batch mode): SQLite needs no table rebuild for it, so the
    # reporting views can stay.
    op.create_index(
        "ix_tx_process_window", "tx_process", ["created_at", "process_code", "state"]
    )
    op.create_index(
        "ix_tx_stage_window",
        "tx_stage",
        ["created_at", "process_code", "platform_order", "platform", "seq", "stage", "state"],
    )


def downgrade() -> None:
    op.drop_index("ix_tx_stage_window", table_name="tx_stage")
    op.drop_index("ix_tx_process_window", table_name="tx_process")
