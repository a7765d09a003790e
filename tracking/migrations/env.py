"""Alembic environment: runs on the connection handed over by ``tracking.db.upgrade``.

From the command line (``alembic -x url=sqlite:///tracking.db upgrade head`` with
``script_location`` pointing here) it opens its own connection.
"""

from alembic import context
from sqlmodel import SQLModel

import tracking.models  # noqa: F401  (registers the tables on SQLModel.metadata)

config = context.config
target_metadata = SQLModel.metadata


def run_migrations(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    from tracking.db import create_engine
    from tracking.settings import get_settings

    url = context.get_x_argument(as_dictionary=True).get("url") or get_settings().database_url
    with create_engine(url).begin() as conn:
        run_migrations(conn)
