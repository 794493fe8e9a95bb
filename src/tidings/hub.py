"""The Hub: the one place events enter tidings.

HTTP publishing, the in-process API of an embedding app and event-bus ingest
all come here: the hub validates and authorises (`message.py`), applies idempotency
keys and hands the event to the backend, which fans it out through every instance's
broker. It also owns the lifecycle (start/stop) and the periodic chores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .auth import Principal
from .backends.base import Backend, create_backend
from .broker import Broker, TenantCounts
from .config import Settings
from .errors import BackendUnavailable
from .event import (
    BROADCAST,
    CONTROL,
    CONTROL_STREAM,
    EVENT,
    CloseReason,
    Event,
    topic_stream,
    user_stream,
)
from .inbox.schema import new_notification
from .message import (
    MAX_ID_LEN,
    MAX_TOPICS_PER_MESSAGE,
    MAX_USERS_PER_MESSAGE,
    TOPIC_RULE,
    Message,
    authorize,
    new_event_id,
    parse_message,
)
from .presence import Presence, create_presence_store, new_instance_id
from .shutdown import ShutdownSignals
from .topics import TopicPatterns, valid_topic

if TYPE_CHECKING:
    from .inbox import InboxService

# Message, parse_message, authorize and the limits are re-exported: publishers that hold a
# Hub usually need them together.
__all__ = [
    "MAX_ID_LEN",
    "MAX_TOPICS_PER_MESSAGE",
    "MAX_USERS_PER_MESSAGE",
    "TOPIC_RULE",
    "Hub",
    "Message",
    "authorize",
    "new_event_id",
    "parse_message",
]

log = logging.getLogger("tidings.hub")


class Hub:
    """Publish to users, topics and tenants, in process or for the HTTP API."""

    def __init__(
        self,
        settings: Settings | None = None,
        backend: Backend | None = None,
        *,
        presence: Presence | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.backend = backend or create_backend(
            self.settings.broker_url,
            history_size=self.settings.history_size,
            history_ttl=self.settings.history_ttl,
        )
        self.broker = Broker(self.backend)
        if presence is None:
            # Shared on the broker's server (Redis, NATS), by TIDINGS_BROKER_URL's scheme;
            # memory:// (one process) has none. See presence.py.
            instance = new_instance_id()
            presence = Presence(
                self.broker,
                create_presence_store(
                    self.settings.broker_url, instance, self.settings.presence_ttl
                ),
                instance=instance,
                interval=self.settings.presence_interval,
                is_running=lambda: self.running,
            )
        self.presence = presence
        self.public_topics = TopicPatterns(self.settings.public_topics)
        self.started_at = time.monotonic()
        self.running = False
        self._chores: asyncio.Task[None] | None = None
        self._signals = ShutdownSignals(self._shutting_down)
        # The persistent inbox, when there is one: create_app() sets it from the settings.
        self.inbox: InboxService | None = None

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        if self.running:
            return
        if self.inbox is not None:
            await self.inbox.start()  # refuses an out-of-date PostgreSQL schema
        await self.backend.connect(self.broker.dispatch)
        try:
            await self.presence.start()
        except BaseException:
            await self.backend.close()
            raise
        self.running = True
        self.started_at = time.monotonic()
        self._chores = asyncio.create_task(self._run_chores(), name="tidings-chores")
        self._signals.install()

    def _shutting_down(self) -> None:
        closed = self.broker.close_all(CloseReason.SHUTDOWN)
        log.info("shutting down: told %d connections to reconnect elsewhere", closed)

    async def stop(self) -> None:
        if self.inbox is not None:
            await self.inbox.stop()
        if not self.running:
            return
        self.running = False
        self._signals.uninstall()
        self.broker.close_all(CloseReason.SHUTDOWN)
        if self._chores is not None:
            self._chores.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._chores
        await self.presence.stop()  # other instances stop counting ours at once
        await self.backend.close()

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run_chores(self) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            self.broker.heartbeat()
            self.broker.close_stalled(self.settings.client_timeout)
            sweep = getattr(self.backend, "sweep", None)
            if sweep is not None:
                sweep()

    # -- publishing -----------------------------------------------------------

    async def publish_message(self, message: Message, *, pause: bool = True) -> str:
        """Publish one validated message; returns its event id (the first one, on a retry).

        `pause`: see `emit`; one publish per HTTP request needs none."""
        event_id = new_event_id()
        if message.idempotency_key is None:  # the hot path: no claim
            await self.emit(
                message.tenant,
                message.streams(),
                message.event,
                message.data,
                event_id=event_id,
                pause=pause,
            )
            return event_id
        claim = f"idem\x1f{message.tenant}\x1f{message.idempotency_key}"
        ttl = self.settings.idempotency_ttl
        publish_once = getattr(self.backend, "publish_once", None)
        if publish_once is not None:  # the claim and the publish as one step (Redis)
            published = await publish_once(claim, ttl, *self._parts(message), event_id)
            if isinstance(published, str):
                return published  # the earlier publish's id: nothing published now
            if pause:
                await asyncio.sleep(0)
            self._count_published(message.tenant, EVENT)
            return event_id
        earlier = await self.backend.claim(claim, event_id, ttl)
        if earlier is not None:
            return earlier
        try:
            await self.emit(*self._parts(message), event_id=event_id, pause=pause)
        except BaseException:
            await self.backend.release(claim)
            raise
        return event_id

    @staticmethod
    def _parts(message: Message) -> tuple[str, list[str], str, Any]:
        return message.tenant, message.streams(), message.event, message.data

    async def emit(
        self,
        tenant: str,
        streams: Sequence[str],
        name: str,
        data: Any,
        *,
        kind: str = EVENT,
        event_id: str | None = None,
        pause: bool = True,
    ) -> Event:
        """Publish on raw stream names, unchecked: the building block of the methods above
        and of the inbox's pushes (``kind`` NOTIFICATION or SYNC).

        `pause` lets connection pumps drain before the caller publishes again, so a tight
        loop of publishes (a batch, an app's for-loop) does not fill a prompt reader's
        buffer on transports that write from a task. A caller that publishes once and
        then answers a request passes False: its answer yields to the loop anyway.
        """
        event = await self.backend.publish(
            tenant, streams, name, data, event_id or new_event_id(), kind
        )
        if pause:
            await asyncio.sleep(0)
        self._count_published(tenant, kind)
        return event

    def _count_published(self, tenant: str, kind: str) -> None:
        if kind != CONTROL:
            broker = self.broker
            broker.stats.published += 1
            counts = broker.tenant_counts.get(tenant)
            if counts is None:
                counts = broker.tenant_counts[tenant] = TenantCounts()
            counts.published += 1

    async def publish(
        self,
        *,
        tenant: str = "",
        users: Iterable[str] = (),
        topics: Iterable[str] = (),
        broadcast: bool = False,
        event: str = "message",
        data: Any = None,
        idempotency_key: str | None = None,
    ) -> str:
        body = {
            "tenant": tenant,
            "users": list(users),
            "topics": list(topics),
            "broadcast": broadcast,
            "event": event,
            "data": data,
            "idempotency_key": idempotency_key,
        }
        return await self.publish_message(parse_message(body))

    async def send_to_user(
        self, user_id: str, data: Any, *, event: str = "message", tenant: str = "", **kw: Any
    ) -> str:
        return await self.publish(tenant=tenant, users=[user_id], event=event, data=data, **kw)

    async def send_to_users(
        self,
        user_ids: Sequence[str],
        data: Any,
        *,
        event: str = "message",
        tenant: str = "",
        **kw: Any,
    ) -> str:
        return await self.publish(tenant=tenant, users=user_ids, event=event, data=data, **kw)

    async def send_to_topic(
        self, topic: str, data: Any, *, event: str = "message", tenant: str = "", **kw: Any
    ) -> str:
        return await self.publish(tenant=tenant, topics=[topic], event=event, data=data, **kw)

    async def broadcast(
        self, data: Any, *, event: str = "message", tenant: str = "", **kw: Any
    ) -> str:
        return await self.publish(tenant=tenant, broadcast=True, event=event, data=data, **kw)

    async def notify(
        self,
        recipients: Iterable[str] | str,
        *,
        tenant: str = "",
        type: str,
        title: str,
        content: str = "",
        priority: str = "normal",
        data: dict[str, Any] | None = None,
        sender: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> list[dict[str, Any]]:
        """Store an inbox notification per recipient, then push it to them (API.md §7).

        Returns the stored records; a retry with the same `idempotency_key` returns
        the first call's records and pushes nothing. Raises InvalidRequest for bad
        fields, and RuntimeError when this hub has no inbox (see `inbox`).
        """
        if self.inbox is None:
            raise RuntimeError(
                "this hub has no inbox: serve it with create_app(settings, hub=hub), or set "
                "hub.inbox = tidings.inbox.InboxService.from_settings(hub)"
            )
        new = new_notification(
            recipients,
            tenant=tenant,
            type=type,
            title=title,
            content=content,
            priority=priority,
            data=data,
            sender=sender,
            idempotency_key=idempotency_key,
        )
        return await self.inbox.notify(new)

    # -- subscriptions ---------------------------------------------------------

    def may_subscribe(self, principal: Principal, topic: str) -> bool:
        return valid_topic(topic) and principal.may_subscribe(topic, self.public_topics)

    def streams_for(self, principal: Principal, topics: Sequence[str]) -> list[str]:
        """A connection's streams: personal, tenant broadcast, then its topics."""
        return [user_stream(principal.user_id), BROADCAST] + [topic_stream(t) for t in topics]

    # -- presence and stats ----------------------------------------------------
    #
    # These answer for this instance (process) alone, at once and without I/O.
    # Across every instance of the service: `await hub.presence.users(tenant)`,
    # `.connections(user_id, tenant)`, `.is_online(...)` and `.stats(tenant)`
    # (presence.py), which the admin endpoints use.

    def is_online(self, user_id: str, tenant: str = "") -> bool:
        """Whether the user has a connection on this instance."""
        return bool(self.broker.user_connections(tenant, user_id))

    def online_users(self, tenant: str = "") -> list[str]:
        """Users with a connection on this instance."""
        return sorted(user for _, user in self.broker.users(tenant))

    def connection_count(self, user_id: str, tenant: str = "") -> int:
        """The user's connections on this instance."""
        return len(self.broker.user_connections(tenant, user_id))

    def disconnect_user(self, user_id: str, tenant: str = "") -> int:
        """Close the user's connections on this instance (see `disconnect` for all)."""
        conns = self.broker.user_connections(tenant, user_id)
        return self.broker.close_all(CloseReason.DISCONNECTED, conns)

    async def disconnect(self, user_id: str, tenant: str = "") -> int:
        """Close the user's connections on every instance; returns how many there were
        (other instances' as of their last presence flush)."""
        try:
            count = await self.presence.connections(user_id, tenant)
        except BackendUnavailable:
            count = self.connection_count(user_id, tenant)
        await self.emit(tenant, [CONTROL_STREAM], "disconnect", {"user": user_id}, kind=CONTROL)
        return count

    def stats(self, tenant: str | None = None) -> dict[str, Any]:
        """Seed S1's GetStats for this instance; `tenant` None covers every tenant.
        Across instances: `await hub.presence.stats(tenant)`."""
        broker = self.broker
        if tenant is None:
            counts: Any = broker.stats
            connections = len(broker.connections)
        else:
            counts = broker.tenant_counts.get(tenant) or TenantCounts()
            connections = sum(1 for c in broker.connections.values() if c.tenant == tenant)
        return {
            "connections": connections,
            "users": len(broker.users(tenant)),
            "topics": broker.topic_count(tenant),
            "running": self.running,
            "messages_published": counts.published,
            "messages_delivered": counts.delivered,
            "messages_dropped": counts.dropped,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
        }
