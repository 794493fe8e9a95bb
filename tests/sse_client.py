"""A small raw SSE client for end-to-end tests: HTTP/1.1 over an asyncio socket.

It shows what a browser's EventSource would see, byte for byte: the status line,
the headers, the decoded body (`raw`), and the events `tidings.wire.SSEParser` finds
in it. Nothing reads in the background: the socket is read only while a test waits
for something (`next_event`, `events_until`, `wait_comments`, `wait_end`), so a
client that stops waiting stops reading — a slow consumer, as the kernel sees it.

Every wait is bounded (`WAIT`): a timeout is a failure guard, never a way to let time
pass. Typical use::

    async with sse_stream(server.url, token=server.token("alice")) as s:
        assert s.status == 200
        welcome = await s.next_event("welcome")
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import orjson

from tidings.wire import SSEEvent, SSEParser

__all__ = [
    "WAIT",
    "Api",
    "SSEClient",
    "StreamEnded",
    "expect_marker",
    "open_stream",
    "sse_stream",
]

WAIT = 10.0
"""Bound on one wait for the server, in seconds; never reached when things work."""


async def until(
    condition: Callable[[], Awaitable[bool] | bool], what: str, within: float = WAIT
) -> None:
    """Poll `condition` (bounded): a failure guard, not a way to let time pass."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class StreamEnded(AssertionError):
    """The stream ended while a test waited for more."""


class SSEClient:
    """One open HTTP response of a stream endpoint; see `open_stream`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}
        self.raw = bytearray()  # the decoded body so far (chunked framing removed)
        self.events: list[SSEEvent] = []  # every event parsed so far, in order
        self.parser = SSEParser()
        self.ended = False  # the server ended the body (or closed the socket)
        self._pending: deque[SSEEvent] = deque()
        self._partial = b""  # body bytes after the last newline, not yet fed to the parser
        self._chunked = False
        self._left: int | None = None  # Content-Length still to read, if not chunked

    # -- what tests read -------------------------------------------------------------

    @property
    def comments(self) -> int:
        """Comment lines (`: ping` heartbeats) seen so far."""
        return self.parser.comments

    @property
    def last_id(self) -> str | None:
        """The last `id:` the stream set (what EventSource would send as Last-Event-ID)."""
        return self.parser.last_event_id

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    async def json(self) -> Any:
        """The whole body as JSON (error answers)."""
        await self.wait_end()
        return orjson.loads(bytes(self.raw))

    def received(self) -> list[SSEEvent]:
        """Events already read off the socket but not yet returned; takes them, reads nothing.

        Before a deliberate disconnect: these did reach the client (they moved `last_id`).
        """
        rest = list(self._pending)
        self._pending.clear()
        return rest

    async def next_event(self, name: str | None = None, *, within: float = WAIT) -> SSEEvent:
        """The next event not yet returned (named `name`, skipping others)."""
        async with asyncio.timeout(within):
            while True:
                while self._pending:
                    event = self._pending.popleft()
                    if name is None or event.event == name:
                        return event
                if not await self._read_more():
                    raise StreamEnded(f"the stream ended while waiting for {name or 'an event'}")

    async def take(self, count: int, name: str | None = None) -> list[SSEEvent]:
        """The next `count` events (named `name`, skipping others)."""
        return [await self.next_event(name) for _ in range(count)]

    async def events_until(
        self, predicate: Callable[[SSEEvent], bool], *, within: float = WAIT
    ) -> list[SSEEvent]:
        """Every next event up to and including the first that satisfies `predicate`."""
        found: list[SSEEvent] = []
        async with asyncio.timeout(within):
            while True:
                event = await self.next_event(within=within)
                found.append(event)
                if predicate(event):
                    return found

    async def wait_comments(self, count: int = 1, *, within: float = WAIT) -> None:
        """Until at least `count` comment lines have arrived."""
        async with asyncio.timeout(within):
            while self.comments < count:
                if not await self._read_more():
                    raise StreamEnded("the stream ended while waiting for a comment")

    async def wait_end(self, *, within: float = WAIT) -> list[SSEEvent]:
        """Read until the server ends the body; returns the events not yet returned."""
        async with asyncio.timeout(within):
            while await self._read_more():
                pass
        rest = list(self._pending)
        self._pending.clear()
        return rest

    async def abort(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), as a crashed client or a dropped network does."""
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.close()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    # -- plumbing ----------------------------------------------------------------------

    async def _start(self) -> None:
        status_line = (await self._reader.readline()).decode("latin-1").rstrip("\r\n")
        if not status_line:
            raise StreamEnded("the server closed the connection before answering")
        _, status, *reason = status_line.split(" ", 2)
        self.status, self.reason = int(status), reason[0] if reason else ""
        while True:
            line = (await self._reader.readline()).decode("latin-1").rstrip("\r\n")
            if not line:
                break
            key, _, value = line.partition(":")
            key, value = key.strip().lower(), value.strip()
            self.headers[key] = f"{self.headers[key]}, {value}" if key in self.headers else value
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        if not self._chunked and "content-length" in self.headers:
            self._left = int(self.headers["content-length"])

    async def _read_more(self) -> bool:
        """Read one piece of the body and parse it; False once the body has ended."""
        if self.ended:
            return False
        data = await self._read_body()
        if not data:
            self.ended = True
            self._feed(b"\n" if self._partial else b"")  # a last line without newline
            return False
        self.raw += data
        self._feed(data)
        return True

    async def _read_body(self) -> bytes:
        try:
            if self._chunked:
                size_line = await self._reader.readline()
                if not size_line:
                    return b""
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await self._reader.readline()  # the empty trailer section
                    return b""
                data = await self._reader.readexactly(size)
                await self._reader.readexactly(2)  # CRLF after the chunk
                return data
            if self._left is not None:
                if self._left == 0:
                    return b""
                data = await self._reader.read(min(self._left, 65536))
                self._left -= len(data)
                return data
            return await self._reader.read(65536)
        except (asyncio.IncompleteReadError, ConnectionError):
            return b""  # the server closed the socket mid-body: the stream ended

    def _feed(self, data: bytes) -> None:
        # Feed the parser whole lines, one at a time: it rescans its buffer per line,
        # so this keeps large payloads (tens of KB per line) linear.
        data = self._partial + data
        cut = data.rfind(b"\n")
        if cut < 0:
            self._partial = data
            return
        self._partial = data[cut + 1 :]
        for line in data[:cut].split(b"\n"):
            for event in self.parser.feed(line + b"\n"):
                self.events.append(event)
                self._pending.append(event)


async def open_stream(
    base_url: str,
    path: str = "/api/v1/stream",
    *,
    token: str | None = None,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    cookies: Mapping[str, str] | None = None,
    last_event_id: str | None = None,
    rcvbuf: int | None = None,
) -> SSEClient:
    """GET a stream endpoint and read the status line and headers.

    Args:
        token: sent as ``Authorization: Bearer`` (use `params` or `cookies` for the others).
        last_event_id: sent as the ``Last-Event-ID`` header.
        rcvbuf: SO_RCVBUF for the socket, set before connecting (a small receive window
            makes a client that stops reading fill the server's buffers quickly).
    """
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    target = path + ("?" + urlencode(dict(params)) if params else "")
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}:{port}",
        "Accept: text/event-stream",
        "Cache-Control: no-cache",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if last_event_id is not None:
        lines.append(f"Last-Event-ID: {last_event_id}")
    if cookies:
        lines.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in cookies.items()))
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        async with asyncio.timeout(WAIT):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
    client = SSEClient(reader, writer)
    try:
        writer.write(request)
        async with asyncio.timeout(WAIT):
            await writer.drain()
            await client._start()
    except BaseException:
        await client.close()
        raise
    return client


@contextlib.asynccontextmanager
async def sse_stream(
    base_url: str, path: str = "/api/v1/stream", **kw: Any
) -> AsyncIterator[SSEClient]:
    """`open_stream` as a context manager that closes the socket at the end."""
    client = await open_stream(base_url, path, **kw)
    try:
        yield client
    finally:
        await client.close()


class Api:
    """The REST side of a server for tests: ``await api.publish(users=["alice"], data=...)``.

    Requests carry the server's API key unless a `token` is given.
    """

    def __init__(self, base_url: str, api_key: str) -> None:
        self.api_key = api_key
        self.http = httpx.AsyncClient(base_url=base_url, timeout=WAIT)

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    def _auth(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.api_key}"}

    async def post(
        self, path: str, body: Any = None, *, token: str | None = None, content: bytes | None = None
    ) -> httpx.Response:
        headers = self._auth(token)
        if content is None:
            content = orjson.dumps(body)
        headers["Content-Type"] = "application/json"
        return await self.http.post(path, content=content, headers=headers)

    async def get(self, path: str, *, token: str | None = None) -> httpx.Response:
        return await self.http.get(path, headers=self._auth(token))

    async def publish(self, *, token: str | None = None, **body: Any) -> str:
        """POST /api/v1/publish; asserts the 202 and returns the event id."""
        response = await self.post("/api/v1/publish", body, token=token)
        assert response.status_code == 202, response.text
        event_id: str = response.json()["id"]
        return event_id

    async def publish_batch(self, messages: list[dict[str, Any]]) -> list[str]:
        response = await self.post("/api/v1/publish/batch", {"messages": messages})
        assert response.status_code == 202, response.text
        ids: list[str] = response.json()["ids"]
        return ids


async def expect_marker(client: SSEClient, api: Api, **target: Any) -> None:
    """Publish a fresh `marker` event to `target` and assert it is `client`'s very next event.

    This proves a negative without waiting for time to pass: anything that should not
    have reached `client` but did would arrive before the marker (one stream's order).
    """
    tag = "marker-" + secrets.token_hex(6)
    await api.publish(event="marker", data=tag, **target)
    event = await client.next_event()
    assert (event.event, event.data) == ("marker", tag), f"expected only the marker, got {event}"
