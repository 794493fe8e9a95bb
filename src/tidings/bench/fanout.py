"""fanout: N subscribers on one topic, M messages --interval s apart, one publisher.

Per message, the time from its send until the FIRST and until the LAST
subscriber had it; p50/p99 over the messages (p99 of 20 values is the max), and
p50/p99 over every single delivery. "complete": every subscriber got every
message exactly once. Issue 8's bound: last-subscriber p99 ≤ 1.0 × Nchan's in the
same run over SSE, ≤ 1.2 × Nchan's SSE p99 over WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

from .dial import close_all, open_subscribers
from .procstat import Window
from .publishers import Publisher, accepted, marker
from .report import Headline, ms, percentile
from .scenario import Context, Result, Spec
from .subscribers import Collector

__all__ = ["SPEC", "measure"]


async def run(ctx: Context) -> Result:
    return await measure(ctx)


async def measure(ctx: Context) -> Result:
    """The fanout against ctx.target (the cluster scenario's publishes on another instance)."""
    args, target, topic = ctx.args, ctx.target, ctx.new_topic()
    tokens = target.tokens(0, args.n, topic, ctx.tenant)
    collector = Collector(args.messages)
    window = Window(ctx.tree)
    started = time.monotonic()
    subs = await open_subscribers(
        target, collector, tokens, topic, args.transport, ctx.dial, ctx.progress
    )
    connect_s = time.monotonic() - started
    await asyncio.sleep(args.settle)
    ready = len(subs)
    loaded = Window(ctx.tree)

    publisher = Publisher(target.host, target.pub_port)
    statuses: Counter[int] = Counter()
    rtts: list[int] = []
    loop = asyncio.get_running_loop()
    begin = loop.time()
    for seq in range(args.messages):
        delay = begin + seq * args.interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        ctx.progress.show(f"{target.kind}: {ready} subscribers · publishing {seq + 1}", force=True)
        status, rtt = await publisher.send(target.publish_request(topic, ctx.tenant, marker(seq)))
        statuses[status] += 1
        rtts.append(rtt)
    publisher.close()
    collector.expect(ready * accepted(statuses))  # a refused publish delivers nothing
    ctx.progress.show(f"{target.kind}: {ready} subscribers · waiting for deliveries", force=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(collector.done.wait(), args.grace)
    end, cpu = loaded.close("publish")
    close_all(subs, collector)
    ctx.progress.done()

    full = [k for k in range(args.messages) if ready and collector.count[k] == ready]
    last = [collector.last_ns[k] for k in full]
    first = [f for f in collector.first_ns if f is not None]
    complete = (
        ready == args.n
        and accepted(statuses) == args.messages
        and collector.received == collector.expected
        and not collector.duplicates
        and not collector.lost
    )
    return {
        "scenario": "fanout",
        "n": args.n,
        "messages": args.messages,
        "last_p50_ms": ms(percentile(last, 50)),
        "last_p99_ms": ms(percentile(last, 99)),
        "first_p50_ms": ms(percentile(first, 50)),
        "complete": complete,
        "received": collector.received,
        "expected": args.n * args.messages,
        "transport": args.transport,
        "interval_s": args.interval,
        "subscribers_ready": ready,
        "connect_s": round(connect_s, 3),
        "connects_per_s": round(ready / connect_s, 1) if connect_s > 0 else None,
        "last_max_ms": ms(max(last) if last else None),
        "slowest_message": max(full, key=lambda k: collector.last_ns[k]) if full else None,
        "delivery_p50_ms": ms(percentile(collector.latencies, 50)),
        "delivery_p99_ms": ms(percentile(collector.latencies, 99)),
        "publish_rtt_p50_ms": ms(percentile(rtts, 50)),
        "messages_fully_delivered": len(full),
        "duplicates": collector.duplicates,
        "lost_streams": collector.lost,
        "stray_markers": collector.stray,
        "connect_failures": dict(collector.failures),
        "connect_retries": collector.retries,
        "publish_status": {str(k): v for k, v in sorted(statuses.items())},
        "publish_errors": dict(publisher.errors),
        "server_rss_kb_before": window.start.rss_kb,
        "server_rss_kb_loaded": end.rss_kb,
        **cpu,
    }


SPEC = Spec(
    name="fanout",
    run=run,
    default_n=1000,
    headline=Headline("last_p99_ms", higher_is_better=False, bound=1.0),
    rows=(
        ("subscribers", "subscribers_ready"),
        ("transport", "transport"),
        ("messages", "messages"),
        ("delivered", "received"),
        ("of", "expected"),
        ("first p50 ms", "first_p50_ms"),
        ("last p50 ms", "last_p50_ms"),
        ("last p99 ms", "last_p99_ms"),
        ("delivery p99 ms", "delivery_p99_ms"),
        ("server CPU s", "server_cpu_s_publish"),
        ("other CPU s (noise)", "other_cpu_s_publish"),
        ("complete", "complete"),
    ),
    help="N subscribers on one topic, M messages: time until the last one has each",
)
