"""Presence and stats across instances: who is online, on how many connections.

Every instance knows its own connections exactly (the broker's registry). To
answer for the whole service, each instance also writes a summary of them to
a shared *presence store* on the broker's server (Redis or NATS), chosen by
the scheme of ``TIDINGS_BROKER_URL``; with ``memory://`` there is no store
and this instance is the whole service.

Writing stays off the hot path: connect and disconnect only add the stream
key to a set (`Broker.touched`); a periodic flush (every
``TIDINGS_PRESENCE_INTERVAL``, default 1 s) writes what changed since the last
flush — per user and per topic, never the whole tenant — together with a
heartbeat that keeps this instance's record alive for ``TIDINGS_PRESENCE_TTL``
(default 10 s). On shutdown the instance removes its record at once; after a
crash (``kill -9``) the record expires with the heartbeat and the next
instance to flush deletes what it left behind.

Reads merge the live local state of this instance with the stored records of
every *other* live instance. Staleness bound: what happens on another instance
shows here within one flush interval (plus a round trip); a crashed instance's
users disappear within ``TIDINGS_PRESENCE_TTL``. This instance's own
connections are always exact.

Stats: connections, users and topics are summed (connections) or counted
distinct (users, topics) across instances; message counters are each
instance's own, summed (others' as of their last flush). Tenants stay walls:
a tenant's stats and presence read only that tenant's records.

The store's interface and the types it shares are presence_store.py's
(re-exported here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from .broker import Broker, TenantCounts
from .event import stream_key, user_stream
from .presence_store import (
    TOPIC,
    USER,
    Change,
    InstanceView,
    PresenceStore,
    Summary,
    TenantView,
    create_presence_store,
    decode_summary,
    new_instance_id,
)

__all__ = [
    "Change",
    "InstanceView",
    "Presence",
    "PresenceStore",
    "Summary",
    "TenantView",
    "create_presence_store",
    "decode_summary",
    "new_instance_id",
]

log = logging.getLogger("tidings.presence")


def _kind(key: str) -> Change | None:
    tenant, _, stream = key.partition("\x1f")
    if stream.startswith("u:"):
        return tenant, USER, stream[2:]
    if stream.startswith("t:"):
        return tenant, TOPIC, stream[2:]
    return None


def _summary(counts: TenantCounts) -> Summary:
    return (counts.connections, counts.published, counts.delivered, counts.dropped)


class Presence:
    """This instance's presence, and through `store` every other instance's.

    Without a store (``memory://``) it answers from the local broker alone.
    """

    def __init__(
        self,
        broker: Broker,
        store: PresenceStore | None = None,
        *,
        instance: str | None = None,
        interval: float = 1.0,
        is_running: Callable[[], bool] = lambda: True,
    ) -> None:
        self.broker = broker
        self.store = store
        self.instance = instance or new_instance_id()
        self.interval = interval
        self.host = socket.gethostname()
        self.started_at = time.time()
        self._started = time.monotonic()
        self._is_running = is_running
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._sent: dict[Change, int] = {}  # reader counts as the store has them
        self._sent_kinds = {USER: 0, TOPIC: 0}  # how many users, topics in `_sent`
        self._sent_summaries: dict[str, Summary] = {}
        self._full = True  # rewrite everything at the next flush
        self._failing = False
        self.flushes = 0  # successful flushes (for tests and logs)

    @property
    def shared(self) -> bool:
        return self.store is not None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the store and register this instance (first flush), then flush
        periodically. Raises BackendUnavailable when the store does not answer."""
        self.started_at = time.time()
        self._started = time.monotonic()
        if self.store is None or self._task is not None:
            return
        self.broker.touched = set()
        self._stopping = False
        self._full = True  # a restarted hub: the store may hold anything of ours, or nothing
        await self.store.open()
        try:
            await self.flush()
        except BaseException:
            await self.store.close()
            raise
        self._task = asyncio.create_task(self._run(), name="tidings-presence")

    async def stop(self) -> None:
        """Stop flushing and remove this instance's record (best effort)."""
        task, self._task = self._task, None
        if task is None or self.store is None:
            return
        # A client library may swallow the cancellation of a flush in flight: the flag
        # ends the loop then, and the wait is bounded whatever happens.
        self._stopping = True
        task.cancel()
        await asyncio.wait({task}, timeout=5.0)
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("presence flush loop failed", exc_info=task.exception())
        try:
            async with asyncio.timeout(5.0):
                await self.store.remove()
        except Exception as exc:
            log.warning("could not remove this instance's presence (it expires): %s", exc)
        with contextlib.suppress(Exception):
            await self.store.close()
        self.broker.touched = None

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.interval)
            if self._stopping:
                return
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._full = True  # what reached the store is unknown: rewrite it all
                if not self._failing:
                    log.warning("presence flush failed (%s); retrying every flush", exc)
                self._failing = True
            else:
                if self._failing:
                    log.warning("presence flush works again")
                self._failing = False

    async def flush(self) -> None:
        """Heartbeat, then write what changed since the last flush (or everything)."""
        store = self.store
        if store is None:
            return
        broker = self.broker
        # Totals and tenant counters of one moment; users and topics as of the last
        # flush (no scan per flush).
        info = self._info(self._sent_kinds)
        summaries = {t: _summary(c) for t, c in broker.tenant_counts.items()}
        missing = await store.heartbeat(info)
        touched, broker.touched = broker.touched or set(), set()
        if missing or self._full:
            counts = {}
            for key, readers in broker.stream_readers():
                change = _kind(key)
                if change is not None and readers:
                    counts[change] = readers
            await store.write(counts, summaries, full=True)
            self._sent = counts
            self._sent_kinds = {USER: 0, TOPIC: 0}
            for _, kind, _ in counts:
                self._sent_kinds[kind] += 1
            self._sent_summaries = summaries
            self._full = False
        else:
            changes: dict[Change, int] = {}
            for key in touched:
                change = _kind(key)
                if change is not None:
                    readers = broker.readers(key)
                    if self._sent.get(change, 0) != readers:
                        changes[change] = readers
            changed = {t: s for t, s in summaries.items() if self._sent_summaries.get(t) != s}
            if changes or changed:
                await store.write(changes, changed, full=False)  # a failure: full next time
                for change, readers in changes.items():
                    if readers:
                        if self._sent.get(change, 0) == 0:
                            self._sent_kinds[change[1]] += 1
                        self._sent[change] = readers
                    elif self._sent.pop(change, 0):
                        self._sent_kinds[change[1]] -= 1
                self._sent_summaries.update(changed)
        self.flushes += 1

    # -- this instance ----------------------------------------------------------------

    def _info(self, kinds: dict[str, int] | None = None) -> dict[str, Any]:
        """This instance's row; `kinds` (users, topics) None: counted now."""
        broker = self.broker
        if kinds is None:
            kinds = {USER: 0, TOPIC: 0}
            for key, readers in broker.stream_readers():
                change = _kind(key)
                if change is not None and readers:
                    kinds[change[1]] += 1
        users, topics = kinds[USER], kinds[TOPIC]
        s = broker.stats
        return {
            "id": self.instance,
            "host": self.host,
            "pid": os.getpid(),
            "started_at": round(self.started_at, 3),
            "uptime_s": round(time.monotonic() - self._started, 3),
            "connections": len(broker.connections),
            "users": users,
            "topics": topics,
            "messages_published": s.published,
            "messages_delivered": s.delivered,
            "messages_dropped": s.dropped,
        }

    def _local(self, tenant: str | None) -> InstanceView:
        view = InstanceView(self.instance, self._info())
        wanted: Iterable[str] = self.broker.tenant_counts if tenant is None else (tenant,)
        for name in wanted:
            counts = self.broker.tenant_counts.get(name)
            tv = view.tenants[name] = TenantView()
            if counts is not None:
                tv.summary(_summary(counts))
        for key, readers in self.broker.stream_readers():
            change = _kind(key)
            if change is None or not readers:
                continue
            name, kind, value = change
            if tenant is not None and name != tenant:
                continue
            tv = view.tenants.setdefault(name, TenantView())
            (tv.users if kind == USER else tv.topics).add(value)
        return view

    # -- across instances ---------------------------------------------------------------

    async def users(self, tenant: str = "") -> list[str]:
        """Users with at least one connection in `tenant`, on any live instance."""
        local = {user for _, user in self.broker.users(tenant)}
        if self.store is not None:
            local |= await self.store.users(tenant)
        return sorted(local)

    async def connections(self, user_id: str, tenant: str = "") -> int:
        """The user's open connections, on every live instance."""
        count = self.broker.readers(stream_key(tenant, user_stream(user_id)))
        if self.store is not None:
            count += await self.store.connections(tenant, user_id)
        return count

    async def is_online(self, user_id: str, tenant: str = "") -> bool:
        return await self.connections(user_id, tenant) > 0

    async def stats(self, tenant: str | None = None) -> dict[str, Any]:
        """Totals across live instances, plus one row per instance (API.md §8).

        `tenant` None covers every tenant (an API key without ``?tenant=``): the rows
        then carry each instance's host and pid, and ``tenants`` has per-tenant totals.
        """
        views = [self._local(tenant)]
        if self.store is not None:
            views += await self.store.instances(tenant)
        views.sort(key=lambda v: (v.id != self.instance, v.id))
        rows = []
        per_tenant: dict[str, TenantView] = {}
        for view in views:
            row: dict[str, Any] = {"id": view.id}
            if tenant is None:
                info = view.info
                row |= {k: info.get(k, 0) for k in _INSTANCE_FIELDS}
            else:
                tv = view.tenants.get(tenant) or TenantView()
                row |= _counts(tv.connections, len(tv.users), len(tv.topics), tv)
                row["uptime_s"] = view.info.get("uptime_s", 0)
            rows.append(row)
            for name, tv in view.tenants.items():
                total = per_tenant.setdefault(name, TenantView())
                total.users |= tv.users
                total.topics |= tv.topics
                total.connections += tv.connections
                total.published += tv.published
                total.delivered += tv.delivered
                total.dropped += tv.dropped
        if tenant is None:
            sums = TenantView()
            users = topics = 0
            for tv in per_tenant.values():
                users += len(tv.users)
                topics += len(tv.topics)
                sums.connections += tv.connections
            for view in views:
                sums.published += int(view.info.get("messages_published", 0))
                sums.delivered += int(view.info.get("messages_delivered", 0))
                sums.dropped += int(view.info.get("messages_dropped", 0))
            result = _counts(sums.connections, users, topics, sums)
        else:
            tv = per_tenant.get(tenant) or TenantView()
            result = _counts(tv.connections, len(tv.users), len(tv.topics), tv)
        result["running"] = self._is_running()
        result["uptime_s"] = round(time.monotonic() - self._started, 3)
        result["instance"] = self.instance
        result["instances"] = rows
        if tenant is None:
            result["tenants"] = {
                name: _counts(tv.connections, len(tv.users), len(tv.topics), tv)
                for name, tv in sorted(per_tenant.items())
                if tv.connections or tv.published or tv.delivered or tv.dropped
            }
        return result


_INSTANCE_FIELDS = (
    "host",
    "pid",
    "started_at",
    "uptime_s",
    "connections",
    "users",
    "topics",
    "messages_published",
    "messages_delivered",
    "messages_dropped",
)


def _counts(connections: int, users: int, topics: int, tv: TenantView) -> dict[str, Any]:
    return {
        "connections": connections,
        "users": users,
        "topics": topics,
        "messages_published": tv.published,
        "messages_delivered": tv.delivered,
        "messages_dropped": tv.dropped,
    }
