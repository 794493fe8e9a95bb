"""The embedded backend: one process, history in ring buffers.

One counter orders every event of the process, so positions in each stream
increase (with gaps, which is allowed). A stream remembers the position of
the last event it evicted; resuming from before that is not exact, and
`history()` says so with None. Nothing here awaits, so publishing from a
request handler reaches every local connection before the handler goes on.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from ..event import CONTROL, EVENT, Event, stream_key
from .base import EventCallback


class _Stream:
    __slots__ = ("events", "evicted", "touched")

    def __init__(self) -> None:
        self.events: deque[tuple[int, Event]] = deque()
        self.evicted = 0  # position of the newest event no longer kept
        self.touched = time.monotonic()


class MemoryBackend:
    def __init__(self, *, history_size: int = 1000, history_ttl: float = 86400.0) -> None:
        self.epoch = "m" + secrets.token_hex(5)
        self._size = history_size
        self._ttl = history_ttl
        self._seq = 0
        self._streams: dict[str, _Stream] = {}
        self._forgotten = 0  # newest position of any stream dropped whole
        self._claims: dict[str, tuple[str, float]] = {}
        self._on_event: EventCallback | None = None

    async def connect(self, on_event: EventCallback) -> None:
        self._on_event = on_event

    async def close(self) -> None:
        self._on_event = None

    async def ready(self) -> bool:
        return True

    async def subscribe(self, keys: Iterable[str]) -> None:
        return None

    async def unsubscribe(self, keys: Iterable[str]) -> None:
        return None

    async def publish(
        self,
        tenant: str,
        streams: Sequence[str],
        name: str,
        data: Any,
        event_id: str,
        kind: str = EVENT,
    ) -> Event:
        self._seq += 1
        seq = self._seq
        positions = (
            tuple([(s, seq) for s in streams]) if len(streams) != 1 else ((streams[0], seq),)
        )
        event = Event(event_id, tenant, name, data, positions, kind=kind)
        if kind == CONTROL:
            pass  # instructions, not history
        elif self._size > 0:
            for stream in streams:
                self._append(stream_key(tenant, stream), seq, event)
        elif streams:
            self._forgotten = seq
        if self._on_event is not None:
            self._on_event(event)
        return event

    def _append(self, key: str, seq: int, event: Event) -> None:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream()
        stream.events.append((seq, event))
        stream.touched = time.monotonic()
        if len(stream.events) > self._size:
            stream.evicted = stream.events.popleft()[0]

    async def tops(self, tenant: str, streams: Sequence[str]) -> dict[str, int]:
        # Every position ever given is at most `_seq`, and a stream's next one
        # will be above it, so `_seq` is a correct "now" for every stream.
        return dict.fromkeys(streams, self._seq)

    async def history(self, tenant: str, stream: str, after: int) -> list[Event] | None:
        if after > self._seq:
            return None  # from the future: another backend's cursor
        state = self._streams.get(stream_key(tenant, stream))
        if state is None:
            return [] if after >= self._forgotten else None
        self._expire(state)
        if after < state.evicted:
            return None
        return [event for seq, event in state.events if seq > after]

    def _expire(self, state: _Stream) -> None:
        if self._ttl <= 0:
            return
        horizon = time.time() - self._ttl
        events = state.events
        while events and events[0][1].ts < horizon:
            state.evicted = events.popleft()[0]

    def sweep(self) -> None:
        """Drop expired history, idle empty streams and expired claims (called periodically)."""
        now = time.monotonic()
        for key, state in list(self._streams.items()):
            self._expire(state)
            if not state.events and now - state.touched > 60:
                self._forgotten = max(self._forgotten, state.evicted)
                del self._streams[key]
        wall = time.time()
        for key, (_, expiry) in list(self._claims.items()):
            if expiry < wall:
                del self._claims[key]

    async def claim(self, key: str, value: str, ttl: float) -> str | None:
        existing = self._claims.get(key)
        if existing is not None and existing[1] >= time.time():
            return existing[0]
        self._claims[key] = (value, time.time() + ttl)
        return None

    async def release(self, key: str) -> None:
        self._claims.pop(key, None)
