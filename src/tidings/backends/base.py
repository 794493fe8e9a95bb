"""The backend contract: cross-instance fan-out, stream history and shared keys.

A backend gives every published event its position (`seq`) in each of its
streams, keeps per-stream history for resume, and hands every event to every
instance's broker (this one included) through the `on_event` callback.
It is chosen by URL scheme (`memory://`, `redis://`, `nats://`) and its
module is imported only when chosen, so redis and nats stay optional.

Positions are per stream and strictly increasing; they need not be contiguous.
`history(after)` must be exact: every event of the stream with seq > after,
in order, or None when it cannot say (trimmed, expired, unknown).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from ..event import EVENT, Event

EventCallback = Callable[[Event], None]


class Backend(Protocol):
    epoch: str
    """Names this backend's history; a cursor from another epoch gets a `reset`."""

    async def connect(self, on_event: EventCallback) -> None: ...

    async def close(self) -> None: ...

    async def publish(
        self,
        tenant: str,
        streams: Sequence[str],
        name: str,
        data: Any,
        event_id: str,
        kind: str = EVENT,
    ) -> Event:
        """Append to each stream's history and deliver to every instance."""
        ...

    async def subscribe(self, keys: Iterable[str]) -> None:
        """This instance has local readers of these stream keys (see `stream_key`)."""
        ...

    async def unsubscribe(self, keys: Iterable[str]) -> None: ...

    async def tops(self, tenant: str, streams: Sequence[str]) -> dict[str, int]:
        """The current last position of each stream (0 when it has none)."""
        ...

    async def history(self, tenant: str, stream: str, after: int) -> list[Event] | None:
        """Every event of the stream after position `after`, or None if that is not known."""
        ...

    async def claim(self, key: str, value: str, ttl: float) -> str | None:
        """Set `key` to `value` unless present; return the existing value if it was."""
        ...

    async def release(self, key: str) -> None:
        """Forget a claim (its publish failed, so a retry must be able to go through).

        A backend that can claim and publish in one step offers ``publish_once(key, ttl,
        tenant, streams, name, data, event_id) -> Event | str`` (the earlier event id if
        `key` was claimed), and `Hub.publish_message` uses it instead of these two
        (Redis: one script); otherwise a failure between the claim and the publish, with
        the release failing too, leaves a claim without its publish (docs/api.md)."""
        ...

    async def ready(self) -> bool:
        """Whether the backend answers (for /readyz)."""
        ...


def create_backend(url: str, *, history_size: int, history_ttl: float) -> Backend:
    scheme = url.split("://", 1)[0].lower()
    if scheme == "memory":
        from .memory import MemoryBackend

        return MemoryBackend(history_size=history_size, history_ttl=history_ttl)
    if scheme in ("redis", "rediss"):
        from .redis import RedisBackend  # needs the `redis` extra

        return RedisBackend(url, history_size=history_size, history_ttl=history_ttl)
    if scheme == "nats":
        from .nats import NatsBackend  # needs the `nats` extra

        return NatsBackend(url, history_size=history_size, history_ttl=history_ttl)
    raise ValueError(
        f"unsupported broker URL scheme {scheme!r} (use memory://, redis:// or nats://)"
    )
