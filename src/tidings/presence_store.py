"""What instances share about their presence, and the shared store's interface.

The types the presence stores of backends/ (Redis, NATS) read and write, and
`PresenceStore`, the protocol they implement; presence.py's `Presence` is the
one that uses them (see its docstring for how presence is kept).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

__all__ = [
    "TOPIC",
    "USER",
    "Change",
    "InstanceView",
    "PresenceStore",
    "Summary",
    "TenantView",
    "chunks",
    "create_presence_store",
    "decode_summary",
    "new_instance_id",
]

USER, TOPIC = "u", "t"
Change = tuple[str, str, str]
"""(tenant, kind, name): kind USER with a user id, or TOPIC with a topic name."""
Summary = tuple[int, int, int, int]
"""One tenant on one instance: (connections, published, delivered, dropped)."""


def decode_summary(raw: bytes) -> Summary:
    connections, published, delivered, dropped = orjson.loads(raw)
    return (int(connections), int(published), int(delivered), int(dropped))


def new_instance_id() -> str:
    """Random, and a safe Redis key part and NATS subject token."""
    return secrets.token_hex(6)


@dataclass(slots=True)
class TenantView:
    """One tenant as one instance sees it."""

    users: set[str] = field(default_factory=set)
    topics: set[str] = field(default_factory=set)
    connections: int = 0
    published: int = 0
    delivered: int = 0
    dropped: int = 0

    def summary(self, summary: Summary) -> None:
        self.connections, self.published, self.delivered, self.dropped = summary


@dataclass(slots=True)
class InstanceView:
    """One instance: its `info` (host, pid, totals…) and the tenants asked for."""

    id: str
    info: dict[str, Any] = field(default_factory=dict)
    tenants: dict[str, TenantView] = field(default_factory=dict)


class PresenceStore(Protocol):
    """Where instances share their presence: one per shared broker (Redis, NATS).

    Every read returns what the *other* live instances stored (not `instance`'s
    own: the caller has its live state); an instance is live while its
    heartbeat is younger than the TTL.
    """

    async def open(self) -> None:
        """Connect; raises BackendUnavailable when the server does not answer."""
        ...

    async def close(self) -> None: ...

    async def heartbeat(self, info: dict[str, Any]) -> bool:
        """Keep this instance live for the TTL and store `info`; delete what crashed
        instances left. True when this instance's record was missing (first beat,
        or it expired and was deleted): the caller then rewrites everything."""
        ...

    async def write(
        self, changes: dict[Change, int], summaries: dict[str, Summary], *, full: bool
    ) -> None:
        """Store reader counts (0 deletes) and tenant summaries; `full` replaces all."""
        ...

    async def remove(self) -> None:
        """Delete this instance's record (a graceful stop)."""
        ...

    async def users(self, tenant: str) -> set[str]: ...

    async def connections(self, tenant: str, user_id: str) -> int: ...

    async def instances(self, tenant: str | None) -> list[InstanceView]:
        """Other live instances, each with `tenant` (None: every tenant)."""
        ...


def create_presence_store(url: str, instance: str, ttl: float) -> PresenceStore | None:
    """The store for a broker URL: Redis or NATS; None for ``memory://`` (one process)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss"):
        from .backends.redis_presence import RedisPresence

        return RedisPresence(url, instance, ttl)
    if scheme == "nats":
        from .backends.nats_presence import NatsPresence

        return NatsPresence(url, instance, ttl)
    return None


def chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    """Lists of at most `size` items (for bounded pipelines and batches)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
