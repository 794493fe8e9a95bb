"""The `notifications` table: one row per recipient of a notification (API.md §7).

Ids are UUIDv7 (time-ordered), so the primary key index grows at its right
edge on PostgreSQL and sorts like `created_at` within a recipient's inbox.
Times are stored in UTC; SQLite has no time zone, so `UtcDateTime` drops it on
the way in and puts it back on the way out.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    Index,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["PRIORITIES", "Base", "NotificationRow", "UtcDateTime", "new_id", "utcnow"]

PRIORITIES = ("low", "normal", "high", "urgent")


def new_id(ms: int | None = None) -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds (default: now), then 74 random bits."""
    if ms is None:
        ms = time.time_ns() // 1_000_000
    value = ms << 80 | int.from_bytes(os.urandom(10))
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant
    return uuid.UUID(int=value)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every database (naive values are refused)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware one (UTC)")
        value = value.astimezone(UTC)
        # SQLite stores text; one fixed zone keeps its comparisons right.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class NotificationRow(Base):
    __tablename__ = "notifications"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    recipient: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(200))
    content: Mapped[str] = mapped_column(Text)
    priority: Mapped[str] = mapped_column(String(8))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    sender: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    read_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        # NULL keys never conflict (NULLs are distinct on both databases).
        UniqueConstraint("tenant", "recipient", "idempotency_key"),
        CheckConstraint(f"priority IN ({', '.join(map(repr, PRIORITIES))})", name="priority"),
        # A page of one inbox, newest first (id breaks ties in the same microsecond).
        Index(
            "ix_notifications_inbox",
            "tenant",
            "recipient",
            created_at.desc(),
            id.desc(),
        ),
        # Unread counts and `unread=true` pages read only the unread rows.
        Index(
            "ix_notifications_unread",
            "tenant",
            "recipient",
            created_at.desc(),
            sqlite_where=read_at.is_(None),
            postgresql_where=read_at.is_(None),
        ),
        # The retention purge walks the oldest rows of every inbox.
        Index("ix_notifications_created_at", "created_at"),
    )
