"""The SSE fast path (server/fastpath.py, server/fasthttp.py).

Unit tests: request heads and response framing, bytes in, values out. End to end: a
real `tidings serve` with ``TIDINGS_FASTPATH=1`` (and ``=0`` where the two paths must
answer alike), over raw sockets, so every byte of the HTTP exchange is visible.
Tests synchronise on what the server sends, never on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httptools
import orjson
import pytest
from websockets.asyncio.client import connect

from server import StartServer, TidingsServer
from sse_client import WAIT, Api, SSEClient, expect_marker, open_stream, sse_stream, until
from tidings.auth import Principal
from tidings.connection import SSEConnection
from tidings.event import CloseReason, Event
from tidings.server import fastpath
from tidings.server.fasthttp import (
    LAST_CHUNK,
    MAX_HEAD,
    HeadCache,
    HeadError,
    RequestHead,
    chunk,
    head_end,
    is_stream,
    may_be_stream,
    parse_head,
    response_head,
    status_line,
    stream_head,
)
from tidings.wire import SSEParser

STREAM_PATHS = fastpath.STREAM_PATHS
STREAM_PATHS_B = [p.encode() for p in sorted(STREAM_PATHS)]


# -- request heads --------------------------------------------------------------------------


def test_head_end_is_the_length_through_the_blank_line() -> None:
    assert head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == 27
    assert head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /next") == 27
    assert head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") == -1
    assert head_end(b"") == -1


@pytest.mark.parametrize(
    "start",
    [
        b"",
        b"G",
        b"GET",
        b"GET /",
        b"GET /api/v1/str",
        b"GET /api/v1/stream",
        b"GET /api/v1/stream?topics=a",
        b"GET /api/v1/stream HTTP/1.1\r\n",
        b"GET /sse/stream ",
        b"GET /api/sse/events?x",
        b"GET /api/v1/notifications/stream HTTP/1.1\r\nHost: x\r\n",
    ],
)
def test_may_be_stream_while_a_stream_request_line_is_possible(start: bytes) -> None:
    assert may_be_stream(start, STREAM_PATHS_B)


@pytest.mark.parametrize(
    "start",
    [
        b"P",
        b"POST /api/v1/stream HTTP/1.1\r\n",
        b"GET /healthz HTTP/1.1\r\n",
        b"GET /api/v1/streams HTTP/1.1\r\n",
        b"GET /api/v1/stream/x HTTP/1.1\r\n",
        b"GET /api/v1/ws?token=x HTTP/1.1\r\n",
        b"get /api/v1/stream HTTP/1.1\r\n",
        b"HEAD /api/v1/stream HTTP/1.1\r\n",
        b"GET /api/v1/%73tream HTTP/1.1\r\n",
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello on a plain port
    ],
)
def test_anything_else_is_known_at_its_first_bytes(start: bytes) -> None:
    assert not may_be_stream(start, STREAM_PATHS_B)


def test_parse_head_gives_method_path_query_version_and_lowercase_headers() -> None:
    raw = (
        b"GET /api/v1/stream?topics=a,b&token=t HTTP/1.1\r\n"
        b"Host: example\r\nLast-Event-ID: abc.def\r\nCookie: tidings_token=x\r\n"
        b"X-Dup: 1\r\nX-Dup: 2\r\n\r\n"
    )
    head = parse_head(raw)
    assert (head.method, head.path, head.raw_path, head.query, head.version) == (
        "GET",
        "/api/v1/stream",
        b"/api/v1/stream",
        b"topics=a,b&token=t",
        "1.1",
    )
    assert head.headers[:3] == [
        (b"host", b"example"),
        (b"last-event-id", b"abc.def"),
        (b"cookie", b"tidings_token=x"),
    ]
    assert head.header(b"x-dup") == b"2" and head.header(b"nope") is None
    assert head.keep_alive and head.complete and not head.upgrade
    assert is_stream(head, STREAM_PATHS)


def test_a_head_without_query_has_an_empty_one() -> None:
    head = parse_head(b"GET /sse/stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (head.path, head.query) == ("/sse/stream", b"")
    assert is_stream(head, STREAM_PATHS)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"GET /api/v1/stream HTTP/1.0\r\nHost: x\r\n\r\n", "HTTP/1.0"),
        (b"POST /api/v1/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", "POST"),
        (b"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n", "a body"),
        (b"GET /api/v1/stream HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked body"),
        (
            b"GET /api/v1/stream HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "an upgrade",
        ),
        (b"GET /api/v1/%73tream HTTP/1.1\r\nHost: x\r\n\r\n", "an escaped path"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "another path"),
    ],
)
def test_only_a_bodiless_http11_get_on_a_stream_path_is_a_stream(raw: bytes, why: str) -> None:
    assert not is_stream(parse_head(raw), STREAM_PATHS), why


def test_connection_close_and_http10_are_not_keep_alive() -> None:
    assert not parse_head(b"GET /sse/stream HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive
    assert not parse_head(b"GET /sse/stream HTTP/1.0\r\n\r\n").keep_alive


def test_an_upgrade_is_flagged() -> None:
    head = parse_head(
        b"GET /api/v1/ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert head.upgrade and head.path == "/api/v1/ws"


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /x HTTP/9.9\r\n\r\n",
        b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n",
        b"\x16\x03\x01\x02\x00\r\n\r\n",
    ],
)
def test_a_malformed_head_is_a_head_error(raw: bytes) -> None:
    with pytest.raises(HeadError):
        parse_head(raw)


# -- responses ------------------------------------------------------------------------------


def test_status_lines() -> None:
    assert status_line(200) == b"HTTP/1.1 200 OK\r\n"
    assert status_line(401) == b"HTTP/1.1 401 Unauthorized\r\n"
    assert status_line(599) == b"HTTP/1.1 599 \r\n"


def test_response_head_puts_defaults_first_and_lets_the_response_override_them() -> None:
    head = response_head(
        200,
        [(b"content-type", b"text/event-stream"), (b"server", b"tidings")],
        [(b"date", b"Mon"), (b"server", b"uvicorn")],
        chunked=True,
    )
    assert head == (
        b"HTTP/1.1 200 OK\r\ndate: Mon\r\ncontent-type: text/event-stream\r\n"
        b"server: tidings\r\ntransfer-encoding: chunked\r\n\r\n"
    )


def test_response_head_adds_connection_close_once() -> None:
    plain = response_head(401, [(b"content-length", b"2")], close=True)
    assert plain == b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\nconnection: close\r\n\r\n"
    given = response_head(401, [(b"connection", b"close")], close=True)
    assert given.count(b"connection") == 1


def test_stream_head_is_response_heads_for_the_lists_given() -> None:
    headers = [(b"content-type", b"text/event-stream")]
    defaults = [(b"date", b"Mon"), (b"server", b"uvicorn")]
    first = stream_head(headers, defaults)
    assert first == response_head(200, headers, defaults, chunked=True)
    assert stream_head(headers, defaults) is first  # remembered
    tick = [(b"date", b"Tue"), (b"server", b"uvicorn")]  # uvicorn's next second: a new list
    assert stream_head(headers, tick) == response_head(200, headers, tick, chunked=True)
    other = [(b"content-type", b"text/event-stream"), (b"vary", b"Origin")]
    assert stream_head(other, tick) == response_head(200, other, tick, chunked=True)


def test_chunks_parse_back_with_a_real_http_parser() -> None:
    payload = "你好, 世界\n".encode()
    body = chunk(b"retry: 3000\n\n") + chunk(b"") + chunk(payload) + LAST_CHUNK
    head = response_head(200, [], chunked=True)
    got: list[bytes] = []
    done: list[bool] = []

    class Collect:
        def on_body(self, data: bytes) -> None:
            got.append(data)

        def on_message_complete(self) -> None:
            done.append(True)

    httptools.HttpResponseParser(Collect()).feed_data(head + body)
    assert b"".join(got) == b"retry: 3000\n\n" + payload and done == [True]


def test_a_chunked_connection_frames_events_as_whole_chunks() -> None:
    conn = fastpath.ChunkedSSEConnection(Principal("alice"), ["u:alice"], limit=4)
    conn.pending = None
    conn.set_position("u:alice", 0)
    event = Event("e1", "", "greeting", {"text": "你好"}, (("u:alice", 1),))
    assert conn.deliver(event)
    framed = conn.drain()[0]
    size, _, rest = framed.partition(b"\r\n")
    assert int(size, 16) == len(rest) - 2 and rest.endswith(b"\r\n")
    (parsed,) = SSEParser().feed(rest[:-2])
    assert (parsed.event, parsed.json(), parsed.id) == ("greeting", {"text": "你好"}, conn.cursor())
    assert conn.heartbeat_frame() == chunk(b": ping\n\n")


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, data = data.partition(b"\r\n")
        n = int(size, 16)
        out, data = out + data[:n], data[n + 2 :]
    return out


async def test_the_inlined_offer_delivers_exactly_what_the_base_class_would() -> None:
    """ChunkedSSEConnection.offer takes a shortcut for single-stream events on a writable
    connection; frames (once dechunked), positions and cursors must equal the general
    path's, including duplicates, foreign streams, multi-stream events and a pause."""
    streams = ["u:amy", "b", "t:news", "t:sport"]

    class Reference(fastpath.ChunkedSSEConnection):
        __slots__ = ()
        offer = SSEConnection.offer  # the general path: deliver -> frame -> push

    written: dict[str, list[bytes]] = {"fast": [], "ref": []}
    conns = {
        "fast": fastpath.ChunkedSSEConnection(Principal("amy"), streams, limit=1000, epoch="ep1"),
        "ref": Reference(Principal("amy"), streams, limit=1000, epoch="ep1"),
    }
    for name, conn in conns.items():
        for stream in streams:
            conn.set_position(stream, 2)
        conn.pending = None
        conn.direct = written[name].append

    await _a_lone_event()
    seqs = {s: 2 for s in [*streams, "t:other"]}

    def event(n: int, *on: str, again: bool = False) -> Event:
        if not again:
            for s in on:
                seqs[s] += 1
        return Event(f"e{n}", "", "tick", {"n": n, "文": "字"}, tuple((s, seqs[s]) for s in on))

    script = [event(0, "t:news"), event(1, "t:news"), event(1, "t:news", again=True)]
    script += [event(2, "u:amy"), event(3, "t:other"), event(4, "t:news", "b")]
    script += [event(5, "t:sport"), event(6, "b", "u:amy"), Event("old", "", "x", 1, (("b", 1),))]
    for n, ev in enumerate(script):
        if n == 6:  # paused: both buffer from here on
            await asyncio.sleep(0)  # the fast path's frames of this iteration are flushed
            for conn in conns.values():
                conn.direct = None
        results = {name: conn.offer(ev) for name, conn in conns.items()}
        assert results["fast"] == results["ref"], ev
    fast, ref = conns["fast"], conns["ref"]
    assert len(written["fast"]) == 2  # the first event as offered, the next five in one write
    assert _dechunk(b"".join(written["fast"])) == _dechunk(b"".join(written["ref"]))
    assert fast.drain() == ref.drain()  # the frames buffered while paused
    assert (fast.positions, fast.cursor()) == (ref.positions, ref.cursor())
    assert len(list(SSEParser().feed(_dechunk(b"".join(written["ref"]))))) == 4  # not vacuous


def _writable(user_id: str, limit: int = 1000) -> tuple[fastpath.ChunkedSSEConnection, list[bytes]]:
    conn = fastpath.ChunkedSSEConnection(Principal(user_id), [f"u:{user_id}"], limit=limit)
    conn.set_position(f"u:{user_id}", 0)
    conn.pending = None
    writes: list[bytes] = []
    conn.direct = writes.append
    return conn, writes


async def _a_lone_event() -> None:
    """A loop iteration with one event: the next iteration's first event is written as
    it is offered, whatever earlier tests left behind."""
    conn, _ = _writable("lone")
    assert conn.offer(Event("lone", "", "message", 0, (("u:lone", 1),)))
    await asyncio.sleep(0)


async def test_the_first_event_of_an_iteration_is_written_as_offered_later_ones_coalesced() -> None:
    await _a_lone_event()
    conn, writes = _writable("bo", limit=2)

    def offer(seq: int) -> None:
        assert conn.offer(Event(f"e{seq}", "", "message", seq, (("u:bo", seq),)))

    offer(1)
    assert len(writes) == 1  # as offered: the client reads it while the pass goes on
    for seq in range(2, 6):  # more than `limit`: a burst is not an overflow
        offer(seq)
    assert len(writes) == 1 and conn.closed is None
    await asyncio.sleep(0)
    assert len(writes) == 2 and not conn.buffer  # the rest of the iteration in one write
    offer(6)
    offer(7)
    assert len(writes) == 2  # after an iteration of several events, everything coalesces
    await asyncio.sleep(0)
    assert len(writes) == 3
    offer(8)
    await asyncio.sleep(0)  # one event alone ...
    assert len(writes) == 4
    offer(9)
    assert len(writes) == 5  # ... and the next iteration writes as it goes again
    frames = SSEParser().feed(_dechunk(b"".join(writes)))
    assert [e.data for e in frames] == [str(seq) for seq in range(1, 10)]


async def test_a_paused_connection_buffers_in_order_then_overflows_as_slow() -> None:
    await _a_lone_event()
    conn, writes = _writable("cy", limit=3)
    conn.offer(Event("e1", "", "message", 1, (("u:cy", 1),)))  # written as offered
    conn.direct = None  # the transport paused: no writes, frames wait in the buffer
    for seq in (2, 3, 4):
        assert conn.offer(Event(f"e{seq}", "", "message", seq, (("u:cy", seq),)))
    await asyncio.sleep(0)
    assert len(writes) == 1 and conn.closed is None
    frames = SSEParser().feed(_dechunk(b"".join(writes + conn.buffer)))
    assert [e.data for e in frames] == ["1", "2", "3", "4"]
    conn.offer(Event("e5", "", "message", 5, (("u:cy", 5),)))
    assert conn.closed is CloseReason.SLOW and len(writes) == 1


def test_the_switch_is_the_environment_then_the_module_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for value, expected in [("0", False), ("off", False), ("1", True), ("yes", True)]:
        monkeypatch.setenv("TIDINGS_FASTPATH", value)
        assert fastpath.enabled() is expected
    monkeypatch.delenv("TIDINGS_FASTPATH")
    assert fastpath.enabled() is fastpath.ENABLED


# -- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TidingsServer]:
    """One fast-path server at debug level, so its log shows which path served a stream."""
    env = {"TIDINGS_FASTPATH": "1", "TIDINGS_LOG_LEVEL": "debug", "TIDINGS_PUBLIC_TOPICS": "lobby"}
    with TidingsServer(tmp_path_factory.mktemp("fast"), env) as server:
        yield server
    assert "Traceback" not in server.log(), server.log()


@pytest.fixture
async def api(srv: TidingsServer) -> AsyncIterator[Api]:
    async with Api(srv.url, srv.api_key) as client:
        yield client


def user() -> str:
    return "u-" + secrets.token_hex(4)


def served_fast(srv: TidingsServer, welcome: dict[str, Any]) -> bool:
    """Whether the fast path opened this connection (its debug line names it)."""
    return any(
        welcome["connection_id"] in line and "(fast path)" in line
        for line in srv.log().splitlines()
    )


class Raw:
    """A plain TCP connection for exchanges `SSEClient` does not model (several requests
    on one connection, odd request heads)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, srv: TidingsServer) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        return cls(reader, writer)

    async def hand_to_uvicorn(self) -> None:
        """Make a request the fast path does not serve: uvicorn's connection from now on."""
        await self.send(get("/healthz"))
        assert (await self.response())[0] == 200

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """One response with a Content-Length body: status, headers, body."""
        async with asyncio.timeout(WAIT):
            status = int((await self.reader.readline()).split(b" ")[1])
            headers: dict[str, str] = {}
            while line := (await self.reader.readline()).strip():
                key, _, value = line.decode("latin-1").partition(":")
                headers[key.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def until(self, marker: bytes) -> bytes:
        """Read until `marker` has arrived; returns everything read."""
        data = b""
        async with asyncio.timeout(WAIT):
            while marker not in data:
                more = await self.reader.read(65536)
                assert more, f"the connection ended before {marker!r}: {data!r}"
                data += more
        return data

    async def eof(self) -> bytes:
        data = b""
        async with asyncio.timeout(WAIT):
            while more := await self.reader.read(65536):
                data += more
        return data

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_a_stream_gets_retry_welcome_and_events_through_the_fast_path(
    srv: TidingsServer, api: Api
) -> None:
    alice = user()
    async with sse_stream(
        srv.url, token=srv.token(alice, topics=["news"]), params={"topics": "news,lobby"}
    ) as s:
        assert s.status == 200
        assert s.header("content-type") == "text/event-stream; charset=utf-8"
        assert s.header("cache-control") == "no-cache"
        assert s.header("transfer-encoding") == "chunked"
        first = await s.next_event()
        assert (first.event, first.retry) == ("retry", 3000)
        welcome = await s.next_event("welcome")
        body = welcome.json()
        assert (body["user_id"], body["topics"], body["unread_count"]) == (
            alice,
            ["news", "lobby"],
            0,
        )
        assert served_fast(srv, body)
        text = "你好，世界 — 通知 🚀"
        await api.publish(topics=["news"], data=text)
        await api.publish(users=[alice], event="direct", data={"消息": text})
        news = await s.next_event()
        assert (news.event, news.data) == ("message", text)
        direct = await s.next_event()
        assert (direct.event, direct.json()) == ("direct", {"消息": text})
        assert news.id and direct.id and news.id != direct.id


async def test_a_batch_bigger_than_the_buffer_reaches_a_reader_that_keeps_up(
    srv: TidingsServer, api: Api
) -> None:
    dan = user()
    async with sse_stream(srv.url, token=srv.token(dan)) as s:
        assert served_fast(srv, (await s.next_event("welcome")).json())
        await api.publish_batch([{"users": [dan], "data": {"n": n}} for n in range(1000)])
        assert [(await s.next_event()).json()["n"] for _ in range(1000)] == list(range(1000))
        await expect_marker(s, api, users=[dan])


async def test_every_stream_path_is_served_fast(srv: TidingsServer) -> None:
    for path in sorted(STREAM_PATHS):
        async with sse_stream(srv.url, path, token=srv.token(user())) as s:
            assert served_fast(srv, (await s.next_event("welcome")).json()), path


async def test_a_request_head_in_single_bytes_still_opens_a_stream(srv: TidingsServer) -> None:
    raw = await Raw.connect(srv)
    try:
        for byte in get("/api/v1/stream", f"Authorization: Bearer {srv.token(user())}"):
            await raw.send(bytes([byte]))
        data = await raw.until(b"event: welcome")
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        await raw.close()


async def test_auth_failures_are_json_401_before_any_200(srv: TidingsServer) -> None:
    expired = srv.token(user(), ttl_s=-60)
    for headers in [(), (f"Authorization: Bearer {expired}",), ("Authorization: Bearer junk",)]:
        raw = await Raw.connect(srv)
        try:
            await raw.send(get("/api/v1/stream", *headers))
            status, head, body = await raw.response()
            assert status == 401, body
            assert head["content-type"] == "application/json"
            assert head["www-authenticate"] == "Bearer"
            assert orjson.loads(body)["error"]["code"] == "unauthorized"
        finally:
            await raw.close()


async def test_after_an_error_the_connection_serves_more_requests(srv: TidingsServer) -> None:
    raw = await Raw.connect(srv)
    try:
        await raw.send(
            get("/api/v1/stream?topics=secret", f"Authorization: Bearer {srv.token('x')}")
        )
        assert (await raw.response())[0] == 403
        await raw.send(get("/api/v1/stream"))  # again the fast path: no credential
        assert (await raw.response())[0] == 401
        await raw.send(get("/healthz"))  # now uvicorn's
        status, _, body = await raw.response()
        assert status == 200, body
        await raw.send(get("/api/v1/stats", f"Authorization: Bearer {srv.api_key}"))
        status, _, body = await raw.response()
        assert status == 200 and "connections" in orjson.loads(body), body
    finally:
        await raw.close()


@pytest.mark.parametrize(
    "malformed",
    [
        b"GET /api/v1/stream HTTP/1.1\r\nBad Header\r\n\r\n",
        b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        b"GARBAGE\r\n\r\n",
    ],
)
@pytest.mark.parametrize("after", ["nothing", "an answered request", "a pipelined request"])
async def test_a_request_that_is_not_http_gets_a_json_400_and_the_close(
    srv: TidingsServer, malformed: bytes, after: str
) -> None:
    # Alone, the fast path hands it to uvicorn, which cannot parse it either; after a
    # request uvicorn served, uvicorn reads it on the same connection. Both answer it as
    # every other refusal is answered (uvicorn's own answer is a line of plain text);
    # pipelined, after the answer due before it.
    raw = await Raw.connect(srv)
    try:
        if after == "an answered request":
            await raw.hand_to_uvicorn()
        if after == "a pipelined request":
            await raw.send(get("/readyz") + malformed)
            status, _, body = await raw.response()
            assert status == 200 and orjson.loads(body)["status"] == "ok", body
        else:
            await raw.send(malformed)
        status, headers, body = await raw.response()
        assert status == 400, body
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        assert orjson.loads(body) == {
            "error": {"code": "invalid_request", "message": "malformed HTTP request"}
        }
        assert await raw.eof() == b""
    finally:
        await raw.close()
    assert "Traceback" not in srv.log()


async def test_a_stream_with_a_request_pipelined_behind_it_sees_its_client_leave(
    srv: TidingsServer, api: Api
) -> None:
    # uvicorn tells only its newest request (the pipelined one, never started) that the
    # client left; the stream before it would learn it from a failed write, with a logged
    # traceback, up to a heartbeat later.
    name = user()
    raw = await Raw.connect(srv)
    try:
        await raw.hand_to_uvicorn()
        token = srv.token(name)
        await raw.send(get("/api/v1/stream", f"Authorization: Bearer {token}") + get("/healthz"))
        await raw.until(b"event: welcome")
    finally:
        await raw.close()

    async def offline() -> bool:
        presence = (await api.get(f"/api/v1/presence/{name}")).json()
        return presence["online"] is False

    await until(offline, f"{name}'s stream to close")
    assert "Traceback" not in srv.log()


async def test_a_client_that_leaves_during_its_body_is_no_error(srv: TidingsServer) -> None:
    raw = await Raw.connect(srv)
    try:
        await raw.send(
            b"POST /api/v1/publish/batch HTTP/1.1\r\nHost: test\r\n"
            + f"Authorization: Bearer {srv.api_key}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            + b'{"messages": [{"topics": ["lobby"],'
        )
    finally:
        await raw.close()
    line = "client left during POST /api/v1/publish/batch"
    await until(lambda: line in srv.log(), "the server to see the client leave")
    assert "Traceback" not in srv.log()


async def test_a_websocket_upgrade_pipelined_behind_a_request_waits_for_its_answer(
    srv: TidingsServer,
) -> None:
    # The socket changes hands only once the answers due before the upgrade are out
    # (uvicorn handed it over at once: the answer due first was lost, its send failed).
    upgrade = get(
        f"/api/v1/ws?token={srv.token(user())}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    )
    raw = await Raw.connect(srv)
    try:
        await raw.hand_to_uvicorn()
        await raw.send(get("/readyz") + upgrade)
        status, _, body = await raw.response()
        assert status == 200 and orjson.loads(body)["status"] == "ok", body
        assert (await raw.until(b'"welcome"')).startswith(b"HTTP/1.1 101 ")
    finally:
        await raw.close()
    assert "Traceback" not in srv.log()


async def test_pipelined_requests_are_answered_in_order(srv: TidingsServer) -> None:
    raw = await Raw.connect(srv)
    try:
        await raw.send(get("/sse/stream") + get("/healthz") + get("/nowhere"))
        assert [(await raw.response())[0] for _ in range(3)] == [401, 200, 404]
    finally:
        await raw.close()


async def test_a_stream_after_another_request_on_the_connection_uses_the_asgi_path(
    srv: TidingsServer, api: Api
) -> None:
    bob = user()
    raw = await Raw.connect(srv)
    try:
        await raw.send(get("/healthz"))
        assert (await raw.response())[0] == 200
        await raw.send(get("/api/v1/stream", f"Authorization: Bearer {srv.token(bob)}"))
        data = await raw.until(b"event: welcome")
        assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data
        await api.publish(users=[bob], data="还在")
        assert "还在".encode() in await raw.until("还在".encode())
    finally:
        await raw.close()


async def test_connection_close_on_an_error_closes_the_connection(srv: TidingsServer) -> None:
    raw = await Raw.connect(srv)
    try:
        await raw.send(get("/api/v1/stream", "Connection: close"))
        status, head, _ = await raw.response()
        assert (status, head["connection"]) == (401, "close")
        assert await raw.eof() == b""
    finally:
        await raw.close()


async def test_rest_and_websocket_upgrades_reach_the_asgi_app(srv: TidingsServer, api: Api) -> None:
    carol = user()
    url = f"ws://127.0.0.1:{srv.port}/api/v1/ws?token={srv.token(carol)}"
    async with connect(url, open_timeout=WAIT) as ws:
        async with asyncio.timeout(WAIT):
            welcome = orjson.loads(await ws.recv())
            assert (welcome["type"], welcome["user_id"]) == ("welcome", carol)
            await api.publish(users=[carol], data="ws 你好")
            event = orjson.loads(await ws.recv())
        assert (event["type"], event["data"]) == ("event", "ws 你好")
    assert (await api.get("/api/v1/stats")).status_code == 200
    assert (await api.http.get("/healthz")).status_code == 200


async def test_other_methods_on_a_stream_path_reach_the_asgi_app(srv: TidingsServer) -> None:
    raw = await Raw.connect(srv)
    try:
        await raw.send(b"POST /api/v1/stream HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
        status, _, body = await raw.response()
        assert status == 405, body
        await raw.send(b"GET /api/v1/stream HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
        status, _, body = await raw.response()  # a GET with a body: uvicorn's, and 401
        assert status == 401, body
    finally:
        await raw.close()


async def test_cors_headers_are_added_to_fast_streams(start_server: StartServer) -> None:
    srv = start_server(TIDINGS_FASTPATH="1", TIDINGS_CORS_ORIGINS="https://app.example")
    headers = {"Origin": "https://app.example"}
    async with sse_stream(srv.url, token=srv.token("dora"), headers=headers) as s:
        await s.next_event("welcome")
        assert s.header("access-control-allow-origin") == "https://app.example"
        assert s.header("access-control-allow-credentials") == "true"
    async with sse_stream(srv.url, headers=headers) as s:
        assert s.status == 401
        assert s.header("access-control-allow-origin") == "https://app.example"


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TidingsServer, ...]]:
    """The same settings on the ASGI path and on the fast path."""
    env = {
        "TIDINGS_JWT_SECRET": secrets.token_urlsafe(48),
        "TIDINGS_API_KEYS": "key-" + secrets.token_urlsafe(16),
        "TIDINGS_PUBLIC_TOPICS": "lobby",
        "TIDINGS_MAX_CONNECTIONS_PER_USER": "1",
    }
    servers = [
        TidingsServer(tmp_path_factory.mktemp(f"fp{flag}"), {**env, "TIDINGS_FASTPATH": flag})
        for flag in ("0", "1")
    ]
    try:
        for server in servers:
            server.start()
        yield tuple(servers)
    finally:
        for server in servers:
            server.close()


async def test_failures_are_answered_alike_on_both_paths(
    both: tuple[TidingsServer, TidingsServer],
) -> None:
    asgi, fast = both
    token = asgi.token("erin")
    cases: list[tuple[dict[str, str], dict[str, str]]] = [
        ({}, {}),
        ({"Authorization": "Bearer nonsense"}, {}),
        ({"Authorization": f"Bearer {asgi.token('erin', ttl_s=-60)}"}, {}),
        ({"Authorization": f"Bearer {asgi.api_key}"}, {}),
        ({"Authorization": f"Bearer {token}"}, {"topics": "secret"}),
        ({"Authorization": f"Bearer {token}"}, {"topics": "bad topic!"}),
    ]
    for headers, params in cases:
        answers = []
        for server in (asgi, fast):
            async with sse_stream(server.url, headers=headers, params=params) as s:
                body = await s.json()
                names = sorted(set(s.headers) - {"date"})
                answers.append((s.status, names, body))
        assert answers[0] == answers[1], (headers, params)
        assert answers[0][0] >= 400


async def test_over_capacity_is_answered_alike_on_both_paths(
    both: tuple[TidingsServer, TidingsServer],
) -> None:
    answers = []
    for server in both:
        async with sse_stream(server.url, token=server.token("frank")) as first:
            await first.next_event("welcome")
            async with sse_stream(server.url, token=server.token("frank")) as second:
                answers.append((second.status, await second.json()))
    assert answers[0] == answers[1] and answers[0][0] == 503, answers


def _socket_bytes_in_flight() -> int:
    """An upper bound on what the kernel holds between a stalled reader and the server."""
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        wmem_max = 4 * 1024 * 1024
    return wmem_max + 1024 * 1024


async def test_a_slow_reader_is_closed_as_slow_and_resumes_without_loss(
    start_server: StartServer,
) -> None:
    srv = start_server(TIDINGS_FASTPATH="1", TIDINGS_CLIENT_BUFFER_SIZE="4")
    payload = 60_000
    count = math.ceil(_socket_bytes_in_flight() / payload) + 4 + 8
    async with (
        Api(srv.url, srv.api_key) as api,
        sse_stream(srv.url, token=srv.token("slow"), rcvbuf=4096) as slow,
        sse_stream(srv.url, token=srv.token("fast")) as fast,
    ):
        await slow.next_event("welcome")
        await fast.next_event("welcome")
        published = []
        for n in range(count):  # `slow` is not read meanwhile; `fast` reads every event
            data = f"{n:05d}:" + "长" * (payload // 3)
            await api.publish(users=["slow", "fast"], event="big", data=data)
            published.append(data)
            assert (await fast.next_event()).data == data

        got = [e.data for e in await slow.wait_end(within=30)]
        assert 0 < len(got) < count, f"slow got {len(got)} of {count}: it was never dropped"
        assert got == published[: len(got)]

        async with sse_stream(
            srv.url, token=srv.token("slow"), last_event_id=slow.last_id
        ) as again:
            await again.next_event("welcome")
            rest = [(await again.next_event()).data for _ in range(count - len(got))]
            assert rest == published[len(got) :]
            await expect_marker(again, api, users=["slow"])
            assert not any(e.event == "reset" for e in again.events)
        stats = (await api.get("/api/v1/stats")).json()
        metrics = (await api.http.get("/metrics")).text
    assert stats["messages_dropped"] >= 1, stats
    assert 'tidings_disconnects_total{reason="slow"}' in metrics, metrics


async def test_sigterm_sends_the_shutdown_event_and_the_process_exits(
    start_server: StartServer,
) -> None:
    srv = start_server(TIDINGS_FASTPATH="1")
    idle = await Raw.connect(srv)  # a connection that never finishes its request head
    await idle.send(b"GET /api/v1/str")
    streams: list[SSEClient] = []
    try:
        for name in ("gina", "hal"):
            stream = await open_stream(srv.url, token=srv.token(name))
            await stream.next_event("welcome")
            streams.append(stream)
        stopping = asyncio.ensure_future(asyncio.to_thread(srv.stop))
        for stream in streams:
            shutdown = await stream.next_event("shutdown")
            before = stream.events[stream.events.index(shutdown) - 1]
            assert (before.event, before.retry) == ("retry", 1000), stream.events
            assert shutdown.json() == {"reason": "server shutting down"}
            assert await stream.wait_end() == []
            assert stream.ended
        assert await idle.eof() == b""
        code = await stopping
    finally:
        for stream in streams:
            await stream.close()
        await idle.close()
    assert code in (0, -signal.SIGTERM), code
    assert "Traceback" not in srv.log(), srv.log()


async def test_an_oversized_head_is_left_to_uvicorn(srv: TidingsServer) -> None:
    raw = await Raw.connect(srv)
    try:
        await raw.send(b"GET /api/v1/stream HTTP/1.1\r\nX-Big: " + b"a" * (MAX_HEAD + 10))
        await raw.send(b"\r\n\r\n")
        status, _, _ = await raw.response()
        assert status == 401  # uvicorn parsed it and the ASGI path answered
    finally:
        await raw.close()


class _Reference:
    """llhttp's own view of a head, by its callbacks: what `parse_head` must agree with."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /api/v1/stream?topics=a,b&token=t HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x? HTTP/1.1\r\n\r\n",
        b"GET /x?a?b HTTP/1.1\r\n\r\n",
        b"GET /x?q=a%20b#frag HTTP/1.1\r\n\r\n",
        b"GET /x#frag HTTP/1.1\r\n\r\n",
        b"GET http://example.com/x?y=1 HTTP/1.1\r\n\r\n",
        b"GET //x/./y HTTP/1.1\r\n\r\n",
        b"GET * HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nX:a\r\nY:   b c  \r\nZ: \r\nW:\r\nV:\t\tv\t\r\n\r\n",
        b"GET /x HTTP/1.1\r\nX:: a\r\nY: a:b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nX-Dup: 1\r\nx-DUP: 2\r\nCookie: a=b; tidings_token=c\r\n\r\n",
        b"GET /x HTTP/1.1\r\nX: caf\xc3\xa9 \xff\r\n\r\n",
        b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"GET /x HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"POST /api/v1/publish HTTP/1.1\r\nContent-Length: 12\r\nExpect: 100-continue\r\n\r\n",
        b"POST /api/v1/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_headers_and_target_are_read_as_llhttp_reports_them(raw: bytes) -> None:
    reference = _Reference()
    parser = httptools.HttpRequestParser(reference)
    with contextlib.suppress(httptools.HttpParserUpgrade):
        parser.feed_data(raw)
    url = httptools.parse_url(reference.url)
    head = parse_head(raw)
    assert head.headers == reference.headers
    assert (head.raw_path, head.query) == (url.path or b"/", url.query or b"")


# -- the head cache ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
        b"Content-Length: %s\r\n\r\n",
        b"POST /api/v1/publish?token=t HTTP/1.1\r\ncontent-length: %s\r\nConnection: close\r\n\r\n",
        b"GET /api/v1/stream HTTP/1.1\r\nContent-Length: %s\r\n\r\n",
        b"POST /x HTTP/1.1\r\nCONTENT-LENGTH: %s\r\n\r\n",  # another spelling: kept whole
        b"POST /x HTTP/1.0\r\nContent-Length: %s\r\n\r\n",
        b"GET /x HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: %s\r\n\r\n",
        b"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\n\r\n%s",
    ],
)
def test_the_head_cache_reads_every_head_as_parse_head_does(template: bytes) -> None:
    cache = HeadCache()
    for digits in [b"5", b"0", b"12", b"000", b"5", b"999999999", b"1234567890", b"0", b"7"]:
        raw = template % digits if template.endswith(b"\r\n\r\n") else template % b""
        assert cache.parse(raw) == parse_head(raw), digits


def test_the_head_cache_hands_out_copies_and_keeps_no_malformed_head() -> None:
    cache = HeadCache()
    raw = b"POST /api/v1/publish HTTP/1.1\r\nContent-Length: 3\r\n\r\n"
    cache.parse(raw).headers.append((b"x", b"y"))
    assert cache.parse(raw) == parse_head(raw)
    bad = b"POST /api/v1/publish HTTP/1.1\r\nContent-Length: 3\r\nBad Header\r\n\r\n"
    for _ in range(2):
        with pytest.raises(HeadError):
            cache.parse(bad)


@pytest.mark.parametrize("value", [b"", b" ", b"abc", b"-1", b"5 5", b"0x5"])
def test_the_head_cache_reads_a_bad_length_as_parse_head_does(value: bytes) -> None:
    """A kept head's key is the head without its length's digits: the same head with
    an empty (or any unplain) length is parsed, not taken for the kept one."""
    cache = HeadCache()
    template = b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n"
    cache.parse(template % b"42")
    raw = template % value
    try:
        expected: RequestHead | type[HeadError] = parse_head(raw)
    except HeadError:
        expected = HeadError
    if expected is HeadError:
        with pytest.raises(HeadError):
            cache.parse(raw)
    else:
        assert cache.parse(raw) == expected


def test_the_head_cache_is_bounded() -> None:
    cache = HeadCache(size=4)
    for n in range(10):
        cache.parse(b"GET /x%d HTTP/1.1\r\n\r\n" % n)
        assert len(cache._heads) <= 4
    big = b"GET /x HTTP/1.1\r\nX: " + b"a" * HeadCache.MAX_KEPT + b"\r\n\r\n"
    assert cache.parse(big) == parse_head(big) and big not in cache._heads
