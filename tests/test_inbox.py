"""The inbox below HTTP: records, paging, idempotency, concurrency, retention, migrations.

Every test runs on SQLite (a file in tmp_path) and on the real PostgreSQL at
127.0.0.1:5432 (a throwaway database per test session, dropped at the end),
through the one parametrised `db_url` fixture; test_inbox_api.py imports it.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, func, insert, inspect, select, text

from tidings import Hub, Principal, Settings
from tidings.connection import SSEConnection
from tidings.errors import BackendUnavailable, ConfigError, InvalidRequest
from tidings.inbox import Inbox, InboxService, NewNotification, Query, commands, new_notification
from tidings.inbox.migrations import (
    VERSION_TABLE,
    downgrade_to_base,
    head_revision,
    is_up_to_date,
    schema_revisions,
    upgrade_to_head,
)
from tidings.inbox.models import Base, NotificationRow, new_id
from tidings.inbox.store import create_engine
from tidings.wire import SSEEvent, SSEParser

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/{}"
T = NotificationRow.__table__

# -- databases ------------------------------------------------------------------------------


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _pg_database(name: str) -> str:
    """Create a throwaway database; skip (visibly) when PostgreSQL does not answer."""
    try:
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432 ({exc!r})")
    return PG_URL.format(name)


def _pg_drop(name: str) -> None:
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_session_url() -> Iterator[str]:
    """One migrated PostgreSQL database for the whole session."""
    name = "tidings_test_" + secrets.token_hex(4)
    url = _pg_database(name)
    try:
        asyncio.run(upgrade_to_head(url))
        yield url
    finally:
        _pg_drop(name)


@pytest.fixture
def fresh_pg() -> Iterator[str]:
    """An empty PostgreSQL database (no schema) for this test only."""
    name = "tidings_test_" + secrets.token_hex(4)
    url = _pg_database(name)
    yield url
    _pg_drop(name)


async def _clear(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(T.delete())
    finally:
        await engine.dispose()


DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty inbox database: SQLite in tmp_path, or the session's PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'inbox.db'}"
        asyncio.run(upgrade_to_head(url))
        return url
    url: str = request.getfixturevalue("pg_session_url")
    asyncio.run(_clear(url))
    return url


@pytest.fixture(params=DATABASES)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database without any schema."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    url: str = request.getfixturevalue("fresh_pg")
    return url


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
async def inbox(db_url: str) -> AsyncIterator[Inbox]:
    store = Inbox(db_url)
    yield store
    await store.close()


@pytest.fixture
async def hub(db_url: str) -> AsyncIterator[Hub]:
    """A running hub (memory broker) with an inbox on the test database."""
    hub = Hub(Settings(database_url=db_url, inbox_retention=0))
    hub.inbox = InboxService.from_settings(hub)
    async with hub:
        yield hub


def new(recipients: list[str], **fields: Any) -> NewNotification:
    values: dict[str, Any] = {"type": "system", "title": "hello", "tenant": "acme"}
    values.update(fields)
    return new_notification(recipients, **values)


class Listener:
    """A connection of `user` attached to the hub's broker, read without a socket."""

    def __init__(self, hub: Hub, user: str, tenant: str = "acme") -> None:
        who = Principal(user, tenant)
        self.conn = SSEConnection(who, hub.streams_for(who, []), limit=10_000)
        self.parser = SSEParser()
        self.hub = hub

    async def attach(self) -> Listener:
        broker = self.hub.broker
        broker.release(self.conn, await broker.attach(self.conn, None))
        return self

    def events(self) -> list[SSEEvent]:
        """Events delivered since the last call (the memory broker delivers at once)."""
        return [e for frame in self.conn.drain() for e in self.parser.feed(frame)]


async def unread_rows(url: str, tenant: str, user: str) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            query = select(func.count()).where(
                T.c.tenant == tenant, T.c.recipient == user, T.c.read_at.is_(None)
            )
            return int((await conn.execute(query)).scalar_one())
    finally:
        await engine.dispose()


# -- migrations -----------------------------------------------------------------------------


def _diff(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return list(compare_metadata(context, Base.metadata))


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


async def test_migrations_upgrade_from_empty_to_head_and_back(empty_db_url: str) -> None:
    url = empty_db_url
    assert await schema_revisions(url) == (None, head_revision())
    assert not await is_up_to_date(url)

    await upgrade_to_head(url)
    assert await is_up_to_date(url)
    await upgrade_to_head(url)  # nothing left to do: a no-op
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            assert {"notifications", VERSION_TABLE} <= await conn.run_sync(_tables)
            # The migration builds exactly what the models describe.
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()

    await downgrade_to_base(url)
    assert await schema_revisions(url) == (None, head_revision())
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            assert "notifications" not in await conn.run_sync(_tables)
    finally:
        await engine.dispose()


async def test_start_migrates_sqlite_and_refuses_an_old_postgresql_schema(
    empty_db_url: str,
) -> None:
    hub = Hub(Settings(database_url=empty_db_url))
    service = InboxService.from_settings(hub)
    if service.store.dialect.name == "sqlite":
        await service.start()
        assert await is_up_to_date(empty_db_url)
        await service.stop()
        return
    with pytest.raises(ConfigError, match="tidings migrate"):
        await service.start()
    await service.stop()
    # Lazily started (an app mounted without its lifespan), the same is a 503.
    with pytest.raises(BackendUnavailable, match="tidings migrate"):
        await service.unread_count(Principal("alice"))
    await service.stop()


def test_migrate_and_purge_commands(empty_db_url: str) -> None:
    settings = Settings(database_url=empty_db_url, inbox_retention="1h")
    with pytest.raises(ConfigError, match="tidings migrate"):
        commands.purge(settings)
    done = commands.migrate(settings)
    assert done["from"] is None and done["to"] == head_revision()
    assert commands.migrate(settings)["from"] == head_revision()  # again: nothing to do
    assert commands.purge(settings) == 0
    assert commands.purge(settings.model_copy(update={"inbox_retention": 0})) == 0


def test_migrate_command_says_when_the_database_does_not_answer() -> None:
    settings = Settings(database_url="postgresql+asyncpg://app:pw@127.0.0.1:1/nowhere")
    with pytest.raises(BackendUnavailable, match=r"cannot reach .*app:\*\*\*@127.0.0.1:1"):
        commands.migrate(settings)


# -- create ---------------------------------------------------------------------------------


async def test_create_stores_one_record_per_recipient(inbox: Inbox) -> None:
    created = await inbox.create(
        new(["alice", "bob", "alice"], priority="high", data={"order": 42}, content="body")
    )
    assert [c.record["recipient"] for c in created] == ["alice", "bob"]
    assert all(c.new and c.unread_count == 1 for c in created)
    record = created[0].record
    assert uuid.UUID(record["id"]).version == 7
    assert record["created_at"].endswith("Z") and record["read_at"] is None
    assert datetime.fromisoformat(record["created_at"]).tzinfo is not None
    assert {k: record[k] for k in ("tenant", "type", "title", "content", "priority", "data")} == {
        "tenant": "acme",
        "type": "system",
        "title": "hello",
        "content": "body",
        "priority": "high",
        "data": {"order": 42},
    }
    assert await inbox.get("acme", "alice", uuid.UUID(record["id"])) == record


async def test_chinese_text_round_trips(inbox: Inbox) -> None:
    sender = {"id": "u-7", "username": "张三", "avatar": "https://example.com/张三.png"}
    [created] = await inbox.create(
        new(["李四"], title="工资已发放", content="十月工资 ¥12,345 已到账 🎉", sender=sender)
    )
    got = await inbox.get("acme", "李四", uuid.UUID(created.record["id"]))
    assert got is not None
    assert got["title"] == "工资已发放" and got["sender"]["username"] == "张三"
    assert got["content"] == "十月工资 ¥12,345 已到账 🎉" and got["recipient"] == "李四"


async def test_idempotency_key_stores_once(inbox: Inbox) -> None:
    first = await inbox.create(new(["alice", "bob"], idempotency_key="pay-2026-10"))
    again = await inbox.create(new(["alice", "bob", "carol"], idempotency_key="pay-2026-10"))
    assert [c.new for c in again] == [False, False, True]
    assert [c.record for c in again[:2]] == [c.record for c in first]
    # The key is per tenant: another tenant's same key is another notification.
    [other] = await inbox.create(new(["alice"], tenant="globex", idempotency_key="pay-2026-10"))
    assert other.new
    page = await inbox.list("acme", "alice", Query())
    assert page.total == 1


async def test_concurrent_retries_store_one_record(inbox: Inbox) -> None:
    results = await asyncio.gather(
        *(inbox.create(new(["alice", "bob"], idempotency_key="once")) for _ in range(12))
    )
    assert sum(c.new for created in results for c in created) == 2
    ids = {c.record["id"] for created in results for c in created}
    assert len(ids) == 2
    assert (await inbox.list("acme", "alice", Query())).total == 1


# -- read -----------------------------------------------------------------------------------


async def test_list_pages_newest_first_with_filters(inbox: Inbox) -> None:
    for i in range(25):
        await inbox.create(new(["alice"], type="like" if i % 2 else "comment", title=f"n{i}"))
    await inbox.create(new(["bob"], title="not alice's"))
    first = await inbox.list("acme", "alice", Query(page=1, page_size=10))
    assert [r["title"] for r in first.items] == [f"n{i}" for i in range(24, 14, -1)]
    assert (first.total, first.unread_count) == (25, 25)
    last = await inbox.list("acme", "alice", Query(page=3, page_size=10))
    assert [r["title"] for r in last.items] == [f"n{i}" for i in range(4, -1, -1)]
    assert (await inbox.list("acme", "alice", Query(page=4, page_size=10))).items == []

    likes = await inbox.list("acme", "alice", Query(type="like", page_size=100))
    assert likes.total == 12 and all(r["type"] == "like" for r in likes.items)
    read = [uuid.UUID(r["id"]) for r in likes.items[:5]]
    await inbox.mark_read("acme", "alice", read)
    unread = await inbox.list("acme", "alice", Query(unread=True, page_size=100))
    assert (unread.total, unread.unread_count, len(unread.items)) == (20, 20, 20)
    assert all(r["read_at"] is None for r in unread.items)
    seen = await inbox.list("acme", "alice", Query(unread=False))
    assert seen.total == 5 and all(r["read_at"] for r in seen.items)
    unread_comments = await inbox.list("acme", "alice", Query(unread=True, type="comment"))
    assert unread_comments.total == 13


async def test_mark_read_one_many_all_and_delete(inbox: Inbox) -> None:
    created = await inbox.create(new(["alice"]))
    ids = [uuid.UUID(c.record["id"]) for c in created]
    ids += [uuid.UUID((await inbox.create(new(["alice"])))[0].record["id"]) for _ in range(4)]

    once = await inbox.mark_one_read("acme", "alice", ids[0])
    assert once is not None and once.ids == [str(ids[0])] and once.unread_count == 4
    assert once.record is not None and once.record["read_at"] is not None
    twice = await inbox.mark_one_read("acme", "alice", ids[0])  # idempotent
    assert twice is not None and twice.ids == [] and twice.unread_count == 4
    assert twice.record == once.record

    many = await inbox.mark_read("acme", "alice", [ids[0], ids[1], ids[2]])
    assert sorted(many.ids) == sorted(map(str, ids[1:3])) and many.unread_count == 2
    every = await inbox.mark_read("acme", "alice", None)
    assert sorted(every.ids) == sorted(map(str, ids[3:])) and every.unread_count == 0
    assert (await inbox.mark_read("acme", "alice", None)).ids == []

    await inbox.create(new(["alice"]))
    gone = await inbox.delete("acme", "alice", ids[0])
    assert gone is not None and gone.ids == [str(ids[0])] and gone.unread_count == 1
    assert await inbox.delete("acme", "alice", ids[0]) is None
    assert await inbox.get("acme", "alice", ids[0]) is None


async def test_walls_between_users_and_tenants(inbox: Inbox) -> None:
    [mine] = await inbox.create(new(["alice"]))
    key = uuid.UUID(mine.record["id"])
    for tenant, user in (("acme", "bob"), ("globex", "alice"), ("", "alice")):
        assert await inbox.get(tenant, user, key) is None
        assert await inbox.mark_one_read(tenant, user, key) is None
        assert (await inbox.mark_read(tenant, user, [key])).ids == []
        assert (await inbox.mark_read(tenant, user, None)).ids == []
        assert await inbox.delete(tenant, user, key) is None
        assert (await inbox.list(tenant, user, Query())).total == 0
    assert await inbox.unread_count("acme", "alice") == 1
    assert await inbox.get("acme", "alice", new_id()) is None


# -- retention ------------------------------------------------------------------------------


async def _insert_aged(url: str, user: str, ages: list[timedelta]) -> None:
    now = datetime.now(UTC)
    rows = [
        {
            "id": new_id(),
            "tenant": "acme",
            "recipient": user,
            "type": "system",
            "title": f"{age}",
            "content": "",
            "priority": "normal",
            "data": {},
            "sender": None,
            "created_at": now - age,
            "read_at": None,
            "idempotency_key": None,
        }
        for age in ages
    ]
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(T), rows)
    finally:
        await engine.dispose()


async def test_purge_deletes_only_what_is_older_than_retention(db_url: str, inbox: Inbox) -> None:
    days = [timedelta(days=d) for d in (1, 30, 89, 91, 120, 400)]
    await _insert_aged(db_url, "alice", days)
    assert await inbox.purge(timedelta(days=90)) == 3
    page = await inbox.list("acme", "alice", Query())
    assert sorted(r["title"] for r in page.items) == sorted(str(d) for d in days[:3])
    assert await inbox.purge(timedelta(days=90)) == 0


async def test_purge_works_in_batches(db_url: str, inbox: Inbox) -> None:
    from tidings.inbox import store

    await _insert_aged(db_url, "alice", [timedelta(days=100)] * 7 + [timedelta(days=1)])
    batch, store.PURGE_BATCH = store.PURGE_BATCH, 3
    seen: list[int] = []
    try:
        assert await inbox.purge(timedelta(days=90), seen.append) == 7
        assert seen == [3, 6, 7]
    finally:
        store.PURGE_BATCH = batch
    assert await inbox.unread_count("acme", "alice") == 1


async def test_periodic_purge_runs_with_the_inbox(db_url: str) -> None:
    await _insert_aged(db_url, "alice", [timedelta(days=10), timedelta(hours=1)])
    hub = Hub(Settings(database_url=db_url, inbox_retention="7d"))
    hub.inbox = InboxService.from_settings(hub)
    async with hub:
        await asyncio.wait_for(hub.inbox.purged.wait(), 10)
        assert await hub.inbox.unread_count(Principal("alice", "acme")) == 1


# -- the service: pushes --------------------------------------------------------------------


async def test_notify_stores_then_pushes_with_the_unread_count(hub: Hub) -> None:
    alice = await Listener(hub, "alice").attach()
    bob_elsewhere = await Listener(hub, "bob", tenant="globex").attach()
    records = await hub.notify(
        ["alice", "bob"],
        tenant="acme",
        type="salary",
        title="工资已发放",
        content="十月",
        sender={"username": "张三"},
    )
    assert [r["recipient"] for r in records] == ["alice", "bob"]
    [event] = alice.events()
    assert event.event == "message" and event.id
    data = event.json()
    assert data == {**records[0], "unread_count": 1}
    assert data["sender"] == {"id": None, "username": "张三", "avatar": None}
    assert bob_elsewhere.events() == []  # same user id, other tenant: nothing

    await hub.notify("alice", tenant="acme", type="x", title="second")
    assert [e.json()["unread_count"] for e in alice.events()] == [2]


async def test_notify_retry_pushes_nothing_new(hub: Hub) -> None:
    alice = await Listener(hub, "alice").attach()
    first = await hub.notify("alice", tenant="acme", type="x", title="t", idempotency_key="k1")
    again = await hub.notify("alice", tenant="acme", type="x", title="t", idempotency_key="k1")
    assert again == first
    assert len(alice.events()) == 1


async def test_read_and_delete_sync_every_connection(hub: Hub) -> None:
    assert hub.inbox is not None
    phone, laptop = await Listener(hub, "alice").attach(), await Listener(hub, "alice").attach()
    records = await hub.notify(["alice"] * 1, tenant="acme", type="x", title="a")
    records += await hub.notify(["alice"], tenant="acme", type="x", title="b")
    records += await hub.notify(["alice"], tenant="acme", type="x", title="c")
    phone.events(), laptop.events()
    alice = Principal("alice", "acme")
    ids = [r["id"] for r in records]

    answer = await hub.inbox.mark_one_read(alice, ids[0])
    assert answer["unread_count"] == 2
    for device in (phone, laptop):
        [event] = device.events()
        assert (event.event, event.json()) == (
            "notification.read",
            {"ids": [ids[0]], "unread_count": 2},
        )

    # Already read: nothing changes, but every device still hears the (same) count,
    # the acknowledgement a device that lost the race to read it waits for.
    await hub.inbox.mark_one_read(alice, ids[0])
    for device in (phone, laptop):
        assert [e.json() for e in device.events()] == [{"ids": [], "unread_count": 2}]

    assert await hub.inbox.mark_read(alice, [ids[1], "not-a-uuid"]) == {
        "updated": 1,
        "unread_count": 1,
    }
    assert [e.json() for e in laptop.events()] == [{"ids": [ids[1]], "unread_count": 1}]

    await hub.inbox.delete(alice, ids[2])
    for device in (phone, laptop):
        event = device.events()[-1]
        assert (event.event, event.json()) == (
            "notification.deleted",
            {"ids": [ids[2]], "unread_count": 0},
        )

    await hub.notify("alice", tenant="acme", type="x", title="d")
    assert (await hub.inbox.mark_all_read(alice))["updated"] == 1
    assert laptop.events()[-1].json()["unread_count"] == 0


async def test_concurrent_creates_and_reads_keep_the_count_true(db_url: str, hub: Hub) -> None:
    """Many concurrent creates and mark-reads for one user: the stored count equals the
    unread rows, and the last count pushed (what a badge shows) equals both."""
    assert hub.inbox is not None
    service = hub.inbox
    badge = await Listener(hub, "alice").attach()
    alice = Principal("alice", "acme")
    created: list[str] = []

    async def create(i: int) -> None:
        records = await hub.notify(["alice", f"user{i}"], tenant="acme", type="x", title=f"{i}")
        created.append(records[0]["id"])

    async def read_some() -> None:
        await service.mark_read(alice, list(created[-3:]))

    async def read_all() -> None:
        await service.mark_all_read(alice)

    jobs = [create(i) for i in range(40)]
    jobs += [read_some() for _ in range(15)] + [read_all() for _ in range(3)]
    jobs = [jobs[i] for i in sorted(range(len(jobs)), key=lambda i: (i * 7919) % len(jobs))]
    await asyncio.gather(*jobs)

    rows = await unread_rows(db_url, "acme", "alice")
    assert await service.unread_count(alice) == rows
    assert (await service.list(alice, Query(unread=True, page_size=100)))["total"] == rows
    counts = [e.json()["unread_count"] for e in badge.events()]
    assert len(counts) >= 40 and counts[-1] == rows


# -- hub.notify: validation and configuration -----------------------------------------------


async def test_hub_notify_without_inbox_says_how_to_get_one() -> None:
    with pytest.raises(RuntimeError, match="no inbox"):
        await Hub().notify(["alice"], type="x", title="t")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"priority": "critical"}, "priority"),
        ({"data": ["not", "an", "object"]}, "data"),
        ({"data": {"tags": {"a", "b"}}}, "data"),
        ({"title": "x" * 201}, "title"),
        ({"title": ""}, "title"),
        ({"content": "x" * 10_001}, "content"),
        ({"type": ""}, "type"),
        ({"type": "t" * 65}, "type"),
        ({"recipients": []}, "recipients"),
        ({"recipients": [""]}, "recipients"),
        ({"recipients": [f"u{i}" for i in range(1001)]}, "at most 1000"),
        ({"sender": {"username": 7}}, "sender.username"),
        ({"sender": {"name": "x"}}, "unknown fields"),
        ({"idempotency_key": ""}, "idempotency_key"),
    ],
)
async def test_hub_notify_validates(db_url: str, fields: dict[str, Any], message: str) -> None:
    hub = Hub(Settings(database_url=db_url, inbox_retention=0))
    hub.inbox = InboxService.from_settings(hub)
    values: dict[str, Any] = {"recipients": ["alice"], "type": "x", "title": "t", **fields}
    async with hub:
        with pytest.raises(InvalidRequest, match=message):
            await hub.notify(values.pop("recipients"), **values)
        assert await hub.inbox.unread_count(Principal("alice")) == 0


async def test_limits_are_inclusive(hub: Hub) -> None:
    [record] = await hub.notify(
        ["u" * 128], type="t" * 64, title="题" * 200, content="内" * 10_000, priority="urgent"
    )
    assert len(record["title"]) == 200 and len(record["content"]) == 10_000


async def test_unreachable_database_is_unavailable_not_a_crash() -> None:
    store = Inbox("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(BackendUnavailable):
            await store.unread_count("acme", "alice")
        assert not await store.ping()
    finally:
        await store.close()


async def _drop_connections(url: str) -> None:
    """What a database restart does to a pool: every connection dies."""
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        # With a timeout, pg_terminate_backend returns once the backend has exited.
        await conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
    finally:
        await conn.close()


@pytest.mark.integration
async def test_a_restarted_postgresql_costs_no_read_and_at_most_one_write(
    pg_session_url: str,
) -> None:
    await _clear(pg_session_url)
    store = Inbox(pg_session_url)
    try:
        await store.create(new(["alice"]))
        await _drop_connections(pg_session_url)
        assert await store.unread_count("acme", "alice") == 1  # retried on a fresh connection
        await _drop_connections(pg_session_url)
        with pytest.raises(BackendUnavailable):  # a write is not retried: 503 once
            await store.create(new(["alice"]))
        await store.create(new(["alice"]))
        assert (await store.list("acme", "alice", Query())).total == 2
    finally:
        await store.close()


async def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'wal.db'}")  # the sync URL works too
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar() == 5000
    finally:
        await engine.dispose()
