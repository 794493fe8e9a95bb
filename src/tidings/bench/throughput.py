"""throughput: N subscribers on one topic, P publishers flat out for --duration s.

Each publisher sends its next publish as soon as the previous one answered.
Deliveries per second over the window from the first publish to the last
delivery; then up to --grace s for late deliveries. "complete": every
subscriber got every accepted publish (nothing lost). Latencies come from a few
sample subscribers. Issue 8's bound: deliveries/s ≥ 1.0 × Nchan's.
"""

from __future__ import annotations

import asyncio
import time

from .dial import close_all, open_subscribers
from .procstat import Window
from .publishers import accepted, flat_out, marker
from .report import Headline, ms, percentile
from .scenario import Context, Result, Spec
from .subscribers import Collector

__all__ = ["SPEC", "measure"]


async def run(ctx: Context) -> Result:
    return await measure(ctx, "throughput")


async def measure(ctx: Context, scenario: str) -> Result:
    """Flat-out publishing to -n subscribers (also the publish scenario, with none)."""
    args, target, topic = ctx.args, ctx.target, ctx.new_topic()
    tokens = target.tokens(0, args.n, topic, ctx.tenant)
    collector = Collector()
    subs = await open_subscribers(
        target, collector, tokens, topic, args.transport, ctx.dial, ctx.progress
    )
    await asyncio.sleep(args.settle)
    ready = len(subs)
    window = Window(ctx.tree)
    ctx.progress.show(
        f"{target.kind}: {args.publishers} publishers for {args.duration} s", force=True
    )
    pubs = await flat_out(
        target.host,
        target.pub_port,
        lambda seq: target.publish_request(topic, ctx.tenant, marker(seq)),
        args.publishers,
        args.duration,
    )
    ok = accepted(pubs.statuses)
    collector.expect(ok * ready)
    _, pub_cpu = window.close("publish")
    await _drain(collector, args.grace)
    _, total_cpu = window.close("total")
    complete_subs = sum(1 for s in subs if s.count == ok)
    close_all(subs, collector)
    ctx.progress.done()
    span = max(pubs.seconds, (collector.last_delivery_ns - pubs.started_ns) / 1e9)
    return {
        "scenario": scenario,
        "n": args.n,
        "transport": args.transport,
        "publishers": args.publishers,
        "duration_s": round(pubs.seconds, 2),
        "deliveries_per_s": round(collector.received / span, 1),
        "publishes_per_s": round(ok / pubs.seconds, 1),
        "complete": ready == args.n
        and ok == pubs.statuses.total()
        and collector.received == ok * ready == complete_subs * ok,
        "subscribers_ready": ready,
        "publishes_ok": ok,
        "deliveries": collector.received,
        "deliveries_expected": ok * ready,
        "subscribers_with_all": complete_subs,
        "lost_streams": collector.lost,
        "drain_s": round(max(0.0, (collector.last_delivery_ns - pubs.ended_ns) / 1e9), 2),
        "publish_rtt_p50_ms": ms(percentile(pubs.rtts, 50)),
        "publish_rtt_p99_ms": ms(percentile(pubs.rtts, 99)),
        "delivery_p50_ms": ms(percentile(collector.latencies, 50)),
        "delivery_p99_ms": ms(percentile(collector.latencies, 99)),
        "publish_status": {str(k): v for k, v in sorted(pubs.statuses.items())},
        "publish_errors": dict(pubs.errors),
        "connect_failures": dict(collector.failures),
        **pub_cpu,
        "server_cpu_s_total": total_cpu["server_cpu_s_total"],
    }


async def _drain(collector: Collector, grace: float) -> None:
    """Wait until everything arrived, or deliveries stopped for 1 s, or `grace` is over."""
    deadline = time.monotonic() + grace
    seen, quiet_since = -1, time.monotonic()
    while not collector.done.is_set() and (now := time.monotonic()) < deadline:
        if collector.received != seen:
            seen, quiet_since = collector.received, now
        elif now - quiet_since >= 1.0:
            return
        await asyncio.sleep(0.05)


SPEC = Spec(
    name="throughput",
    run=run,
    default_n=100,
    headline=Headline("deliveries_per_s", higher_is_better=True, bound=1.0),
    rows=(
        ("subscribers", "subscribers_ready"),
        ("publishers", "publishers"),
        ("publishes/s", "publishes_per_s"),
        ("deliveries/s", "deliveries_per_s"),
        ("delivered", "deliveries"),
        ("of", "deliveries_expected"),
        ("publish RTT p50 ms", "publish_rtt_p50_ms"),
        ("delivery p50 ms (sampled)", "delivery_p50_ms"),
        ("drain after stop s", "drain_s"),
        ("server CPU s", "server_cpu_s_publish"),
        ("harness CPU s", "harness_cpu_s_publish"),
        ("other CPU s (noise)", "other_cpu_s_publish"),
        ("complete", "complete"),
    ),
    help="N subscribers, P publishers flat out: deliveries per second, nothing lost",
)
