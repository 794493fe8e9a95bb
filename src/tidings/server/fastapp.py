"""The fast path's requests as ASGI calls, through the app's own middleware.

`FastPath` is what every `FastProtocol` of one server shares: the app's `State`,
uvicorn's config and server state, and `stack`, the app's user middleware (CORS) and
uvicorn's proxy-headers middleware around `FastPath.open_stream`, so a stream request
sees the heads and client addresses it would see on the ASGI path. Streams go this way
only when the middleware may change their answer (`faststream.goes_direct`); the others
open straight from the head (`faststream.open_stream`). `open_stream` is
`streams.open_sse` and `streams.greet`, exactly as `server/sse.py` calls them; `Capture`
records its answer for the protocol to write.

A publish (`FastPath.publish`) is `fastpublish.answer` itself when the app has no user
middleware; with some (CORS, which adds ``Vary: Origin`` to every answer) its answer
goes out through the same middleware, as `publish_stack`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, cast

from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import is_ssl
from uvicorn.server import ServerState

from ..errors import TidingsError
from .fasthttp import HeadCache, RequestHead
from .fastpublish import Answer, KnownKeys, answer, json_headers, may_start_eagerly
from .faststream import greet_chunked
from .fastwriter import ChunkedSSEConnection
from .handoff import HandOffProtocol
from .http import INTERNAL, Credentials, client_ip, error_response
from .sse import HEADERS
from .state import State
from .streams import open_sse

if TYPE_CHECKING:
    from .fastproto import FastProtocol

log = logging.getLogger("tidings.fastpath")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Capture:
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

    async def internal_error(self) -> None:
        """Answer 500 as the app's handler of unexpected errors does."""
        await error_response(TidingsError(INTERNAL))({"type": "http"}, self.receive, self.send)


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
        self.publish_stack: ASGIApp | None = None  # None: no user middleware to go through
        self.heads = HeadCache()
        self.max_payload = self.state.settings.max_payload
        self.eager = may_start_eagerly(self.state, app.user_middleware)
        self.keys = KnownKeys(self.state.authenticator)
        self.keep_alive_s = 5.0  # uvicorn's timeout_keep_alive, from the config
        self.access_log = False  # uvicorn's access_log, from the config
        self.middleware = bool(app.user_middleware)  # `faststream.goes_direct`'s inputs
        self.proxy_headers = True  # uvicorn's proxy_headers, from the config

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
        self.keep_alive_s = float(config.timeout_keep_alive)
        self.access_log = bool(config.access_log)
        self.proxy_headers = bool(config.proxy_headers)
        self.middleware = bool(self.app.user_middleware)  # as `stack` is built, below
        stack: Any = self.open_stream
        for cls, args, kwargs in reversed(self.app.user_middleware):
            stack = cls(stack, *args, **kwargs)
        if config.proxy_headers:
            stack = ProxyHeadersMiddleware(stack, trusted_hosts=config.forwarded_allow_ips)
        self.stack = cast(ASGIApp, stack)
        self.publish_stack = None
        if self.app.user_middleware:
            stack = self.publish_app
            for cls, args, kwargs in reversed(self.app.user_middleware):
                stack = cls(stack, *args, **kwargs)
            self.publish_stack = cast(ASGIApp, stack)

    def scope(self, head: RequestHead, transport: asyncio.Transport, proto: FastProtocol) -> Scope:
        """The ASGI scope uvicorn would give the stream request `head`."""
        assert self.config is not None
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": head.version,
            "server": _local_addr(transport),
            "client": remote_addr(transport),
            "scheme": "https" if is_ssl(transport) else "http",
            "root_path": self.config.root_path,
            "method": head.method,
            "path": head.path,
            "raw_path": head.raw_path,
            "query_string": head.query,
            "headers": head.headers,
            "state": self.app_state.copy(),
            "app": self.app,
            "tidings.protocol": proto,
            "tidings.head": head,
        }

    async def publish(self, head: RequestHead, body: bytes, proto: FastProtocol) -> Answer:
        """The answer to a publish request through the app's middleware (`publish_stack`;
        without any, `fastpublish.answer` is the answer)."""
        stack = self.publish_stack
        assert stack is not None and proto.transport is not None
        scope = self.scope(head, proto.transport, proto)
        scope["tidings.body"] = body
        capture = Capture()
        try:
            await stack(scope, capture.receive, capture.send)
        except Exception as exc:  # middleware failing; `answer` itself never raises
            log.error("unhandled error answering a publish", exc_info=exc)
            capture = Capture()
            await capture.internal_error()
            scope["tidings.fatal"] = True
        return Answer(
            capture.status, capture.body, capture.headers, scope.get("tidings.fatal", False)
        )

    async def publish_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`fastpublish.answer` as an ASGI app, for the middleware to wrap."""
        result = await answer(self.state, scope["tidings.head"], scope["tidings.body"], self.keys)
        if result.fatal:
            scope["tidings.fatal"] = True
        headers = result.headers if result.headers is not None else json_headers(result.body)
        await send({"type": "http.response.start", "status": result.status, "headers": headers})
        await send({"type": "http.response.body", "body": result.body})

    def uvicorn_protocol(self) -> HttpToolsProtocol:
        assert self.config is not None
        return HandOffProtocol(
            config=self.config,
            server_state=self.server_state,
            app_state=self.app_state,
            _loop=self.loop,
        )

    async def open_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`server/sse.py`'s opening as an ASGI app (so middleware wraps it); it leaves an
        attached, greeted connection on the protocol (`FastProtocol.adopt`)."""
        proto: FastProtocol = scope["tidings.protocol"]
        st = self.state
        try:
            request = HTTPConnection(scope)
            credentials = Credentials.of(request)
            opened = await open_sse(
                st, credentials, lambda: client_ip(request), ChunkedSSEConnection
            )
        except TidingsError as exc:  # nothing registered (a broker that fails: 503)
            await error_response(exc)(scope, receive, send)
            return
        except Exception as exc:
            log.error("unhandled error opening a stream", exc_info=exc)
            await error_response(TidingsError(INTERNAL))(scope, receive, send)
            return
        conn = opened.conn
        if not proto.adopt(conn):
            st.hub.broker.detach(conn)  # the client left meanwhile
            return
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        greet_chunked(st, opened)


_access_log = logging.getLogger("tidings.access")


def log_access(transport: asyncio.Transport | None, head: RequestHead, status: int) -> None:
    """The line uvicorn's access log would write for a request the fast path answers
    (redacted by `logs`); its own logger name tells the two paths apart in a log."""
    peer = remote_addr(transport) if transport is not None else None
    client = f"{peer[0]}:{peer[1]}" if peer else "-"
    path = head.path + ("?" + head.query.decode("latin-1") if head.query else "")
    _access_log.info('%s - "%s %s HTTP/%s" %d', client, head.method, path, head.version, status)


def remote_addr(transport: asyncio.Transport) -> tuple[str, int] | None:
    # The transport's own copies: asking for its "socket" (as uvicorn's helpers do) makes
    # uvloop create and keep a socket object and both addresses for every connection.
    info = transport.get_extra_info("peername")
    if isinstance(info, tuple | list) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


def _local_addr(transport: asyncio.Transport) -> tuple[str, int | None] | None:
    info = transport.get_extra_info("sockname")
    if isinstance(info, tuple | list) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    if isinstance(info, str):
        return (info, None)
    return None
