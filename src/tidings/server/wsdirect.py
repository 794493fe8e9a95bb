"""Direct WebSocket writes: fan-out puts each frame straight on the socket.

uvicorn's sans-I/O WebSocket protocol does the handshake, pings, reading and
closing; `DIRECT_PROTOCOL` subclasses it to offer the endpoint a `DirectWriter`,
so that a fan-out costs one transport write per recipient and no ASGI send:
`WSSocket.offer` writes the whole frame, header and all, with the transport's own
``write`` (`WSSocket.raw`), which the writer takes away before anything closes the
socket. `uvicorn_options` is everything the endpoint needs from uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Callable
from typing import Any

from ..auth import Principal
from ..config import Settings
from ..connection import WSConnection
from ..event import CloseReason, Event
from ..types import Scope

__all__ = [
    "DIRECT_PROTOCOL",
    "DirectWriter",
    "WSSocket",
    "direct_writer",
    "pong_deadline",
    "uvicorn_options",
]


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn settings the WebSocket endpoint relies on (`tidings serve` passes them).

    * protocol pings every ``TIDINGS_WS_PING_INTERVAL``; a connection that has not
      answered one within ``TIDINGS_WS_PONG_TIMEOUT`` of its last pong is closed (1011).
    * frames over ``TIDINGS_MAX_PAYLOAD`` bytes close the connection (1009).
    * permessage-deflate only when ``ws_per_message_deflate`` is set: compression is per
      connection, so it would cost every recipient of a fan-out its own deflate.
    * uvicorn's WebSocket protocol with direct writes (`DIRECT_PROTOCOL`), so fan-out
      puts each event frame straight on the socket instead of through an ASGI send.
    """
    options: dict[str, Any] = {
        "ws_ping_interval": settings.ws_ping_interval,
        "ws_ping_timeout": pong_deadline(settings.ws_ping_interval, settings.ws_pong_timeout),
        "ws_max_size": settings.max_payload,
        "ws_per_message_deflate": settings.ws_per_message_deflate,
    }
    if DIRECT_PROTOCOL is not None:
        options["ws"] = DIRECT_PROTOCOL
    return options


def pong_deadline(ping_interval: float, pong_timeout: float) -> float:
    """uvicorn's wait for a pong, counted from its ping, for a deadline counted from the
    last pong (as the seed's gorilla server does: ping every 54 s, pong wait 60 s).

    When the pong timeout is not longer than the interval, each ping gets all of it.
    """
    if pong_timeout > ping_interval:
        return pong_timeout - ping_interval
    return pong_timeout


def _text_header(size: int) -> bytes:
    """The head of an unmasked, final text frame (server to client, RFC 6455 §5.2)."""
    if size < 126:
        return bytes((0x81, size))
    if size < 65536:
        return _HEAD16(0x81, 126, size)
    return _HEAD64(0x81, 127, size)


_HEAD16 = struct.Struct("!BBH").pack
_HEAD64 = struct.Struct("!BBQ").pack


class WSSocket(WSConnection):
    """A WebSocket connection; keep-alive is protocol pings, so no JSON heartbeats.

    `raw` is the socket's own ``write`` while a `DirectWriter` lets frames go straight
    to it (None otherwise). `offer` does the hot case of fan-out inline with it: an
    event on one stream, the whole frame (header, JSON around this connection's `id`)
    in one write, no Python call in between.
    """

    __slots__ = ("raw",)

    def __init__(
        self, principal: Principal, streams: list[str], *, limit: int, epoch: str = ""
    ) -> None:
        super().__init__(principal, streams, limit=limit, epoch=epoch)
        self.raw: Callable[[bytes], object] | None = None

    def heartbeat(self) -> None:
        return

    def offer(self, event: Event) -> bool:
        # Same result as Connection.offer -> deliver -> frame -> push -> DirectWriter.write,
        # for one case. While `raw` is set the buffer is empty (`DirectWriter.resumed`).
        raw = self.raw
        streams = event.streams
        if raw is None or self.pending is not None or len(streams) != 1 or self.closed is not None:
            return super().offer(event)
        stream, seq = streams[0]
        cursor = self.advance(stream, seq)
        if cursor is None:
            return False
        size = len(cursor)
        last = _last_frame
        if last[0] is not event or last[1] is not stream or last[2] != size:
            head, tail = event.ws_parts(stream)  # recipients of one event share their parts
            last[0], last[1], last[2], last[4] = event, stream, size, tail
            last[3] = _text_header(len(head) + size + len(tail)) + head
        raw(last[3] + cursor.encode() + last[4])
        return True


# The frame parts of the event in fan-out: (event, stream, cursor length) -> the frame's
# header and JSON up to the cursor, and the JSON after it.
_last_frame: list[Any] = [None, None, -1, b"", b""]


class DirectWriter:
    """Writes a connection's frames straight to its socket while the socket takes them.

    `Connection.push` calls `write` (as `conn.direct`) and fan-out `transport.write`
    itself (as `conn.raw`) — no task, no wake-up, no ASGI send per recipient, as the
    SSE fast path does. While the transport's buffer is over its high-water mark the
    connection has neither, so frames wait in its bounded buffer (an overflow closes it
    as SLOW); when the socket drains, the buffer is written in order and they come back.
    Once a close frame is out (`closing`), `raw` never comes back. Offered by
    `DIRECT_PROTOCOL` as the ASGI extension ``tidings.direct`` when no extension
    (permessage-deflate) was negotiated, since frames bypass the protocol's encoder.
    """

    __slots__ = ("conn", "protocol")

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.conn: WSSocket | None = None

    def attach(self, conn: WSSocket) -> None:
        """Write what `conn` has buffered, then each frame as it is pushed."""
        self.conn = conn
        if self.protocol.writable.is_set():
            self.resumed()
        else:
            self.paused()

    def detach(self) -> None:
        self.closing()
        self.conn = None

    def closing(self) -> None:
        """A close frame is out (or the socket closes): no frame may follow it."""
        conn = self.conn
        if conn is not None:
            conn.direct = conn.raw = None

    def lost(self) -> None:
        """The socket is gone: close the connection now, before its buffer fills."""
        conn = self.conn
        self.detach()
        if conn is not None:
            conn.close(CloseReason.CLIENT)

    def write(self, frame: bytes) -> None:
        protocol = self.protocol
        if protocol.close_sent or protocol.transport.is_closing():
            return  # closing: the client resumes what it missed
        protocol.transport.write(_text_header(len(frame)) + frame)

    def paused(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.direct = conn.raw = None
            conn.busy_since = conn.busy_since or time.monotonic()

    def resumed(self) -> None:
        conn = self.conn
        if conn is None or conn.closed is not None:
            return
        for frame in conn.drain():
            self.write(frame)
        protocol = self.protocol
        if protocol.writable.is_set():  # not paused again by the writes above
            conn.busy_since = 0.0
            conn.direct = self.write
            if not (protocol.close_sent or protocol.transport.is_closing()):
                conn.raw = protocol.transport.write


DIRECT_PROTOCOL: type[asyncio.Protocol] | None
try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from websockets.exceptions import InvalidState
    from websockets.frames import Frame
    from websockets.http11 import Request
except ImportError:  # uvicorn before 0.35: frames go through ASGI sends
    DIRECT_PROTOCOL = None
else:

    class DirectWebSocketProtocol(WebSocketsSansIOProtocol):
        """uvicorn's WebSocket protocol (handshake, pings, receiving, closing), plus a
        `DirectWriter` for the app in the ASGI extension ``tidings.direct``.

        Every way uvicorn closes tells the writer first (`DirectWriter.closing`): it
        sets `close_sent` after a close frame, and `shutdown` and `handle_close` write
        one without it; after `transport.close()` a write would still be sent while the
        transport flushes its buffer. Text that is not UTF-8, read in the same data as
        the client's close, is dropped (`send_receive_event_to_app`).
        """

        writer: DirectWriter | None = None
        _close_sent = False

        @property
        def close_sent(self) -> bool:
            return self._close_sent

        @close_sent.setter
        def close_sent(self, value: bool) -> None:
            self._close_sent = value
            if value and self.writer is not None:
                self.writer.closing()

        def shutdown(self) -> None:
            if self.writer is not None:
                self.writer.closing()
            super().shutdown()

        def handle_close(self, event: Frame) -> None:
            if self.writer is not None:
                self.writer.closing()
            super().handle_close(event)

        def send_receive_event_to_app(self) -> None:
            # Text that is not UTF-8, read together with the client's close: the protocol
            # has answered that close, so uvicorn's own (1007) cannot be sent; the close
            # under way ends the socket.
            with contextlib.suppress(InvalidState):
                super().send_receive_event_to_app()

        def handle_connect(self, event: Request) -> None:
            super().handle_connect(event)
            if self.response.status_code == 101 and not self.conn.extensions:
                self.writer = DirectWriter(self)
                self.scope["extensions"]["tidings.direct"] = {"writer": self.writer}

        def pause_writing(self) -> None:
            super().pause_writing()
            if self.writer is not None:
                self.writer.paused()

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.writer is not None:
                self.writer.resumed()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.writer is not None:
                self.writer.lost()
            super().connection_lost(exc)

    DIRECT_PROTOCOL = DirectWebSocketProtocol


def direct_writer(scope: Scope) -> DirectWriter | None:
    """The `DirectWriter` `DIRECT_PROTOCOL` offered this socket, if any."""
    offer = scope.get("extensions", {}).get("tidings.direct")
    writer = offer.get("writer") if isinstance(offer, dict) else None
    return writer if isinstance(writer, DirectWriter) else None
