"""The SSE fast path: an asyncio protocol that serves stream requests itself.

`tidings serve` gives uvicorn `protocol_class(app)` as its HTTP protocol. Each
new socket starts here. A ``GET`` on an SSE path (`STREAM_PATHS`) is served
natively: the same checks as `server/sse.py` (auth, rate limit, topics,
capacity; failures answered as the same JSON errors, through the app's own
middleware), then the response head, ``retry:``, the ``welcome`` event and any
``reset`` in one write, and then fan-out writes each event straight to the
socket: ``conn.direct = transport.write``, no task and no wake-up per
recipient. `ChunkedSSEConnection.offer` does the common case (one stream, a
writable socket) inline, and with `COALESCE` the frames of one loop iteration
leave in one write per socket. Any other request (other paths and methods, WebSocket upgrades,
bodies, HTTP/1.0, anything odd) hands the socket and the bytes read so far to
uvicorn's own `HttpToolsProtocol`, which serves the ASGI app as before; a
keep-alive connection stays with uvicorn from then on.

Back-pressure: while the transport's write buffer is over its high-water mark
(`pause_writing`) the connection has no `direct` writer, so frames go to its
bounded buffer and an overflow closes it as SLOW (the client resumes from
history with its cursor); `resume_writing` flushes the buffer and restores
`direct`. Heartbeats come from the hub's periodic chore (`Broker.heartbeat`).

Shutdown: `_Server.shutdown` (run.py) closes every connection with SHUTDOWN
first; this protocol then writes ``retry: 1000`` and the ``shutdown`` event, ends
the chunked body and closes the socket. Its protocols are in uvicorn's
`server_state.connections`, so uvicorn's graceful shutdown waits for them.

`TIDINGS_FASTPATH=0` (or `ENABLED = False` with the variable unset) makes `tidings
serve` use plain uvicorn, and `server/sse.py` for streams too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, ClassVar, cast

from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl
from uvicorn.server import ServerState

from .. import wire
from ..connection import SSEConnection
from ..errors import RateLimited, TidingsError
from ..event import CloseReason, Event
from .app import SSE_PATHS
from .fasthttp import (
    LAST_CHUNK,
    MAX_HEAD,
    HeadError,
    RequestHead,
    chunk,
    head_end,
    is_stream,
    may_be_stream,
    parse_head,
    response_head,
)
from .http import client_ip, error_response, principal
from .sse import HEADERS
from .state import State
from .streams import check_capacity, requested_topics, subscriber

log = logging.getLogger("tidings.fastpath")

ENABLED = True
"""The default; ``TIDINGS_FASTPATH=0`` or ``=1`` in the environment overrides it."""

COALESCE = os.environ.get("TIDINGS_FASTPATH_COALESCE", "1") != "0"
"""Fan-out appends each frame to its connection's buffer and one callback per loop
iteration writes each buffer with one write (several publishes in one iteration cost one
send per socket: twice the deliveries/s under load, the same fan-out latency); else
fan-out calls `transport.write` per frame. ``TIDINGS_FASTPATH_COALESCE=0`` (benchmarks)."""

STREAM_PATHS = frozenset(SSE_PATHS)
_STREAM_PATHS_B = tuple(p.encode() for p in SSE_PATHS)

PING_CHUNK = chunk(wire.PING)
SHUTDOWN_TAIL = (
    chunk(
        wire.sse_retry(1000) + wire.sse_frame(None, "shutdown", {"reason": "server shutting down"})
    )
    + LAST_CHUNK
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Phases of a FastProtocol.
_HEAD = 0  # reading a request head
_SETUP = 1  # checks and attach running
_LIVE = 2  # streaming
_GONE = 3  # closed, or handed to uvicorn


def enabled() -> bool:
    """Whether `tidings serve` uses the fast path: ``TIDINGS_FASTPATH`` if set, else `ENABLED`."""
    flag = os.environ.get("TIDINGS_FASTPATH", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    return ENABLED


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


class _Capture:
    """The ASGI `send`/`receive` of one stream setup: records the response."""

    __slots__ = ("body", "headers", "status")

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""

    async def receive(self) -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = list(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            self.body += bytes(message.get("body", b""))


class FastPath:
    """What every FastProtocol of one server shares: the app's state and uvicorn's."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.state: State = app.state.tidings
        self.config: Config | None = None
        self.server_state = ServerState()
        self.app_state: dict[str, Any] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stack: ASGIApp = self.open_stream

    def bind(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        if self.config is config and self.server_state is server_state:
            return
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.loop = loop or asyncio.get_event_loop()
        # The app's own middleware (CORS) and uvicorn's proxy headers see the stream
        # request as they would on the ASGI path, so heads and client addresses match.
        stack: Any = self.open_stream
        for cls, args, kwargs in reversed(self.app.user_middleware):
            stack = cls(stack, *args, **kwargs)
        if config.proxy_headers:
            stack = ProxyHeadersMiddleware(stack, trusted_hosts=config.forwarded_allow_ips)
        self.stack = cast(ASGIApp, stack)

    def uvicorn_protocol(self) -> HttpToolsProtocol:
        assert self.config is not None
        return HttpToolsProtocol(
            config=self.config,
            server_state=self.server_state,
            app_state=self.app_state,
            _loop=self.loop,
        )

    async def open_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The checks and the attach of `server/sse.py`, as an ASGI app (so middleware
        wraps it); it leaves an attached, released connection on the protocol."""
        proto: FastProtocol = scope["tidings.protocol"]
        request = HTTPConnection(scope)
        st = self.state
        try:
            try:
                wait = st.connect_limit.retry_after(client_ip(request))
                if wait is not None:
                    raise RateLimited(
                        "too many connection attempts from this address", retry_after=wait
                    )
                who = await principal(request)
                subscriber(who)
                topics = requested_topics(st, who, request.query_params)
                check_capacity(st, who)
                if not st.hub.running:
                    await st.hub.start()
                unread = await st.unread_count(who)
            except TidingsError as exc:
                await error_response(exc)(scope, receive, send)
                return
            if proto.phase != _SETUP:
                return  # the client left meanwhile
            # Interned stream names: every connection's dicts share one key object per
            # stream, so fan-out's lookups compare pointers and touch no per-connection string.
            streams = [sys.intern(s) for s in st.hub.streams_for(who, topics)]
            conn = ChunkedSSEConnection(who, streams, limit=st.settings.client_buffer_size)
            broker = st.hub.broker
            proto.conn = conn
            try:
                resumption = await broker.attach(
                    conn, wire.last_event_id(request.headers, request.query_params)
                )
            except BaseException:
                broker.detach(conn)
                proto.conn = None
                raise
        except Exception as exc:
            log.error("unhandled error opening a stream", exc_info=exc)
            await error_response(TidingsError("internal error; it has been logged"))(
                scope, receive, send
            )
            return
        if proto.phase != _SETUP:
            return  # lost during attach: connection_lost detached it
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        welcome = {
            "connection_id": conn.id,
            "user_id": who.user_id,
            "tenant": who.tenant,
            "topics": topics,
            "unread_count": unread,
            "heartbeat_interval": st.settings.heartbeat_interval,
        }
        conn.push(chunk(wire.sse_retry(st.settings.retry_ms)), force=True)
        conn.push(chunk(wire.sse_frame(conn.cursor(), "welcome", welcome)), force=True)
        if resumption.reset is not None:
            reset = wire.sse_frame(conn.cursor(), "reset", {"reason": resumption.reset})
            conn.push(chunk(reset), force=True)
        broker.release(conn, resumption)
        log.debug(
            "sse open %s user=%r tenant=%r topics=%s (fast path)",
            conn.id,
            who.user_id,
            who.tenant,
            topics,
        )


class FastProtocol(asyncio.Protocol):
    """One client socket: a stream served here, or a request handed to uvicorn."""

    fast: ClassVar[FastPath]

    __slots__ = ("_buffer", "_paused", "_stopping", "conn", "phase", "transport")

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.fast.bind(config, server_state, app_state, _loop)
        self.transport: asyncio.Transport | None = None
        self.conn: ChunkedSSEConnection | None = None
        self.phase = _HEAD
        self._buffer = b""
        self._paused = False
        self._stopping = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.fast.server_state.connections.add(self)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self.phase == _HEAD:
            self._buffer += data
            self._read_head()
        elif self.phase == _SETUP:
            # A pipelined request behind the stream request: kept for after an error answer.
            self._buffer += data
            if len(self._buffer) > MAX_HEAD and self.transport is not None:
                self.transport.abort()
        # _LIVE: an SSE client has nothing more to say; ignore it.

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.fast.server_state.connections.discard(self)
        self.phase = _GONE
        self.transport = None
        self._buffer = b""
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.direct = None
            self.fast.state.hub.broker.detach(conn)
            log.debug("sse close %s reason=%s", conn.id, conn.closed.name if conn.closed else "-")

    def pause_writing(self) -> None:
        self._paused = True
        conn = self.conn
        if conn is not None:
            conn.direct = None
            conn.busy_since = time.monotonic()

    def resume_writing(self) -> None:
        self._paused = False
        conn = self.conn
        transport = self.transport
        if conn is None or transport is None or self.phase != _LIVE or conn.closed is not None:
            return
        unsent = self._unsent()
        if unsent:
            transport.write(unsent)  # may pause again at once
        if not self._paused:
            conn.direct = transport.write
            conn.busy_since = 0.0

    def _unsent(self) -> bytes:
        conn = self.conn
        return b"".join(conn.drain()) if conn is not None else b""

    # -- uvicorn's server calls this on a graceful shutdown ---------------------------

    def shutdown(self) -> None:
        if self.phase == _HEAD and self.transport is not None:
            self.transport.close()
        elif self.phase == _SETUP:
            self._stopping = True
        elif self.conn is not None:
            self.conn.close(CloseReason.SHUTDOWN)

    # -- request heads -------------------------------------------------------------------

    def _read_head(self) -> None:
        buffer = self._buffer
        if not may_be_stream(buffer[:64], _STREAM_PATHS_B):
            self._hand_off()
            return
        end = head_end(buffer)
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._hand_off()
            return
        try:
            head = parse_head(buffer[:end])
        except HeadError:
            self._hand_off()  # uvicorn answers it (400) as it always has
            return
        if not is_stream(head, STREAM_PATHS) or self.fast.config is None:
            self._hand_off()
            return
        self._buffer = buffer[end:]
        self.phase = _SETUP
        loop = self.fast.loop or asyncio.get_event_loop()
        task = loop.create_task(self._setup(head))
        tasks = self.fast.server_state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _hand_off(self) -> None:
        """Give the socket and everything read so far to uvicorn's HTTP protocol."""
        transport, data = self.transport, self._buffer
        self.fast.server_state.connections.discard(self)
        self.phase = _GONE
        self.transport = None
        self._buffer = b""
        if transport is None or transport.is_closing():
            return
        proto = self.fast.uvicorn_protocol()
        proto.connection_made(transport)
        transport.set_protocol(proto)
        if data:
            proto.data_received(data)

    # -- a stream request ----------------------------------------------------------------

    def _scope(self, head: RequestHead) -> Scope:
        fast = self.fast
        transport = self.transport
        assert transport is not None and fast.config is not None
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": head.version,
            "server": get_local_addr(transport),
            "client": get_remote_addr(transport),
            "scheme": "https" if is_ssl(transport) else "http",
            "root_path": fast.config.root_path,
            "method": head.method,
            "path": head.path,
            "raw_path": head.raw_path,
            "query_string": head.query,
            "headers": head.headers,
            "state": fast.app_state.copy(),
            "app": fast.app,
            "tidings.protocol": self,
        }

    async def _setup(self, head: RequestHead) -> None:
        capture = _Capture()
        try:
            await self.fast.stack(self._scope(head), capture.receive, capture.send)
        except Exception as exc:  # middleware failing; open_stream itself answers its errors
            log.error("unhandled error opening a stream", exc_info=exc)
            conn, self.conn = self.conn, None
            if conn is not None:
                self.fast.state.hub.broker.detach(conn)
            capture = _Capture()
            await error_response(TidingsError("internal error; it has been logged"))(
                {"type": "http"}, capture.receive, capture.send
            )
        if self.phase != _SETUP:
            return  # the client left; connection_lost cleaned up
        if capture.status == 200 and self.conn is not None:
            self._go_live(capture)
        else:
            self._answer(capture, head)

    def _go_live(self, capture: _Capture) -> None:
        conn, transport = self.conn, self.transport
        assert conn is not None and transport is not None
        self.phase = _LIVE
        defaults = self.fast.server_state.default_headers
        head = response_head(200, capture.headers, defaults, chunked=True)
        self._buffer = b""
        transport.write(head + b"".join(conn.drain()))
        if conn.closed is not None:  # overflowed or disconnected during the setup
            self._closed(conn.closed)
            return
        conn.on_close(self._closed)
        if not self._paused:
            conn.direct = transport.write
        else:
            conn.busy_since = time.monotonic()
        if self._stopping:
            conn.close(CloseReason.SHUTDOWN)

    def _answer(self, capture: _Capture, head: RequestHead) -> None:
        """An error before any 200: answer it; the connection stays open for more requests."""
        transport = self.transport
        assert transport is not None
        if capture.status == 0:  # nothing was sent: should not happen
            capture.status = 500
        close = not head.keep_alive or self._stopping
        defaults = self.fast.server_state.default_headers
        out = response_head(capture.status, capture.headers, defaults, close=close)
        transport.write(out + capture.body)
        if close:
            transport.close()
            return
        self.phase = _HEAD
        if self._buffer:
            self._read_head()

    def _closed(self, reason: CloseReason) -> None:
        """`conn.close()` was called (overflow, shutdown, disconnect, timeout)."""
        transport = self.transport
        conn = self.conn
        if transport is None or transport.is_closing():
            return
        if conn is not None:
            conn.direct = None
        if reason is CloseReason.SLOW or reason is CloseReason.TIMEOUT:
            # It stopped reading: what is still queued is lost to this socket, not to the
            # client, whose reconnect replays it from history.
            transport.abort()
            return
        tail = self._unsent()
        tail += SHUTDOWN_TAIL if reason is CloseReason.SHUTDOWN else LAST_CHUNK
        transport.write(tail)
        if self._paused:
            transport.abort()  # it would hold the close (and a shutdown) until it reads
        else:
            transport.close()


def protocol_class(app: Starlette) -> type[asyncio.Protocol]:
    """uvicorn's ``http=`` for `app` (a `create_app()` app): streams here, the rest to uvicorn."""

    class BoundFastProtocol(FastProtocol):
        __slots__ = ()

    BoundFastProtocol.fast = FastPath(app)
    return BoundFastProtocol
