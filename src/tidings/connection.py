"""A client connection: its streams, its resume position, and a bounded buffer.

`offer()` is the per-recipient hot path of fan-out. It never waits: it
advances the connection's position, prepends the connection's cursor to the
event's shared encoding and either writes straight to the socket (`direct`,
set by a transport while the socket is writable) or appends to the buffer
that the transport drains. A full buffer closes the connection with
`CloseReason.SLOW`; the client's reconnect resumes from history.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

from . import cursor as cursors
from . import wire
from .auth import Principal
from .event import CloseReason, Event

_ids = itertools.count(1)
_last_part: list[Any] = [None, 0, ""]  # (stream, seq) -> cursor part of the event in fan-out


class Connection:
    """Base of the SSE and WebSocket connections; subclasses only frame events."""

    __slots__ = (
        "__weakref__",
        "_hashes",
        "_index",
        "_on_close",
        "_parts",
        "_waiter",
        "buffer",
        "busy_since",
        "closed",
        "direct",
        "epoch",
        "id",
        "limit",
        "opened_at",
        "pending",
        "positions",
        "principal",
        "streams",
    )

    def __init__(
        self, principal: Principal, streams: list[str], *, limit: int, epoch: str = ""
    ) -> None:
        self.id = f"c{next(_ids):x}{int(time.time() * 1000):x}"
        self.principal = principal
        self.streams = streams
        self.limit = limit
        self.epoch = epoch
        self.positions: dict[str, int] = {}
        self._hashes = {s: cursors.stream_hash(s) for s in streams}
        self._index = {s: i for i, s in enumerate(streams)}
        self._parts = [h + "0" for h in self._hashes.values()]
        # A list, not a deque: an empty list is 56 bytes and `clear()` frees its slots,
        # where a deque keeps a 64-slot block (~600 bytes) per idle connection.
        self.buffer: list[bytes] = []
        self.direct: Callable[[bytes], None] | None = None
        self.pending: list[Event] | None = []  # live events held while history replays
        self.closed: CloseReason | None = None
        self.busy_since = 0.0
        self.opened_at = time.monotonic()
        self._waiter: asyncio.Future[None] | None = None
        self._on_close: tuple[Callable[[CloseReason], None], ...] = ()

    @property
    def tenant(self) -> str:
        return self.principal.tenant

    @property
    def user_id(self) -> str:
        return self.principal.user_id

    # -- position -----------------------------------------------------------

    def stream_hash(self, stream: str) -> str:
        return self._hashes[stream]

    def set_position(self, stream: str, seq: int) -> None:
        self.positions[stream] = seq
        self._parts[self._index[stream]] = cursors.part(self._hashes[stream], seq)

    def cursor(self) -> str:
        return cursors.encode(self.epoch, self._parts)

    def advance(self, stream: str, seq: int) -> str | None:
        """Fan-out's inline step (the transports' `offer`): move `stream` to `seq` and give
        the new cursor, or None if this connection has `seq` already or does not read
        `stream` yet. `set_position` then `cursor`, for one stream and in fewer steps."""
        positions = self.positions
        pos = positions.get(stream)
        if pos is None or seq <= pos:
            return None
        positions[stream] = seq
        last = _last_part
        if last[0] is stream and last[1] == seq:
            part = last[2]  # every recipient of this event shares its cursor part
        else:
            part = self._hashes[stream] + format(seq, "x")
            last[0], last[1], last[2] = stream, seq, part
        parts = self._parts
        parts[self._index[stream]] = part
        return self.epoch + "." + ".".join(parts)

    def reads(self, stream: str) -> bool:
        return stream in self._index

    def add_streams(self, streams: list[str]) -> list[str]:
        """Read these streams too; returns the new ones. They have no position yet, so
        `deliver` skips their events until the broker positions them (`Broker.add_streams`)."""
        new = [s for s in dict.fromkeys(streams) if s not in self._index]
        for stream in new:
            self._hashes[stream] = cursors.stream_hash(stream)
            self._index[stream] = len(self._parts)
            self._parts.append(self._hashes[stream] + "0")
        self.streams = self.streams + new
        return new

    def remove_streams(self, streams: list[str]) -> list[str]:
        """Stop reading these streams; returns the ones it read. The cursor drops them."""
        gone = [s for s in dict.fromkeys(streams) if s in self._index]
        if gone:
            for stream in gone:
                del self._hashes[stream]
                self.positions.pop(stream, None)
            self.streams = [s for s in self.streams if s in self._hashes]
            self._index = {s: i for i, s in enumerate(self.streams)}
            self._parts = [
                cursors.part(self._hashes[s], self.positions.get(s, 0)) for s in self.streams
            ]
        return gone

    # -- delivery -----------------------------------------------------------

    def offer(self, event: Event) -> bool:
        """Deliver `event` unless this connection already has it; never waits."""
        if self.pending is not None:
            self.pending.append(event)
            return False
        return self.deliver(event)

    def deliver(self, event: Event, *, force: bool = False) -> bool:
        positions = self.positions
        fresh = None
        for stream, seq in event.streams:
            pos = positions.get(stream)
            if pos is not None and seq > pos:
                positions[stream] = seq
                self._parts[self._index[stream]] = self._hashes[stream] + format(seq, "x")
                fresh = stream
        if fresh is None:
            return False  # not ours, or a duplicate: positions make delivery exactly-once
        self.push(self.frame(event, fresh), force=force)
        return True

    def frame(self, event: Event, stream: str) -> bytes:
        raise NotImplementedError

    def heartbeat_frame(self) -> bytes:
        raise NotImplementedError

    def push(self, frame: bytes, *, force: bool = False) -> None:
        """Write now if the socket takes it, else buffer (bounded unless `force`)."""
        if self.closed is not None:
            return
        if self.direct is not None and not self.buffer:
            self.direct(frame)
            return
        if len(self.buffer) >= self.limit and not force:
            self.close(CloseReason.SLOW)
            return
        self.buffer.append(frame)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def heartbeat(self) -> None:
        if not self.buffer:
            self.push(self.heartbeat_frame())

    # -- draining (used by transports that pump instead of writing directly) --

    async def wait(self) -> None:
        """Until there is something to write or the connection is closed."""
        while not self.buffer and self.closed is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def drain(self) -> list[bytes]:
        frames, self.buffer = self.buffer, []
        return frames

    # -- closing ------------------------------------------------------------

    def on_close(self, callback: Callable[[CloseReason], None]) -> None:
        self._on_close = (*self._on_close, callback)

    def close(self, reason: CloseReason) -> None:
        """Mark closed and tell the transport; idempotent. The broker detaches later."""
        if self.closed is not None:
            return
        self.closed = reason
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        callbacks, self._on_close = self._on_close, ()
        for callback in callbacks:
            callback(reason)


class SSEConnection(Connection):
    __slots__ = ()

    def frame(self, event: Event, stream: str) -> bytes:
        return b"id: " + self.cursor().encode() + b"\n" + event.sse_body

    def heartbeat_frame(self) -> bytes:
        return wire.PING


class WSConnection(Connection):
    __slots__ = ()

    def frame(self, event: Event, stream: str) -> bytes:
        head, tail = event.ws_parts(stream)
        return head + self.cursor().encode() + tail

    def heartbeat_frame(self) -> bytes:
        return wire.ws_message("ping").encode()
