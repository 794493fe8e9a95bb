"""The WebSocket transport of `Subscriber`: ``/api/v1/ws`` (API.md §5) on `websockets`.

One connection: the handshake carries the token (``Authorization: Bearer``), the
topics (``?topics=a,b``) and the resume point (``Last-Event-ID``), as API.md §5
allows for WebSockets as for SSE, so the server attaches the socket with all three
at once and no ``auth``/``subscribe`` round trip is needed. Server messages become
the events the SSE transport yields (`to_event`), so an app reads both alike:

| WebSocket message              | event (`WSEvent`, an `SSEEvent`)                          |
|--------------------------------|-----------------------------------------------------------|
| ``welcome``                    | ``welcome``; data: its fields                             |
| ``event``                      | its ``event`` name; data as SSE sends it; ``topic``       |
| ``notification``               | ``message``; data: the record plus ``unread_count``       |
| ``notification.read``/``…deleted``, ``reset`` | the same name; data: their fields          |
| ``pong``, ``subscribed``, ``unsubscribed`` | not yielded                                   |
| ``error``                      | raised as its typed error (`errors.error_from_code`)      |

Close codes (`close_error`): 4401 → `Unauthorized`, 4403 → `Forbidden`, 4429 →
`RateLimited`, 1013 → `OverCapacity`, 1008 → `InvalidRequest`, 4500–4999 → a
`TidingsError` that is not retried; every other code (1000, 1001 shutdown, 1006,
1011, 4008 slow consumer, 4009 disconnected, 4010 …) means "reconnect and resume".
A refused handshake (HTTP 403 Origin, 429 …) raises the error its answer names.

Keep-alive: the server pings (protocol pings, API.md §5) and `websockets` answers;
this side pings too, every `PING_INTERVAL` s, and a pong missing for `PING_TIMEOUT` s
closes the connection (1011), which the subscriber retries like any drop. (A consumer
that stops reading stops the socket being read, so that can happen to it too: the
reconnect resumes, as after the server drops a slow consumer.)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)
from websockets.frames import Close
from websockets.http11 import Response

from ..errors import (
    Forbidden,
    InvalidRequest,
    OverCapacity,
    RateLimited,
    TidingsError,
    Unauthorized,
)
from ..wire import SSEEvent, encode_data
from .errors import error_from_code, error_from_response
from .transport import OPEN, Item

__all__ = [
    "CLOSE_TIMEOUT",
    "OPEN_TIMEOUT",
    "PING_INTERVAL",
    "PING_TIMEOUT",
    "WS_PATH",
    "WSEvent",
    "WSTransport",
    "close_error",
    "to_event",
    "ws_url",
]

WS_PATH = "/api/v1/ws"
OPEN_TIMEOUT = 10.0
"""Seconds for the TCP connect and the handshake."""
PING_INTERVAL = 20.0
PING_TIMEOUT = 20.0
CLOSE_TIMEOUT = 2.0
"""Seconds to wait for the server's answer to our close frame (`Subscriber.close`)."""
_SHUTDOWN_CODES = (1001, 1012)  # going away; uvicorn's "service restart"
_SILENT = frozenset({"pong", "subscribed", "unsubscribed"})
_ENVELOPE = frozenset({"type", "id", "timestamp"})


@dataclass(slots=True)
class WSEvent(SSEEvent):
    """An event read over WebSocket: an `SSEEvent` plus what only this transport carries."""

    topic: str | None = None
    """The topic an ``event`` was published to (None: the user's own stream or a broadcast)."""
    timestamp: str | None = None
    """When the server sent it (RFC 3339)."""


def ws_url(base_url: str) -> str:
    """``http(s)://host[/prefix]`` (or ``ws(s)://``) → ``ws(s)://host[/prefix]/api/v1/ws``."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"base_url must be http(s)://host or ws(s)://host, not {base_url!r}")
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{WS_PATH}"


class WSTransport:
    """Reads a user's streams over a WebSocket, one connection per `connect`."""

    def __init__(self, base_url: str, topics: Iterable[str]) -> None:
        self.url = ws_url(base_url)
        self.topics = list(topics)

    async def connect(self, token: str, cursor: str | None) -> AsyncGenerator[Item, None]:
        headers = {"Authorization": f"Bearer {token}"}
        if cursor is not None:
            headers["Last-Event-ID"] = cursor
        url = self.url
        if self.topics:
            url += "?" + urlencode({"topics": ",".join(self.topics)})
        try:
            socket = await connect(
                url,
                additional_headers=headers,
                open_timeout=OPEN_TIMEOUT,
                ping_interval=PING_INTERVAL,
                ping_timeout=PING_TIMEOUT,
                close_timeout=CLOSE_TIMEOUT,
                max_size=None,  # the server bounds what it sends (TIDINGS_MAX_PAYLOAD)
            )
        except InvalidStatus as exc:  # the handshake was refused with an HTTP answer
            raise _refusal(exc.response) from None
        try:
            async with aclosing(self._read(socket)) as items:
                async for item in items:
                    yield item
        finally:
            await socket.close()

    def transient(self, exc: Exception) -> bool:
        if isinstance(exc, InvalidURI):
            return False
        # Refused connections, timeouts, broken handshakes (a proxy, a server mid-restart).
        return isinstance(exc, (OSError, TimeoutError, InvalidHandshake, ConnectionClosed))

    async def aclose(self) -> None:
        return

    async def _read(self, socket: ClientConnection) -> AsyncGenerator[Item, None]:
        held: SSEEvent | None = None  # a welcome waiting for the refusal of a topic
        while True:
            try:
                raw = await socket.recv()
            except ConnectionClosed as exc:
                error = close_error(exc.rcvd)
                if error is not None:
                    raise error from None
                if exc.rcvd is not None and exc.rcvd.code in _SHUTDOWN_CODES:
                    # What the SSE stream says before it ends for the same reason.
                    reason = exc.rcvd.reason or "server shutting down"
                    yield WSEvent("shutdown", encode_data({"reason": reason}))
                return
            try:
                message: Any = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # not a message of API.md §5 (a proxy's?): nothing to act on
            if not isinstance(message, dict):
                continue
            event = to_event(message)  # raises the error of an `error` message
            if event is None:
                continue
            if message["type"] == "welcome":
                granted = message.get("topics")
                if isinstance(granted, list) and set(self.topics) - set(granted):
                    # The server accepted the rest and sends an `error` per refused topic
                    # right after the welcome: raise it, as SSE answers such a stream 403.
                    held = event
                    continue
                yield OPEN
            elif held is not None:  # the announced refusal did not come: go on as usual
                yield OPEN
                yield held
                held = None
            yield event


def to_event(message: dict[str, Any]) -> WSEvent | None:
    """The event a server message stands for (see the module's table); None: not one."""
    kind = message.get("type")
    if not isinstance(kind, str) or kind in _SILENT:
        return None
    if kind == "error":
        raise error_from_code(
            _text(message.get("code")) or "internal",
            _text(message.get("message")) or "the server refused a request",
        )
    cursor = message.get("id")
    event = WSEvent(id=cursor if isinstance(cursor, str) else None)
    event.timestamp = _text(message.get("timestamp"))
    if kind == "event":
        event.event = _text(message.get("event")) or "message"
        event.data = encode_data(message.get("data"))
        event.topic = _text(message.get("topic"))
    elif kind == "notification":
        record = message.get("notification")
        data = dict(record) if isinstance(record, dict) else {}
        data["unread_count"] = message.get("unread_count")
        event.event, event.data = "message", encode_data(data)
    else:  # welcome, reset, notification.read/deleted, and types this SDK does not know yet
        fields = {k: v for k, v in message.items() if k not in _ENVELOPE}
        event.event, event.data = kind, encode_data(fields)
    return event


def close_error(close: Close | None) -> TidingsError | None:
    """The error a close frame from the server stands for; None: reconnect and resume."""
    if close is None:  # no close frame: the connection broke
        return None
    code, reason = close.code, close.reason
    if code == 4401:
        return Unauthorized(reason or "unauthorized")
    if code == 4403:
        return Forbidden(reason or "forbidden")
    if code == 4429:
        return RateLimited(reason or "too many connection attempts")
    if code == 1013:
        return OverCapacity(reason or "the server is full; try again later")
    if code == 1008:
        return InvalidRequest(reason or "the server refused the connection (policy)")
    if 4500 <= code < 5000:
        # The server's range for "do not reconnect as-is" (tidings.event.CloseReason).
        error = TidingsError(reason or f"closed by the server with code {code}")
        error.status, error.code = 400, "closed"
        return error
    return None


def _refusal(response: Response) -> TidingsError:
    """A refused handshake's HTTP answer as its typed error (the same rules as for REST)."""
    answer = httpx.Response(
        response.status_code,
        headers=list(response.headers.raw_items()),
        content=bytes(response.body or b""),
    )
    return error_from_response(answer)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
