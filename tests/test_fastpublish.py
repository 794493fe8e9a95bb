"""``POST /api/v1/publish`` on the fast path (server/fastpublish.py) answers as the ASGI route.

The same requests go, byte for byte over raw sockets, to a server with
``TIDINGS_FASTPATH=0`` and to two on the fast path (publishes answered at once, and
from a task: ``TIDINGS_FASTPATH_EAGER=0``); status, headers (but ``date``) and JSON bodies (event
ids replaced by their order of appearance) must be identical: accepted publishes, every
error of API.md §2 that a publish can meet, idempotent repeats, requests the fast path
leaves to uvicorn (too large, chunked, ``Expect``, ``Origin``, other methods), several
requests on one keep-alive connection and pipelined ones. Then delivery: what the fast
path accepted reaches a subscriber, exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn
from uvicorn.server import ServerState

from server import TidingsServer
from sse_client import WAIT, Api, expect_marker, sse_stream
from tidings.auth import Authenticator, Principal, mint_token
from tidings.config import Settings
from tidings.hub import Hub
from tidings.server import fastpath, fastpublish
from tidings.server.app import create_app
from tidings.server.fasthttp import body_length, may_be_request, parse_head
from tidings.server.fastpublish import REQUEST_LINE, takes

MAX_PAYLOAD = 2048
RATE = 0.01  # publishes per second and tenant on the rate-limited servers: a second is refused
SECRET = secrets.token_urlsafe(48)
KEY = "key-" + secrets.token_urlsafe(16)
TEXT = "你好，世界 — 通知 🚀"
ORIGIN = "https://app.example"

Response = tuple[int, dict[str, str], Any]


# -- which requests are the fast path's -----------------------------------------------------


def head(raw: bytes) -> Any:
    return parse_head(raw + b"\r\n")


@pytest.mark.parametrize(
    ("raw", "length"),
    [
        (b"POST /api/v1/publish HTTP/1.1\r\nContent-Length: 12\r\n", 12),
        (b"POST /api/v1/publish?token=t HTTP/1.1\r\nContent-Length: 0\r\n", 0),
        (b"POST /api/v1/publish HTTP/1.1\r\nContent-Length: 2049\r\n", None),  # over the limit
        (b"POST /api/v1/publish HTTP/1.1\r\n", None),  # no length
        (b"POST /api/v1/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", None),
        (b"POST /api/v1/publish HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n", None),
        (b"POST /api/v1/publish HTTP/1.1\r\nContent-Length: 2\r\nOrigin: https://a.example\r\n", 2),
        (b"POST /api/v1/publish HTTP/1.0\r\nContent-Length: 2\r\n", None),
        (b"POST /api/v1/publish/batch HTTP/1.1\r\nContent-Length: 2\r\n", None),
        (b"PUT /api/v1/publish HTTP/1.1\r\nContent-Length: 2\r\n", None),
        (b"POST /api/v1/%70ublish HTTP/1.1\r\nContent-Length: 2\r\n", None),
    ],
)
def test_the_fast_path_takes_plain_publish_requests_within_the_limit(
    raw: bytes, length: int | None
) -> None:
    assert takes(head(raw), MAX_PAYLOAD) == length


def test_a_body_length_is_one_content_length_of_digits() -> None:
    assert body_length(head(b"POST /x HTTP/1.1\r\nContent-Length: 7\r\n")) == 7
    assert body_length(head(b"GET /x HTTP/1.1\r\n")) is None


@pytest.mark.parametrize(
    ("start", "ours"),
    [
        (b"P", True),
        (b"POST /api/v1/pub", True),
        (b"POST /api/v1/publish HTTP/1.1\r\n", True),
        (b"POST /api/v1/publish?token=x HTTP/1.1\r\n", True),
        (b"POST /api/v1/publish/batch HTTP/1.1\r\n", False),
        (b"POST /api/v1/notifications HTTP/1.1\r\n", False),
        (b"GET /api/v1/publish HTTP/1.1\r\n", False),
    ],
)
def test_a_publish_request_line_is_recognised_at_its_first_bytes(start: bytes, ours: bool) -> None:
    assert may_be_request(start, [REQUEST_LINE]) is ours


def test_known_keys_prove_the_server_only_for_the_built_in_authenticator() -> None:
    settings = Settings(api_keys=[KEY], jwt_secret=SECRET)
    request = head(
        b"POST /api/v1/publish HTTP/1.1\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
    )
    wrong = head(b"POST /api/v1/publish HTTP/1.1\r\nAuthorization: Bearer nope\r\n")
    known = fastpublish.KnownKeys(Authenticator(settings))
    assert [known.principal(request), known.principal(request)] == [Principal.server()] * 2
    assert known.principal(wrong) is None and known.principal(head(b"POST / HTTP/1.1\r\n")) is None

    class Own(Authenticator):  # an app's own: it may decide otherwise
        pass

    assert fastpublish.KnownKeys(Own(settings)).principal(request) is None


# -- the two paths side by side -------------------------------------------------------------


def _servers(factory: pytest.TempPathFactory, **env: str) -> Iterator[tuple[TidingsServer, ...]]:
    settings = {
        "TIDINGS_JWT_SECRET": SECRET,
        "TIDINGS_API_KEYS": KEY,
        "TIDINGS_MAX_PAYLOAD": str(MAX_PAYLOAD),
        "TIDINGS_LOG_LEVEL": "debug",  # access lines tell which path answered (logger name)
        **env,
    }
    paths = [
        {"TIDINGS_FASTPATH": "0"},  # the ASGI route
        {"TIDINGS_FASTPATH": "1"},  # the fast path, answering at once (memory backend)
        {"TIDINGS_FASTPATH": "1", "TIDINGS_FASTPATH_EAGER": "0"},  # the same from a task
    ]
    servers = [TidingsServer(factory.mktemp("fastpublish"), {**settings, **path}) for path in paths]
    try:
        for server in servers:
            server.start()
        yield tuple(servers)
    finally:
        for server in servers:
            server.close()
    for server in servers:
        assert "Traceback" not in server.log(), server.log()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TidingsServer, ...]]:
    """The ASGI route, the fast path, and the fast path with a task per publish."""
    yield from _servers(tmp_path_factory)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TidingsServer, ...]]:
    """The same with TIDINGS_PUBLISH_RATE (a tenant's second publish is refused) and CORS."""
    yield from _servers(
        tmp_path_factory, TIDINGS_PUBLISH_RATE=str(RATE), TIDINGS_CORS_ORIGINS=ORIGIN
    )


def token(user: str, **claims: Any) -> str:
    return mint_token(SECRET, user, **claims)


def post(
    body: Any,
    *headers: str,
    key: str | None = KEY,
    path: str = "/api/v1/publish",
    raw: bytes | None = None,
) -> bytes:
    """One complete request; `body` as JSON unless `raw` gives the bytes."""
    content = raw if raw is not None else orjson.dumps(body)
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(content)}")
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + content


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status = int((await reader.readline()).split(b" ")[1])
    headers: dict[str, str] = {}
    while line := (await reader.readline()).strip():
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def exchange(
    server: TidingsServer, *requests: bytes, pipelined: bool = False
) -> tuple[list[tuple[int, dict[str, str], bytes]], bool]:
    """Send `requests` on one connection (each after the previous answer, or all at once),
    read an answer to each; also whether the server closed the connection afterwards."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    answers = []
    try:
        async with asyncio.timeout(WAIT):
            if pipelined:
                writer.write(b"".join(requests))
            for request in requests:
                if not pipelined:
                    writer.write(request)
                answers.append(await read_response(reader))
            closed = answers[-1][1].get("connection") == "close" and await reader.read() == b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return answers, closed


_ID = re.compile(r"^[0-9a-f]{22}$")


def normalised(answers: list[tuple[int, dict[str, str], bytes]]) -> list[Response]:
    """Without ``date``; event ids as ``id1``, ``id2`` … by first appearance (a repeated
    id stays the same name); a body that is not JSON as text."""
    names: dict[str, str] = {}

    def name(value: Any) -> Any:
        if isinstance(value, str) and _ID.match(value):
            return names.setdefault(value, f"id{len(names) + 1}")
        if isinstance(value, list):
            return [name(v) for v in value]
        if isinstance(value, dict):
            return {k: name(v) for k, v in value.items()}
        return value

    out: list[Response] = []
    for status, headers, body in answers:
        try:
            parsed: Any = name(orjson.loads(body))
        except orjson.JSONDecodeError:
            parsed = body.decode("utf-8", "replace")
        out.append((status, {k: v for k, v in headers.items() if k != "date"}, parsed))
    return out


async def alike(
    servers: tuple[TidingsServer, ...], *requests: bytes, pipelined: bool = False
) -> list[Response]:
    """The normalised answers, asserted identical on both servers; returns them."""
    results = []
    for server in servers:
        answers, closed = await exchange(server, *requests, pipelined=pipelined)
        results.append((normalised(answers), closed))
    for result in results[1:]:
        assert result == results[0], f"ASGI: {results[0]}\nfast: {result}"
    return results[0][0]


def codes(answers: list[Response]) -> list[tuple[int, str | None]]:
    out = []
    for status, _, body in answers:
        error = body.get("error") if isinstance(body, dict) else None
        out.append((status, error["code"] if isinstance(error, dict) else None))
    return out


def sized(size: int) -> bytes:
    """A valid publish body of exactly `size` bytes."""
    start, end = b'{"users": ["u"], "data": "', b'"}'
    return start + b"x" * (size - len(start) - len(end)) + end


def tenant() -> str:
    return "t-" + secrets.token_hex(4)


def cases() -> list[tuple[str, bytes]]:
    t = tenant()
    publisher = token("pub", tenant=t, publish=True)
    topical = token("top", tenant=t, publish=["news:*"])
    return [
        ("accepted", post({"tenant": t, "topics": ["news"], "data": TEXT})),
        (
            "every field",
            post(
                {
                    "tenant": t,
                    "users": ["u1", "u1", "u2"],
                    "topics": "a:b",
                    "broadcast": True,
                    "event": "note.new",
                    "data": {"文": [1, 2.5, None]},
                }
            ),
        ),
        ("a JWT publisher", post({"users": ["u1"], "data": TEXT}, key=publisher)),
        (
            "a JWT in the query",
            post({"users": ["u1"], "data": 1}, key=None, path=f"/api/v1/publish?token={publisher}"),
        ),
        (
            "a JWT in a cookie",
            post({"users": ["u1"]}, f"Cookie: a=b; tidings_token={publisher}", key=None),
        ),
        ("malformed JSON", post(None, raw=b'{"topics": ["a"')),
        ("not JSON at all", post(None, raw="文字".encode())),
        ("an empty body", post(None, raw=b"")),
        ("a JSON array", post(["a"])),
        ("no target", post({"tenant": t, "data": 1})),
        ("a bad topic", post({"topics": ["bad topic!"]})),
        ("users not strings", post({"users": [1]})),
        ("a reserved event", post({"users": ["u"], "event": "welcome"})),
        (
            "unencodable data",
            post(None, raw=b'{"users": ["u"], "data": ' + b"[" * 300 + b"]" * 300 + b"}"),
        ),
        ("exactly the limit", post(None, raw=sized(MAX_PAYLOAD))),
        ("over the limit", post(None, raw=sized(MAX_PAYLOAD + 1))),
        ("no credential", post({"users": ["u"]}, key=None)),
        ("a wrong key", post({"users": ["u"]}, key="nope")),
        # The first Authorization header counts, on every path (fastpublish.KnownKeys).
        ("the key, then a wrong one", post({"users": ["u"]}, "Authorization: Bearer nope")),
        (
            "a wrong key, then the key",
            post({"users": ["u"]}, f"Authorization: Bearer {KEY}", key="nope"),
        ),
        (
            "the key spelt loosely",
            post({"users": ["u"]}, f"authorization:   bearer {KEY}  ", key=None),
        ),
        (
            "the key in the query",
            post({"users": ["u"]}, key=None, path=f"/api/v1/publish?token={KEY}"),
        ),
        (
            "an expired token",
            post({"users": ["u"]}, key=token("pub", tenant=t, publish=True, ttl_s=-60)),
        ),
        ("a token that may not publish", post({"users": ["u"]}, key=token("reader", tenant=t))),
        ("another tenant", post({"tenant": "other", "users": ["u"]}, key=publisher)),
        ("a topic outside the token's", post({"topics": ["sport:x"]}, key=topical)),
        ("users with a topic token", post({"users": ["u"], "topics": ["news:x"]}, key=topical)),
        (
            "chunked",
            post(None, "Transfer-Encoding: chunked", raw=b'f\r\n{"users":["u"]}\r\n0\r\n\r\n'),
        ),
        ("an origin", post({"users": ["u"]}, "Origin: https://app.example")),
        ("GET", b"GET /api/v1/publish HTTP/1.1\r\nHost: test\r\n\r\n"),
        (
            "the batch",
            post({"messages": [{"users": ["u"], "data": TEXT}]}, path="/api/v1/publish/batch"),
        ),
    ]


async def test_every_case_is_answered_alike_on_every_path(
    servers: tuple[TidingsServer, ...],
) -> None:
    seen = {}
    for name, request in cases():
        answers = await alike(servers, request)
        seen[name] = codes(answers)[0]
    assert seen["accepted"] == seen["every field"] == seen["a JWT in a cookie"] == (202, None)
    assert seen["malformed JSON"] == seen["no target"] == (400, "invalid_request")
    assert seen["unencodable data"] == (400, "invalid_request")
    assert seen["exactly the limit"] == (202, None)
    assert seen["over the limit"] == (413, "payload_too_large")
    assert seen["no credential"] == seen["an expired token"] == (401, "unauthorized")
    assert seen["the key, then a wrong one"] == seen["the key spelt loosely"] == (202, None)
    assert (
        seen["a wrong key, then the key"] == seen["the key in the query"] == (401, "unauthorized")
    )
    assert seen["another tenant"] == seen["a topic outside the token's"] == (403, "forbidden")
    assert seen["GET"][0] == 405 and seen["chunked"] == (202, None)


async def test_a_401_carries_www_authenticate_on_every_path(
    servers: tuple[TidingsServer, ...],
) -> None:
    [(status, headers, _)] = await alike(servers, post({"users": ["u"]}, key="nope"))
    assert (status, headers["www-authenticate"]) == (401, "Bearer")


async def test_the_accepted_answer_is_202_with_the_event_id(
    servers: tuple[TidingsServer, ...],
) -> None:
    [(status, headers, body)] = await alike(servers, post({"users": ["u"], "data": TEXT}))
    assert (status, body) == (202, {"id": "id1"})
    assert headers["content-type"] == "application/json"
    assert headers["server"] == "uvicorn"


async def test_an_idempotent_repeat_answers_the_first_id(
    servers: tuple[TidingsServer, ...],
) -> None:
    again = post(
        {"tenant": tenant(), "users": ["u"], "idempotency_key": "k-" + secrets.token_hex(4)}
    )
    answers = await alike(servers, again, again)
    assert [(s, b) for s, _, b in answers] == [(202, {"id": "id1"})] * 2


async def test_rate_limited_publishes_are_429_with_retry_after_on_every_path(
    limited: tuple[TidingsServer, ...],
) -> None:
    t = tenant()
    results = []
    for server in limited:
        answers, _ = await exchange(
            server, post({"tenant": t, "users": ["u"]}), post({"tenant": t, "users": ["u"]})
        )
        results.append(normalised(answers))
    wait = [int(result[1][1].pop("retry-after")) for result in results]  # time-derived
    assert all(1 / RATE - 2 <= w <= 1 / RATE for w in wait), wait
    asgi, *fast = results
    assert all(f == asgi for f in fast), f"ASGI: {asgi}\nfast: {fast}"
    assert codes(asgi) == [(202, None), (429, "rate_limited")]


async def test_cors_answers_alike_on_every_path(limited: tuple[TidingsServer, ...]) -> None:
    """With TIDINGS_CORS_ORIGINS, a request with an Origin is the middleware's (uvicorn's),
    one without is the fast path's: the answers are the same as the ASGI route's."""
    preflight = (
        f"OPTIONS /api/v1/publish HTTP/1.1\r\nHost: test\r\nOrigin: {ORIGIN}\r\n"
        "Access-Control-Request-Method: POST\r\n"
        "Access-Control-Request-Headers: Authorization, Content-Type\r\n\r\n"
    ).encode()
    for request in (
        preflight,
        post({"tenant": tenant(), "users": ["u"]}, f"Origin: {ORIGIN}"),
        post({"tenant": tenant(), "users": ["u"]}, "Origin: https://elsewhere.example"),
        post({"tenant": tenant(), "users": ["u"]}),
        post({"users": ["u"]}, f"Origin: {ORIGIN}", key="nope"),
    ):
        answers = await alike(limited, request)
        assert answers[0][0] in (200, 202, 400, 401), answers
    answers = await alike(limited, post({"tenant": tenant(), "users": ["u"]}, f"Origin: {ORIGIN}"))
    assert answers[0][1]["access-control-allow-origin"] == ORIGIN


async def test_several_requests_on_one_keep_alive_connection(
    servers: tuple[TidingsServer, ...],
) -> None:
    requests = [
        post({"users": ["u"], "data": 1}),
        post(None, raw=b"{"),
        post({"users": ["u"]}, key="nope"),
        post({"users": ["u"], "data": TEXT}),
        b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n",  # uvicorn's from here on
        post({"users": ["u"], "data": 2}),
    ]
    answers = await alike(servers, *requests)
    assert [s for s, _, _ in answers] == [202, 400, 401, 202, 200, 202]


@pytest.mark.parametrize("pipelined", [False, True])
async def test_a_repeated_head_is_answered_as_its_bytes_say(
    servers: tuple[TidingsServer, ...], pipelined: bool
) -> None:
    """The fast path reuses the parse of a publish head sent again byte for byte; a head
    that differs only in its key, or its body's length, is read afresh."""
    same, longer = post({"users": ["u"], "data": 1}), post({"users": ["u"], "data": 12})
    other_key = post({"users": ["u"], "data": 1}, key="n" * len(KEY))
    closing = post({"users": ["u"], "data": 1}, "Connection: close")
    requests = [same, same, other_key, same, longer, longer, same, closing]
    answers = await alike(servers, *requests, pipelined=pipelined)
    assert [s for s, _, _ in answers] == [202, 202, 401, 202, 202, 202, 202, 202]
    assert answers[-1][1]["connection"] == "close"


async def test_pipelined_requests_are_answered_in_order(servers: tuple[TidingsServer, ...]) -> None:
    requests = [
        post({"users": ["u"], "data": n}) if n % 2 == 0 else post({"users": "u"}, key=None)
        for n in range(6)
    ]
    requests.append(post(None, "Connection: close", raw=b'{"users": ["u"]}'))
    answers = await alike(servers, *requests, pipelined=True)
    assert [s for s, _, _ in answers] == [202, 401, 202, 401, 202, 401, 202]
    assert answers[-1][1]["connection"] == "close"


async def test_a_long_pipeline_read_late_is_answered_in_full_and_in_order(
    servers: tuple[TidingsServer, ...],
) -> None:
    """More than the socket buffers hold: the server stops reading while its answers wait."""
    n = 3000
    good, bad = post({"users": ["u"], "data": "长" * 100}), post(None, raw=b"{")
    expected = [400 if i % 7 == 3 else 202 for i in range(n)]
    pipeline = b"".join(bad if status == 400 else good for status in expected)
    for server in servers:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(pipeline)  # sent while the answers are read
            async with asyncio.timeout(WAIT * 3):
                statuses = [(await read_response(reader))[0] for _ in range(n)]
        finally:
            writer.close()
        assert statuses == expected


async def test_a_publish_arriving_a_byte_at_a_time_is_answered(
    servers: tuple[TidingsServer, ...],
) -> None:
    request = post({"users": ["u"], "data": TEXT})
    for server in servers:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            for byte in request:
                writer.write(bytes([byte]))
                await writer.drain()
            async with asyncio.timeout(WAIT):
                assert (await read_response(reader))[0] == 202
        finally:
            writer.close()


async def test_connection_close_closes_after_the_answer(servers: tuple[TidingsServer, ...]) -> None:
    for request in (
        post({"users": ["u"]}, "Connection: close"),
        post(None, "Connection: close", raw=b"[]"),
    ):
        for server in servers:
            answers, closed = await exchange(server, request)
            assert answers[0][1]["connection"] == "close" and closed


async def test_the_fast_server_answered_publishes_itself(
    servers: tuple[TidingsServer, ...],
) -> None:
    access = '"POST /api/v1/publish HTTP/1.1" 202'  # the access line, at debug level
    uvicorn, ours = "uvicorn.access: ", "tidings.access: "  # who wrote it
    new_lines = []
    for server in servers:
        before = len(server.log())
        answers, _ = await exchange(server, post({"users": ["u"]}))
        assert answers[0][0] == 202
        new_lines.append(server.log()[before:])  # written before the answer was
    asgi, *fast = new_lines
    assert "tidings.publish: publish" in asgi
    assert access in asgi and uvicorn in asgi and ours not in asgi
    for lines in fast:
        assert "tidings.publish: publish" in lines
        assert access in lines and ours in lines and uvicorn not in lines


class _Transport(asyncio.Transport):
    """Records what the protocol writes; `handed` is set if it gives the socket away."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.handed = False
        self.three = asyncio.Event()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))
        if len(self.written) == 3:
            self.three.set()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.handed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def is_closing(self) -> bool:
        return False

    def is_reading(self) -> bool:
        return True


@pytest.mark.parametrize("eager", [True, False])
async def test_the_fast_path_answers_publishes_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, eager: bool
) -> None:
    monkeypatch.setattr(fastpublish, "EAGER", eager)
    settings = Settings(
        api_keys=[KEY], jwt_secret=SECRET, database_url=f"sqlite+aiosqlite:///{tmp_path}/t.db"
    )
    app = create_app(settings)
    config = uvicorn.Config(app, http=fastpath.protocol_class(app), log_config=None)
    config.load()
    hub: Hub = app.state.tidings.hub
    async with hub:
        protocol = config.http_protocol_class(
            config=config, server_state=ServerState(), app_state={}
        )
        transport = _Transport()
        protocol.connection_made(transport)
        requests = [post({"users": ["u"], "data": TEXT}), post(None, raw=b"["), post(["x"])]
        protocol.data_received(b"".join(requests))
        assert transport.three.is_set() is eager  # eager: answered before data_received returned
        async with asyncio.timeout(WAIT):
            await transport.three.wait()
    assert not transport.handed
    assert [w.split(b" ", 2)[1] for w in transport.written] == [b"202", b"400", b"400"]


async def test_an_idle_keep_alive_connection_is_closed_as_uvicorn_closes_it(
    servers: tuple[TidingsServer, ...],
) -> None:
    async def idle(server: TidingsServer) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(post({"users": ["u"]}))
            assert (await read_response(reader))[0] == 202
            async with asyncio.timeout(WAIT):
                return await reader.read()  # EOF after uvicorn's timeout_keep_alive (5 s)
        finally:
            writer.close()

    assert await asyncio.gather(*(idle(server) for server in servers)) == [b""] * len(servers)


# -- delivery -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["at once", "in a task"])
async def test_a_fast_publish_reaches_its_subscribers_once(
    servers: tuple[TidingsServer, ...], path: str
) -> None:
    fast = servers[1 if path == "at once" else 2]
    t = tenant()
    async with (
        Api(fast.url, KEY) as api,
        sse_stream(
            fast.url, token=token("alice", tenant=t, topics=["news"]), params={"topics": "news"}
        ) as alice,
    ):
        await alice.next_event("welcome")
        first = post({"tenant": t, "topics": ["news"], "event": "greeting", "data": TEXT})
        key = post({"tenant": t, "users": ["alice"], "data": {"文": 1}, "idempotency_key": "once"})
        answers, _ = await exchange(fast, first, key, key, pipelined=True)
        assert [s for s, _, _ in answers] == [202, 202, 202]
        event = await alice.next_event()
        assert (event.event, event.data) == ("greeting", TEXT)
        event = await alice.next_event()
        assert (event.event, event.json()) == ("message", {"文": 1})
        await expect_marker(alice, api, tenant=t, users=["alice"])  # the repeat delivered nothing
