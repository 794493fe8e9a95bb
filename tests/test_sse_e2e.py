"""Server-Sent Events end to end (API.md §1, §3, §4): a real `tidings serve`, real sockets.

Streams are read with the raw client of tests/sse_client.py, so the status line,
headers and bytes are what a browser's EventSource sees. Tests synchronise on
events only: a negative ("this connection got nothing") is proved by publishing a
marker to the same connection afterwards and seeing it arrive next.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from server import StartServer, TidingsServer, free_port
from sse_client import WAIT, Api, SSEClient, expect_marker, open_stream, sse_stream
from tidings.auth import mint_token

SSE_PATHS = ["/api/v1/stream", "/api/v1/notifications/stream", "/api/sse/events", "/sse/stream"]
PUBLIC_TOPICS = "lobby,status:*"


TRANSPORTS = {"fastpath": "1", "asgi": "0"}  # TIDINGS_FASTPATH: serve's own protocol, or sse.py


@pytest.fixture(scope="module", params=sorted(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> str:
    """Tests that take this run against both ways `tidings serve` can serve a stream."""
    return TRANSPORTS[request.param]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[TidingsServer]:
    """One server for the tests that need only default settings; each test uses its own
    tenant (`tenant` fixture), and tenants are walls, so tests cannot see each other."""
    env = {"TIDINGS_PUBLIC_TOPICS": PUBLIC_TOPICS, "TIDINGS_FASTPATH": transport}
    with TidingsServer(tmp_path_factory.mktemp("sse"), env) as server:
        yield server
    assert "Traceback" not in server.log(), server.log()


@pytest.fixture
async def api(srv: TidingsServer) -> AsyncIterator[Api]:
    async with Api(srv.url, srv.api_key) as client:
        yield client


@pytest.fixture
def tenant() -> str:
    return "t-" + secrets.token_hex(4)


def b64url(value: dict[str, Any]) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def frames(client: SSEClient) -> list[list[str]]:
    """The body as SSE blocks, each the list of its lines (exact text, no parsing)."""
    text = bytes(client.raw).decode()
    return [block.split("\n") for block in text.split("\n\n") if block]


def frame_with(client: SSEClient, needle: str) -> list[str]:
    found = [block for block in frames(client) if any(needle in line for line in block)]
    assert len(found) == 1, f"expected one frame with {needle!r}, got {found}"
    return found[0]


async def expect_error(client: SSEClient, status: int, code: str) -> dict[str, Any]:
    body: dict[str, Any] = await client.json()
    assert client.status == status, (client.status, body)
    assert client.header("content-type") == "application/json"
    assert body["error"]["code"] == code and body["error"]["message"], body
    return body


# -- the response ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", SSE_PATHS)
async def test_stream_answers_200_with_sse_headers_retry_then_welcome(
    srv: TidingsServer, tenant: str, path: str
) -> None:
    token = srv.token("alice", tenant=tenant, topics=["news"])
    async with sse_stream(srv.url, path, token=token, params={"topics": "news"}) as s:
        assert s.status == 200
        assert s.header("content-type") == "text/event-stream; charset=utf-8"
        assert s.header("cache-control") == "no-cache"
        assert s.header("x-accel-buffering") == "no"
        welcome = await s.next_event("welcome")
        assert bytes(s.raw).startswith(b"retry: 3000\n\n")
        assert [e.event for e in s.events] == ["retry", "welcome"]
        assert s.events[0].retry == 3000
        data = welcome.json()
        assert set(data) == {
            "connection_id",
            "user_id",
            "tenant",
            "topics",
            "unread_count",
            "heartbeat_interval",
        }
        assert isinstance(data["connection_id"], str) and data["connection_id"]
        assert (data["user_id"], data["tenant"], data["topics"]) == ("alice", tenant, ["news"])
        assert data["unread_count"] == 0 and data["heartbeat_interval"] == 30
        assert welcome.id and welcome.id.isascii() and len(welcome.id) <= 1024


async def test_each_connection_has_its_own_connection_id(srv: TidingsServer, tenant: str) -> None:
    token = srv.token("alice", tenant=tenant)
    async with sse_stream(srv.url, token=token) as a, sse_stream(srv.url, token=token) as b:
        first = (await a.next_event("welcome")).json()["connection_id"]
        second = (await b.next_event("welcome")).json()["connection_id"]
    assert first != second


# -- credentials ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["header", "token", "access_token", "cookie"])
async def test_every_token_source_opens_a_stream(
    srv: TidingsServer, tenant: str, source: str
) -> None:
    token = srv.token("alice", tenant=tenant)
    sources: dict[str, dict[str, Any]] = {
        "header": {"token": token},
        "token": {"params": {"token": token}},
        "access_token": {"params": {"access_token": token}},
        "cookie": {"cookies": {"tidings_token": token}},
    }
    kw = sources[source]
    async with sse_stream(srv.url, **kw) as s:
        assert s.status == 200
        assert (await s.next_event("welcome")).json()["user_id"] == "alice"


async def test_first_found_credential_wins_even_when_it_is_bad(srv: TidingsServer) -> None:
    good = srv.token("alice")
    bad = mint_token("x" * 40, "alice")  # signed with another secret
    async with sse_stream(srv.url, token=bad, params={"token": good}) as s:
        await expect_error(s, 401, "unauthorized")  # the header is looked at first
    async with sse_stream(srv.url, params={"token": bad}, cookies={"tidings_token": good}) as s:
        await expect_error(s, 401, "unauthorized")  # the query before the cookie


async def test_header_token_wins_over_the_query_and_the_cookie(srv: TidingsServer) -> None:
    header, other = srv.token("alice"), srv.token("mallory")
    async with sse_stream(
        srv.url, token=header, params={"token": other}, cookies={"tidings_token": other}
    ) as s:
        assert (await s.next_event("welcome")).json()["user_id"] == "alice"


def _alg_none(srv: TidingsServer) -> str:
    header = b64url({"alg": "none", "typ": "JWT"})
    return f"{header}.{b64url({'sub': 'alice', 'exp': 4_000_000_000})}."


BAD_TOKENS: dict[str, Callable[[TidingsServer], str]] = {
    "malformed": lambda srv: "not-a-jwt",
    "three_garbage_segments": lambda srv: "abc.def.ghi",
    "expired": lambda srv: srv.token("alice", ttl_s=-300),  # past the 30 s leeway
    "wrong_signature": lambda srv: mint_token("w" * 48, "alice"),
    "alg_none": _alg_none,
    "no_sub": lambda srv: jwt.encode({"exp": 4_000_000_000}, srv.secret, algorithm="HS256"),
    "sub_not_a_string": lambda srv: jwt.encode({"sub": 5}, srv.secret, algorithm="HS256"),
    "sub_too_long": lambda srv: jwt.encode({"sub": "u" * 129}, srv.secret, algorithm="HS256"),
    "tenant_not_a_string": lambda srv: jwt.encode(
        {"sub": "alice", "tenant": 5}, srv.secret, algorithm="HS256"
    ),
    "not_yet_valid": lambda srv: jwt.encode(
        {"sub": "alice", "nbf": time.time() + 600}, srv.secret, algorithm="HS256"
    ),
    "hs512": lambda srv: jwt.encode({"sub": "alice"}, srv.secret, algorithm="HS512"),
    "api_key_in_the_query": lambda srv: srv.api_key,  # keys belong in the header only
}


async def test_missing_credential_is_401_before_the_stream(srv: TidingsServer) -> None:
    async with sse_stream(srv.url) as s:
        await expect_error(s, 401, "unauthorized")
        assert s.header("www-authenticate") == "Bearer"


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_bad_token_is_401_json_before_the_stream(srv: TidingsServer, kind: str) -> None:
    token = BAD_TOKENS[kind](srv)
    if kind != "api_key_in_the_query":
        async with sse_stream(srv.url, token=token) as s:
            await expect_error(s, 401, "unauthorized")
    async with sse_stream(srv.url, params={"token": token}) as s:
        await expect_error(s, 401, "unauthorized")


@pytest.mark.parametrize("authorization", ["Bearer ", "Basic YWxpY2U6cHc=", "Token abc"])
async def test_an_empty_or_foreign_authorization_header_falls_through_to_the_query(
    srv: TidingsServer, authorization: str
) -> None:
    params = {"token": srv.token("alice")}
    async with sse_stream(srv.url, headers={"Authorization": authorization}, params=params) as s:
        assert (await s.next_event("welcome")).json()["user_id"] == "alice"


async def test_api_key_cannot_open_a_stream(srv: TidingsServer) -> None:
    async with sse_stream(srv.url, token=srv.api_key) as s:
        await expect_error(s, 403, "forbidden")


async def test_tokens_and_keys_never_reach_the_server_log(
    start_server: StartServer, transport: str
) -> None:
    srv = start_server(TIDINGS_LOG_LEVEL="debug", TIDINGS_FASTPATH=transport)  # access log on
    good = srv.token("alice")
    bad = good[:-6] + "AAAAAA"
    async with Api(srv.url, srv.api_key) as api:
        attempts: list[dict[str, Any]] = [
            {"params": {"token": good}},
            {"params": {"access_token": good}},
            {"params": {"topics": "x", "token": bad}},
            {"token": good},
            {"cookies": {"tidings_token": good}},
        ]
        for kw in attempts:
            async with sse_stream(srv.url, **kw) as s:
                if s.status == 200:
                    await s.next_event("welcome")
                else:
                    await s.json()
        await api.http.post(f"/api/v1/publish?token={good}", json={"users": ["a"]})
        await api.publish(users=["alice"], data="logged?")
        await api.http.get(f"/nowhere?access_token={bad}")
    srv.stop()
    log = srv.log()
    assert "/api/v1/publish" in log, "the access log is on at debug level"
    for secret in (good.split(".")[2], bad.split(".")[2], srv.api_key, srv.secret):
        assert secret not in log, log


async def test_insecure_query_auth_trusts_user_id_on_loopback(start_server: StartServer) -> None:
    dev = start_server(TIDINGS_INSECURE_QUERY_AUTH="true")
    params = {"user_id": "bob", "tenant_id": "acme"}
    async with sse_stream(dev.url, params=params) as s, Api(dev.url, dev.api_key) as api:
        welcome = (await s.next_event("welcome")).json()
        assert (welcome["user_id"], welcome["tenant"]) == ("bob", "acme")
        await api.publish(tenant="acme", users=["bob"], data={"hello": "bob"})
        assert (await s.next_event()).json() == {"hello": "bob"}


# -- topics ---------------------------------------------------------------------------------


async def test_topic_claim_patterns_and_public_topics_permit_subscriptions(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    token = srv.token("alice", tenant=tenant, topics=["approval:*", "chat:**"])
    topics = "approval:pending,chat:1,chat:1:typing,lobby,status:db"
    async with sse_stream(srv.url, token=token, params={"topics": topics}) as s:
        assert s.status == 200
        welcome = (await s.next_event("welcome")).json()
        assert welcome["topics"] == topics.split(",")
        for topic in topics.split(","):
            await api.publish(tenant=tenant, topics=[topic], data={"on": topic})
            event = await s.next_event()
            assert event.json() == {"on": topic}


@pytest.mark.parametrize(
    "topic",
    [
        "secret",  # no pattern at all
        "approval:a:b",  # `*` is exactly one segment
        "approval",  # nor zero
        "chat",  # `chat:**` needs at least one more segment
        "status:db:replica",
        "lobby2",
    ],
)
async def test_topic_outside_the_patterns_is_403_before_the_stream(
    srv: TidingsServer, tenant: str, topic: str
) -> None:
    token = srv.token("alice", tenant=tenant, topics=["approval:*", "chat:**"])
    async with sse_stream(srv.url, token=token, params={"topics": f"lobby,{topic}"}) as s:
        await expect_error(s, 403, "forbidden")


@pytest.mark.parametrize("topic", ["bad topic", "$sys", "a" * 201, "emoji😀", "semi;colon"])
async def test_malformed_topic_name_is_400_before_the_stream(
    srv: TidingsServer, topic: str
) -> None:
    token = srv.token("alice", topics=["**"])
    async with sse_stream(srv.url, token=token, params={"topics": topic}) as s:
        await expect_error(s, 400, "invalid_request")


async def test_more_than_64_topics_is_400(srv: TidingsServer) -> None:
    token = srv.token("alice", topics=["**"])
    params = {"topics": ",".join(f"room{n}" for n in range(65))}
    async with sse_stream(srv.url, token=token, params=params) as s:
        await expect_error(s, 400, "invalid_request")


async def test_connection_limits_answer_503_with_retry_after(
    start_server: StartServer, transport: str
) -> None:
    srv = start_server(
        TIDINGS_MAX_CONNECTIONS="3",
        TIDINGS_MAX_CONNECTIONS_PER_USER="2",
        TIDINGS_FASTPATH=transport,
    )
    streams = []
    try:
        for user, status in [("a", 200), ("a", 200), ("a", 503), ("b", 200), ("c", 503)]:
            s = await open_stream(srv.url, token=srv.token(user))
            streams.append(s)
            if status == 200:
                await s.next_event("welcome")
            else:
                await expect_error(s, 503, "over_capacity")
                assert (s.header("retry-after") or "").isdigit()
        await streams[0].close()  # a place is free again
        async with Api(srv.url, srv.api_key) as api:
            await wait_no_connections(api, expected=2)
        async with sse_stream(srv.url, token=srv.token("c")) as again:
            await again.next_event("welcome")
    finally:
        for s in streams:
            await s.close()


# -- routing --------------------------------------------------------------------------------


async def test_event_to_a_user_reaches_all_of_their_connections(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    token = srv.token("alice", tenant=tenant)
    async with (
        sse_stream(srv.url, token=token) as phone,
        sse_stream(srv.url, token=token) as laptop,
        sse_stream(srv.url, "/sse/stream", params={"token": token}) as tab,
        sse_stream(srv.url, token=srv.token("bob", tenant=tenant)) as bob,
    ):
        for s in (phone, laptop, tab, bob):
            await s.next_event("welcome")
        await api.publish(tenant=tenant, users=["alice"], data={"n": 1})
        for s in (phone, laptop, tab):
            assert (await s.next_event()).json() == {"n": 1}
        await expect_marker(bob, api, tenant=tenant, users=["bob"])


async def test_event_to_several_users_reaches_each_once(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    names = ["alice", "bob", "carol"]
    async with (
        sse_stream(srv.url, token=srv.token("alice", tenant=tenant)) as a,
        sse_stream(srv.url, token=srv.token("bob", tenant=tenant)) as b,
        sse_stream(srv.url, token=srv.token("carol", tenant=tenant)) as c,
    ):
        for s in (a, b, c):
            await s.next_event("welcome")
        await api.publish(tenant=tenant, users=["alice", "bob"], data="to two")
        for s in (a, b):
            assert (await s.next_event()).data == "to two"
        for s, name in zip((a, b, c), names, strict=True):
            await expect_marker(s, api, tenant=tenant, users=[name])


async def test_event_to_a_topic_reaches_its_subscribers_only(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    token = srv.token("alice", tenant=tenant, topics=["news", "sport"])
    async with (
        sse_stream(srv.url, token=token, params={"topics": "news"}) as news,
        sse_stream(srv.url, token=token, params={"topics": "sport"}) as sport,
        sse_stream(srv.url, token=srv.token("bob", tenant=tenant)) as bob,
    ):
        for s in (news, sport, bob):
            await s.next_event("welcome")
        await api.publish(tenant=tenant, topics=["news"], event="headline", data={"h": 1})
        event = await news.next_event()
        assert (event.event, event.json()) == ("headline", {"h": 1})
        await expect_marker(sport, api, tenant=tenant, topics=["sport"])
        await expect_marker(bob, api, tenant=tenant, users=["bob"])


async def test_broadcast_reaches_every_connection_of_its_tenant_only(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    other = tenant + "-other"
    async with (
        sse_stream(srv.url, token=srv.token("alice", tenant=tenant)) as alice,
        sse_stream(srv.url, token=srv.token("bob", tenant=tenant)) as bob,
        sse_stream(srv.url, token=srv.token("alice", tenant=other)) as stranger,
    ):
        for s in (alice, bob, stranger):
            await s.next_event("welcome")
        await api.publish(tenant=tenant, broadcast=True, event="maintenance", data="at 22:00")
        for s in (alice, bob):
            event = await s.next_event()
            assert (event.event, event.data) == ("maintenance", "at 22:00")
        await expect_marker(stranger, api, tenant=other, broadcast=True)


async def test_tenants_are_walls_for_the_same_user_and_topic(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    other = tenant + "-b"
    params = {"topics": "news"}
    async with (
        sse_stream(
            srv.url, token=srv.token("alice", tenant=tenant, topics=["news"]), params=params
        ) as mine,
        sse_stream(
            srv.url, token=srv.token("alice", tenant=other, topics=["news"]), params=params
        ) as theirs,
    ):
        assert (await theirs.next_event("welcome")).json()["tenant"] == other
        await mine.next_event("welcome")
        await api.publish(tenant=tenant, users=["alice"], data="personal")
        await api.publish(tenant=tenant, topics=["news"], data="topic")
        await api.publish(tenant=tenant, broadcast=True, data="broadcast")
        assert [(await mine.next_event()).data for _ in range(3)] == [
            "personal",
            "topic",
            "broadcast",
        ]
        await expect_marker(theirs, api, tenant=other, users=["alice"])
        await expect_marker(theirs, api, tenant=other, topics=["news"])


async def test_default_tenant_is_a_wall_too(srv: TidingsServer, api: Api, tenant: str) -> None:
    async with (
        sse_stream(srv.url, token=srv.token("dora")) as default,
        sse_stream(srv.url, token=srv.token("dora", tenant=tenant)) as named,
    ):
        await default.next_event("welcome")
        await named.next_event("welcome")
        await api.publish(users=["dora"], data="default tenant")  # no tenant: ""
        assert (await default.next_event()).data == "default tenant"
        await expect_marker(named, api, tenant=tenant, users=["dora"])


async def test_event_for_the_user_and_a_topic_it_reads_arrives_once(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    token = srv.token("alice", tenant=tenant, topics=["news", "sport"])
    async with sse_stream(srv.url, token=token, params={"topics": "news,sport"}) as s:
        await s.next_event("welcome")
        await api.publish(
            tenant=tenant, users=["alice"], topics=["news", "sport"], broadcast=True, data="once"
        )
        assert (await s.next_event()).data == "once"
        await expect_marker(s, api, tenant=tenant, users=["alice"])


# -- ordering and framing --------------------------------------------------------------------


async def test_200_events_arrive_in_publish_order(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    async with sse_stream(srv.url, token=srv.token("alice", tenant=tenant)) as s:
        await s.next_event("welcome")
        for n in range(200):
            await api.publish(tenant=tenant, users=["alice"], data={"n": n})
        received = [(await s.next_event()).json()["n"] for _ in range(200)]
    assert received == list(range(200))


async def test_ids_are_distinct_cursors_on_every_event(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    async with sse_stream(srv.url, token=srv.token("alice", tenant=tenant)) as s:
        welcome = await s.next_event("welcome")
        for n in range(3):
            await api.publish(tenant=tenant, users=["alice"], data=n)
        events = await s.take(3)
    ids = [welcome.id] + [e.id for e in events]
    assert all(i and re.fullmatch(r"[\x21-\x7e]{1,1024}", i) for i in ids), ids
    assert len(set(ids)) == 4


async def test_named_events_carry_an_event_line_and_message_events_do_not(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    async with sse_stream(srv.url, token=srv.token("alice", tenant=tenant)) as s:
        await s.next_event("welcome")
        await api.publish(tenant=tenant, users=["alice"], event="order.created", data={"o": 1})
        await api.publish(tenant=tenant, users=["alice"], data={"m": 2})  # default: message
        await api.publish(tenant=tenant, users=["alice"], event="message", data={"m": 3})
        named, plain, explicit = await s.take(3)
    assert (named.event, named.json()) == ("order.created", {"o": 1})
    assert (plain.event, plain.json()) == ("message", {"m": 2})
    assert (explicit.event, explicit.json()) == ("message", {"m": 3})
    block = frame_with(s, '"o":1')
    assert block[0].startswith("id: ") and block[1:] == ["event: order.created", 'data: {"o":1}']
    for needle in ('"m":2', '"m":3'):
        block = frame_with(s, needle)
        assert len(block) == 2 and block[0].startswith("id: ") and block[1].startswith("data: ")


async def test_string_payload_with_newlines_is_split_into_data_lines(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    text = "first line\nsecond line\n\nfourth: with a colon"
    async with sse_stream(srv.url, token=srv.token("alice", tenant=tenant)) as s:
        await s.next_event("welcome")
        await api.publish(tenant=tenant, users=["alice"], event="note", data=text)
        event = await s.next_event()
    assert (event.event, event.data) == ("note", text)
    block = frame_with(s, "data: first line")
    assert block[1:] == [
        "event: note",
        "data: first line",
        "data: second line",
        "data: ",
        "data: fourth: with a colon",
    ]


async def test_carriage_returns_in_string_payloads_end_lines_too(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    async with sse_stream(srv.url, token=srv.token("alice", tenant=tenant)) as s:
        await s.next_event("welcome")
        await api.publish(tenant=tenant, users=["alice"], data="crlf\r\nlone cr\rlf\nend")
        event = await s.next_event()
    assert event.data == "crlf\nlone cr\nlf\nend"  # what EventSource makes of it, too
    assert frame_with(s, "data: crlf")[1:] == [
        "data: crlf",
        "data: lone cr",
        "data: lf",
        "data: end",
    ]
    assert b"\r" not in bytes(s.raw)


async def test_chinese_text_and_user_ids_round_trip_as_utf8(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    async with sse_stream(srv.url, token=srv.token("张三", tenant=tenant)) as s:
        welcome = (await s.next_event("welcome")).json()
        assert welcome["user_id"] == "张三"
        await api.publish(tenant=tenant, users=["张三"], data={"title": "工资已发放"})
        await api.publish(tenant=tenant, users=["张三"], event="note", data="工资已发放\n请查收")
        obj, text = await s.take(2)
    assert obj.json() == {"title": "工资已发放"}
    assert (text.event, text.data) == ("note", "工资已发放\n请查收")
    raw = bytes(s.raw)
    assert '"title":"工资已发放"'.encode() in raw  # UTF-8 itself, not \\u escapes
    assert "data: 工资已发放\ndata: 请查收\n".encode() in raw


# -- heartbeats -----------------------------------------------------------------------------


async def test_heartbeat_comments_arrive_at_the_configured_interval(
    start_server: StartServer,
) -> None:
    srv = start_server(TIDINGS_HEARTBEAT_INTERVAL="5")  # the minimum
    async with sse_stream(srv.url, token=srv.token("alice")) as s:
        assert (await s.next_event("welcome")).json()["heartbeat_interval"] == 5
        await s.wait_comments(1, within=3 * 5 + WAIT)
        assert b"\n: ping\n\n" in bytes(s.raw)


# -- slow consumers -------------------------------------------------------------------------


def _socket_bytes_in_flight() -> int:
    """An upper bound on what the kernel can hold between a stalled reader and the server:
    the server's largest send buffer (tcp_wmem max) plus a generous allowance for the rest."""
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        wmem_max = 4 * 1024 * 1024
    return wmem_max + 1024 * 1024


async def test_slow_consumer_is_closed_and_recovers_everything_on_resume(
    start_server: StartServer, transport: str
) -> None:
    srv = start_server(TIDINGS_CLIENT_BUFFER_SIZE="4", TIDINGS_FASTPATH=transport)
    payload = 60_000
    # Enough 60 KB events to fill the kernel's buffers and the 4-event connection buffer.
    count = math.ceil(_socket_bytes_in_flight() / payload) + 4 + 8
    async with (
        Api(srv.url, srv.api_key) as api,
        sse_stream(srv.url, token=srv.token("slow"), rcvbuf=4096) as slow,
        sse_stream(srv.url, token=srv.token("fast")) as fast,
    ):
        await slow.next_event("welcome")
        await fast.next_event("welcome")
        # `slow` is not read from here on; `fast` reads each event as it comes.
        published = []
        for n in range(count):
            data = f"{n:05d}:" + "x" * payload
            await api.publish(users=["slow", "fast"], event="big", data=data)
            published.append(data)
            event = await fast.next_event()
            assert event.data == data, f"fast consumer got event {event.data[:6]} for {n}"

        # The server gave up on `slow`: reading now yields what was in flight, then the end.
        got = [e.data for e in await slow.wait_end(within=30)]
        assert slow.ended
        assert 0 < len(got) < count, f"slow got {len(got)} of {count}: it was never dropped"
        assert got == published[: len(got)], "what the slow client got is not a prefix"

        async with sse_stream(
            srv.url, token=srv.token("slow"), last_event_id=slow.last_id
        ) as again:
            await again.next_event("welcome")
            rest = [(await again.next_event()).data for _ in range(count - len(got))]
            assert rest == published[len(got) :]  # nothing lost, nothing twice
            await expect_marker(again, api, users=["slow"])
            assert not any(e.event == "reset" for e in again.events)

        metrics = (await api.http.get("/metrics")).text
        await slow.close()
        await fast.close()
        stats = await wait_no_connections(api)
        assert stats["users"] == 0, stats
    overflows = _metric(metrics, "tidings_buffer_overflows_total")
    assert overflows is not None and overflows >= 1, metrics


async def test_a_stalled_client_that_overflows_is_disconnected_and_counted(
    start_server: StartServer, transport: str
) -> None:
    srv = start_server(TIDINGS_CLIENT_BUFFER_SIZE="4", TIDINGS_FASTPATH=transport)
    payload = 60_000
    count = math.ceil(_socket_bytes_in_flight() / payload) + 4 + 8
    async with (
        Api(srv.url, srv.api_key) as api,
        sse_stream(srv.url, token=srv.token("stalled"), rcvbuf=4096) as stalled,
    ):
        await stalled.next_event("welcome")  # and never reads again, nor closes
        for _ in range(count):
            await api.publish(users=["stalled"], data="s" * payload)
        # The close follows the overflow at once; the bound is only a failure guard.
        stats = await wait_no_connections(api, within=5)
        assert stats["users"] == 0, stats
        metrics = (await api.http.get("/metrics")).text
    assert _metric(metrics, "tidings_buffer_overflows_total") == 1, metrics
    assert _metric(metrics, "tidings_connections") == 0, metrics


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def wait_no_connections(api: Api, expected: int = 0, within: float = WAIT) -> dict[str, Any]:
    """Stats once the server has noticed closed connections: it does so by itself, so poll
    (bounded) until `connections` is `expected`. A condition, not a timed wait."""
    for _ in range(int(within / 0.05)):
        stats: dict[str, Any] = (await api.get("/api/v1/stats")).json()
        if stats["connections"] == expected:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"connections never came down to {expected}: {stats}")


# -- no leaks -------------------------------------------------------------------------------


async def test_200_connections_opened_and_closed_leave_nothing_behind(
    start_server: StartServer, transport: str
) -> None:
    srv = start_server(TIDINGS_FASTPATH=transport)
    streams: list[SSEClient] = []
    async with Api(srv.url, srv.api_key) as api:
        try:
            for wave in range(4):  # 4 × 50 at once: users, tenants and topics in several shapes
                batch = [
                    open_stream(
                        srv.url,
                        token=srv.token(f"u{n % 7}", tenant=f"t{n % 3}", topics=["room:*"]),
                        params={"topics": f"room:{n % 5},room:x"},
                    )
                    for n in range(wave * 50, wave * 50 + 50)
                ]
                streams += await asyncio.gather(*batch)
            for s in streams:
                await s.next_event("welcome")
            stats = (await api.get("/api/v1/stats")).json()
            assert stats["connections"] == 200 and stats["users"] == 21
        finally:  # half close politely, half with a TCP reset (a crashed client)
            await asyncio.gather(*(s.close() for s in streams[::2]))
            await asyncio.gather(*(s.abort() for s in streams[1::2]))

        # The server notices each close by itself; wait (bounded) until it has seen all 200.
        stats = await wait_no_connections(api)
        assert (stats["connections"], stats["users"], stats["topics"]) == (0, 0, 0), stats
        assert (await api.get("/api/v1/presence?tenant=t1")).json()["users"] == []
        metrics = (await api.http.get("/metrics")).text
    assert _metric(metrics, "tidings_connections") == 0, metrics
    assert _metric(metrics, "tidings_connects_total") == 200, metrics


# -- shutdown and start-up ------------------------------------------------------------------


async def test_sigterm_tells_open_streams_to_reconnect_and_the_process_exits(
    start_server: StartServer, transport: str
) -> None:
    srv = start_server(TIDINGS_FASTPATH=transport)
    async with sse_stream(srv.url, token=srv.token("alice")) as s:
        await s.next_event("welcome")
        stopping = asyncio.ensure_future(asyncio.to_thread(srv.stop))  # SIGTERM, then wait
        shutdown = await s.next_event("shutdown")
        before = s.events[s.events.index(shutdown) - 1]
        assert (before.event, before.retry) == ("retry", 1000), s.events
        assert shutdown.json()["reason"]
        await s.wait_end()
        code = await stopping
    assert code in (0, -signal.SIGTERM), code  # exited, gracefully (uvicorn re-raises SIGTERM)
    assert "Traceback" not in srv.log(), srv.log()


def _bare_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(settings)
    return env


async def test_serve_with_no_configuration_starts_in_dev_mode(tmp_path: Path) -> None:
    workdir = tmp_path / "empty"
    workdir.mkdir()
    port = free_port()  # the only thing given: a free port instead of the default 8000
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "tidings", "serve", "--port", str(port)),
            cwd=workdir,
            env=_bare_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(400):  # polling readiness, bounded (20 s)
                assert proc.returncode is None, log.read_text()
                try:
                    if (await http.get(url + "/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"tidings serve did not start:\n{log.read_text()}")
        output = log.read_text()
        assert "tidings token --user alice" in output, output
        hinted = re.search(r"token for alice[^:]*:\s*(\S+)", output)
        assert hinted, output
        assert (workdir / ".tidings_secret").is_file()
        assert sorted(p.name for p in workdir.iterdir() if p.name.startswith(".")) == [
            ".tidings_secret"
        ]

        minted = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tidings", "token", "--user", "alice"],
            cwd=workdir,
            env=_bare_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert minted.returncode == 0, minted.stderr
        for token in (minted.stdout.strip(), hinted.group(1)):
            async with sse_stream(url, token=token) as s:
                assert s.status == 200
                assert (await s.next_event("welcome")).json()["user_id"] == "alice"
    finally:
        proc.terminate()
        async with asyncio.timeout(15):
            await proc.wait()


def test_serve_off_loopback_without_a_secret_refuses_to_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tidings", "serve", "--port", str(free_port())],
        cwd=tmp_path,
        env=_bare_env(TIDINGS_HOST="0.0.0.0"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "TIDINGS_JWT_SECRET" in result.stderr
    assert not (tmp_path / ".tidings_secret").exists()
