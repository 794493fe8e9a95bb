"""The inbox schema under Alembic, configured in code (no alembic.ini needed).

`upgrade_to_head`, `downgrade_to_base` and `schema_revisions` take a database
URL or an `AsyncEngine`. The version table is ``tidings_alembic_version``, so
an app that embeds tidings can keep its own Alembic history in the same
database. Operators run ``tidings migrate``; ``tidings serve`` migrates the
embedded SQLite database itself.

For Alembic's own command line (``alembic -c <ini> ...``), point
``script_location`` at ``tidings.inbox:migrations`` and set ``sqlalchemy.url``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "VERSION_TABLE",
    "downgrade_to_base",
    "head_revision",
    "is_up_to_date",
    "schema_revisions",
    "upgrade_to_head",
]

VERSION_TABLE = "tidings_alembic_version"
HERE = Path(__file__).parent
R = TypeVar("R")


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, in code; `connection` is what env.py migrates."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(config()).get_current_head()
    if head is None:
        raise RuntimeError("the inbox migrations have no head revision")
    return head


async def upgrade_to_head(url: str | URL | AsyncEngine) -> None:
    """Apply every migration not yet applied (none: nothing happens)."""
    await _run(url, lambda conn: command.upgrade(config(conn), "head"))


async def downgrade_to_base(url: str | URL | AsyncEngine) -> None:
    """Undo every migration: the inbox's tables are dropped, with their data."""
    await _run(url, lambda conn: command.downgrade(config(conn), "base"))


async def schema_revisions(url: str | URL | AsyncEngine) -> tuple[str | None, str]:
    """(the database's revision or None for an empty one, the code's head revision)."""

    def current(conn: Connection) -> str | None:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()

    return await _run(url, current), head_revision()


async def is_up_to_date(url: str | URL | AsyncEngine) -> bool:
    current, head = await schema_revisions(url)
    return current == head


async def _run(url: str | URL | AsyncEngine, work: Callable[[Connection], R]) -> R:
    from ..store import create_engine  # store imports models only; no cycle at import time

    engine = url if isinstance(url, AsyncEngine) else create_engine(url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(work)
    finally:
        if engine is not url:
            await engine.dispose()
