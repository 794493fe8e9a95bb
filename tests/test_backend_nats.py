"""The NATS JetStream backend against a real NATS server (no mocks).

The backend-level, two-broker and two-`tidings serve` tests are those of
test_backend_redis.py, run here on ``nats://`` through the `broker_url` fixture.
The restart test runs its own `nats-server` (on a free port, with its own store)
so that it restarts a process it started, not the machine's shared one.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

import test_backend_redis as redis_tests
from server import TidingsServer, free_port
from sse_client import Api, SSEClient, open_stream, sse_stream
from test_backend_redis import (  # the generic tests, collected here too
    BackendFactory,
    HubFactory,
    answers,
    cluster,
    make_backend,
    make_hub,
    publish_status,
    reachable,
    sse_data,
    test_claims,
    test_cross_instance_delivery,
    test_cut_off_beyond_the_window_closes_to_reset,
    test_disconnect_reaches_every_instance,
    test_epoch_is_shared,
    test_events_missed_while_cut_off_arrive_after_reconnect,
    test_expired_history_is_none,
    test_history_is_exact,
    test_idempotency_across_instances,
    test_no_history_kept,
    test_positions_are_contiguous_per_stream,
    test_publish_reaches_every_instance_in_order,
    test_resume_beyond_the_window_resets,
    test_resume_on_the_other_instance,
    test_serve_cross_instance_delivery,
    test_serve_kill_9_then_resume_elsewhere,
    test_serve_resume_on_the_other_instance,
    test_trimmed_history_is_none,
    until,
)
from tidings.backends.nats import NatsBackend
from tidings.event import Event

pytestmark = pytest.mark.integration

NATS_HOST, NATS_PORT = "127.0.0.1", 4222
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"

__all__ = [  # re-exported fixtures and tests (pytest collects them from this module)
    "cluster",
    "make_backend",
    "make_hub",
    "test_claims",
    "test_cross_instance_delivery",
    "test_cut_off_beyond_the_window_closes_to_reset",
    "test_disconnect_reaches_every_instance",
    "test_epoch_is_shared",
    "test_events_missed_while_cut_off_arrive_after_reconnect",
    "test_expired_history_is_none",
    "test_history_is_exact",
    "test_idempotency_across_instances",
    "test_no_history_kept",
    "test_positions_are_contiguous_per_stream",
    "test_publish_reaches_every_instance_in_order",
    "test_resume_beyond_the_window_resets",
    "test_resume_on_the_other_instance",
    "test_serve_cross_instance_delivery",
    "test_serve_kill_9_then_resume_elsewhere",
    "test_serve_resume_on_the_other_instance",
    "test_trimmed_history_is_none",
]


async def drop_names(url: str) -> None:
    """Delete the stream and buckets a backend on `url` made."""
    names = NatsBackend(url)
    nc = await nats.connect(names.url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        for stream in names.all_streams():
            with contextlib.suppress(Exception):
                await js.delete_stream(stream)
    finally:
        await nc.close()


@pytest.fixture
async def broker_url() -> AsyncIterator[str]:
    """A NATS URL with a fresh name prefix; its stream and buckets are deleted afterwards."""
    if not reachable(NATS_HOST, NATS_PORT):
        pytest.skip(f"NATS is not reachable on {NATS_HOST}:{NATS_PORT}")
    url = f"nats://{NATS_HOST}:{NATS_PORT}?prefix=tt{secrets.token_hex(5)}"
    yield url
    await drop_names(url)


async def test_subject_tokens_are_safe(make_backend: BackendFactory) -> None:
    b = await make_backend()
    odd = ["", "a.b", "*", ">", "ü ñ", "x" * 128]
    for tenant in odd:
        for stream in ("u:a.b", "t:x/y@z", "b"):
            assert (await b.publish(tenant, [stream], "m", tenant, "e")).streams == ((stream, 1),)
    for tenant in odd:
        events = await b.history(tenant, "u:a.b", 0)
        assert [e.data for e in events or []] == [tenant]


async def test_concurrent_publishers_keep_positions_contiguous(
    make_backend: BackendFactory,
) -> None:
    a, b = await make_backend(), await make_backend()
    await asyncio.gather(
        *(
            (a if i % 2 else b).publish("", ["t:hot", f"u:{i % 3}"], "m", i, f"e{i}")
            for i in range(40)
        )
    )
    assert (await a.tops("", ["t:hot"]))["t:hot"] == 40
    events = await b.history("", "t:hot", 0)
    assert events is not None
    assert [e.seq_in("t:hot") for e in events] == list(range(1, 41))
    assert sorted(e.data for e in events) == list(range(40))


async def test_concurrent_publishers_fan_out_once_in_position_order(broker_url: str) -> None:
    """Three instances publish at once, events on one to three streams each: every
    instance's fan-out gets every event once, each stream's positions 1, 2, 3 … in
    order, and history holds the same."""
    import random

    rng = random.Random(7)
    got: list[list[Event]] = [[], [], []]
    backends = []
    try:
        for sink in got:
            backend = NatsBackend(broker_url, history_size=1000, history_ttl=3600)
            await backend.connect(sink.append)
            backends.append(backend)
        pool = ["t:hot", "t:cold", "b", "u:0", "u:1", "u:2"]
        plans = [rng.sample(pool, rng.randint(1, 3)) for _ in range(150)]
        await asyncio.gather(
            *(
                backends[i % 3].publish("acme", streams, "m", i, f"e{i}")
                for i, streams in enumerate(plans)
            )
        )
        await until(lambda: all(len(g) >= len(plans) for g in got), "every event everywhere")
        counts = {s: sum(s in p for p in plans) for s in pool}
        for received in got:
            assert sorted(e.data for e in received) == list(range(len(plans)))
            for stream in pool:
                positions = [e.seq_in(stream) for e in received if e.seq_in(stream)]
                assert positions == list(range(1, counts[stream] + 1)), stream
        for stream in pool:
            history = await backends[0].history("acme", stream, 0)
            assert history is not None
            assert [e.seq_in(stream) for e in history] == list(range(1, counts[stream] + 1))
            assert [e.data for e in history] == [e.data for e in got[1] if e.seq_in(stream)]
    finally:
        for backend in backends:
            await backend.close()


async def test_history_written_by_whoever_finds_it_missing(make_backend: BackendFactory) -> None:
    """A publisher that stops right after its commit (before writing history copies):
    its event was delivered, and another instance writes the copies when it needs them."""
    a, b = await make_backend(), await make_backend()
    await a.publish("", ["u:ann", "t:x"], "m", 1, "e1")
    stuck: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def frozen(*args: object) -> None:
        await stuck  # as a process that froze (or died) between its two steps

    writer: Any = a._writer  # type: ignore[attr-defined]
    writer._materialize = frozen
    e2 = await a.publish("", ["u:ann", "t:x"], "m", 2, "e2")
    assert e2.streams == (("u:ann", 2), ("t:x", 2))
    assert await b.tops("", ["u:ann", "t:x"]) == {"u:ann": 2, "t:x": 2}
    for stream in ("u:ann", "t:x"):
        assert [e.data for e in await b.history("", stream, 0) or []] == [1, 2]
    e3 = await b.publish("", ["t:x"], "m", 3, "e3")
    assert e3.streams == (("t:x", 3),)
    assert [e.seq_in("t:x") for e in await b.history("", "t:x", 0) or []] == [1, 2, 3]
    stuck.cancel()


async def test_fan_out_that_missed_commits_catches_up_from_history(
    make_hub: HubFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Commits gone before an instance read them (the commits stream keeps the last
    1000 per tenant): it notices the broken chain and catches up from history."""
    a, b = await make_hub(), await make_hub()
    ann = redis_tests.Client(b, "ann")
    await ann.open()
    await a.send_to_user("ann", "before")
    await ann.wait_for(1)
    await redis_tests.cut_fanout(b)
    for i in range(3):
        await a.send_to_user("ann", i)
    store: Any = a.backend._store  # type: ignore[attr-defined]
    last = await store.last_commit("")
    assert last is not None
    await store.js.delete_msg(store.names.commits, last[1])  # as trimming would
    with caplog.at_level("WARNING", logger="tidings.backends.nats"):
        await redis_tests.restore_fanout(b)
        assert await redis_tests.marker(ann, a, users=["ann"]) == ["before", 0, 1, 2]
    assert "fan-out missed commits" in caplog.text
    assert ann.conn.closed is None


async def test_soak_random_reconnects_across_instances(make_hub: HubFactory) -> None:
    await redis_tests.test_soak_random_reconnects_across_instances(make_hub)


# -- the same soak through two real `tidings serve` processes -----------------------


class SSERoamer:
    """An SSE client that roams between servers, resuming with its last id each time."""

    def __init__(self, user: str, topic: str) -> None:
        self.user, self.topic = user, topic
        self.seen: list[int] = []
        self.resets = 0
        self.last_id: str | None = None
        self.stream: SSEClient | None = None

    async def connect(self, server: TidingsServer, token: str) -> None:
        stream = await open_stream(
            server.url, token=token, params={"topics": self.topic}, last_event_id=self.last_id
        )
        assert stream.status == 200, (stream.status, await stream.json())
        await stream.next_event("welcome")  # its id is the cursor, as EventSource keeps it
        self.stream = stream

    async def read_until(self, total: int) -> None:
        """Read until `total` events were seen in all (each already published to us)."""
        stream = self.stream
        assert stream is not None
        self._absorb(stream)
        for _ in range(total - len(self.seen)):
            await stream.next_event("message")
        self._absorb(stream)

    async def disconnect(self) -> None:
        stream, self.stream = self.stream, None
        if stream is None:
            return
        self._absorb(stream)
        await stream.close()

    def _absorb(self, stream: SSEClient) -> None:
        for event in stream.events:  # everything parsed, so everything `last_id` covers
            if event.event == "message":
                self.seen.append(int(event.data))
            elif event.event == "reset":
                self.resets += 1
        if stream.last_id is not None:  # None: nothing read, the old cursor still holds
            self.last_id = stream.last_id
        stream.events.clear()
        stream.received()  # and not returned again by `next_event`


async def test_serve_soak_roaming_clients(cluster: Callable[..., list[TidingsServer]]) -> None:
    """Hundreds of SSE clients roam between two `tidings serve` on NATS while events on
    users, topics and the broadcast are published through both: every client gets
    every event of its streams once, in publish order, and never a reset."""
    import random

    rng = random.Random(11)
    servers = cluster(2)
    topics = [f"room{i}" for i in range(4)]
    clients = [SSERoamer(f"user{i}", topics[i % 4]) for i in range(200)]
    tokens = {c.user: servers[0].token(c.user, topics=[c.topic]) for c in clients}
    expected: dict[str, list[int]] = {c.user: [] for c in clients}
    apis = [Api(s.url, s.api_key) for s in servers]
    try:
        for api in apis:
            await api.__aenter__()
        for i, c in enumerate(clients):
            await c.connect(servers[i % 2], tokens[c.user])
        for n in range(150):
            kind = rng.random()
            users = rng.sample(clients, rng.randint(1, 10)) if kind < 0.5 else []
            topic = rng.choice(topics) if 0.3 < kind < 0.9 else None
            broadcast = kind >= 0.9
            await rng.choice(apis).publish(
                users=[c.user for c in users],
                topics=[topic] if topic else [],
                broadcast=broadcast,
                data=n,
            )
            chosen = {c.user for c in users}
            for c in clients:
                if broadcast or c.user in chosen or c.topic == topic:
                    expected[c.user].append(n)
            for c in rng.sample(clients, 4):  # read part of what is due, leave, come back
                if c.stream is not None:
                    await c.read_until(rng.randint(len(c.seen), len(expected[c.user])))
                await c.disconnect()
                if rng.random() < 0.8:
                    await c.connect(rng.choice(servers), tokens[c.user])
        for c in clients:
            if c.stream is None:
                await c.connect(rng.choice(servers), tokens[c.user])
            await c.read_until(len(expected[c.user]))
            await c.disconnect()
    finally:
        for c in clients:
            if c.stream is not None:
                await c.stream.close()
        for api in apis:
            await api.__aexit__(None, None, None)
    for c in clients:
        assert c.resets == 0, c.user
        assert c.seen == expected[c.user], (c.user, c.topic)


# -- a NATS restart mid-stream, on a server of our own ------------------------------


class OwnNats:
    """A `nats-server -js` this test starts, stops and restarts (same port and store)."""

    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.store = store
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(15)
            self.proc = None


async def wait_listening(port: int) -> None:
    await until(lambda: reachable("127.0.0.1", port), "nats-server to listen")


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[OwnNats]:
    if not Path(NATS_SERVER).exists():
        pytest.skip("nats-server is not installed")
    server = OwnNats(tmp_path / "nats-store")
    server.start()
    yield server
    server.stop()


async def test_serve_nats_restart_mid_stream(
    own_nats: OwnNats, cluster: Callable[..., list[TidingsServer]]
) -> None:
    """NATS stops (publishes get 503, /readyz says so) and comes back with its store:
    the streams stay open and go on with nothing lost."""
    await wait_listening(own_nats.port)
    url = own_nats.url + "?prefix=restart"
    a, b = cluster(2, TIDINGS_BROKER_URL=url)
    token = a.token("ann")
    async with Api(a.url, a.api_key) as api_a, Api(b.url, b.api_key) as api_b:
        stream = await open_stream(a.url, token=token)
        try:
            await stream.next_event("welcome")
            await api_b.publish(users=["ann"], data="before")
            assert await sse_data(stream, 1) == ["before"]
            try:
                await asyncio.to_thread(own_nats.stop)
                for server, api in ((a, api_a), (b, api_b)):
                    await until(answers(server, 503), "not ready")
                    assert await publish_status(api, users=["ann"], data="refused") == 503
            finally:
                if own_nats.proc is None:
                    own_nats.start()
            await wait_listening(own_nats.port)
            for server in (a, b):
                await until(answers(server, 200), "ready", within=30)
            await api_b.publish(users=["ann"], data="after")
            await api_a.publish(users=["ann"], data="after-a")
            got: list[Any] = await sse_data(stream, 2)
            assert got == ["after", "after-a"]
            assert not [e for e in stream.events if e.event == "reset"]
        finally:
            await stream.close()


async def test_serve_nats_restart_without_its_data_resets(
    own_nats: OwnNats, cluster: Callable[..., list[TidingsServer]]
) -> None:
    """NATS comes back empty (its store lost): a new epoch; open streams are closed
    and their reconnect is told to refetch (`reset`), never a silent gap."""
    await wait_listening(own_nats.port)
    a, b = cluster(2, TIDINGS_BROKER_URL=own_nats.url + "?prefix=lost")
    token = a.token("ann")
    async with Api(a.url, a.api_key) as api_a, Api(b.url, b.api_key) as api_b:
        stream = await open_stream(a.url, token=token)
        try:
            await stream.next_event("welcome")
            await api_b.publish(users=["ann"], data="before")
            assert await sse_data(stream, 1) == ["before"]
            cursor = stream.last_id
            try:
                await asyncio.to_thread(own_nats.stop)
                await until(answers(a, 503), "not ready")
                await asyncio.to_thread(shutil.rmtree, own_nats.store)
            finally:
                if own_nats.proc is None:
                    own_nats.start()
            await wait_listening(own_nats.port)
            for server in (a, b):
                await until(answers(server, 200), "ready", within=30)
            rest = await stream.wait_end(within=30)
            assert not [e for e in rest if e.event == "message"]
        finally:
            await stream.close()
        async with sse_stream(b.url, token=token, last_event_id=cursor) as again:
            await again.next_event("welcome")
            reset = await again.next_event("reset")
            assert "epoch" in orjson.loads(reset.data)["reason"]
            await api_a.publish(users=["ann"], data="after")
            assert await sse_data(again, 1) == ["after"]
