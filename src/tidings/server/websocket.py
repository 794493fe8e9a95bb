"""The WebSocket endpoint (API.md §5) on plain ASGI, beside SSE on the same broker.

A WebSocket connection is just another connection of its user: the same
streams, cursors, history and slow-consumer rule as SSE. Per socket, one
task pumps the connection's buffer to the socket (one text frame per
message) and one reads client messages and handles them in order
(`wsconversation.py`); fan-out never waits on a socket (see `Connection.offer`).

Order of events on a new socket: the Origin check and the connect rate limit
refuse the handshake itself (HTTP 403/429); then the socket is accepted and
the caller authenticated — by header, query or cookie, else by a first
``{"type": "auth"}`` message — and a failure closes it with 4401 and a
reason, which a browser can read (it cannot read a refused handshake).

Keep-alive is the WebSocket protocol's ping/pong, sent by the ASGI server
(`uvicorn_options` configures uvicorn from the settings); no JSON heartbeats
are sent. Clients that need an application-level check send ``ping`` and
get ``pong``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import HTTPConnection

from .. import wire, wsproto
from ..auth import Principal, extract_credential
from ..errors import (
    Forbidden,
    RateLimited,
    TidingsError,
    Unauthorized,
)
from ..event import CloseReason
from ..hub import Hub
from ..types import Receive, Scope, Send
from .http import client_ip, principal, state
from .state import State
from .streams import check_capacity, subscriber
from .wsconversation import Conversation, reset_frame
from .wsdirect import (
    DIRECT_PROTOCOL,
    DirectWriter,
    WSSocket,
    direct_writer,
    pong_deadline,
    uvicorn_options,
)

log = logging.getLogger("tidings.ws")

WS_PATHS = ("/api/v1/ws", "/api/v1/notifications/ws")

AUTH_TIMEOUT = 10.0
"""Seconds a socket without a credential has to send ``{"type": "auth"}`` (API.md §1)."""

CLOSE_TIMEOUT = 5.0
"""Seconds to hand the close frame to a socket that stopped reading, before giving up."""

# Close codes besides CloseReason's (4401 unauthorized, 4008 slow, 4009, 4010, 1001).
FORBIDDEN = 4403  # an API key, not a user: streams are for users
RATE_LIMITED = 4429  # too many connection attempts (not used when the handshake can be refused)
TRY_AGAIN_LATER = 1013  # connection limits reached; retry after a while
INTERNAL = 1011

_CLOSE_CODES: dict[str, int] = {
    "unauthorized": CloseReason.UNAUTHORIZED.code,
    "forbidden": FORBIDDEN,
    "rate_limited": RATE_LIMITED,
    "over_capacity": TRY_AGAIN_LATER,
    "unavailable": TRY_AGAIN_LATER,
    "invalid_request": 1008,
}


def origin_allowed(origin: str | None, allowed: list[str]) -> bool:
    """`TIDINGS_ALLOWED_ORIGINS`: empty or ``*`` allows any; else an exact origin
    (``https://app.example.com``) or a subdomain wildcard (``https://*.example.com``).

    A request without an Origin header is not from a browser and is allowed: the check
    protects browsers' cookies and tokens from other sites (cross-site WebSocket hijacking).
    """
    if not allowed or origin is None or "*" in allowed:
        return True
    origin = origin.strip().rstrip("/").lower()
    for pattern in allowed:
        pattern = pattern.strip().rstrip("/").lower()
        if origin == pattern:
            return True
        scheme, sep, host = pattern.partition("://*.")
        if sep and origin.startswith(scheme + "://") and origin.endswith("." + host):
            return True
    return False


async def said_goodbye(hub: Hub, within: float = 1.0) -> None:
    """Until every open WebSocket of `hub` has closed with its own code (or `within` s).

    A server shutting down calls it after `close_all(SHUTDOWN)`: uvicorn's shutdown
    closes the sockets still open itself, with 1012 instead of 1001.
    """
    waits = [
        session.finished
        for session in list(_open)
        if session.st.hub is hub and session.conn is not None and not session.finished.done()
    ]
    if waits:
        await asyncio.wait(waits, timeout=within)  # waits, never cancels them


class WebSocketEndpoint:
    """ASGI app for `/api/v1/ws` and `/api/v1/notifications/ws`."""

    def __init__(self, *, auth_timeout: float | None = None) -> None:
        self.auth_timeout = auth_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket" or (await receive())["type"] != "websocket.connect":
            return
        request = HTTPConnection(scope)
        st = state(request)
        if not origin_allowed(request.headers.get("origin"), st.settings.allowed_origins):
            await _refuse(scope, send, Forbidden("this Origin may not connect"))
            return
        wait = st.connect_limit.retry_after(client_ip(request))
        if wait is not None:
            exc = RateLimited("too many connection attempts from this address", retry_after=wait)
            await _refuse(scope, send, exc)
            return
        await send({"type": "websocket.accept"})
        timeout = self.auth_timeout
        if timeout is None:
            timeout = st.settings.ws_auth_timeout
        await _Session(st, request, receive, send, timeout).run()


async def _refuse(scope: Scope, send: Send, exc: TidingsError) -> None:
    """Refuse the handshake: an HTTP error response where the server supports it."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})  # uvicorn: HTTP 403
        return
    headers = [(b"content-type", b"application/json")]
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(exc.retry_after).encode()))
    await send({"type": "websocket.http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": orjson.dumps(exc.body())})


def _close_reason(text: str) -> str:
    # A close frame's reason is at most 123 bytes of UTF-8.
    raw = text.encode()
    if len(raw) <= 123:
        return text
    return raw[:120].decode(errors="ignore") + "…"


class _Session:
    """One accepted socket: authenticate, open the connection, then read and pump."""

    def __init__(
        self, st: State, request: HTTPConnection, receive: Receive, send: Send, timeout: float
    ) -> None:
        self.st = st
        self.settings = st.settings
        self.request = request
        self.receive = receive
        self.send = send
        self.auth_timeout = timeout
        self.conversation = Conversation(st, receive)
        self.conn: WSSocket | None = None
        # Futures, not Events with a task waiting on them: a few KB less per socket.
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def close(self, code: int, reason: str) -> None:
        message = {"type": "websocket.close", "code": code, "reason": _close_reason(reason)}
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            await asyncio.wait_for(self.send(message), CLOSE_TIMEOUT)

    async def close_for(self, exc: TidingsError) -> None:
        await self.close(_CLOSE_CODES.get(exc.code, INTERNAL), exc.message)

    # -- opening ------------------------------------------------------------------------

    async def run(self) -> None:
        _open.add(self)
        try:
            await self._run()
        finally:
            if not self.finished.done():
                self.finished.set_result(None)
            _open.discard(self)

    async def _run(self) -> None:
        st, request = self.st, self.request
        try:
            who = await self.authenticate()
            if who is None:
                return  # the client left while we waited for its auth message
            subscriber(who)
            check_capacity(st, who)
            if not st.hub.running:
                await st.hub.start()
        except TidingsError as exc:
            await self.close_for(exc)
            return
        topics, refused = self.conversation.authorize(
            who, wire.split_list(request.query_params.get("topics"))
        )
        conn = WSSocket(
            who, st.hub.streams_for(who, topics), limit=self.settings.client_buffer_size
        )
        broker = st.hub.broker
        self.conn = conn
        reader: asyncio.Future[None] | None = None
        pump: asyncio.Future[Any] | None = None
        writer: DirectWriter | None = None
        failure: TidingsError | None = None
        try:
            resumption = await broker.attach(
                conn, wire.last_event_id(request.headers, request.query_params)
            )
            unread = await st.unread_count(who)  # once attached, as `streams.open_sse` reads it
            welcome = wsproto.message(
                "welcome",
                connection_id=conn.id,
                user_id=who.user_id,
                tenant=who.tenant,
                topics=topics,
                unread_count=unread,
                message="connected",
                id=conn.cursor(),
            )
            conn.push(welcome, force=True)
            for frame in refused:
                conn.push(frame, force=True)
            if resumption.reset is not None:
                conn.push(reset_frame(conn, resumption.reset), force=True)
            broker.release(conn, resumption)
            log.debug(
                "ws open %s user=%r tenant=%r topics=%s", conn.id, who.user_id, who.tenant, topics
            )
            reader = asyncio.ensure_future(self.conversation.read(conn))
            writer = direct_writer(request.scope)
            if writer is not None:
                pump = _closing(conn)
                writer.attach(conn)  # from now on, frames go straight to the socket
            else:
                pump = asyncio.ensure_future(_pump(conn, self.send))
            conn.on_close(_unstick(conn, pump))
            await asyncio.wait((reader, pump), return_when=asyncio.FIRST_COMPLETED)
            if conn.closed is CloseReason.CLIENT and not reader.done():
                # The client left: what it sent before leaving still counts (a tab that
                # marks everything read and closes at once), for a bounded time.
                await asyncio.wait((reader,), timeout=CLOSE_TIMEOUT)
        except TidingsError as exc:  # the backend failed while opening
            failure = exc
        except Exception:
            log.exception("ws %s: opening failed", conn.id)
            failure = TidingsError("internal error; it has been logged")
        finally:
            if writer is not None:
                writer.detach()
            for task in (reader, pump):
                if task is not None:
                    task.cancel()
            reason = conn.closed
            try:
                # Before detaching: a shutdown waits for the sockets to say goodbye.
                if failure is not None:
                    await self.close_for(failure)
                elif reason is not None and reason is not CloseReason.CLIENT:
                    await self.close(reason.code, reason.text)
            finally:
                broker.detach(conn)
                log.debug("ws close %s reason=%s", conn.id, reason.name if reason else "-")

    async def authenticate(self) -> Principal | None:
        """Header, query or cookie; else the first message, within the auth timeout."""
        request = self.request
        if extract_credential(request.headers, request.query_params, request.cookies):
            return await principal(request)  # counts failures; Unauthorized closes with 4401
        try:
            # An embedding app's own authenticator may know other credentials.
            return await self.st.authenticator.authenticate(
                request.headers, request.query_params, request.cookies
            )
        except Unauthorized:
            pass
        try:
            message = await asyncio.wait_for(self.receive(), self.auth_timeout)
        except TimeoutError:
            self._count_failure("missing")
            seconds = f"{self.auth_timeout:g}"
            raise Unauthorized(
                f'no credential: send {{"type":"auth","token":"<jwt>"}} within {seconds} s'
            ) from None
        if message["type"] != "websocket.receive":
            return None
        try:
            first = wsproto.parse(
                message.get("text") or message.get("bytes") or b"",
                max_size=self.settings.max_payload,
            )
        except wsproto.ProtocolError:
            first = None
        if not isinstance(first, wsproto.Auth):
            self._count_failure("missing")
            raise Unauthorized('the first message must be {"type":"auth","token":"<jwt>"}')
        return await self.verify(first.token)

    async def verify(self, token: str) -> Principal:
        auth = self.st.authenticator
        verify = getattr(auth, "principal_from_token", None)
        try:
            if verify is not None:
                who: Principal = await verify(token)
                return who
            # Any RequestAuthenticator: the token as if it came in the header.
            return await auth.authenticate({"authorization": f"Bearer {token}"}, {}, {})
        except Unauthorized as exc:
            self._count_failure("expired" if "expired" in exc.message else "invalid")
            raise

    def _count_failure(self, reason: str) -> None:
        self.st.metrics.auth_failures.labels(reason).inc()


_open: weakref.WeakSet[_Session] = weakref.WeakSet()


def _closing(conn: WSSocket) -> asyncio.Future[None]:
    """A future done once `conn` closes (a plain future: no Event, no task waiting)."""
    closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def done(reason: CloseReason) -> None:
        if not closed.done():
            closed.set_result(None)

    conn.on_close(done)
    return closed


def _unstick(conn: WSSocket, pump: asyncio.Future[None]) -> Callable[[CloseReason], None]:
    """On close, stop waiting for a write stuck on a client that stopped reading."""

    def cancel(reason: CloseReason) -> None:
        if conn.busy_since:
            pump.cancel()

    return cancel


async def _pump(conn: WSSocket, send: Send) -> None:
    """Write the connection's buffer to the socket, one text frame per message."""
    try:
        while True:
            await conn.wait()
            while conn.buffer and conn.closed is None:
                frames = conn.drain()
                conn.busy_since = time.monotonic()
                for frame in frames:
                    if conn.closed is not None:
                        break  # what is left is recovered by the client's resume
                    await send({"type": "websocket.send", "text": frame.decode()})
                conn.busy_since = 0.0
            if conn.closed is not None:
                return
    except OSError:
        conn.close(CloseReason.CLIENT)
    finally:
        conn.busy_since = 0.0
        if conn.closed is None:
            conn.close(CloseReason.CLIENT)


__all__ = [
    "AUTH_TIMEOUT",
    "DIRECT_PROTOCOL",
    "WS_PATHS",
    "WSSocket",
    "WebSocketEndpoint",
    "origin_allowed",
    "pong_deadline",
    "uvicorn_options",
]
