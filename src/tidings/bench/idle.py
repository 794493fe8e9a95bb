"""idle: N authenticated streams held --hold s on a fresh server; memory and CPU.

RSS (and PSS) of the server's process tree before opening and after the hold;
KB per connection = (after - before) / N. CPU time of the server while opening
and while holding; while holding it should only send heartbeats (their bytes are
counted). Issue 8's bound: ≤ 8 KB RSS per connection, no CPU beyond heartbeats.
"""

from __future__ import annotations

import asyncio
import time

from .dial import close_all, open_subscribers
from .procstat import Window
from .report import Headline
from .scenario import Context, Result, Spec
from .subscribers import Collector

__all__ = ["SPEC"]

KB_BOUND = 8.0


async def run(ctx: Context) -> Result:
    args, target, topic = ctx.args, ctx.target, ctx.new_topic()
    tokens = target.tokens(0, args.n, topic, ctx.tenant)
    collector = Collector()
    opening = Window(ctx.tree)
    started = time.monotonic()
    subs = await open_subscribers(
        target, collector, tokens, topic, args.transport, ctx.dial, ctx.progress
    )
    connect_s = time.monotonic() - started
    connected, open_cpu = opening.close("open")
    holding = Window(ctx.tree)
    held_bytes = collector.bytes_after_ready
    deadline = time.monotonic() + args.hold
    while (left := deadline - time.monotonic()) > 0:
        ctx.progress.show(f"{target.kind}: holding {len(subs)} streams, {left:.0f} s left")
        await asyncio.sleep(min(1.0, left))
    after, hold_cpu = holding.close("hold")
    alive = sum(1 for s in subs if s.alive)
    heartbeat_bytes = collector.bytes_after_ready - held_bytes
    close_all(subs, collector)
    ctx.progress.done()
    ready = len(subs)
    before = opening.start
    per = max(ready, 1)
    return {
        "scenario": "idle",
        "n": args.n,
        "transport": args.transport,
        "hold_s": args.hold,
        "subscribers_ready": ready,
        "alive_after_hold": alive,
        "kb_per_conn": round((after.rss_kb - before.rss_kb) / per, 2),
        "kb_per_conn_pss": round((after.pss_kb - before.pss_kb) / per, 2),
        "kb_bound": KB_BOUND,
        "complete": ready == args.n and alive == ready,
        "server_rss_kb_before": before.rss_kb,
        "server_rss_kb_connected": connected.rss_kb,
        "server_rss_kb_after_hold": after.rss_kb,
        "server_procs": after.procs,
        "connect_s": round(connect_s, 3),
        "connect_failures": dict(collector.failures),
        "heartbeat_bytes_per_conn": round(heartbeat_bytes / per, 1),
        **open_cpu,
        **hold_cpu,
    }


SPEC = Spec(
    name="idle",
    run=run,
    default_n=10_000,
    headline=Headline("kb_per_conn", higher_is_better=False),
    rows=(
        ("streams", "subscribers_ready"),
        ("alive after hold", "alive_after_hold"),
        ("hold s", "hold_s"),
        ("RSS before KB", "server_rss_kb_before"),
        ("RSS after hold KB", "server_rss_kb_after_hold"),
        ("KB per connection", "kb_per_conn"),
        ("KB per connection (PSS)", "kb_per_conn_pss"),
        ("server CPU s to open", "server_cpu_s_open"),
        ("server CPU s in hold", "server_cpu_s_hold"),
        ("heartbeat bytes per conn", "heartbeat_bytes_per_conn"),
        ("other CPU s (noise)", "other_cpu_s_hold"),
        ("complete", "complete"),
    ),
    help="N streams held idle on a fresh server: RSS per connection, CPU while idle",
)
