"""Each stage stores the retry policy it runs under (delay, back-off, cap, jitter).

Operator actions and completions then need no in-memory process definition; existing stages
take their platform's policy from the catalog.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = (
    ("retry_delay_seconds", "delay_seconds", "0"),
    ("retry_backoff", "backoff", "1"),
    ("retry_max_delay_seconds", "max_delay_seconds", None),
    ("retry_jitter_seconds", "jitter_seconds", "0"),
)


def upgrade() -> None:
    # Plain ADD COLUMN (no batch mode): SQLite needs no table rebuild, so the views stay.
    for column, _, default in COLUMNS:
        op.add_column(
            "tx_stage",
            sa.Column(
                column,
                sa.Float(),
                nullable=default is None,
                server_default=sa.text(default) if default is not None else None,
            ),
        )
    sets = ", ".join(
        f"{column} = (SELECT p.{source} FROM tx_catalog_platform p "
        "WHERE p.process_code = tx_stage.process_code AND p.code = tx_stage.platform)"
        for column, source, _ in COLUMNS
    )
    op.execute(
        f"UPDATE tx_stage SET {sets} WHERE EXISTS (SELECT 1 FROM tx_catalog_platform p "
        "WHERE p.process_code = tx_stage.process_code AND p.code = tx_stage.platform)"
    )


def downgrade() -> None:
    for column, _, _ in reversed(COLUMNS):
        op.drop_column("tx_stage", column)
