"""The fast path's stream writer: SSE frames as whole HTTP chunks, written in batches.

`ChunkedSSEConnection` frames each event as one chunk of the response's chunked body,
ready for ``transport.write``, so the protocol adds nothing per frame. Its `offer`
does the common case of fan-out (a writable connection, an event on one stream)
inline. The first event fanned out in a loop iteration is written to each socket as it
is offered, so clients read it while the pass goes on; with `COALESCE` the frames of
later events of the same iteration (and of all events while publishes come in bursts)
leave in one write per socket (`_flush`, one callback per iteration for all connections).
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
"""The first event of a loop iteration is written per recipient as it is offered (the
first subscriber has it at once, the last sooner: docs/benchmarks.md, "Fan-out: profile
and changes"); the frames of later events in the same iteration, and of every event in
the iteration after one that had several (a burst of publishes), are appended to their
connection's buffer and one callback per iteration writes each buffer with one write
(under load, one send per socket for several publishes: 2-3x the deliveries/s of a
write per frame). ``TIDINGS_FASTPATH_COALESCE=0``: fan-out calls `transport.write` per
frame for every event (benchmarks)."""

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
        advanced = self.advance(stream, seq)
        if advanced is None:
            return False
        cursor = advanced.encode()
        body = event.sse_body
        frame = b"%x\r\nid: %b\n%b\r\n" % (len(cursor) + len(body) + 5, cursor, body)
        if COALESCE:
            round_ = _round
            first = round_[0]
            if first is None:  # the first event of this loop iteration
                round_[0] = first = event
                asyncio.get_running_loop().call_soon(_flush)
            elif first is not event:
                round_[1] = True  # more than one: the next iteration coalesces all
            buffer = self.buffer
            if first is event and not buffer and not round_[2]:
                direct(frame)  # as it goes: clients read while the pass goes on
                return True
            if not buffer:
                _dirty.append(self)
                if len(_dirty) == 1:
                    asyncio.get_running_loop().call_soon(_flush)
            buffer.append(frame)
        else:
            direct(frame)
        return True


# This loop iteration's first event (written as it goes unless the last iteration had
# several), whether it has had several, whether the last one had several.
_round: list[Any] = [None, False, False]
_dirty: list[SSEConnection] = []  # connections with frames for the next _flush


def _flush() -> None:
    """Write each connection's frames of this loop iteration's later events with one write."""
    global _dirty
    round_ = _round
    if round_[0] is not None:  # else a second call this iteration: the first ended it
        round_[0], round_[1], round_[2] = None, False, round_[1]
    dirty, _dirty = _dirty, []
    for conn in dirty:
        direct = conn.direct
        buffer = conn.buffer
        if direct is not None and buffer:  # else paused or closed: they deal with it
            direct(buffer[0] if len(buffer) == 1 else b"".join(buffer))
            buffer.clear()
