"""The fast path's stream writer: SSE frames as whole HTTP chunks, written in batches.

`ChunkedSSEConnection` frames each event as one chunk of the response's chunked body,
ready for ``transport.write``, so the protocol adds nothing per frame. Its `offer`
does the common case of fan-out (a writable connection, an event on one stream)
inline; with `COALESCE` the frames of one loop iteration leave in one write per
socket (`_flush`, one callback per iteration for all connections).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from .. import wire
from ..connection import SSEConnection
from ..event import Event
from .fasthttp import LAST_CHUNK, chunk

COALESCE = os.environ.get("TIDINGS_FASTPATH_COALESCE", "1") != "0"
"""Fan-out appends each frame to its connection's buffer and one callback per loop
iteration writes each buffer with one write (several publishes in one iteration cost one
send per socket: twice the deliveries/s under load, the same fan-out latency); else
fan-out calls `transport.write` per frame. ``TIDINGS_FASTPATH_COALESCE=0`` (benchmarks)."""

PING_CHUNK = chunk(wire.PING)
SHUTDOWN_TAIL = (
    chunk(
        wire.sse_retry(1000) + wire.sse_frame(None, "shutdown", {"reason": "server shutting down"})
    )
    + LAST_CHUNK
)


class ChunkedSSEConnection(SSEConnection):
    """An SSE connection whose frames are whole HTTP chunks, ready for `transport.write`.

    `offer` is the base class's for every case but the hot one, which it does inline:
    a live, writable connection and an event on one stream.
    """

    __slots__ = ()

    def frame(self, event: Event, stream: str) -> bytes:
        cursor = self.cursor().encode()
        body = event.sse_body
        return b"%x\r\nid: %b\n%b\r\n" % (len(cursor) + len(body) + 5, cursor, body)

    def heartbeat_frame(self) -> bytes:
        return PING_CHUNK

    def offer(self, event: Event) -> bool:
        # Same result as Connection.offer -> deliver -> frame -> push, for one case.
        # While `direct` is set the connection is open and writable, and its buffer
        # holds only this loop iteration's frames (COALESCE) or nothing.
        direct = self.direct
        streams = event.streams
        if direct is None or self.pending is not None or len(streams) != 1:
            return super().offer(event)
        stream, seq = streams[0]
        positions = self.positions
        pos = positions.get(stream)
        if pos is None or seq <= pos:
            return False
        positions[stream] = seq
        last = _last_part
        if last[0] is stream and last[1] == seq:
            part = last[2]  # every recipient of this event shares its cursor part
        else:
            part = self._hashes[stream] + format(seq, "x")
            last[0], last[1], last[2] = stream, seq, part
        parts = self._parts
        parts[self._index[stream]] = part
        cursor = (self.epoch + "." + ".".join(parts)).encode()
        body = event.sse_body
        frame = b"%x\r\nid: %b\n%b\r\n" % (len(cursor) + len(body) + 5, cursor, body)
        if COALESCE:
            buffer = self.buffer
            if not buffer:
                _dirty.append(self)
                if len(_dirty) == 1:
                    asyncio.get_running_loop().call_soon(_flush)
            buffer.append(frame)
        else:
            direct(frame)
        return True


_last_part: list[Any] = [None, 0, ""]  # (stream, seq) -> cursor part of the event in fan-out
_dirty: list[SSEConnection] = []  # connections with frames for the next _flush


def _flush() -> None:
    """Write each connection's frames of this loop iteration with one write."""
    global _dirty
    dirty, _dirty = _dirty, []
    for conn in dirty:
        direct = conn.direct
        buffer = conn.buffer
        if direct is not None and buffer:  # else paused or closed: they deal with it
            direct(buffer[0] if len(buffer) == 1 else b"".join(buffer))
            buffer.clear()
