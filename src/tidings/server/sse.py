"""The SSE endpoint on plain ASGI: `open_sse` before the 200, then one pump per connection.

The pump waits on the connection's buffer and writes everything buffered in
one `send`; a second task only listens for the client's disconnect. Fan-out
itself never waits on a socket (see `Connection.offer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.requests import HTTPConnection

from .. import wire
from ..connection import SSEConnection
from ..errors import TidingsError
from ..event import CloseReason
from ..types import Receive, Scope, Send
from .http import Credentials, client_ip, error_response, state
from .streams import greet, open_sse

log = logging.getLogger("tidings.sse")

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"connection", b"keep-alive"),
]


class SSEEndpoint:
    """ASGI app for `GET /api/v1/stream` and its seed aliases."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = HTTPConnection(scope)
        st = state(request)
        try:
            credentials = Credentials.of(request)
            opened = await open_sse(st, credentials, lambda: client_ip(request), SSEConnection)
        except TidingsError as exc:  # nothing registered (a broker that fails: 503)
            await error_response(exc)(scope, receive, send)
            return
        conn, broker = opened.conn, st.hub.broker
        listener = asyncio.ensure_future(_until_disconnect(receive, conn))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            greet(st, opened)
            who, topics = conn.principal, opened.welcome["topics"]
            log.debug(
                "sse open %s user=%r tenant=%r topics=%s", conn.id, who.user_id, who.tenant, topics
            )
            if not await _pump_until_closed(conn, send):
                # The socket stopped taking data and the connection was closed
                # meanwhile: abandon the response; the server drops the socket.
                return
            if conn.closed is CloseReason.SHUTDOWN:
                # Tell the client to come back soon; another instance will resume it.
                with contextlib.suppress(OSError):
                    await send(
                        {
                            "type": "http.response.body",
                            "more_body": True,
                            "body": wire.sse_retry(1000)
                            + wire.sse_frame(None, "shutdown", {"reason": "server shutting down"}),
                        }
                    )
        finally:
            listener.cancel()
            broker.detach(conn)
            log.debug("sse close %s reason=%s", conn.id, conn.closed.name if conn.closed else "-")
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _pump_until_closed(conn: SSEConnection, send: Send) -> bool:
    """Pump until the connection closes; False if it closed while a write was stuck.

    A client that stops reading blocks `send` (the server waits for the socket
    to drain) and the pump with it. When the connection is closed meanwhile
    (overflow, TIDINGS_CLIENT_TIMEOUT, disconnect by the server) the stuck
    write is cancelled, or the socket would stay open as long as the client
    keeps it so.
    """
    pump = asyncio.ensure_future(_pump(conn, send))

    def cancel_stuck_write(reason: CloseReason) -> None:
        if conn.busy_since:
            pump.cancel()

    conn.on_close(cancel_stuck_write)
    try:
        await pump
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we are being cancelled ourselves
        return False
    return True


async def _pump(conn: SSEConnection, send: Send) -> None:
    while True:
        await conn.wait()
        if conn.buffer:
            body = b"".join(conn.drain())
            conn.busy_since = time.monotonic()
            try:
                await send({"type": "http.response.body", "body": body, "more_body": True})
            except OSError:
                conn.close(CloseReason.CLIENT)
                return
            conn.busy_since = 0.0
        if conn.closed is not None:
            return


async def _until_disconnect(receive: Receive, conn: SSEConnection) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            conn.close(CloseReason.CLIENT)
            return
