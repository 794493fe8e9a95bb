"""Opening an SSE stream answers alike on both paths: ``TIDINGS_FASTPATH=0`` (the ASGI
path, server/sse.py) and the default (the fast path, server/fastpath.py).

Both call `tidings.server.streams.open_sse`; these tests hold them to it from the
outside: the same bad requests against two real servers, byte for byte the same
status, headers (but `date`) and JSON error, or the same `reset` for a cursor that
cannot be honoured. A broker that fails while a stream opens is a 503 on both, with
nothing left registered (a throw-away redis-server, killed mid-test).

The fast path opens a stream straight from the request head, or through the app's ASGI
stack when middleware (CORS) or a proxy header may change the answer
(`server/faststream.py`): both ways answer alike too, with CORS and with forwarded
client addresses under a connect rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest

from server import TidingsServer, free_port
from sse_client import WAIT, sse_stream
from tidings.auth import Principal, mint_token
from tidings.config import Settings
from tidings.connection import SSEConnection
from tidings.inbox.schema import new_notification
from tidings.server.app import create_app
from tidings.server.fasthttp import parse_head
from tidings.server.faststream import goes_direct
from tidings.server.http import Credentials
from tidings.server.streams import greet, open_sse

ENV = {
    "TIDINGS_PUBLIC_TOPICS": "lobby,news:*",
    "TIDINGS_MAX_CONNECTIONS_PER_USER": "1",
    "TIDINGS_MAX_TOPICS_PER_CONNECTION": "3",
    "TIDINGS_CONNECT_RATE": "0.5",  # a burst of one per source address
}
PATHS = {"asgi": "0", "fast": None}  # None: the default, which is the fast path


@contextlib.contextmanager
def pair(tmp: pytest.TempPathFactory, **env: str) -> Iterator[dict[str, TidingsServer]]:
    """Two servers with the same settings and credentials: the ASGI path and the fast path."""
    shared = {
        "TIDINGS_JWT_SECRET": secrets.token_urlsafe(48),
        "TIDINGS_API_KEYS": "key-" + secrets.token_urlsafe(16),
        **env,
    }
    servers = {
        name: TidingsServer(tmp.mktemp(name), {**shared, "TIDINGS_FASTPATH": flag})
        for name, flag in PATHS.items()
    }
    try:
        for srv in servers.values():
            srv.start()
        yield servers
    finally:
        for srv in servers.values():
            srv.close()
    for srv in servers.values():
        assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TidingsServer]]:
    with pair(tmp_path_factory, **ENV) as servers:
        yield servers


_sources = iter(range(2, 250))


def source() -> str:
    """A loopback address of its own, so the connect rate of one case spares the others."""
    return f"127.0.1.{next(_sources)}"


class Answer:
    """One response as a client sees it: status, headers but `date`, body or first events."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def key(self) -> tuple[int, dict[str, str], Any]:
        if self.status == 200:
            return self.status, self.headers, _reset_reason(self.body)
        return self.status, self.headers, orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.headers}, {self.body[:300]!r})"


async def request(
    srv: TidingsServer, target: str, headers: list[str], src: str, *, until: bytes = b""
) -> Answer:
    """GET `target` from address `src`; a 200 is read until `until` (or the welcome)."""
    lines = [f"GET {target} HTTP/1.1", "Host: test", "Accept: text/event-stream", *headers]
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, local_addr=(src, 0))
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            status = int((await reader.readline()).split(b" ")[1])
            head: dict[str, str] = {}
            while line := (await reader.readline()).strip():
                name, _, value = line.decode("latin-1").partition(":")
                head[name.strip().lower()] = value.strip()
            if status != 200:
                body = await reader.readexactly(int(head["content-length"]))
            else:
                body = b""
                while (until or b"event: welcome") not in body:
                    more = await reader.read(65536)
                    assert more, f"ended before {until!r}: {body!r}"
                    body += more
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head.pop("date", None)
    return Answer(status, head, body)


def _reset_reason(body: bytes) -> str | None:
    """The `reset` event's reason in the first bytes of a stream (chunk framing and all)."""
    at = body.find(b"event: reset\ndata: ")
    if at < 0:
        return None
    line = body[at:].split(b"\n")[1]
    reason: str = orjson.loads(line.removeprefix(b"data: "))["reason"]
    return reason


def token(srv: TidingsServer, user: str = "erin", **claims: Any) -> str:
    return "Authorization: Bearer " + srv.token(user, **claims)


def cases(srv: TidingsServer) -> list[tuple[str, str, list[str]]]:
    """(what, target, headers): each a request that must not open a plain stream."""
    secret = srv.secret
    now = int(time.time())
    long_sub = jwt.encode({"sub": "x" * 129, "exp": now + 60}, secret, algorithm="HS256")
    bad_tenant = jwt.encode({"sub": "t", "tenant": 5, "exp": now + 60}, secret, algorithm="HS256")
    other_key = jwt.encode({"sub": "erin", "exp": now + 60}, "k" * 48, algorithm="HS256")
    stream = "/api/v1/stream"
    return [
        ("no credential", stream, []),
        ("not a JWT", stream, ["Authorization: Bearer nonsense"]),
        ("expired", stream, [token(srv, ttl_s=-120)]),
        ("signed with another key", stream, [f"Authorization: Bearer {other_key}"]),
        ("sub too long", stream, [f"Authorization: Bearer {long_sub}"]),
        ("tenant not a string", stream, [f"Authorization: Bearer {bad_tenant}"]),
        ("expired in the query", f"{stream}?token={srv.token('erin', ttl_s=-120)}", []),
        ("junk in the cookie", stream, ["Cookie: tidings_token=junk"]),
        ("an API key", stream, [f"Authorization: Bearer {srv.api_key}"]),
        ("a topic not granted", f"{stream}?topics=secret", [token(srv)]),
        ("one bad topic of several", f"{stream}?topics=lobby,secret", [token(srv)]),
        ("a bad topic name", f"{stream}?topics=bad%20topic!", [token(srv)]),
        ("an overlong topic name", f"{stream}?topics={'a' * 300}", [token(srv)]),
        ("too many topics", f"{stream}?topics=news:a,news:b,news:c,news:d", [token(srv)]),
        ("a granted topic, seed path", "/sse/stream?topics=vip", [token(srv, topics=["staff"])]),
    ]


def resume_cases(srv: TidingsServer) -> list[tuple[str, str, list[str]]]:
    """Cursors that cannot be honoured: 200, a welcome, then a `reset` saying why."""
    stream = "/api/v1/stream"
    return [
        ("garbled cursor", stream, ["Last-Event-ID: !!!"]),
        ("bad cursor token", stream, ["Last-Event-ID: ep.zz"]),
        ("overlong cursor", stream, ["Last-Event-ID: " + "a" * 2000]),
        ("another epoch", stream, ["Last-Event-ID: someepoch.aaaaaa1"]),
        ("another epoch in the query", f"{stream}?last_event_id=someepoch.aaaaaa1", []),
    ]


async def test_bad_requests_are_answered_alike_on_both_paths(
    both: dict[str, TidingsServer],
) -> None:
    asgi, fast = both["asgi"], both["fast"]
    statuses = set()
    for (what, target, headers), (_, fast_target, fast_headers) in zip(
        cases(asgi), cases(fast), strict=True
    ):
        a = await request(asgi, target, headers, source())
        f = await request(fast, fast_target, fast_headers, source())
        assert a.key() == f.key(), (what, a, f)
        assert a.status >= 400 and a.headers["content-type"] == "application/json", (what, a)
        statuses.add(a.status)
    assert statuses == {400, 401, 403}  # not vacuous


async def test_unusable_cursors_reset_alike_on_both_paths(both: dict[str, TidingsServer]) -> None:
    asgi, fast = both["asgi"], both["fast"]
    for (what, target, headers), (_, fast_target, _) in zip(
        resume_cases(asgi), resume_cases(fast), strict=True
    ):
        user = "r-" + secrets.token_hex(4)
        a = await request(asgi, target, [*headers, token(asgi, user)], source(), until=b"reset")
        f = await request(fast, fast_target, [*headers, token(fast, user)], source(), until=b"res")
        assert a.key() == f.key(), (what, a, f)
        assert a.key()[2], (what, a)  # a reason was given


async def test_the_connect_rate_is_answered_alike_on_both_paths(
    both: dict[str, TidingsServer],
) -> None:
    answers = []
    for srv in both.values():
        src = source()
        first = await request(srv, "/api/v1/stream", [], src)  # counts, though it fails auth
        second = await request(srv, "/api/v1/stream", [token(srv)], src)
        answers.append((first.key(), second.key()))
    assert answers[0] == answers[1], answers
    assert answers[0][1][0] == 429 and answers[0][1][1]["retry-after"] == "2", answers


async def test_the_per_user_limit_is_answered_alike_on_both_paths(
    both: dict[str, TidingsServer],
) -> None:
    answers = []
    for srv in both.values():
        user = "cap-" + secrets.token_hex(4)
        async with sse_stream(srv.url, token=srv.token(user)) as first:
            await first.next_event("welcome")
            answers.append(
                (await request(srv, "/api/v1/stream", [token(srv, user)], source())).key()
            )
    assert answers[0] == answers[1], answers
    assert answers[0][0] == 503 and answers[0][2]["error"]["code"] == "over_capacity"


async def test_topics_switched_off_are_answered_alike_on_both_paths(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with pair(tmp_path_factory, TIDINGS_ENABLE_TOPICS="false") as servers:
        answers = [
            (await request(s, "/api/v1/stream?topics=lobby", [token(s)], source())).key()
            for s in servers.values()
        ]
    assert answers[0] == answers[1], answers
    assert answers[0][0] == 400 and "TIDINGS_ENABLE_TOPICS" in answers[0][2]["error"]["message"]


# -- straight from the head, or through the ASGI stack (server/faststream.py) ----------------

ORIGIN = "https://app.example"
CORS_HEADERS = ("access-control-allow-origin", "access-control-allow-credentials", "vary")


def without_cors(answer: Answer) -> tuple[int, dict[str, str], Any]:
    status, headers, body = answer.key()
    return status, {k: v for k, v in headers.items() if k not in CORS_HEADERS}, body


async def test_with_cors_streams_open_through_the_middleware_and_answer_as_without(
    tmp_path_factory: pytest.TempPathFactory, both: dict[str, TidingsServer]
) -> None:
    """CORS makes the fast server open streams through the app's middleware (the ASGI
    stack): its answers are the ASGI server's with CORS, and the direct path's (`both`,
    no CORS) but for the CORS headers."""
    origin = f"Origin: {ORIGIN}"
    user = "o-" + secrets.token_hex(4)  # its own: the per-user limit is one stream

    def each(srv: TidingsServer) -> list[tuple[str, str, list[str]]]:
        return [*cases(srv), ("a stream that opens", "/api/v1/stream", [token(srv, user)])]

    with pair(tmp_path_factory, **ENV, TIDINGS_CORS_ORIGINS=ORIGIN) as cors:
        servers = (cors["asgi"], cors["fast"], both["fast"])  # the last: direct, no CORS
        for requests in zip(*(each(srv) for srv in servers), strict=True):
            a, f, d = [
                await request(srv, target, [*headers, origin], source())
                for srv, (_, target, headers) in zip(servers, requests, strict=True)
            ]
            what = requests[0][0]
            assert a.key() == f.key(), (what, a, f)
            assert f.headers["access-control-allow-origin"] == ORIGIN, (what, f)  # middleware
            assert "Origin" in f.headers["vary"], (what, f)
            assert not d.headers.keys() & set(CORS_HEADERS), (what, d)
            assert without_cors(f) == d.key(), (what, f, d)
        assert (a.status, f.status, d.status) == (200, 200, 200)  # the last one opened


async def test_forwarded_clients_count_for_the_connect_rate_alike_on_both_paths(
    both: dict[str, TidingsServer],
) -> None:
    """With a connect rate and uvicorn's proxy headers (it trusts 127.0.0.1), a request
    with X-Forwarded-For opens through the ASGI stack, where the forwarded address is
    the client; one without opens directly and counts for its peer. Both ways share the
    one rate limit, keyed alike, on both servers."""
    proxy = "127.0.0.1"  # uvicorn's default FORWARDED_ALLOW_IPS
    answers = []
    for srv in both.values():
        untrusted = source()

        def ok(srv: TidingsServer = srv) -> str:  # a user of its own: a 200 stays open
            return token(srv, "fwd-" + secrets.token_hex(4))

        steps = [
            (proxy, ["X-Forwarded-For: 10.9.0.1"]),  # 401; counts for 10.9.0.1
            (proxy, ["X-Forwarded-For: 10.9.0.1", ok()]),  # 429: the same forwarded client
            (proxy, ["X-Forwarded-For: 10.9.0.2", ok()]),  # 200: another one, not the proxy
            (untrusted, ["X-Forwarded-For: 10.9.0.3"]),  # 401; an untrusted peer counts itself
            (untrusted, [ok()]),  # 429: the peer again, now on the direct way
            (proxy, ["X-Forwarded-For: 10.9.0.3", ok()]),  # 200: 10.9.0.3 was never counted
        ]
        answers.append([(await request(srv, "/api/v1/stream", h, src)).key() for src, h in steps])
    assert answers[0] == answers[1], answers
    assert [a[0] for a in answers[0]] == [401, 429, 200, 401, 429, 200], answers


async def test_both_ways_write_the_access_and_sse_open_lines_as_before(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """At debug level: the access line (uvicorn's logger on the ASGI path, ours on the
    fast path, either way), and the debug line of each stream that opened."""
    shared = {"TIDINGS_LOG_LEVEL": "debug", "TIDINGS_JWT_SECRET": secrets.token_urlsafe(48)}
    servers = {
        "asgi": TidingsServer(tmp_path_factory.mktemp("asgi"), {**shared, "FASTPATH": "0"}),
        "direct": TidingsServer(tmp_path_factory.mktemp("direct"), shared),
        "stack": TidingsServer(
            tmp_path_factory.mktemp("stack"), {**shared, "CORS_ORIGINS": ORIGIN}
        ),
    }
    try:
        for srv in servers.values():
            srv.start()
        for name, srv in servers.items():
            logger = "uvicorn.access: " if name == "asgi" else "tidings.access: "
            user = "log-" + secrets.token_hex(4)
            before = len(srv.log())
            refused = await request(srv, "/api/v1/stream", [], source())
            opened = await request(srv, "/api/v1/stream?topics=", [token(srv, user)], source())
            assert (refused.status, opened.status) == (401, 200), (name, srv.log())
            lines = srv.log()[before:]  # written before the answers were
            assert f"{logger}127.0.1." in lines, (name, lines)
            assert '"GET /api/v1/stream HTTP/1.1" 401' in lines, (name, lines)
            assert '"GET /api/v1/stream?topics= HTTP/1.1" 200' in lines, (name, lines)
            assert lines.count(logger) == 2, (name, lines)
            assert f" user={user!r} tenant='' topics=[]" in lines, (name, lines)  # sse open
            assert lines.count("sse open ") == 1, (name, lines)
            assert ("(fast path)" in lines) is (name != "asgi"), (name, lines)
    finally:
        for srv in servers.values():
            srv.close()


@pytest.mark.parametrize(
    ("middleware", "proxy_headers", "rate", "forwarded", "direct"),
    [
        (False, True, 0.0, True, True),  # no connect rate: nothing asks for the address
        (False, False, 5.0, True, True),  # no proxy headers: the peer is the client
        (False, True, 5.0, False, True),  # nothing forwarded: the peer is the client
        (False, True, 5.0, True, False),  # the middleware may rewrite the client
        (True, False, 0.0, False, False),  # user middleware (CORS) sees every request
    ],
)
def test_the_rule_for_opening_straight_from_the_head(
    middleware: bool, proxy_headers: bool, rate: float, forwarded: bool, direct: bool
) -> None:
    raw = b"GET /api/v1/stream HTTP/1.1\r\nHost: t\r\n"
    if forwarded:
        raw += b"X-Forwarded-For: 10.0.0.1\r\n"
    head = parse_head(raw + b"\r\n")
    assert (
        goes_direct(head, middleware=middleware, proxy_headers=proxy_headers, connect_rate=rate)
        is direct
    )


# -- a broker that fails while a stream opens ---------------------------------------------


class RedisServer:
    """A throw-away redis-server of our own (the machine's shared one stays untouched)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + WAIT
        while not self.answers():
            assert self.proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not answer"
            time.sleep(0.02)  # polling readiness, not synchronising a test

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def on_redis(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, TidingsServer]]:
    url = f"redis://127.0.0.1:{redis_server.port}/0?prefix=open"
    with pair(tmp_path_factory, TIDINGS_BROKER_URL=url) as servers:
        yield servers


async def connections(srv: TidingsServer) -> float:
    """The server's own count of registered connections (the tidings_connections gauge)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(WAIT):
            data = await reader.read(-1)
    finally:
        writer.close()
    for line in data.decode().splitlines():
        if line.startswith("tidings_connections "):
            return float(line.split()[1])
    raise AssertionError(data)


async def test_a_broker_failure_while_opening_is_503_on_both_paths_and_leaves_nothing(
    redis_server: RedisServer, on_redis: dict[str, TidingsServer]
) -> None:
    for srv in on_redis.values():  # both work while Redis does
        async with sse_stream(srv.url, token=srv.token("ann")) as s:
            assert s.status == 200
            await s.next_event("welcome")
        deadline = time.monotonic() + WAIT
        while await connections(srv) != 0:  # the closed stream is detached
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    await asyncio.to_thread(redis_server.kill)
    answers = {}
    for name, srv in on_redis.items():
        answer = await request(srv, "/api/v1/stream", [token(srv, "bob")], source())
        answers[name] = answer
        assert answer.status == 503, (name, answer, srv.log())
        error = orjson.loads(answer.body)["error"]
        assert error["code"] == "unavailable", (name, error)
        assert f"Redis at 127.0.0.1:{redis_server.port}" in error["message"], (name, error)
        assert await connections(srv) == 0, name  # nothing registered
    # The message may quote the client library's error; everything else is the same.
    asgi, fast = answers["asgi"], answers["fast"]
    assert (asgi.status, asgi.headers.keys()) == (fast.status, fast.headers.keys())


# -- the welcome's unread count -------------------------------------------------------------


async def test_a_read_committed_right_after_the_welcome_count_still_reaches_the_stream(
    tmp_path: Path,
) -> None:
    """The count is read once the connection is attached (`streams.open_sse`): a mark
    read committed just after that read is pushed to the new connection, after its
    welcome, so the client's badge ends right. Read before the attach (as it was), the
    push went to nobody and the welcome's count stayed one too high."""
    secret = secrets.token_urlsafe(48)
    app = create_app(
        Settings(jwt_secret=secret, database_url=f"sqlite+aiosqlite:///{tmp_path}/w.db")
    )
    st = app.state.tidings
    who = Principal(user_id="小明", tenant="t")
    async with st.hub:
        inbox = st.hub.inbox
        [record] = await inbox.notify(
            new_notification(["小明"], type="wage", title="工资已发放", tenant="t")
        )
        counted = st.unread_count

        async def count_then_read(principal: Principal) -> int:
            count = await counted(principal)
            await inbox.mark_read(who, [record["id"]])  # committed right after the read
            return count

        st.unread_count = count_then_read
        token = mint_token(secret, "小明", tenant="t")
        credentials = Credentials({"authorization": f"Bearer {token}"}, {}, {})
        opened = await open_sse(st, credentials, lambda: "127.0.0.1", SSEConnection)
        greet(st, opened)
        frames = b"".join(opened.conn.drain()).decode().split("\n\n")
        st.hub.broker.detach(opened.conn)
    names = [line[7:] for f in frames for line in f.split("\n") if line.startswith("event: ")]
    assert names == ["welcome", "notification.read"]
    [read] = [f for f in frames if "event: notification.read" in f]
    data = orjson.loads(read.split("data: ", 1)[1])
    assert (opened.welcome["unread_count"], data["unread_count"]) == (1, 0)
