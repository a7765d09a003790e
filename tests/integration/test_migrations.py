"""The Alembic migrations build exactly the schema the models describe."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

from tracking.db import current_revision, head_revision, upgrade


def test_migrations_match_the_models(engine):
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, SQLModel.metadata)
    assert diff == []


def test_connect_brings_the_database_to_head(engine):
    assert current_revision(engine) == head_revision()
    upgrade(engine)  # a second upgrade is a no-op
    with engine.connect() as conn:
        views = set(sa.inspect(conn).get_view_names())
    assert {"v_transaction_summary", "v_stage_summary", "v_error_summary",
            "v_pending_aging"} <= views
