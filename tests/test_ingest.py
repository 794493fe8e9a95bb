"""Ingest from an event bus (TIDINGS_INGEST_URL) against real NATS and Redis, no mocks.

Real `tidings serve` processes read a NATS subject (JetStream, or core with
``?mode=core``) or a Redis stream; the test publishes on the bus as a business
service would and watches what reaches SSE subscribers, the inbox and /metrics.
Each test uses its own subjects, JetStream stream, Redis stream and key prefix,
and deletes them at the end — after its servers stopped: bus fixtures come
before `start_server` in the arguments (set up first, torn down last), or a
running ingest would create them again. Synchronisation is on events (an SSE event, a
metric reaching a value); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
import redis.asyncio as aioredis
from nats.js.errors import NotFoundError

from server import StartServer, TidingsServer, free_port
from sse_client import WAIT, Api, SSEClient, expect_marker, sse_stream, until
from tidings.config import Settings
from tidings.errors import ConfigError
from tidings.hub import Hub, parse_message
from tidings.ingest import BusKeys, Ingest, create_source

pytestmark = pytest.mark.integration

NATS_URL = "nats://127.0.0.1:4222"
REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 12
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
SLOW = 30.0  # bound on a wait that spans a reconnect with backoff


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


async def metric(where: TidingsServer | str, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when absent) of a server, or at a base URL."""
    base = where if isinstance(where, str) else where.url
    async with httpx.AsyncClient(timeout=WAIT) as http:
        text = (await http.get(base + "/metrics")).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name + (f"{{{want}}}" if want else "")) + r" ([0-9.e+-]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found[1]) if found else 0.0


async def ingested(server: TidingsServer, outcome: str = "published") -> float:
    return await metric(server, "tidings_ingest_messages_total", outcome=outcome)


async def counted(server: TidingsServer, value: float, outcome: str = "published") -> None:
    """Until the outcome's count is `value`: a message's count moves just after its publish,
    so it may trail the event a subscriber already has."""

    async def there() -> bool:
        return await ingested(server, outcome) == value

    await until(there, f"tidings_ingest_messages_total{{outcome={outcome!r}}} == {value}")


async def connected(server: TidingsServer) -> None:
    async def up() -> bool:
        return await metric(server, "tidings_ingest_connected") == 1.0

    await until(up, f"ingest to connect:\n{server.log()}", within=SLOW)


# -- the buses ---------------------------------------------------------------------------


class Bus:
    """Where a business service publishes; `url` is the TIDINGS_INGEST_URL that reads it."""

    async def send(self, body: bytes | dict[str, Any], **kw: Any) -> None:
        raise NotImplementedError

    async def drained(self) -> bool:
        """Every message was acknowledged."""
        raise NotImplementedError


@dataclass
class NatsBus(Bus):
    nc: Any
    subject: str
    stream: str
    core: bool = False

    @property
    def url(self) -> str:
        mode = "mode=core" if self.core else f"stream={self.stream}"
        return f"{NATS_URL}/{self.subject}.>?{mode}"

    async def send(self, body: bytes | dict[str, Any], **kw: Any) -> None:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        subject = f"{self.subject}.{kw.pop('suffix', 'events')}"
        plain = kw.pop("plain", False)  # a core publish: JetStream stores it too
        if self.core or plain:
            await self.nc.publish(subject, data, **kw)
            await self.nc.flush()
        else:  # stored once the PubAck is back
            await self.nc.jetstream().publish(subject, data, stream=self.stream, **kw)

    async def drained(self) -> bool:
        if self.core:
            return True
        info = await self.nc.jetstream().consumer_info(self.stream, "tidings")
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)


@dataclass
class RedisBus(Bus):
    r: aioredis.Redis
    stream: str
    claim_idle: str = "60s"

    @property
    def url(self) -> str:
        return f"{REDIS_URL}?stream={self.stream}&claim_idle={self.claim_idle}"

    async def send(self, body: bytes | dict[str, Any], **kw: Any) -> None:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        await self.r.xadd(self.stream, kw.get("fields") or {"body": data})

    async def drained(self) -> bool:
        pending = await self.r.xpending(self.stream, "tidings")
        lag = (await self.r.xinfo_groups(self.stream))[0].get("lag")
        return bool(pending["pending"] == 0 and lag == 0)


@pytest.fixture
async def nats_bus() -> AsyncIterator[NatsBus]:
    if not reachable(4222):
        pytest.skip("NATS is not reachable on 127.0.0.1:4222")
    nc = await nats.connect(NATS_URL)
    tag = secrets.token_hex(5)
    bus = NatsBus(nc, f"tt{tag}", f"TT_INGEST_{tag.upper()}")
    yield bus
    with contextlib.suppress(NotFoundError):
        await nc.jetstream().delete_stream(bus.stream)
    await nc.close()


@pytest.fixture
async def nats_core_bus(nats_bus: NatsBus) -> NatsBus:
    nats_bus.core = True
    return nats_bus


@pytest.fixture
async def redis_bus() -> AsyncIterator[RedisBus]:
    if not reachable(REDIS_PORT):
        pytest.skip(f"Redis is not reachable on {REDIS_HOST}:{REDIS_PORT}")
    r = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    bus = RedisBus(r, "tt-ingest-" + secrets.token_hex(5))
    yield bus
    await r.delete(bus.stream)
    await r.aclose()


@pytest.fixture(params=["nats", "nats-core", "redis"])
def bus(request: pytest.FixtureRequest) -> Bus:
    name = {"nats": "nats_bus", "nats-core": "nats_core_bus", "redis": "redis_bus"}
    found: Bus = request.getfixturevalue(name[request.param])
    return found


@pytest.fixture
def shared_broker() -> Iterator[str]:
    """A Redis broker URL (fresh key prefix) for several instances."""
    if not reachable(REDIS_PORT):
        pytest.skip(f"Redis is not reachable on {REDIS_HOST}:{REDIS_PORT}")
    prefix = "tt" + secrets.token_hex(5)
    yield f"{REDIS_URL}?prefix={prefix}"
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    keys = list(client.scan_iter(match=prefix + ":*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


async def data_of(stream: SSEClient, count: int, within: float = WAIT) -> list[Any]:
    """The data of the next `count` events (a string payload comes as it is, API.md §4)."""
    found = []
    for _ in range(count):
        data = (await stream.next_event(within=within)).data
        try:
            found.append(orjson.loads(data))
        except orjson.JSONDecodeError:
            found.append(data)
    return found


# -- delivery ----------------------------------------------------------------------------


async def test_bus_message_reaches_sse_subscriber(bus: Bus, start_server: StartServer) -> None:
    """A message on the bus, in the publish API's shape, reaches the user, Chinese intact;
    a batch too, and tenants stay walls."""
    server = start_server(TIDINGS_INGEST_URL=bus.url)
    await connected(server)
    token = server.token("alice", topics=["approval:*"])
    async with (
        Api(server.url, server.api_key) as api,
        sse_stream(server.url, token=token, params={"topics": "approval:pending"}) as stream,
    ):
        await stream.next_event("welcome")
        wages = {"title": "工资已发放", "amount": 8650}
        await bus.send({"users": ["alice"], "event": "wages_paid", "data": wages})
        event = await stream.next_event()
        assert (event.event, orjson.loads(event.data)) == ("wages_paid", wages)
        assert event.id

        await bus.send({"tenant": "acme", "users": ["alice"], "data": "另一个租户"})
        batch = {
            "messages": [
                {"topics": ["approval:pending"], "data": {"记录": 42}},
                {"broadcast": True, "data": "系统维护 22:00"},
            ]
        }
        await bus.send(batch, **({"plain": True} if isinstance(bus, NatsBus) else {}))
        assert await data_of(stream, 2) == [{"记录": 42}, "系统维护 22:00"]
        await expect_marker(stream, api, users=["alice"])  # acme's message never came
    await counted(server, 3)


@pytest.mark.parametrize("bus", ["nats", "nats-core"], indirect=True)
async def test_a_retried_message_is_published_once(bus: Bus, start_server: StartServer) -> None:
    """The same Nats-Msg-Id twice (a publisher's retry), or the same `idempotency_key`,
    is delivered once. (On JetStream its own duplicate window catches the first case
    too; core NATS shows that tidings does.)"""
    assert isinstance(bus, NatsBus)
    server = start_server(TIDINGS_INGEST_URL=bus.url)
    await connected(server)
    async with (
        Api(server.url, server.api_key) as api,
        sse_stream(server.url, token=server.token("bob")) as stream,
    ):
        await stream.next_event("welcome")
        for _ in range(2):
            await bus.send({"users": ["bob"], "data": "一次"}, headers={"Nats-Msg-Id": "order-7"})
        keyed = {"users": ["bob"], "data": "也一次", "idempotency_key": "k1"}
        await bus.send(keyed)
        await bus.send(keyed)
        await bus.send({"users": ["bob"], "data": "last"})
        assert await data_of(stream, 3) == ["一次", "也一次", "last"]
        await expect_marker(stream, api, users=["bob"])


async def test_the_same_bus_position_publishes_once() -> None:
    """A redelivery (same transport key: the message's position on the bus) publishes
    nothing twice; a batch retried after a partial failure publishes only the rest."""
    hub = Hub(Settings())
    ingest = Ingest(hub, create_source(f"{REDIS_URL}?stream=unused"), registry=None)
    async with hub:
        body = orjson.dumps({"users": ["ivy"], "data": 1})
        for _ in range(2):
            assert await ingest.handle(body, "bus:redis:s:1-0")
        assert hub.stats()["messages_published"] == 1
        assert await ingest.handle(body, "bus:redis:s:2-0")
        assert hub.stats()["messages_published"] == 2
        items = [{"users": ["ivy"], "data": i} for i in range(3)]
        first = {**items[0], "idempotency_key": ingest.keys.key("bus:b") + "/0"}
        await hub.publish_message(parse_message(first))
        assert await ingest.handle(orjson.dumps({"messages": items}), "bus:b")
        assert hub.stats()["messages_published"] == 5  # 2 + the first + the 2 not yet out


def test_derived_keys_need_the_servers_secret() -> None:
    """A key derived from an origin shows nothing of it and changes with the secret;
    instances sharing TIDINGS_JWT_SECRET (else TIDINGS_API_KEYS) derive the same."""
    one, two = (BusKeys(secrets.token_bytes(32)) for _ in range(2))
    key = one.key("id:order-7")
    assert key.startswith("$bus:") and "order-7" not in key and len(key) <= 200
    assert key == one.key("id:order-7") != two.key("id:order-7")
    jwt = Settings(jwt_secret="s" * 32, api_keys=["k"])
    assert BusKeys.from_settings(jwt).key("o") == BusKeys.from_settings(jwt).key("o")
    assert BusKeys.from_settings(jwt).key("o") != BusKeys.from_settings(Settings()).key("o")
    keys = Settings(api_keys=["a", "b"])
    assert BusKeys.from_settings(keys).key("o") == BusKeys.from_settings(keys).key("o")


@pytest.mark.parametrize("bus", ["nats", "redis"], indirect=True)
async def test_an_api_publisher_cannot_claim_a_bus_messages_key_first(
    bus: Bus, start_server: StartServer
) -> None:
    """A user who may publish in the tenant claims, through the API, the keys a bus
    message would get from its Nats-Msg-Id or its position if they were used as they
    are: the bus messages are still delivered (their keys are HMACs under the secret)."""
    server = start_server(TIDINGS_INGEST_URL=bus.url)
    await connected(server)
    # The keys of the next two messages, as one could guess them from the bus.
    if isinstance(bus, NatsBus):
        info = await bus.nc.jetstream().stream_info(bus.stream)
        created = int(info.created.timestamp() * 1e6)
        guessed = ["order-9", f"$bus:nats:{bus.stream}:{created}:2"]
    else:
        assert isinstance(bus, RedisBus)
        guessed = [f"$bus:redis:{bus.stream}:7-0", f"$bus:redis:{bus.stream}:8-0"]
    mallory = server.token("mallory", publish=True)
    async with (
        Api(server.url, server.api_key) as api,
        sse_stream(server.url, token=server.token("gus")) as stream,
    ):
        await stream.next_event("welcome")
        await api.publish(token=mallory, users=["mallory"], idempotency_key=guessed[0])
        decoy = {"recipients": ["gus"], "type": "t", "title": "decoy"}
        response = await api.post(
            "/api/v1/notifications", {**decoy, "idempotency_key": guessed[1]}, token=mallory
        )
        assert response.status_code == 201, response.text
        assert (await data_of(stream, 1))[0]["title"] == "decoy"

        message = {"users": ["gus"], "data": "工资已发放"}
        notification = {"recipients": ["gus"], "type": "t", "title": "real"}
        if isinstance(bus, NatsBus):
            await bus.send(message, headers={"Nats-Msg-Id": "order-9"})
            await bus.send(notification)
        else:
            await bus.r.xadd(bus.stream, {"body": orjson.dumps(message)}, id="7-0")
            await bus.r.xadd(bus.stream, {"body": orjson.dumps(notification)}, id="8-0")
        message_data, pushed = await data_of(stream, 2)
        assert (message_data, pushed["title"]) == ("工资已发放", "real")
        inbox = (await api.get("/api/v1/notifications", token=server.token("gus"))).json()
        assert sorted(n["title"] for n in inbox["items"]) == ["decoy", "real"]
    await counted(server, 2)


# -- malformed messages ------------------------------------------------------------------


async def test_malformed_messages_are_counted_and_ingest_goes_on(
    bus: Bus, start_server: StartServer
) -> None:
    server = start_server(TIDINGS_INGEST_URL=bus.url, TIDINGS_MAX_PAYLOAD="2000")
    await connected(server)
    async with sse_stream(server.url, token=server.token("carol")) as stream:
        await stream.next_event("welcome")
        malformed: list[bytes | dict[str, Any]] = [b"{not json", "半个".encode()[:4]]
        invalid: list[bytes | dict[str, Any]] = [
            b"[1, 2]",
            {"data": "no target"},
            {"topics": ["$reserved"], "data": 1},
            {"users": ["carol"], "event": "welcome"},
            {"users": ["carol"], "broadcast": "yes"},
            {"messages": []},
            {"messages": [{"users": ["carol"]}, {"data": "no target"}]},
            {"recipients": ["carol"], "type": "x"},  # no title
            {"recipients": ["carol"], "users": ["carol"], "type": "x", "title": "t"},
        ]
        for body in [*malformed, *invalid, b'{"users": ["carol"], "data": "' + b"x" * 2000]:
            await bus.send(body)
        if isinstance(bus, RedisBus):
            await bus.send(b"", fields={"payload": b"{}"})  # no `body` field
        await bus.send({"users": ["carol"], "data": "still here"})
        assert await data_of(stream, 1) == ["still here"]
    expected = len(malformed) + isinstance(bus, RedisBus)
    assert await ingested(server, "malformed") == expected
    assert await ingested(server, "invalid") == len(invalid)
    assert await ingested(server, "too_large") == 1
    await counted(server, 1)
    assert "rejected a message (invalid" in server.log()


async def test_ingest_confined_to_a_tenant(redis_bus: RedisBus, start_server: StartServer) -> None:
    """TIDINGS_INGEST_TENANT: messages land in that tenant; naming another is forbidden."""
    server = start_server(TIDINGS_INGEST_URL=redis_bus.url, TIDINGS_INGEST_TENANT="acme")
    await connected(server)
    async with sse_stream(server.url, token=server.token("dan", tenant="acme")) as stream:
        await stream.next_event("welcome")
        await redis_bus.send({"tenant": "other", "users": ["dan"], "data": "no"})
        await redis_bus.send({"recipients": ["dan"], "tenant": "other", "type": "t", "title": "no"})
        await redis_bus.send({"users": ["dan"], "data": "acme by default"})
        assert await data_of(stream, 1) == ["acme by default"]
    assert await ingested(server, "forbidden") == 2


# -- the inbox ---------------------------------------------------------------------------


async def test_notification_via_ingest_lands_in_the_inbox(
    bus: Bus, start_server: StartServer
) -> None:
    server = start_server(TIDINGS_INGEST_URL=bus.url)
    await connected(server)
    token = server.token("erin")
    async with sse_stream(server.url, token=token) as stream:
        await stream.next_event("welcome")
        await bus.send(
            {
                "recipients": ["erin"],
                "type": "payroll_received",
                "title": "工资已发放",
                "content": "本月工资 8650 元",
                "priority": "high",
                "sender": {"id": "hr", "username": "人事部", "avatar": None},
                "data": {"amount": 8650},
            }
        )
        pushed = orjson.loads((await stream.next_event()).data)
    assert pushed["title"] == "工资已发放"
    assert pushed["sender"]["username"] == "人事部"
    assert pushed["unread_count"] == 1
    async with Api(server.url, server.api_key) as api:
        inbox = (await api.get("/api/v1/notifications", token=token)).json()
    assert [n["id"] for n in inbox["items"]] == [pushed["id"]]
    assert inbox["items"][0]["content"] == "本月工资 8650 元"
    assert inbox["unread_count"] == 1


# -- several instances -------------------------------------------------------------------


async def test_two_instances_deliver_each_message_once(
    bus: Bus, shared_broker: str, start_server: StartServer
) -> None:
    """Two instances on one ingest URL share the messages: each is published once."""
    env = {
        "TIDINGS_INGEST_URL": bus.url,
        "TIDINGS_BROKER_URL": shared_broker,
        "TIDINGS_JWT_SECRET": secrets.token_urlsafe(48),
        "TIDINGS_API_KEYS": "cluster-" + secrets.token_urlsafe(16),
    }
    a, b = start_server(**env), start_server(**env)
    await connected(a)
    await connected(b)
    count = 60
    async with (
        Api(b.url, b.api_key) as api,
        sse_stream(a.url, token=a.token("fay")) as stream,
    ):
        await stream.next_event("welcome")
        for i in range(count):
            await bus.send({"users": ["fay"], "data": i})
        seen: list[int] = []
        for _ in range(count):
            [value] = await data_of(stream, 1)
            assert value not in seen, f"{value} twice"
            seen.append(value)
        assert sorted(seen) == list(range(count))

        async def all_done() -> bool:
            done = await ingested(a) + await ingested(b)
            return done >= count and await bus.drained()

        await until(all_done, "both instances to finish")
        await expect_marker(stream, api, users=["fay"])  # nothing published twice before it
        assert await ingested(a) + await ingested(b) == count


def two_free_ports() -> int:
    """p such that p and p + 1 are free: worker i serves /metrics on TIDINGS_METRICS_PORT + i."""
    for _ in range(50):
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port + 1))
            return port
    raise AssertionError("no two adjacent free ports")


async def test_two_workers_deliver_each_message_once(
    bus: Bus, shared_broker: str, start_server: StartServer
) -> None:
    """`tidings serve --workers 2`: both workers consume the bus as one group (consumer
    group, durable consumer, queue group), so each message is published once."""
    metrics = two_free_ports()
    server = start_server(
        TIDINGS_INGEST_URL=bus.url,
        TIDINGS_BROKER_URL=shared_broker,
        TIDINGS_WORKERS="2",
        TIDINGS_METRICS_PORT=str(metrics),
    )
    workers = [f"http://127.0.0.1:{port}" for port in (metrics, metrics + 1)]

    async def both_connected() -> bool:
        try:
            up = [await metric(w, "tidings_ingest_connected") for w in workers]
        except httpx.TransportError:  # a worker's /metrics listener is not up yet
            return False
        return up == [1.0, 1.0]

    await until(both_connected, f"both workers' ingest to connect:\n{server.log()}", within=SLOW)

    async def published() -> float:
        counts = [
            await metric(w, "tidings_ingest_messages_total", outcome="published") for w in workers
        ]
        return sum(counts)

    count = 60
    async with (
        Api(server.url, server.api_key) as api,
        sse_stream(server.url, token=server.token("hal")) as stream,
    ):
        await stream.next_event("welcome")
        for i in range(count):
            await bus.send({"users": ["hal"], "data": i})
        seen: list[int] = []
        for _ in range(count):
            [value] = await data_of(stream, 1)
            assert value not in seen, f"{value} twice"
            seen.append(value)
        assert sorted(seen) == list(range(count))

        async def all_done() -> bool:
            return await published() >= count and await bus.drained()

        await until(all_done, "both workers to finish")
        await expect_marker(stream, api, users=["hal"])  # nothing published twice before it
        assert await published() == count


# -- failures ----------------------------------------------------------------------------


class OwnRedis:
    """A redis-server this test starts, stops and restarts with its data (a broker to break)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0?prefix=tt"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        self.proc = subprocess.Popen(
            ["redis-server", *args, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop_with_its_data(self) -> None:
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "shutdown", "save"], capture_output=True, timeout=10
        )
        if self.proc is not None:
            self.proc.wait(15)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(15)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "broker-redis")
    server.start()
    yield server
    server.kill()


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
        args = ["-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)]
        self.proc = subprocess.Popen(
            [NATS_SERVER, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def stop_with_its_data(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(15)
            self.proc = None

    kill = stop_with_its_data


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[OwnNats]:
    if not Path(NATS_SERVER).exists():
        pytest.skip("nats-server is not installed")
    server = OwnNats(tmp_path / "bus-nats")
    server.start()
    yield server
    server.kill()


@pytest.mark.parametrize("kind", ["nats", "redis"])
async def test_ingest_reconnects_when_the_bus_restarts(
    start_server: StartServer, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """The bus stops and comes back (with its data): ingest notices, reconnects with
    backoff, and reads on; the server serves throughout."""
    own: OwnNats | OwnRedis
    if kind == "nats":
        own = request.getfixturevalue("own_nats")
        url = f"{own.url}/biz.>?stream=BIZ"
    else:
        own = OwnRedis(tmp_path / "bus-redis")
        own.start()
        request.addfinalizer(own.kill)
        url = f"redis://127.0.0.1:{own.port}/0?stream=biz"
    await until(lambda: asyncio.to_thread(reachable, own.port), "the bus to listen")

    async def send(data: str) -> None:
        body = orjson.dumps({"users": ["kim"], "data": data})
        if isinstance(own, OwnNats):
            nc = await nats.connect(own.url)
            try:
                await nc.jetstream().publish("biz.pay", body, stream="BIZ")
            finally:
                await nc.close()
        else:
            r = aioredis.Redis(port=own.port)
            try:
                await r.xadd("biz", {"body": body})
            finally:
                await r.aclose()

    async def gauge_is(value: float) -> bool:
        return await metric(server, "tidings_ingest_connected") == value

    server = start_server(TIDINGS_INGEST_URL=url)
    await connected(server)
    async with sse_stream(server.url, token=server.token("kim")) as stream:
        await stream.next_event("welcome")
        await send("before")
        assert await data_of(stream, 1) == ["before"]
        await asyncio.to_thread(own.stop_with_its_data)
        await until(lambda: gauge_is(0.0), "ingest to notice")
        await asyncio.to_thread(own.start)
        await until(lambda: asyncio.to_thread(reachable, own.port), "the bus to listen")
        await until(lambda: gauge_is(1.0), "ingest to reconnect", within=SLOW)
        await send("after")
        assert await data_of(stream, 1, within=SLOW) == ["after"]


@pytest.mark.parametrize("bus", ["nats", "redis"], indirect=True)
async def test_message_arriving_while_the_broker_is_down_is_not_lost(
    bus: Bus, own_redis: OwnRedis, start_server: StartServer
) -> None:
    """tidings' broker is down: the message is not acknowledged but retried, and goes
    out once the broker is back — to the stream that stayed open."""
    await until(lambda: asyncio.to_thread(reachable, own_redis.port), "redis-server to listen")
    server = start_server(TIDINGS_INGEST_URL=bus.url, TIDINGS_BROKER_URL=own_redis.url)
    await connected(server)
    async with sse_stream(server.url, token=server.token("gus")) as stream:
        await stream.next_event("welcome")
        await bus.send({"users": ["gus"], "data": "before"})
        assert await data_of(stream, 1) == ["before"]
        await asyncio.to_thread(own_redis.stop_with_its_data)
        try:
            await bus.send({"users": ["gus"], "data": "while down"})

            async def refused() -> bool:
                return await metric(server, "tidings_ingest_retries_total") >= 1

            await until(refused, "the broker to refuse the ingest publish")
            assert not await bus.drained()  # held, not acknowledged
        finally:
            await asyncio.to_thread(own_redis.start)
        assert await data_of(stream, 1, within=SLOW) == ["while down"]
        await until(bus.drained, "the message to be acknowledged")
    await counted(server, 2)
    assert not [e for e in stream.events if e.event == "reset"]


@pytest.mark.parametrize("bus", ["nats", "redis"], indirect=True)
async def test_a_message_held_at_shutdown_goes_out_from_the_next_instance(
    bus: Bus, own_redis: OwnRedis, start_server: StartServer
) -> None:
    """An instance stops while it holds a message its broker refused: the message stays
    on the bus (NATS: handed back; Redis: pending, claimed by the next instance), and a
    client resuming on the next instance gets it from history."""
    if isinstance(bus, RedisBus):
        bus.claim_idle = "0s"  # claim at once what the stopped instance left pending
    await until(lambda: asyncio.to_thread(reachable, own_redis.port), "redis-server to listen")
    env = {
        "TIDINGS_INGEST_URL": bus.url,
        "TIDINGS_BROKER_URL": own_redis.url,
        "TIDINGS_JWT_SECRET": secrets.token_urlsafe(48),
    }
    a = start_server(**env)
    await connected(a)
    token = a.token("lea")
    async with sse_stream(a.url, token=token) as stream:
        await stream.next_event("welcome")
        await bus.send({"users": ["lea"], "data": "before"})
        assert await data_of(stream, 1) == ["before"]
        cursor = stream.last_id
    await asyncio.to_thread(own_redis.stop_with_its_data)
    await bus.send({"users": ["lea"], "data": "held"})

    async def refused() -> bool:
        return await metric(a, "tidings_ingest_retries_total") >= 1

    await until(refused, "the broker to refuse the ingest publish")
    code = await asyncio.to_thread(a.stop)
    assert code in (0, -signal.SIGTERM), a.log()  # graceful (uvicorn re-raises SIGTERM)
    assert "Traceback" not in a.log()
    await asyncio.to_thread(own_redis.start)
    await until(lambda: asyncio.to_thread(reachable, own_redis.port), "redis-server to listen")
    b = start_server(**env)

    async def published() -> bool:
        return await ingested(b) == 1 and await bus.drained()

    await until(published, "the next instance to publish it", within=SLOW)
    async with sse_stream(b.url, token=token, last_event_id=cursor) as stream:
        await stream.next_event("welcome")
        assert await data_of(stream, 1) == ["held"]


async def test_redis_entries_of_a_dead_consumer_are_claimed(
    redis_bus: RedisBus, start_server: StartServer
) -> None:
    """An entry read by a consumer that died before acknowledging it is claimed and
    published by a live instance."""
    r = redis_bus.r
    await r.xgroup_create(redis_bus.stream, "tidings", id="0", mkstream=True)
    note = {"recipients": ["hal"], "type": "t", "title": "认领"}
    await redis_bus.send(note)
    taken = await r.xreadgroup("tidings", "dead-instance", {redis_bus.stream: ">"}, count=1)
    assert len(taken[0][1]) == 1  # pending at a consumer that will never acknowledge it
    redis_bus.claim_idle = "0s"
    server = start_server(TIDINGS_INGEST_URL=redis_bus.url)
    token = server.token("hal")
    async with Api(server.url, server.api_key) as api:

        async def in_inbox() -> bool:
            answer = await api.get("/api/v1/notifications/unread-count", token=token)
            return bool(answer.json()["unread_count"] == 1)

        await until(in_inbox, "the claimed notification", within=SLOW)
        await until(redis_bus.drained, "the claimed entry to be acknowledged")
        items = (await api.get("/api/v1/notifications", token=token)).json()["items"]
    assert [n["title"] for n in items] == ["认领"]


async def test_ingest_survives_a_bus_that_is_down_at_start(
    redis_bus: RedisBus, start_server: StartServer
) -> None:
    """A bus that does not answer is retried in the background; the server serves."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0?stream={redis_bus.stream}"
    server = start_server(TIDINGS_INGEST_URL=url)
    async with httpx.AsyncClient(timeout=WAIT) as http:
        assert (await http.get(server.url + "/readyz")).status_code == 200
    assert await metric(server, "tidings_ingest_connected") == 0.0


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("nats://127.0.0.1:4222", "must name a NATS subject"),
        ("nats://127.0.0.1:4222/a.b?mode=fast", "?mode= must be jetstream or core"),
        ("nats://127.0.0.1:4222/a.b?group=x", "unknown option ?group="),
        ("redis://127.0.0.1:6379/0", "must name a Redis stream"),
        ("redis://127.0.0.1:6379/0?stream=s&claim_idle=soon", "?claim_idle= must be a duration"),
        ("kafka://127.0.0.1:9092/t", "must be nats://host:4222/<subject> or redis://"),
    ],
)
def test_bad_ingest_urls_are_refused(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        create_source(url)


def test_serve_refuses_a_bad_ingest_url(tmp_path: Path) -> None:
    server = TidingsServer(tmp_path, {"TIDINGS_INGEST_URL": "redis://127.0.0.1:6379/0"})
    with pytest.raises(RuntimeError, match="TIDINGS_INGEST_URL must name a Redis stream"):
        server.start()
