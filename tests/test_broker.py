"""Broker + memory backend: routing, walls, exact resume, slow consumers, cleanup."""

from __future__ import annotations

import gc
import weakref

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidings.auth import Principal
from tidings.backends.memory import MemoryBackend
from tidings.connection import SSEConnection
from tidings.event import CloseReason
from tidings.hub import Hub
from tidings.wire import SSEParser


class Client:
    """A connection plus a parser over what it was sent."""

    def __init__(
        self,
        hub: Hub,
        user: str,
        tenant: str = "",
        topics: tuple[str, ...] = (),
        limit: int = 8,
    ) -> None:
        principal = Principal(user, tenant, topics=topics)
        self.hub = hub
        self.conn = SSEConnection(principal, hub.streams_for(principal, list(topics)), limit=limit)
        self.parser = SSEParser()
        self.events: list[tuple[str, object]] = []

    async def open(self, cursor: str | None = None) -> str | None:
        resumption = await self.hub.broker.attach(self.conn, cursor)
        self.hub.broker.release(self.conn, resumption)
        return resumption.reset

    def read(self) -> list[tuple[str, object]]:
        for frame in self.conn.drain():
            self.events += [(e.event, _value(e.data)) for e in self.parser.feed(frame)]
        return self.events

    @property
    def last_id(self) -> str:
        self.read()
        return self.parser.last_event_id or self.conn.cursor()

    def close(self) -> None:
        self.hub.broker.detach(self.conn)


def _value(data: str) -> object:
    # String payloads travel as-is, everything else as JSON.
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data


@pytest.fixture
async def hub() -> Hub:
    h = Hub()
    await h.start()
    yield h  # type: ignore[misc]
    await h.stop()


async def test_routes_to_user_topic_and_broadcast_within_tenant(hub: Hub) -> None:
    alice = Client(hub, "alice", "acme", topics=("news",))
    bob = Client(hub, "bob", "acme")
    other = Client(hub, "alice", "globex", topics=("news",))
    for c in (alice, bob, other):
        await c.open()
    await hub.send_to_user("alice", {"n": 1}, tenant="acme")
    await hub.send_to_topic("news", {"n": 2}, tenant="acme")
    await hub.broadcast({"n": 3}, tenant="acme")
    assert alice.read() == [("message", {"n": 1}), ("message", {"n": 2}), ("message", {"n": 3})]
    assert bob.read() == [("message", {"n": 3})]
    assert other.read() == []  # tenants are walls, same user id and topic notwithstanding


async def test_event_on_two_of_my_streams_arrives_once(hub: Hub) -> None:
    alice = Client(hub, "alice", topics=("news",))
    await alice.open()
    await hub.publish(users=["alice"], topics=["news"], broadcast=True, data="once")
    assert alice.read() == [("message", "once")]


async def test_resume_replays_exactly_what_was_missed(hub: Hub) -> None:
    alice = Client(hub, "alice", topics=("a", "b"))
    await alice.open()
    await hub.send_to_topic("a", 1)
    cursor = alice.last_id
    alice.close()
    await hub.send_to_topic("b", 2)
    await hub.send_to_user("alice", 3)
    await hub.send_to_topic("c", "not mine")
    again = Client(hub, "alice", topics=("a", "b"))
    assert await again.open(cursor) is None
    await hub.send_to_topic("a", 4)
    assert again.read() == [("message", 2), ("message", 3), ("message", 4)]


async def test_resume_from_other_epoch_or_garbage_sends_reset(hub: Hub) -> None:
    alice = Client(hub, "alice")
    assert await alice.open("mdeadbeef00.abcdef1") == "history epoch changed (server restarted)"
    bob = Client(hub, "bob")
    assert await bob.open("%%%") == "not a tidings cursor"


async def test_resume_beyond_history_window_sends_reset() -> None:
    hub = Hub(backend=MemoryBackend(history_size=2))
    await hub.start()
    alice = Client(hub, "alice")
    await alice.open()
    cursor = alice.last_id
    alice.close()
    for n in range(3):
        await hub.send_to_user("alice", n)
    again = Client(hub, "alice")
    assert await again.open(cursor) == "history of u-stream no longer kept"
    await hub.stop()


async def test_slow_consumer_is_closed_and_counted(hub: Hub) -> None:
    slow = Client(hub, "slow")
    fast = Client(hub, "fast")
    await slow.open()
    await fast.open()
    for n in range(20):
        await hub.broadcast(n)
        fast.read()
    assert slow.conn.closed is CloseReason.SLOW
    assert [d for _, d in fast.read()] == list(range(20))
    slow.close()
    assert hub.broker.stats.overflows == 1


async def test_detach_leaves_no_trace(hub: Hub) -> None:
    clients = [Client(hub, f"u{i}", topics=("t",)) for i in range(50)]
    for c in clients:
        await c.open()
    refs = [weakref.ref(c.conn) for c in clients]
    for c in clients:
        c.close()
    assert hub.broker.connections == {}
    assert hub.broker._readers == {}
    del clients, c
    gc.collect()
    assert all(r() is None for r in refs)


async def test_users_and_presence(hub: Hub) -> None:
    a1, a2 = Client(hub, "alice", "t1"), Client(hub, "alice", "t1")
    await a1.open()
    await a2.open()
    assert hub.is_online("alice", "t1") and not hub.is_online("alice")
    assert hub.online_users("t1") == ["alice"]
    assert hub.disconnect_user("alice", "t1") == 2
    assert a1.conn.closed is CloseReason.DISCONNECTED


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("publish"), st.sampled_from(["u", "t1", "t2", "b", "u+t1"])),
            st.tuples(st.just("reconnect"), st.booleans()),
        ),
        max_size=40,
    )
)
async def test_property_resume_never_loses_or_duplicates(steps: list[tuple[str, object]]) -> None:
    hub = Hub()
    await hub.start()
    topics = ("t1", "t2")
    # A buffer for every event of a run (at most 40): overflow is another test's business.
    client = Client(hub, "alice", topics=topics, limit=64)
    await client.open()
    seen: list[object] = []
    sent: list[int] = []
    for n, (op, arg) in enumerate(steps):
        if op == "publish":
            sent.append(n)
            users = ["alice"] if "u" in str(arg) else []
            tops = [t for t in topics if t in str(arg)]
            await hub.publish(users=users, topics=tops, broadcast=arg == "b", data=n)
        else:
            cursor = client.last_id
            seen += [d for e, d in client.read() if e == "message"]
            client.close()
            client = Client(hub, "alice", topics=topics, limit=64)
            if arg:  # publish while disconnected, then resume
                sent.append(-n)
                await hub.send_to_topic("t2", -n)
            assert await client.open(cursor) is None
    seen += [d for e, d in client.read() if e == "message"]
    assert seen == sent
    await hub.stop()
