"""Alembic environment. `db.session.init_db` runs it programmatically with a live connection in
`config.attributes["connection"]`; the `alembic` command line also works when SLIDEPIPE_DB_URL
(or sqlalchemy.url) is set."""

from __future__ import annotations

import os

from alembic import context

from db.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: later revisions use batch mode (copy-and-move) there.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from db.session import make_engine

    url = config.get_main_option("sqlalchemy.url") or os.environ.get("SLIDEPIPE_DB_URL")
    if not url:
        raise SystemExit("set SLIDEPIPE_DB_URL (or sqlalchemy.url) to the database to migrate")
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
