"""The SDK's WebSocket mode, `Subscriber(..., transport="ws")`, against real servers.

The same events as over SSE (a parity test reads both at once), reconnects that resume
without loss or duplicates (sequence-checked: forced disconnects on one server, a
restart on Redis), `reset` when the cursor is unknown, typed errors for refused
credentials and topics, the token provider on reconnect, and `tidings listen --ws`.
Synchronisation is by events only; WAIT turns a hang into a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.frames import Close

from server import StartServer, TidingsServer, free_port
from tidings.client import Publisher, Subscriber, WSEvent, backoff_delay
from tidings.client import subscriber as subscriber_module
from tidings.client.ws import close_error, to_event, ws_url
from tidings.errors import (
    Forbidden,
    InvalidRequest,
    OverCapacity,
    RateLimited,
    TidingsError,
    Unauthorized,
)
from tidings.wire import SSEEvent

PAYROLL = {"title": "工资已发放", "amount": "¥12,000"}
WAIT = 15.0  # bound on any one wait for the server; never reached when things work


async def next_event(subscriber: Subscriber, name: str | None = None) -> SSEEvent:
    """The next event (named `name`, skipping others), bounded by WAIT."""
    async with asyncio.timeout(WAIT):
        async for event in subscriber:
            if name is None or event.event == name:
                return event
    raise AssertionError("the subscriber ended")


def decoded(event: SSEEvent) -> Any:
    """The event's data as JSON, or as text when it is not JSON."""
    try:
        return event.json()
    except ValueError:
        return event.data


def ws(server: TidingsServer, token: str, **kw: Any) -> Subscriber:
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.5)
    return Subscriber(server.url, token, transport="ws", **kw)


async def disconnect(server: TidingsServer, user: str) -> int:
    """POST /api/v1/disconnect: the server closes the user's connections (4009)."""
    async with httpx.AsyncClient(timeout=WAIT) as http:
        answer = await http.post(
            server.url + "/api/v1/disconnect",
            json={"tenant": "", "user": user},
            headers={"Authorization": f"Bearer {server.api_key}"},
        )
    answer.raise_for_status()
    count: int = answer.json()["disconnected"]
    return count


@pytest.fixture
def attempts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, float]]]:
    """Every backoff the subscriber computes, as (attempt, its upper bound); no real wait."""
    seen: list[tuple[int, float]] = []

    def recording(attempt: int, initial: float, cap: float, **_: Any) -> float:
        delay = backoff_delay(attempt, initial, cap)
        bound = min(cap, initial * 2**attempt)
        assert 0.0 <= delay <= bound
        seen.append((attempt, bound))
        return 0.0

    monkeypatch.setattr(subscriber_module, "backoff_delay", recording)
    yield seen


# -- pure parts: URL, message → event, close code → error ------------------------------------


def test_ws_url_follows_the_base_url() -> None:
    assert ws_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/api/v1/ws"
    assert ws_url("https://n.example.com/push/") == "wss://n.example.com/push/api/v1/ws"
    assert ws_url("wss://n.example.com") == "wss://n.example.com/api/v1/ws"
    with pytest.raises(ValueError):
        ws_url("ftp://127.0.0.1")
    with pytest.raises(ValueError):
        Subscriber("ftp://127.0.0.1", "t", transport="ws")
    with pytest.raises(ValueError):
        Subscriber("http://x", "t", transport="ws", client=httpx.AsyncClient())
    with pytest.raises(ValueError):
        Subscriber("http://x", "t", transport="carrier-pigeon")  # type: ignore[arg-type]


def test_messages_become_the_events_sse_sends() -> None:
    stamp = {"timestamp": "2025-01-01T00:00:00.000Z"}
    topical = to_event({"type": "event", "id": "c1", "event": "paid", "topic": "pay", "data": "月"})
    assert topical == WSEvent("paid", "月", "c1", topic="pay", timestamp=None)
    personal = to_event({"type": "event", "id": "c2", "event": "message", "data": PAYROLL, **stamp})
    assert personal is not None and personal.topic is None and personal.json() == PAYROLL
    assert personal.timestamp == stamp["timestamp"]
    record = {"id": "n1", "type": "comment", "title": "新评论"}
    pushed = to_event(
        {"type": "notification", "id": "c3", "notification": record, "unread_count": 2}
    )
    assert pushed is not None and (pushed.event, pushed.id) == ("message", "c3")
    assert pushed.json() == {**record, "unread_count": 2}
    read = to_event({"type": "notification.read", "id": "c4", "ids": ["n1"], "unread_count": 1})
    assert read is not None and read.json() == {"ids": ["n1"], "unread_count": 1}
    reset = to_event({"type": "reset", "id": "c5", "reason": "unknown cursor", **stamp})
    assert reset is not None and reset.event == "reset"
    assert reset.json() == {"reason": "unknown cursor"}
    for silent in ("pong", "subscribed", "unsubscribed"):
        assert to_event({"type": silent, "topics": ["a"]}) is None
    with pytest.raises(Forbidden, match="secret"):
        to_event({"type": "error", "code": "forbidden", "message": "not secret", "topic": "secret"})
    with pytest.raises(TidingsError) as odd:
        to_event({"type": "error", "code": "brand_new", "message": "?"})
    assert odd.value.code == "brand_new"


def test_close_codes_become_typed_errors() -> None:
    assert isinstance(close_error(Close(4401, "token expired")), Unauthorized)
    assert isinstance(close_error(Close(4403, "api key")), Forbidden)
    assert isinstance(close_error(Close(4429, "")), RateLimited)
    assert isinstance(close_error(Close(1013, "full")), OverCapacity)
    assert isinstance(close_error(Close(1008, "")), InvalidRequest)
    final = close_error(Close(4500, "do not come back"))
    assert final is not None and final.status == 400 and final.message == "do not come back"
    # Reconnect and resume: shutdown, slow consumer, disconnected, timeout, internal, broken.
    for code in (1000, 1001, 1011, 1012, 4008, 4009, 4010):
        assert close_error(Close(code, "")) is None
    assert close_error(None) is None


# -- receiving -----------------------------------------------------------------------------


async def test_ws_gets_welcome_then_published_events(server: TidingsServer) -> None:
    states: list[str] = []
    token = server.token("alice", topics=["payroll"])
    async with (
        ws(server, token, topics=["payroll"], on_state=states.append) as sub,
        Publisher(server.url, server.api_key) as pub,
    ):
        assert sub.transport == "ws" and sub.url.endswith("/api/v1/ws")
        welcome = await next_event(sub)
        assert welcome.event == "welcome" and welcome.id
        assert welcome.json()["user_id"] == "alice" and welcome.json()["topics"] == ["payroll"]
        await pub.publish(users=["alice"], data=PAYROLL)
        personal = await next_event(sub)
        assert (personal.event, personal.json()) == ("message", PAYROLL)
        assert isinstance(personal, WSEvent) and personal.topic is None and personal.timestamp
        await pub.publish(topics=["payroll"], event="paid", data="月薪\n第二行")
        topical = await next_event(sub)
        assert (topical.event, topical.data) == ("paid", "月薪\n第二行")
        assert isinstance(topical, WSEvent) and topical.topic == "payroll"
        assert sub.last_event_id == topical.id
    assert states[:2] == ["connecting", "open"] and states[-1] == "closed"


async def test_ws_and_sse_yield_the_same_events(server: TidingsServer) -> None:
    token = server.token("alice", topics=["news"])
    async with (
        Subscriber(server.url, token, topics=["news"]) as sse,
        ws(server, token, topics=["news"]) as sock,
        Publisher(server.url, server.api_key) as pub,
        Publisher(server.url, token) as inbox,
    ):
        await next_event(sse, "welcome")
        await next_event(sock, "welcome")
        await pub.publish(users=["alice"], data=PAYROLL)
        await pub.publish(topics=["news"], event="headline", data="头条")
        await pub.publish(broadcast=True, data=None)
        [record] = await pub.notify(
            ["alice"], type="comment", title="新评论", sender={"id": "b", "username": "鲍勃"}
        )
        await inbox.mark_read(record["id"])

        async def five(sub: Subscriber) -> list[tuple[str, Any]]:
            return [(e.event, decoded(e)) for e in [await next_event(sub) for _ in range(5)]]

        over_sse, over_ws = await five(sse), await five(sock)
    assert over_ws == over_sse
    assert over_ws[3][0] == "message" and over_ws[3][1]["sender"]["username"] == "鲍勃"
    assert over_ws[3][1]["unread_count"] == 1
    assert over_ws[4] == ("notification.read", {"ids": [record["id"]], "unread_count": 0})


# -- reconnect and resume ------------------------------------------------------------------


async def test_ws_resumes_after_disconnects_without_loss_or_duplicates(
    server: TidingsServer,
) -> None:
    """Events published before, during and after each forced drop arrive once, in order."""
    received: list[int] = []
    welcomes = 0
    published = 0
    async with (
        ws(server, server.token("alice")) as sub,
        Publisher(server.url, server.api_key) as pub,
    ):

        async def publish(count: int) -> None:
            nonlocal published
            for _ in range(count):
                published += 1
                await pub.publish(users=["alice"], data={"n": published})

        async def read_until_welcome() -> None:
            nonlocal welcomes
            while True:
                event = await next_event(sub)
                assert event.event != "reset", event
                if event.event == "welcome":
                    welcomes += 1
                    return
                received.append(event.json()["n"])

        await read_until_welcome()
        for _ in range(4):
            await publish(10)
            assert await disconnect(server, "alice") == 1
            await publish(5)  # while alice is away (or already back)
            await read_until_welcome()
        await publish(3)
        while len(received) < published:
            event = await next_event(sub)
            assert event.event == "message", event
            received.append(event.json()["n"])
    assert received == list(range(1, published + 1))
    assert welcomes == 5


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis broker with a fresh key prefix (the history outlives a server restart)."""
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1.0).close()
    except OSError:
        pytest.skip("Redis is not reachable on 127.0.0.1:6379")
    prefix = "tw" + secrets.token_hex(5)
    yield f"redis://127.0.0.1:6379/12?prefix={prefix}"
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=12)
    try:
        keys = list(client.scan_iter(match=prefix + ":*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


async def test_ws_resumes_across_a_server_restart_on_redis(
    start_server: StartServer, redis_url: str
) -> None:
    server = start_server(TIDINGS_BROKER_URL=redis_url)
    states: list[str] = []
    async with (
        ws(server, server.token("alice"), on_state=states.append) as sub,
        Publisher(server.url, server.api_key) as pub,
    ):
        await next_event(sub, "welcome")
        for n in range(1, 21):  # most still on their way when the server stops
            await pub.publish(users=["alice"], data={"n": n})
        await asyncio.to_thread(server.restart)
        for n in range(21, 41):
            await pub.publish(users=["alice"], data={"n": n})
        received: list[int] = []
        names: list[str] = []
        while len(received) < 40:
            event = await next_event(sub)
            names.append(event.event)
            if event.event == "message":
                received.append(event.json()["n"])
    assert received == list(range(1, 41))
    assert "reset" not in names and "welcome" in names  # the reconnect's
    assert states.count("open") >= 2


async def test_ws_hears_reset_after_a_restart_that_lost_the_history(
    server: TidingsServer,
) -> None:
    async with (
        ws(server, server.token("alice")) as sub,
        Publisher(server.url, server.api_key) as pub,
    ):
        await next_event(sub, "welcome")
        await pub.publish(users=["alice"], data=PAYROLL)
        assert (await next_event(sub)).json() == PAYROLL
        await asyncio.to_thread(server.restart)  # the memory history is gone
        names = []
        while (event := await next_event(sub)).event != "reset":
            names.append(event.event)
        assert event.json()["reason"] and event.id
        assert "welcome" in names  # the reset follows the new connection's welcome
        await pub.publish(users=["alice"], data={"title": "新消息"})
        assert (await next_event(sub, "message")).json() == {"title": "新消息"}


async def test_ws_hears_reset_for_an_unknown_cursor(server: TidingsServer) -> None:
    async with (
        ws(server, server.token("alice"), last_event_id="not-a-cursor-of-this-server") as sub,
        Publisher(server.url, server.api_key) as pub,
    ):
        assert (await next_event(sub)).event == "welcome"
        reset = await next_event(sub)
        assert reset.event == "reset" and reset.json()["reason"]
        await pub.publish(users=["alice"], data={"after": "reset"})
        assert (await next_event(sub)).json() == {"after": "reset"}


async def test_ws_resumes_from_a_stored_last_event_id(server: TidingsServer) -> None:
    token = server.token("alice")
    async with Publisher(server.url, server.api_key) as pub:
        async with ws(server, token) as first:
            await next_event(first, "welcome")
            await pub.publish(users=["alice"], data={"n": 1})
            assert (await next_event(first)).json() == {"n": 1}
            cursor = first.last_event_id
        await pub.publish(users=["alice"], data={"n": 2})  # while nobody listens
        async with ws(server, token, last_event_id=cursor) as second:
            assert (await next_event(second)).event == "welcome"
            missed = await next_event(second)
            assert (missed.event, missed.json()) == ("message", {"n": 2})


# -- backoff -----------------------------------------------------------------------------


async def test_ws_backoff_grows_while_nothing_answers(attempts: list[tuple[int, float]]) -> None:
    tried = asyncio.Event()

    def on_state(state: str) -> None:
        if len(attempts) >= 8:
            tried.set()

    nowhere = f"http://127.0.0.1:{free_port()}"
    sub = Subscriber(nowhere, "t", transport="ws", backoff_initial=0.5, on_state=on_state)
    waiting = asyncio.ensure_future(anext(sub))
    async with asyncio.timeout(WAIT):
        await tried.wait()
    assert not waiting.done()
    await sub.close()
    with pytest.raises(StopAsyncIteration):
        await waiting
    assert [a for a, _ in attempts[:8]] == list(range(8))
    assert [b for _, b in attempts[:8]] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


async def test_ws_backoff_starts_small_again_after_a_connect(
    server: TidingsServer, attempts: list[tuple[int, float]]
) -> None:
    async with ws(server, server.token("alice")) as sub:
        await next_event(sub, "welcome")
        for _ in range(3):
            assert await disconnect(server, "alice") == 1
            await next_event(sub, "welcome")
    assert [a for a, _ in attempts] == [0, 0, 0]


# -- credentials -----------------------------------------------------------------------------


async def test_ws_bad_token_without_provider_raises_unauthorized(server: TidingsServer) -> None:
    sub = ws(server, "not-a-jwt")
    with pytest.raises(Unauthorized):
        await next_event(sub)
    with pytest.raises(StopAsyncIteration):  # closed after the error
        await anext(sub)


async def test_ws_api_key_is_not_a_user(server: TidingsServer) -> None:
    with pytest.raises(Forbidden):
        await next_event(ws(server, server.api_key))


async def test_ws_forbidden_topic_raises_before_the_welcome(server: TidingsServer) -> None:
    async with ws(server, server.token("alice"), topics=["secret"]) as sub:
        with pytest.raises(Forbidden, match="secret"):
            await next_event(sub)


async def test_ws_refused_fresh_tokens_back_off_instead_of_spinning(
    server: TidingsServer, attempts: list[tuple[int, float]]
) -> None:
    calls = 0
    enough = asyncio.Event()

    async def still_bad() -> str:
        nonlocal calls
        calls += 1
        if calls == 4:
            enough.set()
        return "still-not-a-jwt"

    sub = ws(server, "not-a-jwt", token_provider=still_bad)
    waiting = asyncio.ensure_future(anext(sub))
    async with asyncio.timeout(WAIT):
        await enough.wait()
    await sub.close()
    with pytest.raises(StopAsyncIteration):
        await waiting
    # The first refusal asks at once; each refused fresh token waits a growing backoff.
    assert [a for a, _ in attempts][:2] == [0, 1]


async def test_ws_token_provider_after_an_expired_token(server: TidingsServer) -> None:
    calls: list[int] = []

    async def fresh_token() -> str:
        calls.append(1)
        return server.token("alice")

    expired = server.token("alice", ttl_s=-3600)
    async with ws(server, expired, token_provider=fresh_token) as sub:
        welcome = await next_event(sub)
    assert welcome.event == "welcome" and welcome.json()["user_id"] == "alice"
    assert calls == [1]


async def test_ws_token_provider_is_asked_when_a_reconnect_is_refused(
    server: TidingsServer,
) -> None:
    """The server comes back with a new signing key: the old token is refused (4401)."""
    calls: list[str] = []

    async def fresh_token() -> str:
        token = server.token("alice")
        calls.append(token)
        return token

    async with (
        ws(server, server.token("alice"), token_provider=fresh_token) as sub,
        Publisher(server.url, server.api_key) as pub,
    ):
        await next_event(sub, "welcome")
        assert calls == []

        def rotate_and_restart() -> None:
            server.stop()
            server.settings["TIDINGS_JWT_SECRET"] = secrets.token_urlsafe(48)
            server.start()

        await asyncio.to_thread(rotate_and_restart)
        # Only the new process says `reset` (its memory history does not know our id); a
        # reconnect that landed on the old one while it shut down was welcomed and closed.
        reset = await next_event(sub, "reset")
        assert reset.json()["reason"]
        assert len(calls) == 1
        await pub.publish(users=["alice"], data=PAYROLL)
        assert (await next_event(sub, "message")).json() == PAYROLL


# -- tidings listen --ws -----------------------------------------------------------------


async def test_listen_ws_prints_events(server: TidingsServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidings",
        "listen",
        "--ws",
        "--url",
        server.url,
        "--token",
        server.token("alice", topics=["payroll"]),
        "--topics",
        "payroll",
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(WAIT):
            welcome = json.loads(await proc.stdout.readline())
            assert welcome["event"] == "welcome" and welcome["data"]["user_id"] == "alice"
            async with Publisher(server.url, server.api_key) as pub:
                await pub.publish(topics=["payroll"], event="payroll", data={"title": "工资已发放"})
            event = json.loads(await proc.stdout.readline())
            assert event["event"] == "payroll" and event["data"] == {"title": "工资已发放"}
            assert event["topic"] == "payroll" and event["id"]
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_listen_ws_refused_token_exits_1(server: TidingsServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    listen = ["listen", "--transport", "ws", "--url", server.url, "--token", "not-a-jwt"]
    result = subprocess.run(
        [sys.executable, "-m", "tidings", *listen],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 1 and "401 unauthorized" in result.stderr
