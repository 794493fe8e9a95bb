"""The Redis backend against the real Redis on 127.0.0.1:6379 (no mocks).

Three layers:
- the backend alone: positions, exact history, trimming and TTL, claims, the shared epoch;
- brokers on two backend instances in this process: cross-instance delivery, resume
  on the other instance, catching up after a lost connection (`Broker.resync`),
  data loss and rollback of Redis;
- two real `tidings serve` processes on one Redis: delivery across them, resume
  elsewhere, `kill -9`, and a restart of the real Redis server mid-stream.

Every test uses its own key prefix and deletes its keys at the end. The generic
tests are reused by test_backend_nats.py through the `broker_url` fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from server import StartServer, TidingsServer
from sse_client import Api, SSEClient, open_stream, sse_stream, until
from tidings.auth import Principal
from tidings.backends.base import Backend, create_backend
from tidings.backends.memory import MemoryBackend
from tidings.backends.redis import RedisBackend
from tidings.connection import SSEConnection
from tidings.errors import BackendUnavailable
from tidings.event import CloseReason, Event
from tidings.hub import Hub
from tidings.wire import SSEParser

pytestmark = pytest.mark.integration

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 12
REDIS_START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1 -::1",
    "--port",
    str(REDIS_PORT),
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


# -- Redis plumbing -------------------------------------------------------------------


def redis_cli(*args: str) -> str:
    out = subprocess.run(
        ["redis-cli", "-h", REDIS_HOST, "-p", str(REDIS_PORT), "-n", str(REDIS_DB), *args],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return out.stdout.strip()


def drop_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    try:
        keys = list(client.scan_iter(match=prefix + ":*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.exceptions.RedisError:
        pass  # Redis is down (a failed restart test): nothing left to clean
    finally:
        client.close()


def redis_answers() -> bool:
    return redis_cli("ping") == "PONG"


def stop_redis() -> None:
    subprocess.run(
        ["redis-cli", "-h", REDIS_HOST, "-p", str(REDIS_PORT), "shutdown", "nosave"],
        capture_output=True,
        timeout=10,
    )
    deadline = time.monotonic() + 10
    while reachable(REDIS_HOST, REDIS_PORT):
        assert time.monotonic() < deadline, "Redis did not stop"
        time.sleep(0.05)


def start_redis() -> None:
    if not redis_answers():
        subprocess.run(REDIS_START, capture_output=True, timeout=10, check=False)
    deadline = time.monotonic() + 15
    while not redis_answers():
        assert time.monotonic() < deadline, "Redis did not come back"
        time.sleep(0.05)


@contextlib.contextmanager
def redis_restarts() -> Iterator[None]:
    """Whatever happens inside, Redis answers again afterwards."""
    try:
        yield
    finally:
        start_redis()


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture
def broker_url() -> Iterator[str]:
    """A Redis URL with a fresh key prefix, deleted afterwards."""
    if not reachable(REDIS_HOST, REDIS_PORT):
        pytest.skip(f"Redis is not reachable on {REDIS_HOST}:{REDIS_PORT}")
    prefix = "tt" + secrets.token_hex(5)
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}?prefix={prefix}"
    drop_prefix(prefix)


BackendFactory = Callable[..., Awaitable[Backend]]


@pytest.fixture
async def make_backend(broker_url: str) -> AsyncIterator[BackendFactory]:
    """``await make_backend(history_size=…, history_ttl=…)``: a connected backend."""
    made: list[Backend] = []

    async def make(history_size: int = 100, history_ttl: float = 3600.0) -> Backend:
        backend = create_backend(broker_url, history_size=history_size, history_ttl=history_ttl)
        await backend.connect(lambda event: None)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        with contextlib.suppress(Exception):
            await backend.close()


HubFactory = Callable[..., Awaitable[Hub]]


@pytest.fixture
async def make_hub(broker_url: str) -> AsyncIterator[HubFactory]:
    """``await make_hub()``: a started Hub on its own backend instance (one "server")."""
    hubs: list[Hub] = []

    async def make(history_size: int = 100, history_ttl: float = 3600.0) -> Hub:
        backend = create_backend(broker_url, history_size=history_size, history_ttl=history_ttl)
        hub = Hub(backend=backend)
        await hub.start()
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        with contextlib.suppress(Exception):
            await hub.stop()


class Client:
    """A connection on a hub, plus a parser over what it was sent."""

    def __init__(
        self, hub: Hub, user: str, tenant: str = "", topics: tuple[str, ...] = (), limit: int = 64
    ) -> None:
        principal = Principal(user, tenant, topics=topics)
        self.hub = hub
        self.conn = SSEConnection(principal, hub.streams_for(principal, list(topics)), limit=limit)
        self.parser = SSEParser()
        self.events: list[tuple[str, Any]] = []
        self.last_id: str | None = None

    async def open(self, cursor: str | None = None) -> str | None:
        resumption = await self.hub.broker.attach(self.conn, cursor)
        self.hub.broker.release(self.conn, resumption)
        return resumption.reset

    def read(self) -> list[tuple[str, Any]]:
        for frame in self.conn.drain():
            for event in self.parser.feed(frame):
                self.events.append((event.event, _value(event.data)))
        self.last_id = self.parser.last_event_id
        return self.events

    async def wait_for(self, count: int) -> list[tuple[str, Any]]:
        await until(lambda: len(self.read()) >= count, f"{count} events")
        return self.read()

    def data(self) -> list[Any]:
        return [d for _, d in self.read()]

    def close(self) -> None:
        self.hub.broker.detach(self.conn)


def _value(data: str) -> Any:
    try:  # string payloads travel as-is, everything else as JSON
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data


async def marker(client: Client, hub: Hub, **target: Any) -> list[Any]:
    """Publish a marker to `target`, wait for it; returns every data `client` got before it."""
    tag = "mark-" + secrets.token_hex(4)
    await hub.publish(event="mark", data=tag, **target)
    await until(lambda: tag in client.data(), "the marker")
    got = client.data()
    return got[: got.index(tag)]


# == the backend alone ================================================================


async def test_positions_are_contiguous_per_stream(make_backend: BackendFactory) -> None:
    b = await make_backend()
    e1 = await b.publish("acme", ["u:ann", "b"], "m", 1, "e1")
    e2 = await b.publish("acme", ["u:ann"], "m", 2, "e2")
    e3 = await b.publish("acme", ["t:news", "b"], "m", 3, "e3")
    assert e1.streams == (("u:ann", 1), ("b", 1))
    assert e2.streams == (("u:ann", 2),)
    assert e3.streams == (("t:news", 1), ("b", 2))
    assert await b.tops("acme", ["u:ann", "b", "t:news", "u:bob"]) == {
        "u:ann": 2,
        "b": 2,
        "t:news": 1,
        "u:bob": 0,
    }
    # tenants are walls: the same names elsewhere start afresh
    assert (await b.publish("other", ["u:ann"], "m", 4, "e4")).streams == (("u:ann", 1),)
    assert await b.tops("acme", ["u:ann"]) == {"u:ann": 2}


async def test_history_is_exact(make_backend: BackendFactory) -> None:
    b = await make_backend(history_size=10)
    for i in range(1, 6):
        await b.publish("acme", ["u:ann", "t:x"], "m", {"i": i}, f"e{i}")
    for after in range(6):
        events = await b.history("acme", "u:ann", after)
        assert events is not None
        assert [e.data["i"] for e in events] == list(range(after + 1, 6))
        assert [e.seq_in("u:ann") for e in events] == list(range(after + 1, 6))
    assert await b.history("acme", "u:ann", 6) is None  # ahead of the stream
    assert await b.history("acme", "u:nobody", 0) == []
    assert await b.history("acme", "u:nobody", 3) is None
    # an entry knows its position in the event's other shared streams (dedupe on replay)
    [event] = await b.history("acme", "u:ann", 4) or []
    assert event.seq_in("t:x") == 5
    assert event.name == "m" and event.id == "e5" and event.tenant == "acme"


async def test_trimmed_history_is_none(make_backend: BackendFactory) -> None:
    b = await make_backend(history_size=3)
    for i in range(1, 9):
        await b.publish("", ["t:x"], "m", i, f"e{i}")
    assert [e.data for e in await b.history("", "t:x", 5) or []] == [6, 7, 8]
    assert await b.history("", "t:x", 4) is None
    assert await b.history("", "t:x", 0) is None


async def test_no_history_kept(make_backend: BackendFactory) -> None:
    b = await make_backend(history_size=0)
    await b.publish("", ["t:x"], "m", 1, "e1")
    assert await b.tops("", ["t:x"]) == {"t:x": 1}
    assert await b.history("", "t:x", 1) == []
    assert await b.history("", "t:x", 0) is None


async def test_expired_history_is_none(make_backend: BackendFactory) -> None:
    b = await make_backend(history_size=100, history_ttl=0.5)
    await b.publish("", ["t:x"], "m", 1, "e1")
    assert [e.data for e in await b.history("", "t:x", 0) or []] == [1]
    # waiting for the clock is the point here (the TTL), not synchronisation
    await until(lambda: _is_none(b.history("", "t:x", 0)), "the history to expire")
    assert await b.tops("", ["t:x"]) == {"t:x": 1}  # positions are never reused
    assert (await b.publish("", ["t:x"], "m", 2, "e2")).streams == (("t:x", 2),)
    assert [e.data for e in await b.history("", "t:x", 1) or []] == [2]


async def _is_none(value: Awaitable[object]) -> bool:
    return await value is None


async def test_claims(make_backend: BackendFactory) -> None:
    a, b = await make_backend(), await make_backend()
    assert await a.claim("k", "first", 60) is None
    assert await b.claim("k", "second", 60) == "first"
    await b.release("k")
    assert await b.claim("k", "third", 60) is None
    assert await a.claim("k", "fourth", 60) == "third"


async def test_claims_expire(make_backend: BackendFactory) -> None:
    a = await make_backend()
    assert await a.claim("short", "x", 0.2) is None
    await until(lambda: _is_none(a.claim("short", "y", 0.2)), "the claim to expire")


async def test_publish_once_claims_and_publishes_in_one_script(
    broker_url: str, make_backend: BackendFactory
) -> None:
    """The idempotent publish: the claim is taken by the publish's own script, so a
    claim exists exactly when its event was published."""
    a, b = await make_backend(), await make_backend()
    assert isinstance(a, RedisBackend) and isinstance(b, RedisBackend)
    first = await a.publish_once("k", 60, "", ["u:ann"], "m", "工资已发放", "e1")
    assert isinstance(first, Event) and first.streams == (("u:ann", 1),)
    assert await b.publish_once("k", 60, "", ["u:ann"], "m", "再发一次", "e2") == "e1"
    assert [e.data for e in await b.history("", "u:ann", 0) or []] == ["工资已发放"]
    assert await a.claim("k", "e3", 60) == "e1"  # the same claims as `claim`'s
    # A publish that fails leaves no claim: the script stops before it claims anything.
    prefix = broker_url.rsplit("prefix=", 1)[1]
    redis_cli("SET", prefix + ":epoch", "m-another")  # as if another history took over
    with pytest.raises(BackendUnavailable):
        await a.publish_once("k2", 60, "", ["u:ann"], "m", "lost?", "e4")
    assert redis_cli("EXISTS", prefix + ":k:k2") == "0"


async def test_publish_once_claims_expire(make_backend: BackendFactory) -> None:
    a = await make_backend()
    assert isinstance(a, RedisBackend)
    assert isinstance(await a.publish_once("short", 0.2, "", ["t:x"], "m", 1, "e1"), Event)

    async def published_again() -> bool:
        again = await a.publish_once("short", 0.2, "", ["t:x"], "m", 2, "e2")
        return isinstance(again, Event)

    await until(published_again, "the claim to expire")


async def test_keyed_publishes_on_redis_never_claim_apart(make_hub: HubFactory) -> None:
    """`Hub.publish_message` uses the one-script publish on Redis, not claim + publish."""
    a = await make_hub()

    async def no_claim(key: str, value: str, ttl: float) -> str | None:
        raise AssertionError("claimed apart from the publish")

    a.backend.claim = no_claim  # type: ignore[method-assign]
    ann = Client(a, "ann")
    await ann.open()
    first = await a.send_to_user("ann", "一次", idempotency_key="k1")
    assert await a.send_to_user("ann", "一次", idempotency_key="k1") == first
    await a.send_to_user("ann", "next")
    await ann.wait_for(2)
    assert ann.data() == ["一次", "next"]
    assert a.broker.stats.published == 2


async def test_epoch_is_shared(make_backend: BackendFactory) -> None:
    a, b = await make_backend(), await make_backend()
    assert a.epoch and a.epoch == b.epoch
    assert await a.ready() and await b.ready()


async def test_publish_reaches_every_instance_in_order(broker_url: str) -> None:
    got: dict[str, list[Any]] = {"a": [], "b": []}
    backends = []
    for name in got:
        backend = create_backend(broker_url, history_size=100, history_ttl=3600)
        await backend.connect(got[name].append)
        backends.append(backend)
    try:
        a, b = backends
        for i in range(20):
            await (a if i % 2 else b).publish("", ["t:x"], "m", i, f"e{i}")
        await until(lambda: len(got["a"]) == len(got["b"]) == 20, "every event on both")
        for events in got.values():
            assert [e.seq_in("t:x") for e in events] == list(range(1, 21))
    finally:
        for backend in backends:
            await backend.close()


# == brokers on two backend instances ==================================================


async def test_cross_instance_delivery(make_hub: HubFactory) -> None:
    a, b = await make_hub(), await make_hub()
    ann = Client(b, "ann", "acme", topics=("news",))
    bob = Client(b, "bob", "acme")
    stranger = Client(b, "ann", "other", topics=("news",))
    for client in (ann, bob, stranger):
        await client.open()
    await a.send_to_user("ann", "to-ann", tenant="acme")
    await a.send_to_topic("news", "news-1", tenant="acme")
    await a.broadcast("hello-all", tenant="acme")
    await a.publish(tenant="acme", users=["ann"], topics=["news"], broadcast=True, data="once")
    assert await marker(ann, a, tenant="acme", users=["ann"]) == [
        "to-ann",
        "news-1",
        "hello-all",
        "once",
    ]
    assert await marker(bob, a, tenant="acme", users=["bob"]) == ["hello-all", "once"]
    assert await marker(stranger, a, tenant="other", users=["ann"]) == []


async def test_resume_on_the_other_instance(make_hub: HubFactory) -> None:
    a, b = await make_hub(), await make_hub()
    first = Client(a, "ann", topics=("news",))
    await first.open()
    await b.send_to_user("ann", "one")
    await b.send_to_topic("news", "two")
    await first.wait_for(2)
    cursor = first.last_id
    first.close()
    await a.send_to_user("ann", "three")
    await a.publish(users=["ann"], topics=["news"], broadcast=True, data="four")
    await b.broadcast("five")
    second = Client(b, "ann", topics=("news",))
    assert await second.open(cursor) is None
    assert second.data() == ["three", "four", "five"]
    # and live from here, exactly once
    assert await marker(second, a, users=["ann"]) == ["three", "four", "five"]


async def test_resume_beyond_the_window_resets(make_hub: HubFactory) -> None:
    a = await make_hub(history_size=2)
    b = await make_hub(history_size=2)
    first = Client(a, "ann")
    await first.open()
    await a.send_to_user("ann", 0)
    await first.wait_for(1)
    cursor = first.last_id
    first.close()
    for i in range(1, 4):
        await a.send_to_user("ann", i)
    second = Client(b, "ann")
    reset = await second.open(cursor)
    assert reset is not None and "no longer kept" in reset


async def test_idempotency_across_instances(make_hub: HubFactory) -> None:
    a, b = await make_hub(), await make_hub()
    ann = Client(a, "ann")
    await ann.open()
    first = await a.send_to_user("ann", "once", idempotency_key="k1")
    again = await b.send_to_user("ann", "once", idempotency_key="k1")
    assert first == again
    assert await marker(ann, b, users=["ann"]) == ["once"]


async def test_disconnect_reaches_every_instance(make_hub: HubFactory) -> None:
    a, b = await make_hub(), await make_hub()
    ann = Client(b, "ann")
    await ann.open()
    await a.disconnect("ann")
    await until(lambda: ann.conn.closed is CloseReason.DISCONNECTED, "the disconnect")


# -- losing the connection -----------------------------------------------------------


async def cut_fanout(hub: Hub) -> None:
    """Stop `hub`'s backend reading the fan-out, as if its connection dropped."""
    backend: Any = hub.backend
    await backend.pause_fanout()


async def restore_fanout(hub: Hub) -> None:
    backend: Any = hub.backend
    await backend.resume_fanout()
    await until(backend.ready, "the backend to be ready again")


async def test_events_missed_while_cut_off_arrive_after_reconnect(make_hub: HubFactory) -> None:
    a, b = await make_hub(), await make_hub()
    ann = Client(a, "ann", topics=("news",))
    bob = Client(a, "bob")
    await ann.open()
    await bob.open()
    await b.send_to_user("ann", "before")
    await ann.wait_for(1)
    await cut_fanout(a)
    assert not await a.backend.ready()
    with pytest.raises(BackendUnavailable):
        await a.send_to_user("ann", "refused")
    await b.send_to_user("ann", "missed-1")
    await b.publish(users=["ann", "bob"], topics=["news"], data="missed-2")
    await b.broadcast("missed-3")
    await restore_fanout(a)
    assert await marker(ann, b, users=["ann"]) == ["before", "missed-1", "missed-2", "missed-3"]
    assert await marker(bob, b, users=["bob"]) == ["missed-2", "missed-3"]
    assert ann.conn.closed is None  # the connection was kept


async def test_cut_off_beyond_the_window_closes_to_reset(make_hub: HubFactory) -> None:
    a = await make_hub(history_size=2)
    b = await make_hub(history_size=2)
    ann, bob = Client(a, "ann"), Client(a, "bob")
    await ann.open()
    await bob.open()
    cursor = ann.conn.cursor()  # what the client holds
    await cut_fanout(a)
    for i in range(3):
        await b.send_to_user("ann", i)  # more than the window: ann cannot catch up
    await b.send_to_user("bob", "fine")
    await restore_fanout(a)
    assert ann.conn.closed is CloseReason.DISCONNECTED
    assert await marker(bob, b, users=["bob"]) == ["fine"]
    again = Client(a, "ann")
    reset = await again.open(cursor)
    assert reset is not None


async def test_data_loss_changes_the_epoch(broker_url: str, make_hub: HubFactory) -> None:
    a, b = await make_hub(), await make_hub()
    ann = Client(a, "ann")
    await ann.open()
    await b.send_to_user("ann", "one")
    await ann.wait_for(1)
    old = a.backend.epoch
    cursor = ann.last_id
    prefix = broker_url.rsplit("prefix=", 1)[1]
    drop_prefix(prefix)  # as if Redis restarted empty (or was flushed)
    with pytest.raises(BackendUnavailable):  # the publish script notices, nothing is written
        await b.send_to_user("ann", "lost?")
    await until(b.backend.ready, "b to find the new history")
    assert b.backend.epoch != old
    await b.send_to_user("ann", "one-again")  # a reads an event of another epoch: re-checks
    await until(lambda: ann.conn.closed is CloseReason.DISCONNECTED, "ann to be told")
    await until(a.backend.ready, "a ready")
    assert a.backend.epoch == b.backend.epoch
    again = Client(b, "ann")
    assert await again.open(cursor) == "history epoch changed (server restarted)"
    await a.send_to_user("ann", "two")
    await again.wait_for(1)
    assert again.data() == ["two"]


async def test_rollback_changes_the_epoch(broker_url: str, make_hub: HubFactory) -> None:
    a = await make_hub()
    ann = Client(a, "ann")
    await ann.open()
    for i in range(3):
        await a.send_to_user("ann", i)
    await ann.wait_for(3)
    old = a.backend.epoch
    prefix = broker_url.rsplit("prefix=", 1)[1]
    # an older snapshot: fewer publishes than this instance has seen, same epoch
    redis_cli("SET", prefix + ":gen", "1")
    redis_cli("HSET", f"{prefix}:n:0:", "u:ann", "1")
    await cut_fanout(a)
    await restore_fanout(a)
    assert a.backend.epoch != old
    assert ann.conn.closed is CloseReason.DISCONNECTED


# -- soak: many clients, random reconnects across instances, every event once ---------


class Roamer:
    """A client that keeps its events and cursor across connections to different hubs."""

    def __init__(self, user: str, topic: str) -> None:
        self.user, self.topic = user, topic
        self.parser = SSEParser()
        self.seen: list[int] = []
        self.cursor: str | None = None
        self.resets = 0
        self.conn: SSEConnection | None = None
        self.hub: Hub | None = None

    async def connect(self, hub: Hub) -> None:
        principal = Principal(self.user, topics=(self.topic,))
        conn = SSEConnection(principal, hub.streams_for(principal, [self.topic]), limit=10_000)
        resumption = await hub.broker.attach(conn, self.cursor)
        if resumption.reset is not None:
            self.resets += 1
        self.cursor = conn.cursor()  # what the `welcome` carries as its id
        hub.broker.release(conn, resumption)
        self.conn, self.hub = conn, hub

    def read(self) -> None:
        if self.conn is None:
            return
        for frame in self.conn.drain():
            for event in self.parser.feed(frame):
                if event.event == "message":
                    self.seen.append(int(event.data))
        if self.parser.last_event_id:
            self.cursor = self.parser.last_event_id

    def disconnect(self) -> None:
        self.read()
        if self.conn is not None and self.hub is not None:
            self.hub.broker.detach(self.conn)
        self.conn = None


async def test_soak_random_reconnects_across_instances(make_hub: HubFactory) -> None:
    import random

    rng = random.Random(5)
    hubs = [await make_hub(history_size=1000), await make_hub(history_size=1000)]
    topics = [f"room{i}" for i in range(5)]
    clients = [Roamer(f"user{i}", topics[i % 5]) for i in range(200)]
    for i, client in enumerate(clients):
        await client.connect(hubs[i % 2])
    expected: dict[str, list[int]] = {c.user: [] for c in clients}
    for n in range(400):
        kind = rng.random()
        users = rng.sample(clients, rng.randint(1, 20)) if kind < 0.5 else []
        topic = rng.choice(topics) if 0.3 < kind < 0.9 else None
        broadcast = kind >= 0.9
        await rng.choice(hubs).publish(
            users=[c.user for c in users],
            topics=[topic] if topic else [],
            broadcast=broadcast,
            data=n,
        )
        chosen = {c.user for c in users}
        for c in clients:
            if broadcast or c.user in chosen or c.topic == topic:
                expected[c.user].append(n)
        for c in rng.sample(clients, 3):  # some clients roam to the other instance
            if c.conn is not None and rng.random() < 0.5:
                c.disconnect()
            else:
                c.disconnect()
                await c.connect(hubs[rng.randrange(2)])
        for c in clients:
            if c.conn is None and rng.random() < 0.2:
                await c.connect(hubs[rng.randrange(2)])
    for c in clients:
        if c.conn is None:
            await c.connect(hubs[rng.randrange(2)])

    def complete() -> bool:
        for c in clients:
            c.read()
        return all(len(c.seen) >= len(expected[c.user]) for c in clients)

    await until(complete, "every client to have every event", within=30)
    for c in clients:
        assert c.resets == 0, c.user
        want = expected[c.user]
        dups = sorted({n for n in c.seen if c.seen.count(n) > 1})
        gone = [n for n in want if n not in c.seen]
        assert c.seen == want, (c.user, c.topic, "duplicates", dups, "missing", gone)


# == Broker.resync with the memory backend (no Redis needed) ==========================


async def test_resync_delivers_what_history_has_beyond_each_position() -> None:
    backend = MemoryBackend(history_size=10)
    hub = Hub(backend=backend)
    await hub.start()
    try:
        ann = Client(hub, "ann", topics=("news",))
        await ann.open()
        ann.conn.pending = []  # stand in for a fan-out that lost events: hold them
        await hub.send_to_user("ann", 1)
        await hub.publish(users=["ann"], topics=["news"], data=2)
        ann.conn.pending = None
        assert ann.data() == []
        await hub.broker.resync()
        assert ann.data() == [1, 2]
        await hub.broker.resync()  # nothing twice
        assert ann.data() == [1, 2]
    finally:
        await hub.stop()


async def test_resync_closes_what_it_cannot_catch_up() -> None:
    backend = MemoryBackend(history_size=1)
    hub = Hub(backend=backend)
    await hub.start()
    try:
        ann, bob, old = Client(hub, "ann"), Client(hub, "bob"), Client(hub, "old")
        for client in (ann, bob, old):
            await client.open()
        ann.conn.pending = []
        for i in range(3):
            await hub.send_to_user("ann", i)
        ann.conn.pending = None
        old.conn.epoch = "m-another"
        await hub.broker.resync()
        assert ann.conn.closed is CloseReason.DISCONNECTED  # history gone
        assert old.conn.closed is CloseReason.DISCONNECTED  # another epoch
        assert bob.conn.closed is None
    finally:
        await hub.stop()


async def test_resync_holds_for_connections_still_opening() -> None:
    hub = Hub(backend=MemoryBackend(history_size=10))
    await hub.start()
    try:
        ann = Client(hub, "ann")
        await ann.open()
        cursor = ann.conn.cursor()
        await hub.send_to_user("ann", 1)
        ann.close()
        again = Client(hub, "ann")
        resumption = await hub.broker.attach(again.conn, cursor)  # held, not released
        await hub.broker.resync()
        assert again.read() == []
        hub.broker.release(again.conn, resumption)
        assert again.data() == [1]  # once, though both the replay and resync found it
    finally:
        await hub.stop()


# == two real `tidings serve` processes ===============================================


@pytest.fixture
def cluster(broker_url: str, start_server: StartServer) -> Callable[..., list[TidingsServer]]:
    """``cluster(n, **env)``: n servers on one Redis prefix, sharing secret and API key."""
    secret = secrets.token_urlsafe(48)
    key = "cluster-" + secrets.token_urlsafe(16)

    def start(n: int = 2, **env: str) -> list[TidingsServer]:
        settings = {
            "TIDINGS_BROKER_URL": broker_url,
            "TIDINGS_JWT_SECRET": secret,
            "TIDINGS_API_KEYS": key,
            **env,
        }
        return [start_server(**settings) for _ in range(n)]

    return start


async def sse_data(stream: SSEClient, count: int) -> list[Any]:
    return [_value(e.data) for e in await stream.take(count, "message")]


async def test_serve_cross_instance_delivery(cluster: Callable[..., list[TidingsServer]]) -> None:
    a, b = cluster(2)
    token = b.token("ann", tenant="acme", topics=["news"])
    async with (
        Api(a.url, a.api_key) as api,
        sse_stream(b.url, token=token, params={"topics": "news"}) as stream,
    ):
        assert stream.status == 200
        await stream.next_event("welcome")
        await api.publish(tenant="acme", users=["ann"], data="user")
        await api.publish(tenant="acme", topics=["news"], data="topic")
        await api.publish(tenant="acme", broadcast=True, data="broadcast")
        await api.publish(tenant="other", users=["ann"], broadcast=True, data="wall")
        await api.publish(tenant="acme", users=["ann"], data="end")
        assert await sse_data(stream, 4) == ["user", "topic", "broadcast", "end"]


async def test_serve_resume_on_the_other_instance(
    cluster: Callable[..., list[TidingsServer]],
) -> None:
    a, b = cluster(2)
    token = a.token("ann")
    async with Api(a.url, a.api_key) as api:
        async with sse_stream(a.url, token=token) as stream:
            await stream.next_event("welcome")
            await api.publish(users=["ann"], data=1)
            assert await sse_data(stream, 1) == [1]
            cursor = stream.last_id
        for i in (2, 3, 4):
            await api.publish(users=["ann"], broadcast=i == 3, data=i)
        async with sse_stream(b.url, token=token, last_event_id=cursor) as stream:
            await stream.next_event("welcome")
            assert await sse_data(stream, 3) == [2, 3, 4]
            await api.publish(users=["ann"], data=5)
            assert await sse_data(stream, 1) == [5]
            assert not [e for e in stream.events if e.event == "reset"]


async def test_serve_kill_9_then_resume_elsewhere(
    cluster: Callable[..., list[TidingsServer]],
) -> None:
    a, b = cluster(2)
    token = a.token("ann", topics=["news"])
    params = {"topics": "news"}
    async with Api(b.url, b.api_key) as api:
        stream = await open_stream(a.url, token=token, params=params)
        try:
            assert stream.status == 200, await stream.json()
            await stream.next_event("welcome")
            for i in range(5):
                await api.publish(users=["ann"] if i % 2 else [], topics=["news"], data=i)
            assert await sse_data(stream, 5) == [0, 1, 2, 3, 4]
            cursor = stream.last_id
            await asyncio.to_thread(a.kill)
            for i in range(5, 10):
                await api.publish(users=["ann"], topics=["news"] if i % 2 else [], data=i)
        finally:
            await stream.close()
        async with sse_stream(b.url, token=token, params=params, last_event_id=cursor) as again:
            await again.next_event("welcome")
            assert await sse_data(again, 5) == [5, 6, 7, 8, 9]
            await api.publish(users=["ann"], data="live")
            assert await sse_data(again, 1) == ["live"]
            assert not [e for e in again.events if e.event == "reset"]


async def readyz(url: str) -> int:
    async with httpx.AsyncClient(timeout=5) as http:
        return (await http.get(url + "/readyz")).status_code


async def publish_status(api: Api, **body: Any) -> int:
    return (await api.post("/api/v1/publish", body)).status_code


async def test_serve_redis_restart_mid_stream(
    cluster: Callable[..., list[TidingsServer]],
) -> None:
    """Redis restarts empty (no persistence): 503 meanwhile, then clients reset and go on."""
    a, b = cluster(2)
    token = a.token("ann")
    async with Api(a.url, a.api_key) as api_a, Api(b.url, b.api_key) as api_b:
        stream = await open_stream(a.url, token=token)
        try:
            await stream.next_event("welcome")
            await api_b.publish(users=["ann"], data="before")
            assert await sse_data(stream, 1) == ["before"]
            cursor = stream.last_id
            with redis_restarts():
                await asyncio.to_thread(stop_redis)
                for server, api in ((a, api_a), (b, api_b)):
                    await until(answers(server, 503), "not ready")
                    assert await publish_status(api, users=["ann"], data="refused") == 503
                await asyncio.to_thread(start_redis)
            for server in (a, b):
                await until(answers(server, 200), "ready")
            # Redis lost everything, so the history is new: the stream is closed,
            # and its reconnect is told to refetch (never a silent gap).
            rest = await stream.wait_end()
            assert all(e.data != '"refused"' for e in rest)
        finally:
            await stream.close()
        async with sse_stream(b.url, token=token, last_event_id=cursor) as again:
            await again.next_event("welcome")
            reset = await again.next_event("reset")
            assert "epoch" in orjson.loads(reset.data)["reason"]
            await api_a.publish(users=["ann"], data="after")
            assert await sse_data(again, 1) == ["after"]


async def test_serve_redis_restart_with_its_data_keeps_streams(
    cluster: Callable[..., list[TidingsServer]],
) -> None:
    """Redis restarts from a snapshot with everything: streams stay open, nothing lost."""
    dump = Path("/var/lib/redis/dump.rdb")
    if not os.access(dump.parent, os.W_OK):
        pytest.skip(f"cannot manage {dump} (not root?)")
    existed = await asyncio.to_thread(dump.exists)
    a, b = cluster(2)
    token = a.token("ann")
    async with (
        Api(a.url, a.api_key) as api_a,
        Api(b.url, b.api_key) as api_b,
        sse_stream(a.url, token=token) as stream,
    ):
        await stream.next_event("welcome")
        await api_b.publish(users=["ann"], data="before")
        assert await sse_data(stream, 1) == ["before"]
        try:
            with redis_restarts():
                assert redis_cli("SAVE") == "OK"
                await asyncio.to_thread(stop_redis)
                assert await publish_status(api_b, users=["ann"], data="refused") == 503
                await asyncio.to_thread(start_redis)
        finally:
            if not existed:
                await asyncio.to_thread(dump.unlink, missing_ok=True)
        for server in (a, b):
            await until(answers(server, 200), "ready")
        await api_b.publish(users=["ann"], data="after")
        await api_a.publish(users=["ann"], data="after-a")
        assert await sse_data(stream, 2) == ["after", "after-a"]
        assert not [e for e in stream.events if e.event == "reset"]


def answers(server: TidingsServer, status: int) -> Callable[[], Awaitable[bool]]:
    """A condition for `until`: the server's /readyz answers `status`."""

    async def check() -> bool:
        try:
            return await readyz(server.url) == status
        except httpx.TransportError:
            return False

    return check
