"""SQL shared by the inbox's methods: a user's filters, counts, and the batched unread
count (the hot query of every connect) written out as SQL text for each dialect."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import ColumnElement, Select, String, Table, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import BackendUnavailable
from .models import NotificationRow

T = cast(Table, NotificationRow.__table__)
C = T.c


def owned_by(tenant: str, user: str) -> list[ColumnElement[bool]]:
    return [C.tenant == tenant, C.recipient == user]


def unread_of(tenant: str, user: str) -> list[ColumnElement[bool]]:
    return [*owned_by(tenant, user), C.read_at.is_(None)]


def counting(where: list[ColumnElement[bool]]) -> Select[int]:
    return select(func.count()).select_from(T).where(*where)


async def count_where(conn: AsyncConnection, where: list[ColumnElement[bool]]) -> int:
    return (await conn.execute(counting(where))).scalar_one()


async def unread_counts(conn: AsyncConnection, tenant: str, users: Sequence[str]) -> dict[str, int]:
    if conn.dialect.name == "postgresql":
        # One probe of the unread index per user, the list as one array parameter. (A
        # plain IN filter is fine until PostgreSQL caches a generic plan for the
        # prepared statement: then every row scans the whole parameter list.)
        wanted = func.unnest(bindparam("users", list(users), type_=ARRAY(String)))
        user = wanted.table_valued("recipient").render_derived()
        count = counting([C.tenant == tenant, C.recipient == user.c.recipient, C.read_at.is_(None)])
        query = select(user.c.recipient, count.scalar_subquery())
    else:
        query = (
            select(C.recipient, func.count())
            .where(C.tenant == tenant, C.recipient.in_(users), C.read_at.is_(None))
            .group_by(C.recipient)
        )
    return {user: count for user, count in await conn.execute(query)}


# The batched unread count as SQL text (see store.Inbox._unread_batch). PostgreSQL: one probe of
# the partial unread index per user, as `unread_counts` does (a plan that stays good when
# the prepared statement's plan becomes generic).
PG_UNREAD = (
    f"SELECT w.recipient, (SELECT count(*) FROM {T.name} AS n WHERE n.tenant = $1"
    " AND n.recipient = w.recipient AND n.read_at IS NULL)"
    " FROM unnest($2::varchar[]) AS w(recipient)"
)
_sqlite_unread_sql: dict[int, str] = {}


def _sqlite_unread(size: int) -> str:
    """SQLite's statement for `size` users (a power of two: few texts to prepare)."""
    sql = _sqlite_unread_sql.get(size)
    if sql is None:
        marks = ", ".join("?" * size)
        sql = _sqlite_unread_sql[size] = (
            f"SELECT recipient, count(*) FROM {T.name} WHERE tenant = ?"
            f" AND recipient IN ({marks}) AND read_at IS NULL GROUP BY recipient"
        )
    return sql


async def sqlite_unread_counts(
    driver: Any, tenant: str, users: Sequence[str]
) -> list[tuple[str, int]]:
    """Unread counts of `users` through an aiosqlite connection: one call on its thread."""
    size = 1 << (len(users) - 1).bit_length()
    padded = [*users, *[users[-1]] * (size - len(users))]  # a repeated name counts once
    try:
        sql = _sqlite_unread(size)
        rows: list[tuple[str, int]] = await driver.execute_fetchall(sql, (tenant, *padded))
    except sqlite3.OperationalError as exc:  # what SQLAlchemy would wrap as OperationalError
        raise BackendUnavailable(f"the inbox database does not answer: {exc}") from exc
    return rows
