"""Cross-instance latency of a broker backend (docs/scaling.md, "Latency").

Two backend instances on one broker URL, as two `tidings serve` processes would
have: instance A publishes an event on two streams (a user stream and a topic),
instance B's fan-out callback notes when it arrives. One event at a time, so
the numbers are latency, not throughput.

    .venv/bin/python scripts/backend_latency.py nats://127.0.0.1:4222
    .venv/bin/python scripts/backend_latency.py redis://127.0.0.1:6379/12 -n 2000

Every run uses a fresh name prefix and removes nothing else; on NATS it deletes
the streams it made, on Redis its keys.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import statistics
import time

from tidings.backends.base import Backend, create_backend
from tidings.event import Event


def quantiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    return f"p50 {p50:.2f} ms  p99 {p99:.2f} ms"


async def cleanup(url: str, prefix: str) -> None:
    if url.startswith("nats://"):
        import nats

        from tidings.backends.nats import NatsBackend

        names = NatsBackend(f"{url}?prefix={prefix}")
        nc = await nats.connect(names.url)
        js = nc.jetstream()
        for stream in names.all_streams():
            with contextlib.suppress(Exception):
                await js.delete_stream(stream)
        await nc.close()
    elif url.startswith(("redis://", "rediss://")):
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url)
        keys = [k async for k in client.scan_iter(match=prefix + ":*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def measure(url: str, count: int, warmup: int) -> None:
    prefix = "lat" + secrets.token_hex(4)
    sep = "&" if "?" in url else "?"
    full = f"{url}{sep}prefix={prefix}"
    arrived: dict[str, float] = {}
    waiter: asyncio.Future[None] | None = None

    def on_event(event: Event) -> None:
        arrived[event.id] = time.perf_counter()
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    a: Backend = create_backend(full, history_size=1000, history_ttl=86400)
    b: Backend = create_backend(full, history_size=1000, history_ttl=86400)
    await a.connect(lambda event: None)
    await b.connect(on_event)
    publish: list[float] = []
    receive: list[float] = []
    try:
        for i in range(warmup + count):
            event_id = f"e{i}"
            waiter = asyncio.get_running_loop().create_future()
            start = time.perf_counter()
            await a.publish(
                "acme", ["u:ann", "t:news"], "message", {"n": i, "pad": "x" * 300}, event_id
            )
            returned = time.perf_counter()
            if event_id not in arrived:
                await asyncio.wait_for(waiter, 10)
            if i >= warmup:
                publish.append(returned - start)
                receive.append(arrived[event_id] - start)
    finally:
        await a.close()
        await b.close()
        await cleanup(url, prefix)
    print(f"{url.split('://')[0]}: {count} events on 2 streams, one at a time")
    print(f"  publish returns:          {quantiles(publish)}")
    print(f"  other instance receives:  {quantiles(receive)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="nats://host:port or redis://host:port/db (no ?prefix=)")
    parser.add_argument("-n", "--count", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(measure(args.url, args.count, args.warmup))


if __name__ == "__main__":
    main()
