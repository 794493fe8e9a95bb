"""WebSocket transport (API.md §5) end to end: a real server on a free port, real sockets,
the `websockets` client library (and, for keep-alive, a raw client that can refuse pongs).

Each test starts its own server in process (so it can configure it and reach its hub)
with `ws_server(...)`. Synchronisation is by messages only: a test waits for what it
expects (with a generous timeout that only turns a hang into a failure), never sleeps.
"""

from __future__ import annotations

import asyncio
import re
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close, Opcode
from websockets.protocol import State as ProtocolState

from server import StartServer, TidingsServer
from sse_client import sse_stream
from tidings.auth import Principal, mint_token
from tidings.backends.memory import MemoryBackend
from tidings.config import Settings
from tidings.event import NOTIFICATION, SYNC, user_stream
from tidings.hub import Hub
from tidings.inbox.schema import new_notification
from tidings.server.app import create_app
from tidings.server.websocket import (
    DIRECT_PROTOCOL,
    WebSocketEndpoint,
    WSSocket,
    uvicorn_options,
)

# The inbox store calls SQLAlchemy 2.1's deprecated Result.tuples() (not ours to change here);
# in process, pytest would turn that warning into a failed request.
pytestmark = pytest.mark.filterwarnings("ignore:The Result.tuples:DeprecationWarning")

SECRET = "s" * 40
API_KEY = "test-api-key-0123456789"
WAIT = 10.0  # turns a hang into a failure; never a synchronisation
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


@dataclass
class Server:
    url: str
    hub: Hub
    settings: Settings
    app: Any

    def ws_url(self, path: str = "/api/v1/ws", **query: str) -> str:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return "ws" + self.url.removeprefix("http") + path + ("?" + qs if qs else "")

    def token(self, user: str, **claims: Any) -> str:
        return mint_token(SECRET, user, **claims)

    def connect(self, path: str = "/api/v1/ws", **kw: Any) -> Any:
        query = kw.pop("query", {})
        kw.setdefault("compression", None)
        return connect(self.ws_url(path, **query), proxy=None, open_timeout=WAIT, **kw)

    async def publish(self, **body: Any) -> str:
        return await self.hub.publish(**body)


@asynccontextmanager
async def ws_server(
    auth_timeout: float | None = None,
    *,
    direct: bool = True,
    deflate: bool = False,
    **overrides: Any,
) -> AsyncIterator[Server]:
    """A server in this process; `direct=False` sends every frame through ASGI (the path
    of an embedding app's own server) instead of `DirectWriter`."""
    workdir = tempfile.TemporaryDirectory(prefix="tidings-ws-")
    overrides.setdefault("database_url", f"sqlite+aiosqlite:///{workdir.name}/tidings.db")
    settings = Settings(jwt_secret=SECRET, api_keys=[API_KEY], **overrides)
    hub = Hub(settings)
    app = create_app(settings, hub=hub)
    if auth_timeout is not None:
        for route in app.routes:
            if isinstance(getattr(route, "endpoint", None), WebSocketEndpoint):
                route.endpoint.auth_timeout = auth_timeout  # type: ignore[attr-defined]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    options = uvicorn_options(settings)
    if not direct:
        options["ws"] = "websockets-sansio"
    options["ws_per_message_deflate"] = deflate
    config = uvicorn.Config(app, lifespan="on", log_config=None, **options)
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    port = sock.getsockname()[1]
    try:
        yield Server(f"http://127.0.0.1:{port}", hub, settings, app)
    finally:
        await server.shutdown(sockets=[sock])
        sock.close()
        workdir.cleanup()


@pytest.fixture(params=["direct", "asgi"])
async def srv(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    async with ws_server(direct=request.param == "direct") as s:
        yield s


async def recv(ws: ClientConnection) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), WAIT)
    assert isinstance(raw, str), "server messages are text frames"
    message = orjson.loads(raw)
    assert isinstance(message, dict)
    assert RFC3339.match(message.pop("timestamp")), message
    return message


async def expect(ws: ClientConnection, kind: str) -> dict[str, Any]:
    message = await recv(ws)
    assert message["type"] == kind, message
    return message


async def send(ws: ClientConnection, **message: Any) -> None:
    await ws.send(orjson.dumps(message).decode())


async def closed(ws: ClientConnection) -> tuple[int | None, str]:
    """Read until the server closes; the close code and reason."""
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), WAIT)
    rcvd = ws.protocol.close_rcvd
    return (rcvd.code, rcvd.reason) if rcvd else (None, "")


async def still_open(ws: ClientConnection) -> None:
    await send(ws, type="ping")
    await expect(ws, "pong")


# -- the seed's client and the welcome ---------------------------------------------------------


async def test_seed_s2_client_query_token_welcome_then_notification(srv: Server) -> None:
    # new WebSocket('ws://host/api/v1/notifications/ws?token=…'), reacting to welcome and
    # notification (seed 002).
    token = srv.token("alice")
    async with srv.connect("/api/v1/notifications/ws", query={"token": token}) as ws:
        welcome = await expect(ws, "welcome")
        assert welcome["user_id"] == "alice"
        assert welcome["unread_count"] == 0
        assert isinstance(welcome["message"], str) and welcome["message"]
        assert welcome["connection_id"] and welcome["id"]
        record = {
            "id": "n1",
            "type": "system",
            "title": "工资已发放",
            "content": "本月工资已到账",
            "priority": "high",
            "sender": {"id": "u0", "username": "财务", "avatar": None},
            "unread_count": 1,
        }
        await srv.hub.emit("", [user_stream("alice")], "message", record, kind=NOTIFICATION)
        note = await expect(ws, "notification")
        assert note["notification"]["title"] == "工资已发放"
        assert note["notification"]["sender"]["username"] == "财务"
        assert "unread_count" not in note["notification"]
        assert note["unread_count"] == 1
        assert note["id"]


async def test_both_paths_serve_the_same_broker(srv: Server) -> None:
    token = srv.token("bob")
    async with (
        srv.connect("/api/v1/ws", query={"token": token}) as a,
        srv.connect("/api/v1/notifications/ws", query={"token": token}) as b,
    ):
        await expect(a, "welcome")
        await expect(b, "welcome")
        assert srv.hub.connection_count("bob") == 2
        await srv.publish(users=["bob"], data={"n": 1})
        for ws in (a, b):
            event = await expect(ws, "event")
            assert event["event"] == "message" and event["data"] == {"n": 1}
            assert "topic" not in event


async def test_event_sync_and_broadcast_messages(srv: Server) -> None:
    async with srv.connect(query={"token": srv.token("carol")}) as ws:
        await expect(ws, "welcome")
        await srv.publish(broadcast=True, event="maintenance", data="今晚维护")
        event = await expect(ws, "event")
        assert event["event"] == "maintenance" and event["data"] == "今晚维护"
        assert "topic" not in event
        for name in ("notification.read", "notification.deleted"):
            await srv.hub.emit(
                "", [user_stream("carol")], name, {"ids": ["n1"], "unread_count": 0}, kind=SYNC
            )
            sync = await expect(ws, name)
            assert sync["ids"] == ["n1"] and sync["unread_count"] == 0 and sync["id"]


# -- auth ----------------------------------------------------------------------------------------


async def test_auth_header(srv: Server) -> None:
    headers = {"Authorization": f"Bearer {srv.token('dave')}"}
    async with srv.connect(additional_headers=headers) as ws:
        assert (await expect(ws, "welcome"))["user_id"] == "dave"


async def test_auth_access_token_query_alias(srv: Server) -> None:
    async with srv.connect(query={"access_token": srv.token("dave")}) as ws:
        assert (await expect(ws, "welcome"))["user_id"] == "dave"


async def test_auth_cookie(srv: Server) -> None:
    headers = {"Cookie": f"tidings_token={srv.token('erin')}"}
    async with srv.connect(additional_headers=headers) as ws:
        assert (await expect(ws, "welcome"))["user_id"] == "erin"


async def test_auth_first_message(srv: Server) -> None:
    async with srv.connect() as ws:
        await send(ws, type="auth", token=srv.token("frank", tenant="acme"))
        welcome = await expect(ws, "welcome")
        assert welcome["user_id"] == "frank" and welcome["tenant"] == "acme"
        await send(ws, type="auth", token=srv.token("frank"))
        error = await expect(ws, "error")
        assert error["code"] == "invalid_request" and error["request"] == "auth"
        await still_open(ws)


async def test_auth_first_message_times_out() -> None:
    async with ws_server(auth_timeout=0.2) as srv, srv.connect() as ws:
        code, reason = await closed(ws)
        assert code == 4401
        assert "auth" in reason


@pytest.mark.parametrize(
    "first",
    [{"type": "ping"}, {"type": "auth"}, {"type": "auth", "token": "not.a.jwt"}, "garbage"],
)
async def test_auth_first_message_refused(srv: Server, first: Any) -> None:
    async with srv.connect() as ws:
        await ws.send(first if isinstance(first, str) else orjson.dumps(first).decode())
        code, reason = await closed(ws)
        assert code == 4401 and reason


@pytest.mark.parametrize(
    ("token", "words"),
    [
        ("garbage", "malformed"),
        (mint_token("x" * 40, "mallory"), "signature"),
        (mint_token(SECRET, "late", ttl_s=-3600), "expired"),
    ],
)
async def test_bad_token_closes_4401_with_reason(srv: Server, token: str, words: str) -> None:
    async with srv.connect(query={"token": token}) as ws:
        code, reason = await closed(ws)
        assert code == 4401
        assert words in reason
    assert srv.hub.broker.connections == {}


async def test_api_key_cannot_open_a_stream(srv: Server) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with srv.connect(additional_headers=headers) as ws:
        code, _ = await closed(ws)
        assert code == 4403


# -- origin, rate and capacity limits -----------------------------------------------------------


async def test_allowed_origins() -> None:
    async with ws_server(allowed_origins=["https://app.example.com"]) as srv:
        token = srv.token("gina")
        async with srv.connect(query={"token": token}, origin="https://app.example.com") as ws:
            await expect(ws, "welcome")
        async with srv.connect(query={"token": token}) as ws:  # no Origin: not a browser
            await expect(ws, "welcome")
        with pytest.raises(InvalidStatus) as refused:
            async with srv.connect(query={"token": token}, origin="https://evil.example"):
                pass
        assert refused.value.response.status_code == 403
        assert b"forbidden" in refused.value.response.body


async def test_connect_rate_limit_refuses_the_handshake() -> None:
    async with ws_server(connect_rate=0.001) as srv:
        token = srv.token("hank")
        async with srv.connect(query={"token": token}) as ws:
            await expect(ws, "welcome")
        with pytest.raises(InvalidStatus) as refused:
            async with srv.connect(query={"token": token}):
                pass
        assert refused.value.response.status_code == 429
        assert refused.value.response.headers["Retry-After"]


async def test_per_user_capacity_closes_1013() -> None:
    async with ws_server(max_connections_per_user=1) as srv:
        token = srv.token("ivan")
        async with srv.connect(query={"token": token}) as first:
            await expect(first, "welcome")
            async with srv.connect(query={"token": token}) as second:
                code, reason = await closed(second)
                assert code == 1013 and "limit" in reason
            await still_open(first)


# -- client messages -----------------------------------------------------------------------------


async def test_ping_pong(srv: Server) -> None:
    async with srv.connect(query={"token": srv.token("judy")}) as ws:
        await expect(ws, "welcome")
        await send(ws, type="ping")
        assert await expect(ws, "pong") == {"type": "pong"}


async def test_subscribe_forbidden_topic_keeps_the_socket(srv: Server) -> None:
    token = srv.token("kim", topics=["orders:*"])
    async with srv.connect(query={"token": token}) as ws:
        await expect(ws, "welcome")
        await send(ws, type="subscribe", topics=["orders:1", "payroll", "bad name!"])
        forbidden = await expect(ws, "error")
        assert forbidden["code"] == "forbidden" and forbidden["topic"] == "payroll"
        invalid = await expect(ws, "error")
        assert invalid["code"] == "invalid_request" and invalid["topic"] == "bad name!"
        subscribed = await expect(ws, "subscribed")
        assert subscribed["topics"] == ["orders:1"] and subscribed["id"]
        await srv.publish(topics=["payroll"], data="secret")
        await srv.publish(topics=["orders:1"], data={"status": "已发货"})
        event = await expect(ws, "event")
        assert event["topic"] == "orders:1" and event["data"] == {"status": "已发货"}
        await still_open(ws)


async def test_connect_query_topics(srv: Server) -> None:
    token = srv.token("lee", topics=["news"])
    async with srv.connect(query={"token": token, "topics": "news,secret"}) as ws:
        welcome = await expect(ws, "welcome")
        assert welcome["topics"] == ["news"]
        error = await expect(ws, "error")
        assert error["code"] == "forbidden" and error["topic"] == "secret"
        await srv.publish(topics=["news"], data=1)
        assert (await expect(ws, "event"))["topic"] == "news"


async def test_unsubscribe(srv: Server) -> None:
    token = srv.token("mia", topics=["a", "b"])
    async with srv.connect(query={"token": token, "topics": "a"}) as ws:
        await expect(ws, "welcome")
        await send(ws, type="subscribe", topics=["b", "a"])
        assert (await expect(ws, "subscribed"))["topics"] == ["b", "a"]
        await send(ws, type="unsubscribe", topics=["a"])
        assert (await expect(ws, "unsubscribed"))["topics"] == ["a"]
        await srv.publish(topics=["a"], data="gone")
        await srv.publish(topics=["b"], data="kept")
        event = await expect(ws, "event")
        assert (event["topic"], event["data"]) == ("b", "kept")
        await send(ws, type="unsubscribe", topics=["b", "never"])
        assert (await expect(ws, "unsubscribed"))["topics"] == ["b", "never"]
        await srv.publish(topics=["b"], data="gone too")
        await srv.publish(users=["mia"], data="personal")
        assert (await expect(ws, "event"))["data"] == "personal"
    assert srv.hub.broker.topic_count() == 0


async def test_topic_limit_per_connection() -> None:
    async with ws_server(max_topics_per_connection=2) as srv:
        token = srv.token("ned", topics=["**"])
        async with srv.connect(query={"token": token, "topics": "t1"}) as ws:
            await expect(ws, "welcome")
            await send(ws, type="subscribe", topics=["t1", "t2", "t3"])
            error = await expect(ws, "error")
            assert error["code"] == "invalid_request" and error["topics"] == ["t3"]
            assert (await expect(ws, "subscribed"))["topics"] == ["t1", "t2"]


async def test_topics_disabled() -> None:
    async with (
        ws_server(enable_topics=False) as srv,
        srv.connect(query={"token": srv.token("oz", topics=["x"])}) as ws,
    ):
        await expect(ws, "welcome")
        await send(ws, type="subscribe", topics=["x"])
        assert (await expect(ws, "error"))["code"] == "invalid_request"
        await still_open(ws)


async def create_notifications(srv: Any, user: str, *titles: str) -> list[dict[str, Any]]:
    """POST /api/v1/notifications (API.md §7) with the server's API key."""
    key = srv.api_key if isinstance(srv, TidingsServer) else API_KEY
    records = []
    async with httpx.AsyncClient(base_url=srv.url, timeout=WAIT) as http:
        for title in titles:
            answer = await http.post(
                "/api/v1/notifications",
                json={"recipients": [user], "type": "system", "title": title, "priority": "high"},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert answer.status_code == 201, answer.text
            records += answer.json()["notifications"]
    return records


async def test_mark_read_syncs_every_connection_of_the_user(srv: Server) -> None:
    token = srv.token("pia")
    async with (
        srv.connect(query={"token": token}) as ws,
        srv.connect(query={"token": token}) as other_ws,
        sse_stream(srv.url, token=token) as sse,
    ):
        await expect(ws, "welcome")
        await expect(other_ws, "welcome")
        await sse.next_event("welcome")
        records = await create_notifications(srv, "pia", "审批通过", "报销已到账")
        for n, record in enumerate(records, 1):
            for socket_ in (ws, other_ws):
                note = await expect(socket_, "notification")
                assert note["notification"]["id"] == record["id"]
                assert note["unread_count"] == n
            pushed = (await sse.next_event()).json()
            assert pushed["id"] == record["id"] and pushed["unread_count"] == n
        await send(ws, type="mark_read", notification_ids=[records[0]["id"]])
        for socket_ in (ws, other_ws):
            read = await expect(socket_, "notification.read")
            assert read["ids"] == [records[0]["id"]] and read["unread_count"] == 1
        synced = await sse.next_event("notification.read")
        assert synced.json() == {"ids": [records[0]["id"]], "unread_count": 1}
        # Already read, or not a notification of this user: acknowledged, nothing changed.
        await send(ws, type="mark_read", ids=[records[0]["id"], "not-a-uuid"])
        read = await expect(ws, "notification.read")
        assert read["ids"] == [] and read["unread_count"] == 1
        assert (await expect(other_ws, "notification.read"))["ids"] == []
        assert (await sse.next_event("notification.read")).json()["ids"] == []
        await send(ws, type="mark_read", all=True)
        read = await expect(ws, "notification.read")
        assert read["ids"] == [records[1]["id"]] and read["unread_count"] == 0
        assert (await expect(other_ws, "notification.read"))["unread_count"] == 0
        assert (await sse.next_event("notification.read")).json()["unread_count"] == 0
    async with srv.connect(query={"token": token}) as ws:
        assert (await expect(ws, "welcome"))["unread_count"] == 0


async def test_welcome_counts_unread(srv: Server) -> None:
    await create_notifications(srv, "quentin", "一", "二", "三")
    async with srv.connect("/api/v1/notifications/ws", query={"token": srv.token("quentin")}) as ws:
        assert (await expect(ws, "welcome"))["unread_count"] == 3


async def test_mark_read_without_inbox_is_unavailable(srv: Server) -> None:
    inbox, srv.hub.inbox = srv.hub.inbox, None  # an embedding app without one
    try:
        async with srv.connect(query={"token": srv.token("pia")}) as ws:
            await expect(ws, "welcome")
            await send(ws, type="mark_read", notification_ids=["n1"])
            error = await expect(ws, "error")
            assert error["code"] == "unavailable" and error["request"] == "mark_read"
            await still_open(ws)
    finally:
        srv.hub.inbox = inbox


# -- bad frames ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "[1, 2]",
        '"ping"',
        "{}",
        '{"type": 7}',
        '{"type": "发送"}',
        '{"type": "subscribe"}',
        '{"type": "subscribe", "topics": [1]}',
        '{"type": "subscribe", "topics": "a", "last_event_id": 5}',
        '{"type": "mark_read", "notification_ids": []}',
        '{"type": "resume"}',
        b"\xff\xfe binary garbage",
    ],
)
async def test_bad_frames_answer_invalid_request(srv: Server, frame: str | bytes) -> None:
    token = srv.token("quinn")
    async with (
        srv.connect(query={"token": token}) as ws,
        srv.connect(query={"token": token}) as other,
    ):
        await expect(ws, "welcome")
        await expect(other, "welcome")
        await ws.send(frame)
        error = await expect(ws, "error")
        assert error["code"] == "invalid_request" and error["message"]
        await still_open(ws)
        await srv.publish(users=["quinn"], data="both")
        assert (await expect(ws, "event"))["data"] == "both"
        assert (await expect(other, "event"))["data"] == "both"


async def test_binary_json_frame_is_understood(srv: Server) -> None:
    async with srv.connect(query={"token": srv.token("rae")}) as ws:
        await expect(ws, "welcome")
        await ws.send(b'{"type": "ping"}')
        await expect(ws, "pong")


async def test_huge_frame_closes_1009_and_spares_others() -> None:
    async with ws_server(max_payload=1024) as srv:
        token = srv.token("sam")
        async with (
            srv.connect(query={"token": token}) as ws,
            srv.connect(query={"token": token}) as other,
        ):
            await expect(ws, "welcome")
            await expect(other, "welcome")
            await send(ws, type="ping", padding="x" * 4096)
            code, _ = await closed(ws)
            assert code == 1009
            await still_open(other)


# -- resume --------------------------------------------------------------------------------------


async def test_resume_on_connect_is_exact(srv: Server) -> None:
    token = srv.token("tom", topics=["room"])
    query = {"token": token, "topics": "room"}
    async with srv.connect(query=query) as ws:
        await expect(ws, "welcome")
        await srv.publish(users=["tom"], data=0)
        last = (await expect(ws, "event"))["id"]
    missed: list[int | str] = []
    for i in range(1, 6):
        missed.append(i)
        await srv.publish(users=["tom"], data=i)
        missed.append(f"room{i}")
        await srv.publish(topics=["room"], data=f"room{i}")
    await srv.publish(users=["someone-else"], data="not mine")
    async with srv.connect(query={**query, "last_event_id": last}) as ws:
        welcome = await expect(ws, "welcome")
        got = [(await expect(ws, "event"))["data"] for _ in missed]
        assert got == missed
        await srv.publish(users=["tom"], data="live")
        live = await expect(ws, "event")
        assert live["data"] == "live"  # nothing else came between
        assert live["id"] != welcome["id"]


async def test_resume_message_replays_after_the_cursor(srv: Server) -> None:
    async with srv.connect(query={"token": srv.token("uma")}) as ws:
        await expect(ws, "welcome")
        await srv.publish(users=["uma"], data=1)
        first = await expect(ws, "event")
        await srv.publish(users=["uma"], data=2)
        await srv.publish(users=["uma"], data=3)
        assert [(await expect(ws, "event"))["data"] for _ in range(2)] == [2, 3]
        await send(ws, type="resume", last_event_id=first["id"])
        assert [(await expect(ws, "event"))["data"] for _ in range(2)] == [2, 3]
        await srv.publish(users=["uma"], data=4)
        assert (await expect(ws, "event"))["data"] == 4


async def test_first_message_auth_then_resume(srv: Server) -> None:
    async with srv.connect(query={"token": srv.token("vic")}) as ws:
        welcome = await expect(ws, "welcome")
    await srv.publish(users=["vic"], data="while away")
    async with srv.connect() as ws:
        await send(ws, type="auth", token=srv.token("vic"))
        await expect(ws, "welcome")
        await send(ws, type="resume", last_event_id=welcome["id"])
        assert (await expect(ws, "event"))["data"] == "while away"


async def test_subscribe_with_last_event_id_resumes_the_topic(srv: Server) -> None:
    token = srv.token("wes", topics=["feed"])
    async with srv.connect(query={"token": token}) as ws:
        await expect(ws, "welcome")
        await send(ws, type="subscribe", topics=["feed"])
        last = (await expect(ws, "subscribed"))["id"]
        await srv.publish(topics=["feed"], data="seen")
        last = (await expect(ws, "event"))["id"]
    await srv.publish(topics=["feed"], data="missed 1")
    await srv.publish(users=["wes"], data="personal, missed")
    await srv.publish(topics=["feed"], data="missed 2")
    async with srv.connect(query={"token": token, "last_event_id": last}) as ws:
        await expect(ws, "welcome")
        assert (await expect(ws, "event"))["data"] == "personal, missed"
        await send(ws, type="subscribe", topics=["feed"], last_event_id=last)
        await expect(ws, "subscribed")
        got = [(await expect(ws, "event"))["data"] for _ in range(2)]
        assert got == ["missed 1", "missed 2"]


async def test_subscribe_without_cursor_starts_live(srv: Server) -> None:
    token = srv.token("xia", topics=["feed"])
    await srv.publish(topics=["feed"], data="old")
    async with srv.connect(query={"token": token}) as ws:
        await expect(ws, "welcome")
        await send(ws, type="subscribe", topics=["feed"])
        await expect(ws, "subscribed")
        await srv.publish(topics=["feed"], data="new")
        assert (await expect(ws, "event"))["data"] == "new"


@pytest.mark.parametrize("cursor", ["garbage!", "otherepoch.aaaaaa1"])
async def test_unusable_cursor_resets(srv: Server, cursor: str) -> None:
    async with srv.connect(query={"token": srv.token("yan"), "last_event_id": cursor}) as ws:
        await expect(ws, "welcome")
        reset = await expect(ws, "reset")
        assert reset["reason"] and reset["id"]
        await srv.publish(users=["yan"], data="live")
        assert (await expect(ws, "event"))["data"] == "live"
        await send(ws, type="resume", last_event_id=cursor)
        assert (await expect(ws, "reset"))["reason"]
        await still_open(ws)


# -- slow consumers, server-side closes ----------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False])
async def test_slow_consumer_closed_4008_and_recovers_by_resume(direct: bool) -> None:
    async with ws_server(client_buffer_size=4, direct=direct) as srv:
        token = srv.token("zoe")
        async with srv.connect(query={"token": token}, max_queue=1) as ws:
            await expect(ws, "welcome")
            await srv.publish(users=["zoe"], data=0)
            last = (await expect(ws, "event"))["id"]
            payload = "工" * 20000
            sent = 0
            conn = next(iter(srv.hub.broker.connections.values()))
            while conn.closed is None:  # the client reads nothing meanwhile
                sent += 1
                await srv.publish(users=["zoe"], data={"n": sent, "pad": payload})
                await asyncio.sleep(0)  # let the server write until the socket is full
            received = []
            with pytest.raises(ConnectionClosed):
                while True:
                    message = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT))
                    received.append(message["data"]["n"])
                    last = message["id"]
            assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 4008
        assert received == list(range(1, len(received) + 1))
        async with srv.connect(query={"token": token, "last_event_id": last}) as ws:
            await expect(ws, "welcome")
            rest = [(await expect(ws, "event"))["data"]["n"] for _ in range(sent - len(received))]
            assert received + rest == list(range(1, sent + 1))
        assert srv.hub.broker.stats.overflows == 1


async def test_server_disconnect_closes_4009(srv: Server) -> None:
    async with srv.connect(query={"token": srv.token("abe")}) as ws:
        await expect(ws, "welcome")
        async with httpx.AsyncClient(base_url=srv.url) as http:
            answer = await http.post(
                "/api/v1/disconnect",
                json={"tenant": "", "user": "abe"},
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
            assert answer.status_code == 200, answer.text
        code, _ = await closed(ws)
        assert code == 4009


async def test_shutdown_closes_1001() -> None:
    async with ws_server() as srv, srv.connect(query={"token": srv.token("bea")}) as ws:
        await expect(ws, "welcome")
        await srv.hub.stop()
        code, _ = await closed(ws)
        assert code == 1001


# -- keep-alive ----------------------------------------------------------------------------------


class RawClient:
    """A WebSocket client on the sans-I/O protocol that decides itself whether to pong."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from websockets.client import ClientProtocol

        self.reader, self.writer = reader, writer
        self.protocol: Any = ClientProtocol
        self.pings = 0

    @classmethod
    async def open(cls, url: str, token: str) -> RawClient:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self = cls(reader, writer)
        ws_url = "ws" + url.removeprefix("http") + "/api/v1/ws?token=" + token
        self.protocol = ClientProtocol(parse_uri(ws_url))
        self.protocol.send_request(self.protocol.connect())
        self.flush()
        return self

    def flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.writer.write(data)

    async def next_frame(self, *, answer_pings: bool) -> Any:
        """The next frame (a ping included); None at the end of the connection."""
        while True:
            for event in self.protocol.events_received():
                if getattr(event, "opcode", None) is not None:
                    if event.opcode is Opcode.PING:
                        self.pings += 1
                        if answer_pings:
                            self.flush()  # the protocol queued the pong
                        else:
                            self.protocol.data_to_send()  # and drop it on the floor
                    return event
            data = await asyncio.wait_for(self.reader.read(65536), WAIT)
            if not data:
                self.protocol.receive_eof()
                return None
            self.protocol.receive_data(data)

    def send_text(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        self.flush()

    def close(self) -> None:
        self.writer.close()


async def closed_for_silence(url: str, token: str) -> None:
    """A client that never answers a ping is closed with 1011."""
    client = await RawClient.open(url, token)
    try:
        frames = []
        while (frame := await client.next_frame(answer_pings=False)) is not None:
            frames.append(frame)
            if frame.opcode is Opcode.CLOSE:
                break
        assert orjson.loads(frames[0].data)["type"] == "welcome"
        assert client.pings >= 1
        assert frames[-1].opcode is Opcode.CLOSE
        assert Close.parse(frames[-1].data).code == 1011
    finally:
        client.close()


async def test_keepalive_closes_a_client_that_does_not_pong() -> None:
    async with ws_server(ws_ping_interval=0.2, ws_pong_timeout=0.1) as srv:
        await closed_for_silence(srv.url, srv.token("cal"))


async def test_keepalive_keeps_a_client_that_pongs() -> None:
    async with ws_server(ws_ping_interval=0.05, ws_pong_timeout=0.5) as srv:
        client = await RawClient.open(srv.url, srv.token("dan"))
        try:
            while client.pings < 5:
                frame = await client.next_frame(answer_pings=True)
                assert frame is not None and frame.opcode is not Opcode.CLOSE
            client.send_text('{"type": "ping"}')
            while True:
                frame = await client.next_frame(answer_pings=True)
                assert frame is not None and frame.opcode is not Opcode.CLOSE
                if frame.opcode is Opcode.TEXT:
                    message = orjson.loads(frame.data)
                    if message["type"] == "pong":
                        break
            assert client.protocol.state is ProtocolState.OPEN
        finally:
            client.close()


def test_uvicorn_options_follow_the_settings() -> None:
    options = uvicorn_options(Settings(max_payload=1000))
    assert options == {
        "ws_ping_interval": 54.0,
        "ws_ping_timeout": 6.0,  # a pong due 60 s after the last one, as in the seed
        "ws_max_size": 1000,
        "ws_per_message_deflate": False,
        "ws": DIRECT_PROTOCOL,
    }


async def test_direct_writes_unless_deflate_is_negotiated() -> None:
    for deflate in (False, True):
        async with ws_server(deflate=deflate) as srv:
            compression = "deflate" if deflate else None
            query = {"token": srv.token("eve")}
            async with srv.connect(query=query, compression=compression) as ws:
                await expect(ws, "welcome")
                [conn] = srv.hub.broker.connections.values()
                # Frames written directly would bypass the compressor.
                assert (conn.direct is None) is deflate
                await srv.publish(users=["eve"], data="压缩" * 1000)
                assert (await expect(ws, "event"))["data"] == "压缩" * 1000
                await still_open(ws)


# -- the broker's support for subscribe/unsubscribe/resume on an open connection --------------


async def test_broker_add_and_remove_streams_keep_positions_exact() -> None:
    hub = Hub(backend=MemoryBackend(history_size=100, history_ttl=3600))
    await hub.start()
    try:
        broker = hub.broker
        who = Principal("u1", topics=("t",))
        conn = WSSocket(who, hub.streams_for(who, []), limit=100)
        broker.release(conn, await broker.attach(conn, None))
        await hub.send_to_topic("t", "before")
        cursor_without_t = conn.cursor()
        resumption = await broker.add_streams(conn, ["t:t"])
        await hub.send_to_topic("t", "held")  # published while the subscription opens
        broker.release(conn, resumption)
        await hub.send_to_topic("t", "live")
        frames = [orjson.loads(f) for f in conn.drain()]
        assert [f["data"] for f in frames] == ["held", "live"]
        assert conn.cursor() != cursor_without_t and conn.reads("t:t")
        broker.remove_streams(conn, ["t:t", "t:never"])
        await hub.send_to_topic("t", "after")
        assert conn.drain() == []
        assert conn.cursor().count(".") == cursor_without_t.count(".")
        assert broker.topic_count() == 0
        # A cursor naming t replays it when t is subscribed again.
        resumption = await broker.add_streams(conn, ["t:t"], frames[0]["id"])
        broker.release(conn, resumption)
        assert [orjson.loads(f)["data"] for f in conn.drain()] == ["live", "after"]
        broker.detach(conn)
        assert broker.topic_count() == 0 and broker.connections == {}
    finally:
        await hub.stop()


# -- against `tidings serve` (tests/server.py): the command's own uvicorn settings -------------


def ws_url(server: TidingsServer, path: str = "/api/v1/ws", **query: str) -> str:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return "ws" + server.url.removeprefix("http") + path + ("?" + qs if qs else "")


async def test_serve_seed_s2_flow(server: TidingsServer) -> None:
    # Seed 002's JavaScript client, unchanged: query token, then welcome and notification.
    await create_notifications(server, "alice", "欢迎使用")
    url = ws_url(server, "/api/v1/notifications/ws", token=server.token("alice"))
    async with connect(url, proxy=None, open_timeout=WAIT) as ws:
        welcome = await expect(ws, "welcome")
        assert welcome["user_id"] == "alice" and welcome["unread_count"] == 1
        assert welcome["message"]
        [record] = await create_notifications(server, "alice", "请审批报销单")
        note = await expect(ws, "notification")
        assert note["notification"]["title"] == "请审批报销单"
        assert note["notification"]["id"] == record["id"]
        assert note["notification"]["priority"] == "high"
        assert note["unread_count"] == 2
        await send(ws, type="ping")
        await expect(ws, "pong")
        await send(ws, type="mark_read", notification_ids=[record["id"]])
        read = await expect(ws, "notification.read")
        assert read["ids"] == [record["id"]] and read["unread_count"] == 1


async def test_serve_keepalive_and_frame_limit(start_server: StartServer) -> None:
    server = start_server(ws_ping_interval="0.2", ws_pong_timeout="0.1", max_payload="1024")
    await closed_for_silence(server.url, server.token("cal"))
    async with connect(ws_url(server, token=server.token("cal")), proxy=None) as ws:
        await expect(ws, "welcome")
        await send(ws, type="ping", padding="x" * 2048)
        code, _ = await closed(ws)
        assert code == 1009


async def test_serve_a_text_frame_that_is_not_utf8_closes_1007_with_one_warning(
    start_server: StartServer,
) -> None:
    server = start_server()
    async with connect(ws_url(server, token=server.token("ida")), proxy=None) as ws:
        await expect(ws, "welcome")
        await ws.send(b'{"type": "ping", "x": "\xff"}', text=True)
        code, _ = await closed(ws)
        assert code == 1007
    log = server.log()
    assert "WARNING uvicorn.error: Invalid UTF-8 sequence received from client." in log, log
    assert "Traceback" not in log, log


async def test_serve_a_bad_text_frame_read_with_the_clients_close_is_dropped(
    start_server: StartServer,
) -> None:
    # A text frame that is not UTF-8, then the client's close, in one read: the protocol
    # has answered the close by the time uvicorn handles the text, and uvicorn's close
    # for the bad text (1007) can no longer be sent (it logged a "fatal error").
    from websockets.frames import Frame

    server = start_server()
    client = await RawClient.open(server.url, server.token("jo"))
    try:
        welcome = await client.next_frame(answer_pings=True)
        assert orjson.loads(welcome.data)["type"] == "welcome"
        close = Frame(Opcode.CLOSE, Close(1000, "").serialize())
        client.writer.write(
            Frame(Opcode.TEXT, b"\xff").serialize(mask=True, extensions=[])
            + close.serialize(mask=True, extensions=[])
        )
        while (frame := await client.next_frame(answer_pings=True)) is not None:
            if frame.opcode is Opcode.CLOSE:
                assert Close.parse(frame.data).code == 1000
    finally:
        client.writer.close()
    assert "Traceback" not in server.log(), server.log()


async def test_serve_a_message_read_with_the_clients_close_still_counts(
    start_server: StartServer,
) -> None:
    # A tab that marks everything read and closes at once: both frames in one read.
    from websockets.frames import Frame

    server = start_server()
    token = server.token("kim")
    async with connect(ws_url(server, token=token), proxy=None) as other:
        await expect(other, "welcome")
        client = await RawClient.open(server.url, token)
        try:
            welcome = await client.next_frame(answer_pings=True)
            assert orjson.loads(welcome.data)["type"] == "welcome"
            client.writer.write(
                Frame(Opcode.TEXT, b'{"type": "mark_read", "all": true}').serialize(
                    mask=True, extensions=[]
                )
                + Frame(Opcode.CLOSE, Close(1000, "").serialize()).serialize(
                    mask=True, extensions=[]
                )
            )
            read = await expect(other, "notification.read")
            assert read["unread_count"] == 0
        finally:
            client.writer.close()


async def test_serve_shutdown_closes_1001_and_restart_resets(start_server: StartServer) -> None:
    server = start_server()
    async with connect(ws_url(server, token=server.token("bo")), proxy=None) as ws:
        welcome = await expect(ws, "welcome")
        stopping = asyncio.create_task(asyncio.to_thread(server.stop))
        code, _ = await closed(ws)
        assert code == 1001
        await stopping
    await asyncio.to_thread(server.start)
    url = ws_url(server, token=server.token("bo"), last_event_id=welcome["id"])
    async with connect(url, proxy=None) as ws:
        await expect(ws, "welcome")
        assert "restart" in (await expect(ws, "reset"))["reason"]


def test_the_inlined_offer_writes_exactly_what_the_base_class_would() -> None:
    """WSSocket.offer takes a shortcut for single-stream events on a socket's own write
    (`raw`, whole frames); frames, positions and cursors must equal the general path's
    (`direct`, payloads), including duplicates, foreign streams, multi-stream events, a
    paused socket, a closed connection, both frame header sizes, and recipients of one
    event whose cursors differ in length."""
    from tidings.connection import WSConnection
    from tidings.event import CloseReason, Event

    def unframe(frame: bytes) -> bytes:
        """The payload of an unmasked, final text frame; its length checked."""
        assert frame[0] == 0x81
        size, at = frame[1], 2
        if size == 126:
            size, at = int.from_bytes(frame[2:4], "big"), 4
        assert len(frame) - at == size
        return frame[at:]

    class Reference(WSSocket):
        __slots__ = ()
        offer = WSConnection.offer  # the general path: deliver -> frame -> push

    many = ["u:amy", "b", "t:news", "t:sport"]
    few = ["u:amy", "t:news"]  # a shorter cursor: the same event's frames differ in size
    conns = {
        "fast": WSSocket(Principal("amy"), many, limit=3, epoch="ep1"),
        "ref": Reference(Principal("amy"), many, limit=3, epoch="ep1"),
        "fast2": WSSocket(Principal("amy"), few, limit=3, epoch="ep1"),
        "ref2": Reference(Principal("amy"), few, limit=3, epoch="ep1"),
    }
    written: dict[str, list[bytes]] = {name: [] for name in conns}

    def attach(name: str, conn: WSSocket) -> None:
        conn.direct = written[name].append
        conn.raw = lambda frame: written[name].append(unframe(frame))

    for name, conn in conns.items():
        for stream in conn.streams:
            conn.set_position(stream, 2)
        conn.pending = None
        attach(name, conn)
    seqs = {s: 2 for s in [*many, "t:other"]}

    def event(n: int, *on: str, again: bool = False) -> Event:
        if not again:
            for s in on:
                seqs[s] += 1
        data = {"n": n, "文": "字" * (n * 20)}  # from n = 2 on, over 125 bytes
        return Event(f"e{n}", "", "tick", data, tuple((s, seqs[s]) for s in on))

    script = [event(0, "t:news"), event(1, "t:news"), event(1, "t:news", again=True)]
    script += [event(2, "u:amy"), event(3, "t:other"), event(4, "t:news", "b")]
    script += [event(5, "t:sport"), event(6, "b", "u:amy"), Event("old", "", "x", 1, (("b", 1),))]
    script += [event(7, "t:news"), event(8, "t:news"), event(9, "t:news"), event(10, "b")]
    for n, ev in enumerate(script):
        if n == 6:  # paused: all buffer from here on, and overflow alike
            for conn in conns.values():
                conn.direct = conn.raw = None
        results = {name: conn.offer(ev) for name, conn in conns.items()}
        assert results["fast"] == results["ref"] and results["fast2"] == results["ref2"], ev
    for fast, ref in (("fast", "ref"), ("fast2", "ref2")):
        assert written[fast] == written[ref] and len(written[ref]) == 4  # not vacuous
        a, b = conns[fast], conns[ref]
        assert a.buffer == b.buffer
        assert (a.positions, a.cursor()) == (b.positions, b.cursor())
    assert conns["fast"].closed is conns["ref"].closed is CloseReason.SLOW
    for name, conn in conns.items():  # closed, though a writer is still attached: nothing more
        attach(name, conn)
    last = event(11, "t:news")
    assert conns["fast"].offer(last) == conns["ref"].offer(last)
    assert written["fast"] == written["ref"] and len(written["ref"]) == 4
    frames = [orjson.loads(f) for f in written["fast"]]
    assert [f["data"]["n"] for f in frames] == [0, 1, 2, 4]
    assert [orjson.loads(f)["data"]["n"] for f in written["fast2"]] == [0, 1, 2, 4]


async def test_a_read_committed_right_after_the_welcome_count_still_reaches_the_socket(
    srv: Server,
) -> None:
    """As for SSE (tests/test_stream_opening.py): the welcome's count is read once the
    connection is attached, so a read committed right after it arrives as a push."""
    st = srv.app.state.tidings
    inbox = srv.hub.inbox
    assert inbox is not None
    who = Principal(user_id="阿明", tenant="")
    [record] = await inbox.notify(new_notification(["阿明"], type="wage", title="工资已发放"))
    counted = st.unread_count

    async def count_then_read(principal: Principal) -> int:
        count = await counted(principal)
        await inbox.mark_read(who, [record["id"]])  # committed right after the read
        return count

    st.unread_count = count_then_read
    async with srv.connect(query={"token": srv.token("阿明")}) as ws:
        welcome = await expect(ws, "welcome")
        read = await expect(ws, "notification.read")
    assert (welcome["unread_count"], read["unread_count"], read["ids"]) == (1, 0, [record["id"]])


class _Transport(asyncio.Transport):
    """A socket that keeps what is written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.out.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default


@pytest.mark.parametrize("how", ["close frame", "shutdown", "client's close", "lost"])
async def test_no_fan_out_frame_follows_a_close(how: str) -> None:
    """Fan-out writes with the transport's own `write` (`WSSocket.raw`); every way
    uvicorn's protocol closes takes it away first, so no event frame follows a close
    frame, and a socket that drains again after it does not get it back."""
    from uvicorn.server import ServerState
    from websockets.frames import Frame

    from tidings.event import Event
    from tidings.server.wsdirect import DirectWriter

    assert DIRECT_PROTOCOL is not None
    config = uvicorn.Config(app=WebSocketEndpoint(), ws=DIRECT_PROTOCOL)
    config.load()
    protocol: Any = DIRECT_PROTOCOL(config=config, server_state=ServerState(), app_state={})
    transport = _Transport()
    protocol.connection_made(transport)
    writer = protocol.writer = DirectWriter(protocol)
    conn = WSSocket(Principal("amy"), ["u:amy"], limit=10, epoch="ep1")
    conn.set_position("u:amy", 1)
    conn.pending = None
    writer.attach(conn)
    assert conn.raw == transport.write and conn.direct is not None
    assert conn.offer(Event("e2", "", "tick", {"文": "字"}, (("u:amy", 2),)))
    assert orjson.loads(transport.out[-1][2:])["data"] == {"文": "字"}

    if how == "close frame":  # the app's close, a pong timeout, a protocol error
        protocol.close_sent = True
    elif how == "shutdown":
        protocol.shutdown()
    elif how == "client's close":
        close = Close(1000, "")
        protocol.conn.close_rcvd = close  # as the protocol's parser records it
        frame = Frame(Opcode.CLOSE, close.serialize())
        protocol.handle_close(frame)
    else:
        protocol.connection_lost(None)
    assert conn.raw is None
    writes = len(transport.out)
    protocol.resume_writing()  # drained after the close: the socket's write stays away
    assert conn.raw is None
    conn.offer(Event("e3", "", "tick", 3, (("u:amy", 3),)))
    assert all(not out.startswith(b"\x81") for out in transport.out[writes:])
