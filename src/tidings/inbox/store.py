"""`Inbox`: the notification records on SQLAlchemy async (SQLite or PostgreSQL).

Every method is one short transaction. Writes that a push depends on return
what the push needs (the records, the changed ids, the new unread count),
read inside the same transaction. Nothing here knows about transports. The
engine (drivers, SQLite's WAL and BEGIN modes) is engine.py's; the SQL the
methods share, queries.py's.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar, cast

from sqlalchemy import Dialect, RowMapping, delete, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..errors import BackendUnavailable
from .batching import Coalescer
from .engine import create_engine, database_url, unavailable
from .models import new_id, utcnow
from .queries import (
    PG_UNREAD,
    C,
    T,
    count_where,
    counting,
    owned_by,
    sqlite_unread_counts,
    unread_counts,
    unread_of,
)
from .schema import NewNotification, Query

__all__ = ["Created", "Inbox", "Page", "create_engine", "database_url", "to_record"]

log = logging.getLogger("tidings.inbox")

PURGE_BATCH = 5000  # rows per DELETE of the retention purge (short locks, bounded WAL)
COUNT_BATCH = 500  # users per statement of a batched unread count (bind parameters)
COUNT_WINDOW = 0.002  # seconds a batch of unread counts waits for company in a burst

R = TypeVar("R")


class Created(NamedTuple):
    """One recipient's record of a create: `new` False when an idempotent retry found it."""

    record: dict[str, Any]
    new: bool
    unread_count: int


@dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    total: int
    unread_count: int


@dataclass(slots=True)
class Changed:
    """What a mark-read or delete changed, and the unread count after it."""

    ids: list[str] = field(default_factory=list)
    unread_count: int = 0
    record: dict[str, Any] | None = None


def to_record(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A row as API.md §7 spells a notification."""
    read_at = row["read_at"]
    return {
        "id": str(row["id"]),
        "tenant": row["tenant"],
        "recipient": row["recipient"],
        "type": row["type"],
        "title": row["title"],
        "content": row["content"],
        "priority": row["priority"],
        "data": row["data"],
        "sender": row["sender"],
        "created_at": _iso(row["created_at"]),
        "read_at": None if read_at is None else _iso(read_at),
    }


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class Inbox:
    """Notification records over an `AsyncEngine` (see the module docstring)."""

    def __init__(self, engine: AsyncEngine | str | URL) -> None:
        self.engine = engine if isinstance(engine, AsyncEngine) else create_engine(engine)
        self._writer = self.engine.execution_options(tidings_begin="IMMEDIATE")
        # Reads skip BEGIN (a round trip to the server, or to aiosqlite's thread): each
        # statement is atomic, and PostgreSQL's READ COMMITTED gives every statement its
        # own snapshot anyway. (On SQLite, not via AUTOCOMMIT: the pool would reset the
        # driver's isolation level after every read.)
        if self.engine.dialect.name == "sqlite":
            self._reader = self.engine.execution_options(tidings_begin="NONE")
        else:
            self._reader = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # Unread counts asked for concurrently (a burst of connects, each needing one for
        # its welcome) share one query per round trip; see batching.py.
        self._unread = Coalescer(self._unread_batch, 0, limit=COUNT_BATCH, window=COUNT_WINDOW)
        # SQLite: a connection and its aiosqlite driver kept for _sqlite_unread_batch
        self._counter: tuple[AsyncConnection, Any] | None = None

    @property
    def dialect(self) -> Dialect:
        return self.engine.dialect

    async def close(self) -> None:
        counter, self._counter = self._counter, None
        if counter is not None:
            await counter[0].close()
        await self.engine.dispose()

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        with unavailable():
            async with self._writer.begin() as conn:
                yield conn

    async def _reading(self, work: Callable[[AsyncConnection], Awaitable[R]]) -> R:
        """Run a read; once more if the pooled connection turned out dead.

        After a database restart every pooled connection is dead; SQLAlchemy then
        invalidates the pool, so the second try gets a fresh connection and no read
        fails for the restart. (Writes are not retried: they answer 503 once.)
        """
        with unavailable():
            try:
                async with self._reader.connect() as conn:
                    return await work(conn)
            except sa_exc.DBAPIError as exc:
                if not exc.connection_invalidated:
                    raise
            async with self._reader.connect() as conn:
                return await work(conn)

    async def ping(self) -> bool:
        """Whether the database answers (for /readyz)."""
        try:
            await self._reading(lambda conn: conn.execute(select(1)))
        except BackendUnavailable:
            return False
        return True

    # -- create -------------------------------------------------------------------------

    async def create(self, new: NewNotification) -> list[Created]:
        """Store one record per recipient in one transaction, in recipient order.

        With an idempotency key, a recipient who already has a record under that key
        keeps it: the unique constraint refuses the second row (ON CONFLICT DO NOTHING),
        and the earlier record is read back with ``new`` False.
        """
        now = utcnow()
        rows: list[dict[str, Any]] = [
            {
                "id": new_id(),
                "tenant": new.tenant,
                "recipient": recipient,
                "type": new.type,
                "title": new.title,
                "content": new.content,
                "priority": new.priority,
                "data": new.data,
                "sender": new.sender,
                "created_at": now,
                "read_at": None,
                "idempotency_key": new.idempotency_key,
            }
            for recipient in new.recipients
        ]
        async with self._write() as conn:
            # executemany: SQLAlchemy sends multi-row INSERTs ("insertmanyvalues") from one
            # cached statement, instead of compiling a statement with a VALUES row per row.
            result = await conn.execute(self._insert().returning(C.id), rows)
            inserted: set[uuid.UUID] = set(result.scalars())
            found = {r["recipient"]: r for r in rows if r["id"] in inserted}
            if len(found) < len(rows):
                earlier = [r["recipient"] for r in rows if r["id"] not in inserted]
                query = select(T).where(
                    C.tenant == new.tenant,
                    C.idempotency_key == new.idempotency_key,
                    C.recipient.in_(earlier),
                )
                for earlier_row in (await conn.execute(query)).mappings():
                    found[earlier_row["recipient"]] = dict(earlier_row)
            counts = await unread_counts(conn, new.tenant, [r["recipient"] for r in rows])
        return [
            Created(to_record(row), row["id"] in inserted, counts.get(user, 0))
            for user in new.recipients
            if (row := found.get(user)) is not None  # a retry's earlier record deleted since
        ]

    def _insert(self) -> Any:
        # Both dialects spell ON CONFLICT alike; the generic insert() has no such clause.
        dml = postgresql if self.dialect.name == "postgresql" else sqlite
        return dml.insert(T).on_conflict_do_nothing(
            index_elements=[C.tenant, C.recipient, C.idempotency_key]
        )

    # -- read ---------------------------------------------------------------------------

    async def get(self, tenant: str, user: str, id: uuid.UUID) -> dict[str, Any] | None:
        query = select(T).where(C.id == id, *owned_by(tenant, user))

        async def read(conn: AsyncConnection) -> RowMapping | None:
            return (await conn.execute(query)).mappings().first()

        row = await self._reading(read)
        return None if row is None else to_record(row)

    async def list(self, tenant: str, user: str, query: Query) -> Page:
        """One page, newest first, with the filtered total and the inbox's unread count."""
        where = owned_by(tenant, user)
        if query.unread is not None:
            where.append(C.read_at.is_(None) if query.unread else C.read_at.is_not(None))
        if query.type is not None:
            where.append(C.type == query.type)
        total = counting(where).scalar_subquery().label("total")
        unread = counting(unread_of(tenant, user)).scalar_subquery().label("unread")
        # One round trip: the counts ride along as uncorrelated subqueries (computed once).
        items = (
            select(T, total, unread)
            .where(*where)
            .order_by(C.created_at.desc(), C.id.desc())
            .limit(query.page_size)
            .offset((query.page - 1) * query.page_size)
        )

        async def read(conn: AsyncConnection) -> tuple[Sequence[RowMapping], RowMapping]:
            rows = (await conn.execute(items)).mappings().all()
            # Past the last page (or in an empty inbox) no row carries the counts.
            counts = (
                rows[0] if rows else (await conn.execute(select(total, unread))).mappings().one()
            )
            return rows, counts

        rows, counts = await self._reading(read)
        return Page([to_record(r) for r in rows], counts["total"], counts["unread"])

    async def unread_count(self, tenant: str, user: str) -> int:
        """The user's unread count, read by a statement that starts after this call.

        Concurrent calls are answered together (one statement per tenant and round
        trip); nothing is cached, so the count is as fresh as a query of its own.
        """
        return await self._unread.get((tenant, user))

    async def _unread_batch(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """One statement per tenant, written out as SQL text.

        This is the hot query of every connect: it skips SQLAlchemy's statement building
        and caching (hundreds of µs per call for the IN list or the unnest).
        """
        by_tenant: dict[str, list[str]] = {}
        for tenant, user in keys:
            by_tenant.setdefault(tenant, []).append(user)
        if self.dialect.name == "sqlite":
            return await self._sqlite_unread_batch(by_tenant)

        async def read(conn: AsyncConnection) -> dict[tuple[str, str], int]:
            counts: dict[tuple[str, str], int] = {}
            for tenant, users in by_tenant.items():
                result = await conn.exec_driver_sql(PG_UNREAD, (tenant, users))
                rows = cast(list[tuple[str, int]], result.all())
                counts.update(((tenant, user), count) for user, count in rows)
            return counts

        return await self._reading(read)

    async def _sqlite_unread_batch(
        self, by_tenant: Mapping[str, Sequence[str]]
    ) -> dict[tuple[str, str], int]:
        """SQLite: each statement is one call on the thread of a connection kept for these
        counts (the coalescer runs one batch at a time). A pooled connection would add a
        checkout, and a rollback on its return: each a round trip to aiosqlite's thread,
        which costs more than the count. The connection holds no transaction between
        statements, so it sees every commit and keeps no snapshot (or WAL) alive.
        """
        if self._counter is None:
            with unavailable():
                conn = await self._reader.connect()
                self._counter = conn, (await conn.get_raw_connection()).driver_connection
        counter, driver = self._counter
        counts: dict[tuple[str, str], int] = {}
        try:
            for tenant, users in by_tenant.items():
                rows = await sqlite_unread_counts(driver, tenant, users)
                counts.update(((tenant, user), count) for user, count in rows)
        except BaseException:
            self._counter = None  # the next batch opens a fresh one
            await counter.close()
            raise
        return counts

    # -- change -------------------------------------------------------------------------

    async def mark_one_read(self, tenant: str, user: str, id: uuid.UUID) -> Changed | None:
        """Mark one read (idempotent: `ids` is empty when it already was); None if not theirs."""
        mine = [C.id == id, *owned_by(tenant, user)]
        async with self._write() as conn:
            change = update(T).where(*mine, C.read_at.is_(None)).values(read_at=utcnow())
            row = (await conn.execute(change.returning(*C))).mappings().first()
            changed = Changed(ids=[] if row is None else [str(id)])
            if row is None:
                row = (await conn.execute(select(T).where(*mine))).mappings().first()
                if row is None:
                    return None
            changed.record = to_record(row)
            changed.unread_count = await count_where(conn, unread_of(tenant, user))
        return changed

    async def mark_read(
        self, tenant: str, user: str, ids: Iterable[uuid.UUID] | None = None
    ) -> Changed:
        """Mark these (None: all) of the user's unread notifications read."""
        where = unread_of(tenant, user)
        if ids is not None:
            wanted = list(ids)
            if not wanted:
                return Changed(unread_count=await self.unread_count(tenant, user))
            where.append(C.id.in_(wanted))
        async with self._write() as conn:
            change = update(T).where(*where).values(read_at=utcnow()).returning(C.id)
            changed = Changed(ids=[str(i) for i in (await conn.execute(change)).scalars()])
            changed.unread_count = await count_where(conn, unread_of(tenant, user))
        return changed

    async def delete(self, tenant: str, user: str, id: uuid.UUID) -> Changed | None:
        """Delete one; None if the user has no such notification."""
        async with self._write() as conn:
            gone = delete(T).where(C.id == id, *owned_by(tenant, user)).returning(C.id)
            if (await conn.execute(gone)).first() is None:
                return None
            count = await count_where(conn, unread_of(tenant, user))
        return Changed(ids=[str(id)], unread_count=count)

    async def purge(
        self, older_than: timedelta, progress: Callable[[int], None] | None = None
    ) -> int:
        """Delete every notification created before now - `older_than`; returns how many.

        Works in batches of PURGE_BATCH rows, one short transaction each; `progress`
        hears the running total after each batch.
        """
        cutoff = utcnow() - older_than
        oldest = select(C.id).where(C.created_at < cutoff).limit(PURGE_BATCH)
        total = 0
        while True:
            async with self._write() as conn:
                result = await conn.execute(delete(T).where(C.id.in_(oldest)))
            total += result.rowcount
            if progress is not None:
                progress(total)
            if result.rowcount < PURGE_BATCH:
                return total
