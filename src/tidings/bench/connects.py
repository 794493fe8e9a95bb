"""connects: how fast N subscribers get in, each with its own JWT to verify.

Tokens are minted before the clock starts; a connect counts once the stream is
subscribed (tidings: the welcome event arrived; Nchan: the 200). At most
--concurrency handshakes are in flight. `connect_p50_ms`/`connect_p99_ms`: from
the socket's creation to the stream being ready, as the harness saw it (its own
waits included: with the harness busy, a fast server's connects wait on it).
Issue 8's bound: connects/s ≥ 1.0 × Nchan's (about 4,000/s on the project's
machine).
"""

from __future__ import annotations

import asyncio
import time

from .dial import close_all, open_subscribers
from .procstat import Window
from .report import Headline, ms, percentile
from .scenario import Context, Result, Spec
from .subscribers import Collector

__all__ = ["SPEC"]


async def run(ctx: Context) -> Result:
    args, target, topic = ctx.args, ctx.target, ctx.new_topic()
    tokens = target.tokens(0, args.n, topic, ctx.tenant)
    collector = Collector()
    window = Window(ctx.tree)
    started = time.monotonic()
    subs = await open_subscribers(
        target, collector, tokens, topic, args.transport, ctx.dial, ctx.progress
    )
    seconds = time.monotonic() - started
    end, cpu = window.close("open")
    close_all(subs, collector)
    ctx.progress.done()
    await asyncio.sleep(0.2)  # let the server see the closes before the next run
    ready = len(subs)
    server_s = cpu["server_cpu_s_open"]
    return {
        "scenario": "connects",
        "n": args.n,
        "transport": args.transport,
        "connects_per_s": round(ready / seconds, 1) if seconds > 0 else None,
        "subscribers_ready": ready,
        "seconds": round(seconds, 3),
        "concurrency": args.concurrency,
        "server_us_per_connect": round(server_s * 1e6 / ready, 1) if ready else None,
        "connect_p50_ms": ms(percentile(collector.connect_ns, 50)),
        "connect_p99_ms": ms(percentile(collector.connect_ns, 99)),
        "complete": ready == args.n,
        "connect_failures": dict(collector.failures),
        "connect_retries": collector.retries,
        "server_rss_kb_connected": end.rss_kb,
        **cpu,
    }


SPEC = Spec(
    name="connects",
    run=run,
    default_n=5000,
    headline=Headline("connects_per_s", higher_is_better=True, bound=1.0),
    rows=(
        ("subscribers", "subscribers_ready"),
        ("in flight", "concurrency"),
        ("seconds", "seconds"),
        ("connects/s", "connects_per_s"),
        ("server µs per connect", "server_us_per_connect"),
        ("connect p50 ms", "connect_p50_ms"),
        ("connect p99 ms", "connect_p99_ms"),
        ("failures", "connect_failures"),
        ("other CPU s (noise)", "other_cpu_s_open"),
        ("complete", "complete"),
    ),
    help="N subscribers connecting, each with its own JWT: connects per second",
)
