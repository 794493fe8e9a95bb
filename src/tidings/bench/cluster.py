"""cluster: publish on one instance, subscribe on another, on a shared broker (issue 5).

Two fresh ``tidings serve`` instances on --broker (redis://... or nats://...,
given a fresh key prefix that is deleted afterwards): subscribers on the second,
publishes through the first. The same fanout also runs on one instance with the
in-process memory:// broker, and the result is the latency the broker adds, at
p50 and p99 of every delivery and of the last subscriber per message. With
--rounds R both run R times, alternating, and each added value is the median of
the R differences: one stall of a busy machine then moves no number.
"""

from __future__ import annotations

import statistics
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
    "publish_rtt_p50_ms",
    "server_cpu_s_publish",
    "other_cpu_s_publish",
)


async def run(ctx: Context) -> Result:
    broker = ctx.args.broker
    if not broker or not is_shared(broker):
        raise BenchError("cluster needs --broker redis://... or nats://...")
    url = fresh(broker)
    memory: list[Result] = []
    cluster: list[Result] = []
    try:
        with ctx.servers(1, "memory://") as alone, ctx.servers(2, url) as pair:
            # subscribers on the second instance, publishes through the first
            split = replace(pair, ports=pair.ports[1:], pub_port=pair.ports[0])
            for k in range(ctx.args.rounds):  # alternating, so noise hits both alike
                ctx.progress.show(f"round {k + 1}: memory://", force=True)
                memory.append(await fanout.measure(ctx.on(alone)))
                ctx.progress.show(f"round {k + 1}: {urlsplit(broker).scheme}", force=True)
                cluster.append(await fanout.measure(ctx.on(split)))
    finally:
        await drop_prefix(url)
    result: dict[str, Any] = {
        "scenario": "cluster",
        "broker": urlsplit(broker).scheme,
        "n": ctx.args.n,
        "messages": ctx.args.messages,
        "rounds": ctx.args.rounds,
        "transport": ctx.args.transport,
    }
    for name in ("delivery_p50_ms", "delivery_p99_ms", "last_p50_ms", "last_p99_ms"):
        added = [
            c[name] - m[name]
            for m, c in zip(memory, cluster, strict=True)
            if c.get(name) is not None and m.get(name) is not None
        ]
        result[f"added_{name}"] = _median(added)
    result["complete"] = all(r["complete"] for r in memory + cluster)
    result["memory"] = _summary(memory)
    result["cluster"] = _summary(cluster)
    return result


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _summary(runs: list[Result]) -> Result:
    """Per field: the median over rounds (numbers), all (complete), the sum (counts)."""
    out: Result = {}
    for name in _KEPT:
        values = [r[name] for r in runs if r.get(name) is not None]
        if name == "complete":
            out[name] = all(values)
        elif name in ("received", "expected"):
            out[name] = sum(values)
        else:
            out[name] = _median(values)
    return out


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
