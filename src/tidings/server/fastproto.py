"""The fast path's socket: one asyncio protocol per client connection.

It reads the request head; a stream request (`fasthttp.is_stream`) or a publish request
(`fastpublish.takes`) is served here, anything else is handed, with the bytes read so
far, to uvicorn's `HttpToolsProtocol`.
A stream's checks and attach (`streams.open_sse`) run straight from the request head
where `faststream.goes_direct` allows, else through the app's ASGI stack
(`FastPath.stack`), as a task; then the response head, ``retry:``, the ``welcome`` and
any ``reset`` leave in one write and fan-out writes straight to the socket
(``conn.direct = transport.write``): no task, no timer and no read buffer per idle
stream.

Back-pressure: while the transport's write buffer is over its high-water mark
(`pause_writing`) the connection has no `direct` writer, so frames go to its bounded
buffer and an overflow closes it as SLOW (the client resumes from history with its
cursor); `resume_writing` flushes the buffer and restores `direct`.

Publish requests: the head and the whole body are read, then `_publish` answers: at
once when it may start outside a task (`eager`), else as a task. The connection then
serves its next request (keep-alive; pipelined requests wait in the read buffer, served
in order by `_serve`'s loop, and reading pauses while the answers are not read). An idle
keep-alive connection closes after uvicorn's ``timeout_keep_alive``, as uvicorn's does.

Shutdown: `_Server.shutdown` (run.py) closes every connection with SHUTDOWN first;
this protocol then writes ``retry: 1000`` and the ``shutdown`` event, ends the chunked
body and closes the socket. Protocols are in uvicorn's `server_state.connections`, so
uvicorn's graceful shutdown waits for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, ClassVar, cast

from uvicorn.config import Config
from uvicorn.server import ServerState

from ..event import CloseReason
from . import eager
from .app import SSE_PATHS
from .fastapp import Capture, FastPath, log_access, remote_addr
from .fasthttp import (
    HEAD_END,
    LAST_CHUNK,
    MAX_HEAD,
    HeadError,
    RequestHead,
    is_stream,
    may_be_request,
    response_head,
    stream_head,
)
from .fastpublish import REQUEST_LINE, Answer, answer, takes
from .faststream import goes_direct, greet_chunked, open_stream
from .fastwriter import SHUTDOWN_TAIL, ChunkedSSEConnection
from .sse import HEADERS

log = logging.getLogger("tidings.fastpath")

STREAM_PATHS = frozenset(SSE_PATHS)
_REQUEST_LINES = (REQUEST_LINE, *(b"GET " + p.encode() for p in SSE_PATHS))  # most often first

# Phases of a FastProtocol.
_HEAD = 0  # reading a request head
_SETUP = 1  # checks and attach running
_LIVE = 2  # streaming
_GONE = 3  # closed, or handed to uvicorn
_BUSY = 4  # answering a publish request


class FastProtocol(asyncio.Protocol):
    """One client socket: a stream served here, or a request handed to uvicorn."""

    fast: ClassVar[FastPath]

    __slots__ = (
        "_answered",
        "_at",
        "_buffer",
        "_idle",
        "_need",
        "_paused",
        "_repeat",
        "_serving",
        "_stopping",
        "conn",
        "phase",
        "transport",
    )

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
        self._serving = False  # in `_serve`'s loop
        self._at = 0  # in `_serve`'s loop: where the next request starts in the buffer
        self._need = 0  # bytes the buffer must hold before the request is looked at again
        self._idle: asyncio.TimerHandle | None = None  # the keep-alive timeout, once answered
        self._answered = 0.0  # loop time of the last answer
        # The last publish request's head bytes, its parse and its body length.
        self._repeat: tuple[bytes, RequestHead, int] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.fast.server_state.connections.add(self)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == _HEAD:
            self._buffer += data
            if len(self._buffer) >= self._need:
                self._serve()
        elif phase == _BUSY:
            # Pipelined requests behind a publish: read once it is answered.
            self._buffer += data
            if len(self._buffer) > MAX_HEAD and self.transport is not None:
                self.transport.pause_reading()
        elif phase == _SETUP:
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
        self._stop_idle()
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
        if self.phase == _HEAD and transport is not None:
            self._next_request()  # answers were written: read the next request
            return
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
        elif self.phase == _SETUP or self.phase == _BUSY:
            self._stopping = True
        elif self.conn is not None:
            self.conn.close(CloseReason.SHUTDOWN)

    # -- request heads -------------------------------------------------------------------

    def _serve(self) -> None:
        """Serve the requests in the read buffer, in order, while each is answered at once
        (an eager publish); stop at one that needs a task, more bytes, or uvicorn."""
        if self._serving:
            return  # an answer given inside the loop below: the loop goes on
        self._serving = True
        try:
            while self.phase == _HEAD and not self._paused:
                unread = len(self._buffer) - self._at
                if not unread or unread < self._need or not self._request():
                    break
        finally:
            self._serving = False
            if self._at:  # drop what was answered: one copy, however many requests
                self._buffer = self._buffer[self._at :]
                self._at = 0

    def _request(self) -> bool:
        """Take the request at `_at` in the buffer; False while its bytes are due."""
        buffer, at = self._buffer, self._at
        repeat = self._repeat
        if repeat is not None and buffer.startswith(repeat[0], at):
            # The previous publish's head again, byte for byte (a backend on a keep-alive
            # connection): parsed, it would give the same head and length.
            return self._take_publish(repeat[1], at + len(repeat[0]), repeat[2])
        if not may_be_request(buffer[at : at + 64], _REQUEST_LINES):
            self._hand_off()
            return True
        end = buffer.find(HEAD_END, at)
        if end < 0:
            if len(buffer) - at > MAX_HEAD:
                self._hand_off()
            return False
        end += len(HEAD_END)
        fast = self.fast
        try:
            head = fast.heads.parse(buffer[at:end])
        except HeadError:
            self._hand_off()  # uvicorn answers it (400) as it always has
            return True
        if fast.config is None:
            self._hand_off()
        elif is_stream(head, STREAM_PATHS):
            self._at = end
            self.phase = _SETUP
            self._stream(head)
        elif (length := takes(head, fast.max_payload)) is not None:
            self._repeat = (buffer[at:end], head, length)
            return self._take_publish(head, end, length)
        else:
            self._hand_off()
        return True

    def _take_publish(self, head: RequestHead, end: int, length: int) -> bool:
        """Answer the publish request whose head ends at `end`; False while its body is due."""
        if len(self._buffer) < end + length:
            self._need = end + length - self._at  # the body is on its way
            return False
        self._need = 0
        self._at = end + length
        self.phase = _BUSY
        answering = self._publish(head, self._buffer[end : end + length])
        fast = self.fast
        if fast.eager and fast.state.hub.running:
            self._track(eager.start(answering, fast.loop or asyncio.get_event_loop()))
        else:
            self._start(answering)
        return True

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        self._track((self.fast.loop or asyncio.get_event_loop()).create_task(coro))

    def _track(self, task: asyncio.Task[None] | None) -> None:
        if task is not None:
            tasks = self.fast.server_state.tasks
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def _hand_off(self) -> None:
        """Give the socket and everything read so far to uvicorn's HTTP protocol."""
        transport, data = self.transport, self._buffer[self._at :]
        self.fast.server_state.connections.discard(self)
        self.phase = _GONE
        self.transport = None
        self._buffer = b""
        self._at = self._need = 0
        self._stop_idle()
        if transport is None or transport.is_closing():
            return
        if not transport.is_reading():
            transport.resume_reading()  # paused behind a publish answer; uvicorn reads on
        proto = self.fast.uvicorn_protocol()
        proto.connection_made(transport)
        transport.set_protocol(proto)
        if data:
            proto.data_received(data)

    # -- a stream request ----------------------------------------------------------------

    def adopt(self, conn: ChunkedSSEConnection) -> bool:
        """Take the attached connection of this request; False if the client has left."""
        if self.phase != _SETUP:
            return False
        self.conn = conn
        return True

    def _stream(self, head: RequestHead) -> None:
        """Open the stream `head` asks for, as a task: straight from the head where
        `goes_direct` allows, else through the ASGI stack. (Not `eager`: started at once,
        a burst's setups cost more, ~8 µs each; docs/benchmarks.md, "Connects".)"""
        fast = self.fast
        if goes_direct(
            head,
            middleware=fast.middleware,
            proxy_headers=fast.proxy_headers,
            connect_rate=fast.state.connect_limit.rate,
        ):
            self._start(self._open(head))
        else:
            self._start(self._setup(head))

    async def _open(self, head: RequestHead) -> None:
        """The direct way: `open_sse` on the head, then the answer or the live stream."""
        if self.phase != _SETUP:
            return  # the client left before this began: nothing to check or count
        fast = self.fast
        opened = await open_stream(fast.state, head, self._client_ip)
        if isinstance(opened, Answer):  # refused: nothing registered
            if self.phase != _SETUP:
                return  # the client left; connection_lost cleaned up
            if fast.access_log:
                log_access(self.transport, head, opened.status)
            self._answer(opened.status, opened.headers or [], opened.body, head)
            return
        conn = opened.conn
        if not self.adopt(conn):
            fast.state.hub.broker.detach(conn)  # the client left meanwhile
            return
        greet_chunked(fast.state, opened)
        if fast.access_log:
            log_access(self.transport, head, 200)
        self._go_live(HEADERS)

    def _client_ip(self) -> str:
        """The peer's address, as `http.client_ip` gives it when no proxy header counts."""
        peer = remote_addr(self.transport) if self.transport is not None else None
        return peer[0] if peer else "?"

    async def _setup(self, head: RequestHead) -> None:
        """The ASGI way: the request through the app's middleware to `FastPath.open_stream`."""
        capture = Capture()
        try:
            assert self.transport is not None
            scope = self.fast.scope(head, self.transport, self)
            await self.fast.stack(scope, capture.receive, capture.send)
        except Exception as exc:  # middleware failing; open_stream itself answers its errors
            log.error("unhandled error opening a stream", exc_info=exc)
            conn, self.conn = self.conn, None
            if conn is not None:
                self.fast.state.hub.broker.detach(conn)
            capture = Capture()
            await capture.internal_error()
        if self.phase != _SETUP:
            return  # the client left; connection_lost cleaned up
        if self.fast.access_log:
            log_access(self.transport, head, capture.status or 500)
        if capture.status == 200 and self.conn is not None:
            self._go_live(capture.headers)
        else:
            self._answer(capture.status or 500, capture.headers, capture.body, head)

    def _go_live(self, headers: list[tuple[bytes, bytes]]) -> None:
        conn, transport = self.conn, self.transport
        assert conn is not None and transport is not None
        self.phase = _LIVE
        head = stream_head(headers, self.fast.server_state.default_headers)
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

    def _answer(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, head: RequestHead
    ) -> None:
        """An error before any 200: answer it; the connection stays open for more requests."""
        transport = self.transport
        assert transport is not None
        close = not head.keep_alive or self._stopping
        defaults = self.fast.server_state.default_headers
        out = response_head(status, headers, defaults, close=close)
        transport.write(out + body)
        if close:
            transport.close()
            return
        self.phase = _HEAD
        self._next_request()

    # -- a publish request ---------------------------------------------------------------

    async def _publish(self, head: RequestHead, body: bytes) -> None:
        fast = self.fast
        if fast.publish_stack is None:  # no middleware to go through
            result = await answer(fast.state, head, body, fast.keys)
        else:
            result = await fast.publish(head, body, self)
        transport = self.transport
        if self.phase != _BUSY or transport is None:
            return  # the client left; connection_lost cleaned up
        close = result.fatal or not head.keep_alive or self._stopping
        if fast.access_log:  # before the answer leaves, as uvicorn logs it
            log_access(transport, head, result.status)
        transport.write(result.render(fast.server_state.default_headers, close))
        if close:
            self.phase = _GONE  # serve nothing more; connection_lost cleans up
            transport.close()
            return
        self.phase = _HEAD
        self._next_request()

    # -- keep-alive ----------------------------------------------------------------------

    def _next_request(self) -> None:
        """After an answer: arm the keep-alive timeout, read a pipelined request, or pause
        reading while the client does not read the answers."""
        transport = self.transport
        assert transport is not None
        loop = self.fast.loop
        if loop is not None:
            self._answered = loop.time()
            if self._idle is None:
                self._idle = loop.call_later(self.fast.keep_alive_s, self._idle_check)
        if self._paused:
            transport.pause_reading()  # resume_writing comes back here
            return
        if not transport.is_reading():
            transport.resume_reading()
        if self._buffer:
            self._serve()

    def _idle_check(self) -> None:
        self._idle = None
        transport, loop = self.transport, self.fast.loop
        if self.phase != _HEAD or self._buffer or transport is None or loop is None:
            return  # a request is on its way or being answered; its answer re-arms this
        left = self._answered + self.fast.keep_alive_s - loop.time()
        if left > 0:
            self._idle = loop.call_later(left, self._idle_check)
        else:
            transport.close()

    def _stop_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

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
