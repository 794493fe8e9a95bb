"""Alembic's environment for the inbox: run by `tidings.inbox.migrations`, or by Alembic's CLI."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection

from tidings.inbox.migrations import VERSION_TABLE
from tidings.inbox.models import Base


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,  # SQLite alters tables by copying them
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_with_url(url: str) -> None:
    from tidings.inbox.store import create_engine

    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(run_migrations)
    finally:
        await engine.dispose()


def main() -> None:
    if context.is_offline_mode():  # `alembic upgrade --sql`: print the SQL
        context.configure(
            url=context.config.get_main_option("sqlalchemy.url"),
            target_metadata=Base.metadata,
            version_table=VERSION_TABLE,
            literal_binds=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
    else:
        url = context.config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError("set sqlalchemy.url, or migrate with `tidings migrate`")
        asyncio.run(run_with_url(url))


main()
