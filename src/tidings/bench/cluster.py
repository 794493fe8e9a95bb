"""cluster: publish on one instance, subscribe on another, on a shared broker (issue 5).

Two fresh ``tidings serve`` instances on --broker (redis://... or nats://...,
given a fresh key prefix that is deleted afterwards): subscribers on the second,
publishes through the first. The same fanout also runs on one instance with the
in-process memory:// broker, and the result is the latency the broker adds, at
p50 and p99 of every delivery and of the last subscriber per message.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from . import fanout
from .report import BenchError, Headline
from .scenario import Context, Result, Spec

__all__ = ["SPEC", "drop_prefix", "with_prefix"]

_KEPT = (
    "last_p50_ms",
    "last_p99_ms",
    "delivery_p50_ms",
    "delivery_p99_ms",
    "first_p50_ms",
    "complete",
    "received",
    "expected",
    "subscribers_ready",
    "publish_rtt_p50_ms",
    "server_cpu_s_publish",
    "other_cpu_s_publish",
)


def with_prefix(url: str, prefix: str) -> str:
    """`url` with ``prefix=`` set (the backends' key/subject prefix)."""
    parts = urlsplit(url)
    query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("prefix="))
    query = f"{query}&prefix={prefix}" if query else f"prefix={prefix}"
    return parts._replace(query=query).geturl()


async def drop_prefix(url: str) -> None:
    """Delete what a backend on `url` left in the broker (best effort)."""
    with contextlib.suppress(Exception):
        if url.startswith(("redis://", "rediss://")):
            import redis.asyncio as redis

            from ..backends.redis import split_url as redis_url

            plain, prefix = redis_url(url)
            client = redis.Redis.from_url(plain)
            try:
                keys = [k async for k in client.scan_iter(match=prefix + ":*", count=1000)]
                if keys:
                    await client.delete(*keys)
            finally:
                await client.aclose()
        elif url.startswith("nats://"):
            import nats

            from ..backends.nats import NatsBackend

            names = NatsBackend(url)
            nc = await nats.connect(names.url, connect_timeout=2, max_reconnect_attempts=0)
            try:
                js = nc.jetstream()
                for stream in (names.stream, "KV_" + names.seq_bucket, "KV_" + names.idem_bucket):
                    with contextlib.suppress(Exception):
                        await js.delete_stream(stream)
            finally:
                await nc.close()


async def run(ctx: Context) -> Result:
    broker = ctx.args.broker
    if not broker or not broker.startswith(("redis://", "rediss://", "nats://")):
        raise BenchError("cluster needs --broker redis://... or nats://...")
    ctx.progress.show("memory:// baseline", force=True)
    with ctx.servers(1, "memory://") as alone:
        memory = await fanout.measure(ctx.on(alone))
    url = with_prefix(broker, f"tbench{os.urandom(4).hex()}")
    try:
        with ctx.servers(2, url) as pair:
            # subscribers on the second instance, publishes through the first
            split = replace(pair, ports=pair.ports[1:], pub_port=pair.ports[0])
            cluster = await fanout.measure(ctx.on(split))
    finally:
        await drop_prefix(url)
    result: dict[str, Any] = {
        "scenario": "cluster",
        "broker": urlsplit(broker).scheme,
        "n": ctx.args.n,
        "messages": ctx.args.messages,
        "transport": ctx.args.transport,
    }
    for name in ("delivery_p50_ms", "delivery_p99_ms", "last_p50_ms", "last_p99_ms"):
        a, b = cluster.get(name), memory.get(name)
        result[f"added_{name}"] = None if a is None or b is None else round(a - b, 2)
    result["complete"] = bool(cluster["complete"] and memory["complete"])
    result["memory"] = {k: memory.get(k) for k in _KEPT}
    result["cluster"] = {k: cluster.get(k) for k in _KEPT}
    return result


SPEC = Spec(
    name="cluster",
    run=run,
    default_n=1000,
    headline=Headline("added_delivery_p99_ms", higher_is_better=False),
    rows=(
        ("broker", "broker"),
        ("subscribers", "n"),
        ("messages", "messages"),
        ("added delivery p50 ms", "added_delivery_p50_ms"),
        ("added delivery p99 ms", "added_delivery_p99_ms"),
        ("added last-sub p50 ms", "added_last_p50_ms"),
        ("added last-sub p99 ms", "added_last_p99_ms"),
        ("memory:// delivery p50 ms", "memory.delivery_p50_ms"),
        ("memory:// delivery p99 ms", "memory.delivery_p99_ms"),
        ("cluster delivery p50 ms", "cluster.delivery_p50_ms"),
        ("cluster delivery p99 ms", "cluster.delivery_p99_ms"),
        ("memory:// last-sub p99 ms", "memory.last_p99_ms"),
        ("cluster last-sub p99 ms", "cluster.last_p99_ms"),
        ("delivered (cluster)", "cluster.received"),
        ("of", "cluster.expected"),
        ("complete", "complete"),
    ),
    help="publish on one instance, subscribe on another (--broker): added latency",
    nchan=False,
    starts_servers=True,
)
