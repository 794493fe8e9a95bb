"""Presence and stats across instances, and `tidings serve --workers N` (issue 5).

Real `tidings serve` processes on the real Redis and NATS (every shared test runs
on both), no mocks. Presence flushes every 0.2 s with a 2 s TTL here, so what one
instance sees of another is polled for with a deadline (`until`), never slept for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest

from server import START_TIMEOUT, StartServer, TidingsServer, free_port
from sse_client import WAIT, Api, SSEClient, open_stream, until
from tidings import Hub, Settings
from tidings.auth import Principal
from tidings.connection import SSEConnection
from tidings.errors import ConfigError

pytestmark = pytest.mark.integration

REDIS = ("127.0.0.1", 6379, 12)
NATS = ("127.0.0.1", 4222)
FAST = {"TIDINGS_PRESENCE_INTERVAL": "0.2", "TIDINGS_PRESENCE_TTL": "2"}


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


# -- brokers ----------------------------------------------------------------------------


async def _drop_redis(prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis(host=REDIS[0], port=REDIS[1], db=REDIS[2])
    try:
        keys = [k async for k in client.scan_iter(match=prefix + ":*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _drop_nats(prefix: str) -> None:
    """Delete every stream (and so every bucket) named after `prefix`."""
    base = prefix.upper() + "_"
    nc = await nats.connect(f"nats://{NATS[0]}:{NATS[1]}", connect_timeout=2)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            name = info.config.name or ""
            if name.startswith((base, "KV_" + base)):
                with contextlib.suppress(Exception):
                    await js.delete_stream(name)
    finally:
        await nc.close()


@pytest.fixture(params=["redis", "nats"])
async def broker_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A Redis or NATS URL with a fresh prefix; everything under it is deleted afterwards."""
    prefix = "tp" + secrets.token_hex(5)
    if request.param == "redis":
        if not reachable(REDIS[0], REDIS[1]):
            pytest.skip("Redis is not reachable")
        yield f"redis://{REDIS[0]}:{REDIS[1]}/{REDIS[2]}?prefix={prefix}"
        await _drop_redis(prefix)
    else:
        if not reachable(*NATS):
            pytest.skip("NATS is not reachable")
        yield f"nats://{NATS[0]}:{NATS[1]}?prefix={prefix}"
        await _drop_nats(prefix)


Cluster = Callable[..., list[TidingsServer]]


@pytest.fixture
def cluster(broker_url: str, start_server: StartServer) -> Cluster:
    """``cluster(n, **env)``: n servers on one broker prefix, sharing secret and API key.

    `broker_url` comes first, so its clean-up runs after every server has stopped.
    """
    secret = secrets.token_urlsafe(48)
    key = "cluster-" + secrets.token_urlsafe(16)

    def start(n: int = 2, **env: str) -> list[TidingsServer]:
        settings = {
            "TIDINGS_BROKER_URL": broker_url,
            "TIDINGS_JWT_SECRET": secret,
            "TIDINGS_API_KEYS": key,
            **FAST,
            **env,
        }
        return [start_server(**settings) for _ in range(n)]

    return start


# -- helpers ----------------------------------------------------------------------------


async def get(srv: TidingsServer, path: str, token: str | None = None) -> Any:
    async with Api(srv.url, srv.api_key) as api:
        response = await api.get(path, token=token)
    assert response.status_code == 200, response.text
    return response.json()


def seen(
    srv: TidingsServer, path: str, expected: Callable[[Any], bool], token: str | None = None
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return expected(await get(srv, path, token))

    return check


async def stream(srv: TidingsServer, user: str, tenant: str = "", **kw: Any) -> SSEClient:
    topics = kw.pop("topics", [])
    token = srv.token(user, tenant=tenant, topics=topics)
    params = {"topics": ",".join(topics)} if topics else None
    client = await open_stream(srv.url, token=token, params=params)
    assert client.status == 200, await client.json()
    await client.next_event("welcome")
    return client


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- the in-process API --------------------------------------------------------------------


async def attach(hub: Hub, user: str, tenant: str = "", topics: tuple[str, ...] = ()) -> Any:
    principal = Principal(user, tenant)
    conn = SSEConnection(principal, hub.streams_for(principal, list(topics)), limit=16)
    hub.broker.release(conn, await hub.broker.attach(conn, None))
    return conn


async def test_in_process_presence_spans_hubs(broker_url: str) -> None:
    settings = Settings(broker_url=broker_url, presence_interval=0.1, presence_ttl=1)
    async with Hub(settings) as a, Hub(settings) as b:
        conns = [await attach(a, "ann", "acme", ("news",)), await attach(b, "ann", "acme")]
        await attach(b, "bob", "acme")

        async def both_see_ann_twice() -> bool:
            counts = [await h.presence.connections("ann", "acme") for h in (a, b)]
            return counts == [2, 2]

        await until(both_see_ann_twice, "ann's 2 connections from both hubs")
        await until(lambda: _eq(a.presence.users("acme"), ["ann", "bob"]), "bob (on b) from a")
        assert a.online_users("acme") == ["ann"]  # the synchronous API: this process only
        assert a.connection_count("ann", "acme") == 1
        assert await a.presence.is_online("bob", "acme")
        assert not await a.presence.is_online("bob", "globex")  # tenants are walls
        stats = await b.presence.stats("acme")
        assert (stats["connections"], stats["users"], stats["topics"]) == (3, 2, 1)

        # `disconnect` counts the user's connections on every instance.
        assert await a.disconnect("ann", "acme") == 2
        for conn in conns:
            await until(lambda conn=conn: _true(conn.closed is not None), "closed")
            for hub in (a, b):
                hub.broker.detach(conn)  # as its transport would (detach is idempotent)
        await until(lambda: _eq(b.presence.users("acme"), ["bob"]), "ann gone")


async def test_a_restarted_hub_writes_its_presence_again(broker_url: str) -> None:
    settings = Settings(broker_url=broker_url, presence_interval=0.1, presence_ttl=1)
    async with Hub(settings) as a, Hub(settings) as b:
        await attach(a, "ann")
        await until(lambda: _eq(b.presence.users(), ["ann"]), "ann from b")
        await a.stop()  # removes a's record at once…
        await until(lambda: _eq(b.presence.users(), []), "a's record removed")
        await a.start()  # …and a start writes it all again (the connection is still there)
        await until(lambda: _eq(b.presence.users(), ["ann"]), "ann again")


async def _eq(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def _true(value: bool) -> bool:
    return value


async def test_memory_presence_is_this_process() -> None:
    async with Hub(Settings()) as hub:
        assert hub.presence.store is None
        await attach(hub, "ann", "acme")
        assert await hub.presence.users("acme") == ["ann"]
        stats = await hub.presence.stats()
        assert (stats["connections"], stats["users"]) == (1, 1)
        assert [row["id"] for row in stats["instances"]] == [stats["instance"]]
        assert stats["instances"][0]["pid"] == os.getpid()
        assert stats["tenants"]["acme"]["connections"] == 1


def test_presence_ttl_must_cover_two_intervals() -> None:
    with pytest.raises(ConfigError, match="TIDINGS_PRESENCE_TTL must be at least 2"):
        Settings(presence_interval=1, presence_ttl=1.5)


# -- presence across instances --------------------------------------------------------------


async def test_presence_is_seen_from_every_instance(cluster: Cluster) -> None:
    a, b = cluster(2)
    one = await stream(a, "ann", "acme")
    two: SSEClient | None = None
    try:
        await until(seen(b, "/api/v1/presence?tenant=acme", lambda r: r["users"] == ["ann"]), "b")
        assert await get(b, "/api/v1/presence/ann?tenant=acme") == {
            "user_id": "ann",
            "online": True,
            "connections": 1,
        }
        # Tenants are walls: the same user id elsewhere is not online, and an admin
        # token of another tenant does not see acme.
        assert (await get(b, "/api/v1/presence/ann?tenant=globex"))["online"] is False
        outsider = b.token("boss", tenant="globex", admin=True)
        assert (await get(b, "/api/v1/presence", outsider))["users"] == []
        insider = b.token("boss", tenant="acme", admin=True)
        assert (await get(b, "/api/v1/presence", insider))["users"] == ["ann"]

        two = await stream(b, "ann", "acme")  # on both instances now
        for srv in (a, b):
            path = "/api/v1/presence/ann?tenant=acme"
            await until(seen(srv, path, lambda r: r["connections"] == 2), "2 connections")

        await one.close()
        await until(
            seen(b, "/api/v1/presence/ann?tenant=acme", lambda r: r["connections"] == 1), "1"
        )
        await two.close()
        two = None
        for srv in (a, b):
            await until(
                seen(srv, "/api/v1/presence?tenant=acme", lambda r: r["users"] == []), "gone"
            )
    finally:
        await one.close()
        if two is not None:
            await two.close()


async def test_a_crashed_instance_disappears_after_the_ttl(cluster: Cluster) -> None:
    a, b = cluster(2)
    client = await stream(a, "ann")
    try:
        await until(seen(b, "/api/v1/presence", lambda r: r["users"] == ["ann"]), "ann on b")
        await until(seen(b, "/api/v1/stats", lambda r: len(r["instances"]) == 2), "2 instances")
        await asyncio.to_thread(a.kill)  # kill -9: no goodbye, no record removed
    finally:
        await client.close()
    # TIDINGS_PRESENCE_TTL is 2 s here: the bound is that, plus one flush of b.
    await until(seen(b, "/api/v1/presence", lambda r: r["users"] == []), "ann gone")
    stats = await get(b, "/api/v1/stats")
    assert [row["pid"] for row in stats["instances"]] == [b.pid]
    assert stats["connections"] == 0 and stats["users"] == 0


async def test_stats_add_up_across_instances(cluster: Cluster) -> None:
    a, b = cluster(2)
    clients = [
        await stream(a, "ann", "acme", topics=["news"]),
        await stream(b, "ann", "acme"),
        await stream(b, "bob", "acme"),
        await stream(b, "carl", "globex"),
    ]
    try:
        async with Api(a.url, a.api_key) as api:
            for i in range(3):
                await api.publish(tenant="acme", users=["ann"], data=i)
            await api.publish(tenant="globex", broadcast=True, data="g")
        acme = {
            "connections": 3,
            "users": 2,
            "topics": 1,
            "messages_published": 3,
            "messages_delivered": 6,
            "messages_dropped": 0,
        }

        def complete(r: Any) -> bool:  # every instance's last flush has it all
            totals = (r["connections"], r["users"], r["topics"])
            messages = (r["messages_published"], r["messages_delivered"])
            return (totals, messages) == ((4, 3, 1), (4, 7)) and r["tenants"]["acme"] == acme

        await until(seen(b, "/api/v1/stats", complete), "every instance's counts on b")
        everything = await get(b, "/api/v1/stats")
        assert everything["tenants"]["globex"]["connections"] == 1
        assert everything["tenants"]["globex"]["users"] == 1
        rows = {row["pid"]: row for row in everything["instances"]}
        assert set(rows) == {a.pid, b.pid}
        assert (rows[a.pid]["connections"], rows[b.pid]["connections"]) == (1, 3)
        assert (rows[a.pid]["messages_published"], rows[b.pid]["messages_published"]) == (4, 0)
        assert everything["instance"] == rows[b.pid]["id"]

        # An admin token sees its tenant only, and no host or pid.
        boss = a.token("boss", tenant="acme", admin=True)
        await until(
            seen(a, "/api/v1/stats", lambda r: {k: r[k] for k in acme} == acme, boss),
            "acme's counts on a",
        )
        mine = await get(a, "/api/v1/stats", boss)
        assert "tenants" not in mine
        assert len(mine["instances"]) == 2
        assert all("pid" not in row and "host" not in row for row in mine["instances"])
        assert sum(row["connections"] for row in mine["instances"]) == 3

        def globex(r: Any) -> bool:
            return (r["connections"], r["users"], r["messages_published"]) == (1, 1, 1)

        await until(seen(a, "/api/v1/stats?tenant=globex", globex), "globex's counts on a")
    finally:
        for client in clients:
            await client.close()


# -- tidings serve --workers N ------------------------------------------------------------


async def worker_rows(srv: TidingsServer, count: int = 2) -> list[dict[str, Any]]:
    await until(
        seen(srv, "/api/v1/stats", lambda r: len(r["instances"]) == count),
        f"{count} workers in stats",
        within=START_TIMEOUT,
    )
    rows: list[dict[str, Any]] = (await get(srv, "/api/v1/stats"))["instances"]
    return rows


async def test_workers_share_the_port_and_the_events(cluster: Cluster) -> None:
    (srv,) = cluster(1, TIDINGS_WORKERS="2")
    rows = await worker_rows(srv)
    pids = {row["pid"] for row in rows}
    assert len(pids) == 2 and srv.pid not in pids, "each worker is its own instance"

    # Both workers take connections: the kernel spreads them (SO_REUSEPORT).
    clients: list[SSEClient] = []
    try:
        for n in range(64):
            clients.append(await stream(srv, f"u{n}"))
            await until(
                seen(srv, "/api/v1/stats", lambda r, n=n: r["connections"] == n + 1),
                "the new connection in stats",
            )
            stats = await get(srv, "/api/v1/stats")
            if all(row["connections"] > 0 for row in stats["instances"]):
                break
        else:
            raise AssertionError(f"one worker took every connection: {stats['instances']}")

        # Delivery crosses workers: publish on new connections (each lands on either
        # worker) until both workers have published; u0's stream gets every event.
        published = 0
        limits = httpx.Limits(max_keepalive_connections=0)
        headers = {"Authorization": f"Bearer {srv.api_key}"}
        async with httpx.AsyncClient(base_url=srv.url, limits=limits, timeout=WAIT) as http:
            for _ in range(200):
                body = orjson.dumps({"users": ["u0"], "data": published})
                response = await http.post("/api/v1/publish", content=body, headers=headers)
                assert response.status_code == 202, response.text
                published += 1
                stats = await get(srv, "/api/v1/stats")
                if all(row["messages_published"] > 0 for row in stats["instances"]):
                    break
            else:
                raise AssertionError(f"one worker took every publish: {stats['instances']}")
        events = await clients[0].take(published, "message")
        assert [orjson.loads(e.data) for e in events] == list(range(published))
    finally:
        for client in clients:
            await client.close()


async def test_sigterm_stops_every_worker_gracefully(cluster: Cluster) -> None:
    (srv,) = cluster(1, TIDINGS_WORKERS="2")
    pids = [row["pid"] for row in await worker_rows(srv)]
    client = await stream(srv, "ann")
    try:
        stopping = asyncio.ensure_future(asyncio.to_thread(srv.stop))  # SIGTERM, then wait
        rest = await client.wait_end()
        assert "shutdown" in [e.event for e in rest], "the stream was told to reconnect"
        code = await stopping
    finally:
        await client.close()
    assert code == 0, code
    assert not [pid for pid in pids if alive(pid)], "a worker outlived the supervisor"


async def test_a_dead_worker_is_replaced(cluster: Cluster) -> None:
    (srv,) = cluster(1, TIDINGS_WORKERS="2")
    first = {row["pid"] for row in await worker_rows(srv)}
    victim = min(first)
    os.kill(victim, signal.SIGKILL)

    def replaced(stats: Any) -> bool:
        pids = {row["pid"] for row in stats["instances"]}
        return len(pids) == 2 and victim not in pids

    # The dead worker's record expires (TTL), and its replacement registers.
    await until(seen(srv, "/api/v1/stats", replaced), "a new worker", within=START_TIMEOUT)
    assert srv.stop() == 0


async def test_workers_stop_when_the_supervisor_is_killed(cluster: Cluster) -> None:
    (srv,) = cluster(1, TIDINGS_WORKERS="2")
    pids = [row["pid"] for row in await worker_rows(srv)]
    await asyncio.to_thread(srv.kill)
    deadline = time.monotonic() + WAIT
    while [pid for pid in pids if alive(pid)]:
        assert time.monotonic() < deadline, "workers outlived a killed supervisor"
        await asyncio.sleep(0.05)


def test_workers_refuse_the_memory_broker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env |= {"TIDINGS_JWT_SECRET": secrets.token_urlsafe(48), "TIDINGS_BROKER_URL": "memory://"}
    done = subprocess.run(
        [sys.executable, "-m", "tidings", "serve", "--workers", "2", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    assert done.returncode == 2, done.stderr
    assert "TIDINGS_WORKERS=2 needs a shared broker" in done.stderr
    assert "redis://" in done.stderr and "nats://" in done.stderr
