"""`InboxService`: store first, push second (ARCHITECTURE.md, "Storage first").

A new record goes to its recipient's personal stream as a NOTIFICATION event
(SSE: a `message` whose data is the record plus `unread_count`); reading or
deleting goes there as a SYNC event (`notification.read` /
`notification.deleted`, data ``{"ids", "unread_count"}``). Personal streams
have history, so a client that was briefly away gets them through
`Last-Event-ID`, and every connection of the user — the acting one too — sees
the new count.

Badges must not drift: the last count a client hears must be the count. Writes
for one user therefore run one at a time in this process (striped locks held
from the transaction through its push), so the pushes leave in commit order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from ..auth import Principal
from ..errors import BackendUnavailable, ConfigError, NotFound
from ..event import NOTIFICATION, SYNC, user_stream
from .migrations import schema_revisions, upgrade_to_head
from .schema import NewNotification, Query, parse_id
from .store import Changed, Inbox

if TYPE_CHECKING:
    from ..config import Settings
    from ..hub import Hub

__all__ = ["InboxService"]

log = logging.getLogger("tidings.inbox")

LOCK_STRIPES = 64  # per-user write locks, hashed; bounded memory for any number of users
PURGE_INTERVAL = 3600.0  # seconds between retention purges (the first runs at start)
READ, DELETED = "notification.read", "notification.deleted"


class InboxService:
    """The inbox as routes and `Hub.notify` use it: records plus their live pushes.

    Args:
        store: the records.
        hub: where pushes go (its `emit`).
        retention: seconds a notification is kept; 0 keeps them forever.
        migrate: apply migrations at start (default: on SQLite only). Otherwise
            start refuses a schema that is not at the code's head revision.
    """

    def __init__(
        self, store: Inbox, hub: Hub, *, retention: float = 0.0, migrate: bool | None = None
    ) -> None:
        self.store = store
        self.hub = hub
        self.retention = retention
        self.migrate = store.dialect.name == "sqlite" if migrate is None else migrate
        self.purged = asyncio.Event()  # set after each periodic purge (tests wait on it)
        self._locks = [asyncio.Lock() for _ in range(LOCK_STRIPES)]
        self._start_lock = asyncio.Lock()
        self._started = False
        self._purger: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, hub: Hub, settings: Settings | None = None) -> InboxService:
        """TIDINGS_DATABASE_URL and TIDINGS_INBOX_RETENTION (default: the hub's settings)."""
        settings = settings or hub.settings
        return cls(Inbox(settings.database_url), hub, retention=settings.inbox_retention)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Migrate (SQLite) or check the schema (PostgreSQL), then start the purge.

        Raises ConfigError when the schema is not at head and `migrate` is off.
        """
        async with self._start_lock:
            if self._started:
                return
            try:
                await self._check_schema()
            except (OSError, sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
                raise BackendUnavailable(f"the inbox database does not answer: {exc}") from exc
            if self.retention > 0:
                self._purger = asyncio.create_task(self._purge_periodically(), name="inbox-purge")
            self._started = True

    async def _check_schema(self) -> None:
        engine = self.store.engine
        if self.migrate:
            await upgrade_to_head(engine)
            return
        current, head = await schema_revisions(engine)
        if current != head:
            where = make_url(engine.url).render_as_string(hide_password=True)
            found = f"is at revision {current}" if current else "has no tidings schema yet"
            raise ConfigError(
                f"the inbox database {where} {found}; this tidings needs revision {head}. "
                f"Run `tidings migrate` (with the same TIDINGS_DATABASE_URL), then start again."
            )

    async def stop(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            await asyncio.gather(self._purger, return_exceptions=True)
            self._purger = None
        self._started = False
        await self.store.close()

    async def _ready(self) -> None:
        """Start lazily (an app mounted without its lifespan) and make sure pushes can go."""
        if not self._started:
            try:
                await self.start()
            except ConfigError as exc:
                raise BackendUnavailable(str(exc)) from exc
        if not self.hub.running:
            await self.hub.start()

    async def ping(self) -> bool:
        return await self.store.ping()

    # -- create ---------------------------------------------------------------------------

    async def notify(self, new: NewNotification) -> list[dict[str, Any]]:
        """Store a record per recipient, then push each new one; returns the records.

        A retry with the same idempotency key returns the records the first call
        stored and pushes nothing.
        """
        await self._ready()
        async with self._serial(new.tenant, new.recipients):
            created = await self.store.create(new)
            for item in created:
                if item.new:
                    data = {**item.record, "unread_count": item.unread_count}
                    await self._push(new.tenant, item.record["recipient"], "message", data)
        return [item.record for item in created]

    # -- one user's inbox -----------------------------------------------------------------

    async def unread_count(self, who: Principal) -> int:
        await self._ready()
        return await self.store.unread_count(who.tenant, who.user_id)

    async def list(self, who: Principal, query: Query) -> dict[str, Any]:
        await self._ready()
        page = await self.store.list(who.tenant, who.user_id, query)
        return {
            "items": page.items,
            "page": query.page,
            "page_size": query.page_size,
            "total": page.total,
            "unread_count": page.unread_count,
        }

    async def get(self, who: Principal, id: str) -> dict[str, Any]:
        await self._ready()
        key = parse_id(id)
        record = None if key is None else await self.store.get(who.tenant, who.user_id, key)
        if record is None:
            raise NotFound("no such notification")
        return record

    async def mark_one_read(self, who: Principal, id: str) -> dict[str, Any]:
        """Idempotent: reading a read notification changes nothing (its push names no ids)."""
        await self._ready()
        key = parse_id(id)
        if key is None:
            raise NotFound("no such notification")
        async with self._serial(who.tenant, [who.user_id]):
            changed = await self.store.mark_one_read(who.tenant, who.user_id, key)
            if changed is None:
                raise NotFound("no such notification")
            await self._sync(who, READ, changed)
        return {"notification": changed.record, "unread_count": changed.unread_count}

    async def mark_read(self, who: Principal, ids: Iterable[str]) -> dict[str, Any]:
        """Mark these read; ids that are not the user's (or not UUIDs) are not counted."""
        await self._ready()
        keys = {key for id in ids if (key := parse_id(id)) is not None}
        async with self._serial(who.tenant, [who.user_id]):
            changed = await self.store.mark_read(who.tenant, who.user_id, keys)
            await self._sync(who, READ, changed)
        return {"updated": len(changed.ids), "unread_count": changed.unread_count}

    async def mark_all_read(self, who: Principal) -> dict[str, Any]:
        await self._ready()
        async with self._serial(who.tenant, [who.user_id]):
            changed = await self.store.mark_read(who.tenant, who.user_id, None)
            await self._sync(who, READ, changed)
        return {"updated": len(changed.ids), "unread_count": changed.unread_count}

    async def delete(self, who: Principal, id: str) -> None:
        await self._ready()
        key = parse_id(id)
        if key is None:
            raise NotFound("no such notification")
        async with self._serial(who.tenant, [who.user_id]):
            changed = await self.store.delete(who.tenant, who.user_id, key)
            if changed is None:
                raise NotFound("no such notification")
            await self._sync(who, DELETED, changed)

    # -- retention ------------------------------------------------------------------------

    async def purge(self, older_than: float | None = None) -> int:
        """Delete notifications older than `older_than` seconds (default: the retention)."""
        seconds = self.retention if older_than is None else older_than
        if seconds <= 0:
            return 0
        if not self._started:
            await self.start()
        return await self.store.purge(timedelta(seconds=seconds))

    async def _purge_periodically(self) -> None:
        while True:
            try:
                removed = await self.store.purge(timedelta(seconds=self.retention))
                if removed:
                    log.info("inbox retention: removed %d notifications", removed)
            except Exception:
                # A database that is briefly away must not end the purge for good.
                log.warning("inbox retention purge failed; retrying later", exc_info=True)
            self.purged.set()
            await asyncio.sleep(PURGE_INTERVAL)

    # -- plumbing -------------------------------------------------------------------------

    @asynccontextmanager
    async def _serial(self, tenant: str, users: Sequence[str]) -> AsyncIterator[None]:
        # Stripes are taken in index order, so two multi-user writes cannot deadlock.
        stripes = sorted({hash((tenant, user)) % LOCK_STRIPES for user in users})
        async with AsyncExitStack() as stack:
            for stripe in stripes:
                await stack.enter_async_context(self._locks[stripe])
            yield

    async def _sync(self, who: Principal, name: str, changed: Changed) -> None:
        # Pushed even when nothing changed (`ids` empty): it is the acknowledgement a
        # device waits for, e.g. when another device read the same notification first.
        data = {"ids": changed.ids, "unread_count": changed.unread_count}
        await self._push(who.tenant, who.user_id, name, data, kind=SYNC)

    async def _push(
        self, tenant: str, user: str, name: str, data: Any, *, kind: str = NOTIFICATION
    ) -> None:
        try:
            await self.hub.emit(tenant, [user_stream(user)], name, data, kind=kind)
        except Exception:
            # The record is committed: the user sees it in the inbox on the next fetch.
            log.warning(
                "inbox push %s to %r failed; the change is stored", name, user, exc_info=True
            )
