"""Exact resume end to end (API.md §4): a real `tidings serve`, real sockets.

A client that reconnects with its last `id` (the `Last-Event-ID` header, or
`?last_event_id=`) gets exactly what it missed on each of its streams — its own,
its tenant's broadcast and its topics — in order, once, then live events; when the
server cannot do that it says `reset` first. The property test at the end drives
random interleavings of publishes, disconnects and reconnects against one server.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import StartServer, TidingsServer
from sse_client import Api, SSEClient, expect_marker, open_stream, sse_stream

TOPICS = "news,sport"


TRANSPORTS = {"fastpath": "1", "asgi": "0"}  # TIDINGS_FASTPATH: serve's own protocol, or sse.py


@pytest.fixture(scope="module", params=sorted(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> str:
    """Tests that take this run against both ways `tidings serve` can serve a stream."""
    return TRANSPORTS[request.param]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[TidingsServer]:
    env = {"TIDINGS_FASTPATH": transport}
    with TidingsServer(tmp_path_factory.mktemp("resume"), env) as server:
        yield server
    assert "Traceback" not in server.log(), server.log()


@pytest.fixture
async def api(srv: TidingsServer) -> AsyncIterator[Api]:
    async with Api(srv.url, srv.api_key) as client:
        yield client


@pytest.fixture
def tenant() -> str:
    return "t-" + secrets.token_hex(4)


def alice_token(srv: TidingsServer, tenant: str) -> str:
    return srv.token("alice", tenant=tenant, topics=["news", "sport", "weather"])


def resume_kw(how: str, cursor: str | None) -> dict[str, Any]:
    """Open-stream arguments that resume from `cursor` by header or by query."""
    assert cursor
    if how == "header":
        return {"last_event_id": cursor, "params": {"topics": TOPICS}}
    return {"params": {"topics": TOPICS, "last_event_id": cursor}}


async def open_alice(srv: TidingsServer, tenant: str, **kw: Any) -> SSEClient:
    """alice's stream reading `news` and `sport` unless `params` says otherwise."""
    kw.setdefault("params", {"topics": TOPICS})
    return await open_stream(srv.url, token=alice_token(srv, tenant), **kw)


@contextlib.asynccontextmanager
async def alice_stream(srv: TidingsServer, tenant: str, **kw: Any) -> AsyncIterator[SSEClient]:
    client = await open_alice(srv, tenant, **kw)
    try:
        yield client
    finally:
        await client.close()


async def expect_reset_then_live(client: SSEClient, api: Api, tenant: str) -> str:
    """welcome, then `reset` with a reason before any live event; returns the reason."""
    await client.next_event("welcome")
    reset = await client.next_event()
    assert reset.event == "reset", reset
    reason: str = reset.json()["reason"]
    assert isinstance(reason, str) and reason
    await expect_marker(client, api, tenant=tenant, users=["alice"])
    return reason


# -- exact replay ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["header", "query"])
async def test_reconnect_replays_exactly_the_missed_events_in_order_then_goes_live(
    srv: TidingsServer, api: Api, tenant: str, how: str
) -> None:
    async with alice_stream(srv, tenant) as first:
        await first.next_event("welcome")
        await api.publish(tenant=tenant, users=["alice"], data="seen live")
        assert (await first.next_event()).data == "seen live"
        cursor = first.last_id

    other = tenant + "-b"
    missed = []
    bodies: list[dict[str, Any]] = [
        {"users": ["alice"], "data": "personal 1"},
        {"topics": ["news"], "data": "news 1"},
        {"users": ["bob"], "data": "not for alice"},
        {"broadcast": True, "event": "notice", "data": "broadcast 1"},
        {"topics": ["weather"], "data": "a topic alice does not read now"},
        {"topics": ["sport"], "data": "sport 1"},
        {"users": ["alice"], "topics": ["news", "sport"], "data": "on three streams"},
        {"tenant": other, "users": ["alice"], "data": "another tenant"},
        {"topics": ["news"], "data": "news 2"},
        {"users": ["alice"], "data": "personal 2"},
    ]
    for body in bodies:
        await api.publish(**{"tenant": tenant, **body})
        if "not" not in body["data"] and "another" not in body["data"]:
            missed.append(body["data"])

    async with alice_stream(srv, tenant, **resume_kw(how, cursor)) as again:
        await again.next_event("welcome")
        replay = await again.take(len(missed))
        assert [e.data for e in replay] == missed
        assert replay[2].event == "notice"
        await expect_marker(again, api, tenant=tenant, users=["alice"])
        await expect_marker(again, api, tenant=tenant, topics=["sport"])
        assert not any(e.event == "reset" for e in again.events)


async def test_the_header_wins_over_the_query_cursor(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    async with alice_stream(srv, tenant) as first:
        cursor = (await first.next_event("welcome")).id
    await api.publish(tenant=tenant, users=["alice"], data="missed")
    params = {"topics": TOPICS, "last_event_id": "garbage!"}
    async with alice_stream(srv, tenant, last_event_id=cursor, params=params) as again:
        await again.next_event("welcome")
        assert (await again.next_event()).data == "missed"


async def test_resuming_twice_from_the_same_cursor_replays_the_same_events(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    async with alice_stream(srv, tenant) as first:
        cursor = (await first.next_event("welcome")).id
    for n in range(3):
        await api.publish(tenant=tenant, topics=["news"], data=n)
    for _ in range(2):  # say a second tab restored from the same saved id
        async with alice_stream(srv, tenant, last_event_id=cursor) as again:
            await again.next_event("welcome")
            assert [e.data for e in await again.take(3)] == ["0", "1", "2"]


async def test_a_chain_of_resumes_never_repeats_an_event(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    cursor: str | None = None
    got: list[str] = []
    for round_ in range(4):
        kw = {} if cursor is None else {"last_event_id": cursor}
        async with alice_stream(srv, tenant, **kw) as s:
            await s.next_event("welcome")
            if round_:
                got += [e.data for e in await s.take(2)]  # the two published while away
            await api.publish(tenant=tenant, users=["alice"], data=f"live {round_}")
            got.append((await s.next_event()).data)
            cursor = s.last_id
        await api.publish(tenant=tenant, topics=["news"], data=f"away {round_} a")
        await api.publish(tenant=tenant, broadcast=True, data=f"away {round_} b")
    async with alice_stream(srv, tenant, last_event_id=cursor) as s:
        await s.next_event("welcome")
        got += [e.data for e in await s.take(2)]
    expected = []
    for round_ in range(4):
        expected += [f"live {round_}", f"away {round_} a", f"away {round_} b"]
    assert got == expected


async def test_a_topic_added_on_reconnect_starts_live(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    async with alice_stream(srv, tenant, params={"topics": "news"}) as first:
        cursor = (await first.next_event("welcome")).id
    await api.publish(tenant=tenant, topics=["news"], data="news while away")
    await api.publish(tenant=tenant, topics=["weather"], data="weather before subscribing")
    params = {"topics": "news,weather"}
    async with alice_stream(srv, tenant, params=params, last_event_id=cursor) as again:
        await again.next_event("welcome")
        assert (await again.next_event()).data == "news while away"
        await expect_marker(again, api, tenant=tenant, topics=["weather"])


async def test_a_connection_reading_64_long_topics_resumes_exactly(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    topics = [f"{'t' * 190}:{n:03d}" for n in range(64)]  # the most a connection may read
    token = srv.token("alice", tenant=tenant, topics=["**"])
    params = {"topics": ",".join(topics)}
    async with sse_stream(srv.url, token=token, params=params) as first:
        await first.next_event("welcome")
        for topic in topics[::9]:
            await api.publish(tenant=tenant, topics=[topic], data=topic[-3:])
        await first.take(len(topics[::9]))
        cursor = first.last_id
    assert cursor and len(cursor) <= 1024 and cursor.isascii()
    for topic in topics[::-7]:
        await api.publish(tenant=tenant, topics=[topic], data=topic[-3:])
    async with sse_stream(srv.url, token=token, params=params, last_event_id=cursor) as again:
        await again.next_event("welcome")
        missed = [e.data for e in await again.take(len(topics[::-7]))]
        assert missed == [topic[-3:] for topic in topics[::-7]]
        await expect_marker(again, api, tenant=tenant, users=["alice"])
        assert not any(e.event == "reset" for e in again.events)


# -- when exact resume is impossible: reset ----------------------------------------------


async def test_reconnect_after_a_restart_gets_reset_before_live_events(
    start_server: StartServer, transport: str
) -> None:
    srv = start_server(TIDINGS_FASTPATH=transport)
    async with Api(srv.url, srv.api_key) as api:
        async with alice_stream(srv, "") as first:
            await first.next_event("welcome")
            await api.publish(users=["alice"], data="before the restart")
            assert (await first.next_event()).data == "before the restart"
            restarting = asyncio.ensure_future(asyncio.to_thread(srv.restart))
            await first.next_event("shutdown")  # the stream is told, then ends
            await first.wait_end()
            await restarting
            cursor = first.last_id
        async with alice_stream(srv, "", last_event_id=cursor) as again:
            reason = await expect_reset_then_live(again, api, "")
    assert "restart" in reason or "epoch" in reason, reason


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!",
        "not-a-cursor-at-all",
        "m0123456789.zzzzzz1",  # the shape, but another epoch
        "m0123456789.!!!",
        "a" * 2000,  # over the 1024-character limit
    ],
)
async def test_a_garbled_cursor_gets_reset_before_live_events(
    srv: TidingsServer, api: Api, tenant: str, cursor: str
) -> None:
    async with alice_stream(srv, tenant, last_event_id=cursor) as s:
        assert s.status == 200
        await expect_reset_then_live(s, api, tenant)


async def test_a_garbled_query_cursor_gets_reset_too(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    params = {"topics": TOPICS, "last_event_id": "游标?%&"}
    async with alice_stream(srv, tenant, params=params) as s:
        await expect_reset_then_live(s, api, tenant)


async def test_a_cursor_from_the_future_gets_reset(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    async with alice_stream(srv, tenant) as first:
        welcome = (await first.next_event("welcome")).id
    assert welcome
    epoch, *parts = welcome.split(".")
    ahead = ".".join([epoch] + [p[:6] + "fffffffff" for p in parts])
    async with alice_stream(srv, tenant, last_event_id=ahead) as s:
        await expect_reset_then_live(s, api, tenant)


async def test_missing_more_than_the_history_window_gets_reset(
    start_server: StartServer, transport: str
) -> None:
    srv = start_server(TIDINGS_HISTORY_SIZE="3", TIDINGS_FASTPATH=transport)
    async with Api(srv.url, srv.api_key) as api:
        async with alice_stream(srv, "") as first:
            cursor = (await first.next_event("welcome")).id

        for n in range(3):  # exactly the window: still exact
            await api.publish(users=["alice"], data=f"kept {n}")
        async with alice_stream(srv, "", last_event_id=cursor) as again:
            await again.next_event("welcome")
            assert [e.data for e in await again.take(3)] == ["kept 0", "kept 1", "kept 2"]
            await expect_marker(again, api, users=["alice"])
            cursor = again.last_id

        for n in range(4):  # one more than the window: the oldest is gone
            await api.publish(users=["alice"], data=f"lost {n}")
        async with alice_stream(srv, "", last_event_id=cursor) as again:
            await again.next_event("welcome")
            reset = await again.next_event()
            assert reset.event == "reset" and reset.json()["reason"], reset
            tag = "after-" + secrets.token_hex(4)
            await api.publish(users=["alice"], event="marker", data=tag)
            rest = await again.events_until(lambda e: e.data == tag)
            # Whatever comes between the reset and live events is history, in order.
            assert [e.data for e in rest[:-1]] in (
                [],
                ["lost 1", "lost 2", "lost 3"],
            ), rest


# -- the property -----------------------------------------------------------------------------

TARGETS = ["user", "news", "sport", "broadcast", "bob", "weather", "other-tenant"]
MINE = {"user", "news", "sport", "broadcast"}  # streams the client reads

target_sets = st.lists(st.sampled_from(TARGETS), min_size=1, max_size=3, unique=True)
step = st.one_of(
    st.tuples(st.just("publish"), target_sets),
    st.tuples(st.just("batch"), st.lists(target_sets, min_size=2, max_size=4)),
    st.tuples(st.just("read"), st.integers(1, 4)),
    st.tuples(st.just("disconnect"), st.none()),
    st.tuples(st.just("reconnect"), st.sampled_from(["header", "query"])),
)


@dataclass
class Run:
    srv: TidingsServer
    api: Api
    tenant: str = field(default_factory=lambda: "p-" + secrets.token_hex(4))
    published: list[tuple[int, frozenset[str]]] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    clients: list[SSEClient] = field(default_factory=list)
    cursor: str | None = None
    connected: bool = False
    n: int = 0

    def message(self, targets: list[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"tenant": self.tenant, "users": [], "topics": [], "data": self.n}
        for target in targets:
            if target == "user":
                body["users"].append("alice")
            elif target == "bob":
                body["users"].append("bob")
            elif target == "broadcast":
                body["broadcast"] = True
            elif target == "other-tenant":
                body["tenant"] = self.tenant + "-x"
            else:
                body["topics"].append(target)
        mine = frozenset(targets) & MINE if body["tenant"] == self.tenant else frozenset()
        if mine:
            self.published.append((self.n, mine))
        if not (body["users"] or body["topics"] or body.get("broadcast")):
            body["users"] = ["bob"]  # only "other-tenant": send it to someone there
        self.n += 1
        return body

    async def connect(self, how: str = "header") -> None:
        kw = {} if self.cursor is None else resume_kw(how, self.cursor)
        client = await open_alice(self.srv, self.tenant, **kw)
        self.clients.append(client)
        await client.next_event("welcome")
        self.connected = True

    async def disconnect(self) -> None:
        client = self.clients[-1]
        self._record(client.received())  # read off the socket already: the client has them
        self.cursor = client.last_id
        await client.close()
        self.connected = False

    async def read(self, count: int) -> None:
        outstanding = len(self.published) - len(self.seen)
        client = self.clients[-1]
        self._record([await client.next_event() for _ in range(min(count, outstanding))])

    def _record(self, events: list[Any]) -> None:
        for event in events:
            assert event.event == "message", f"unexpected {event}"
            self.seen.append(int(event.data))

    async def step(self, kind: str, arg: Any) -> None:
        if kind == "publish":
            await self.api.publish(**self.message(arg))
        elif kind == "batch":
            await self.api.publish_batch([self.message(targets) for targets in arg])
        elif kind == "read" and self.connected:
            await self.read(arg)
        elif kind == "disconnect" and self.connected:
            await self.disconnect()
        elif kind == "reconnect":
            if self.connected:
                await self.disconnect()
            await self.connect(arg)

    async def finish(self) -> None:
        if not self.connected:
            await self.connect()
        await self.read(len(self.published) - len(self.seen))
        await expect_marker(self.clients[-1], self.api, tenant=self.tenant, users=["alice"])
        for client in self.clients:
            await client.close()


async def run_scenario(srv: TidingsServer, steps: list[tuple[str, Any]]) -> Run:
    async with Api(srv.url, srv.api_key) as api:
        run = Run(srv, api)
        try:
            await run.connect()
            for kind, arg in steps:
                await run.step(kind, arg)
            await run.finish()
        finally:
            for client in run.clients:
                await client.close()
    return run


@pytest.fixture(scope="module")
def property_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TidingsServer]:
    with TidingsServer(tmp_path_factory.mktemp("resume-property")) as server:
        yield server
    assert "Traceback" not in server.log(), server.log()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=10, max_size=30))
def test_any_interleaving_of_publishes_and_reconnects_delivers_each_event_once_in_order(
    property_srv: TidingsServer, steps: list[tuple[str, Any]]
) -> None:
    run = asyncio.run(run_scenario(property_srv, steps))
    expected = [n for n, _ in run.published]
    assert sorted(run.seen) == expected, "lost or repeated events"
    streams = {n: mine for n, mine in run.published}
    for stream in MINE:
        order = [n for n in run.seen if stream in streams[n]]
        assert order == [n for n in expected if stream in streams[n]], f"{stream} out of order"
    assert not any(e.event == "reset" for c in run.clients for e in c.events)
