"""The inbox's database engine: the async driver for a URL, SQLite's pragmas and
BEGIN mode, and which database errors mean "unavailable" (503).

SQLite runs in WAL mode (readers never wait for the writer) with a busy
timeout; write transactions start with ``BEGIN IMMEDIATE`` so two writers queue
for the lock instead of failing when one upgrades from reading to writing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from ..errors import BackendUnavailable

__all__ = ["create_engine", "database_url", "unavailable"]

SQLITE_BUSY_TIMEOUT_MS = 5000  # how long a writer waits for SQLite's lock before failing


def database_url(url: str | URL) -> URL:
    """The URL with its async driver: ``sqlite://`` → aiosqlite, ``postgresql://`` → asyncpg."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.drivername != "sqlite+aiosqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend in ("postgresql", "postgres") and parsed.drivername != "postgresql+asyncpg":
        parsed = parsed.set(drivername="postgresql+asyncpg")
    return parsed


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def create_engine(url: str | URL) -> AsyncEngine:
    """An async engine for the inbox: WAL and a busy timeout on SQLite, asyncpg on PostgreSQL."""
    parsed = database_url(url)
    options: dict[str, Any] = {"json_serializer": _json, "json_deserializer": orjson.loads}
    if parsed.get_backend_name() != "sqlite":
        # No pre-ping (a round trip per checkout, on every request): reads retry once on
        # a fresh connection instead (see Inbox._reading).
        return create_async_engine(parsed, **options)
    if parsed.database in (None, "", ":memory:"):
        # One shared connection, or every connection would see its own empty database.
        options["poolclass"] = StaticPool
    engine = create_async_engine(parsed, **options)
    event.listen(engine.sync_engine, "connect", _sqlite_connect)
    event.listen(engine.sync_engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, record: Any) -> None:
    # The driver's own implicit BEGIN is off: `_sqlite_begin` says which BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in (
        "journal_mode=WAL",
        f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
        "synchronous=NORMAL",  # durable at each checkpoint; safe with WAL
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    mode = conn.get_execution_options().get("tidings_begin", "DEFERRED")
    if mode != "NONE":  # NONE: a read, each statement its own transaction
        conn.exec_driver_sql(f"BEGIN {mode}")


@contextmanager
def unavailable() -> Iterator[None]:
    """Errors of the "cannot reach the database" kind become BackendUnavailable (503)."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        gone = isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
        if not (gone or exc.connection_invalidated):
            raise
        raise BackendUnavailable(f"the inbox database does not answer: {exc.orig}") from exc
    except (sa_exc.TimeoutError, OSError) as exc:
        raise BackendUnavailable(f"the inbox database does not answer: {exc}") from exc
