"""cluster: publish on one instance, subscribe on another, on a shared broker (issue 5).

Two fresh ``tidings serve`` instances on --broker (redis://... or nats://...,
given a fresh key prefix that is deleted afterwards): subscribers on the second,
publishes through the first. The same fanout also runs on one instance with the
in-process memory:// broker, and the result is the latency the broker adds, at
p50 and p99 of every delivery and of the last subscriber per message.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from . import fanout
from .brokers import drop_prefix, fresh, is_shared
from .report import BenchError, Headline
from .scenario import Context, Result, Spec

__all__ = ["SPEC"]

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


async def run(ctx: Context) -> Result:
    broker = ctx.args.broker
    if not broker or not is_shared(broker):
        raise BenchError("cluster needs --broker redis://... or nats://...")
    ctx.progress.show("memory:// baseline", force=True)
    with ctx.servers(1, "memory://") as alone:
        memory = await fanout.measure(ctx.on(alone))
    url = fresh(broker)
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
    default_n=100,
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
