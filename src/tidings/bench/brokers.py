"""Brokers of started servers: a fresh key prefix per run, deleted afterwards.

Servers the bench starts on Redis or NATS get ``?prefix=tbench<random>`` so a
run neither sees nor leaves anything of another (the backends put every key,
subject and stream name under the prefix); `drop_prefix` deletes what they made.
"""

from __future__ import annotations

import contextlib
import os
from urllib.parse import urlsplit

__all__ = ["drop_prefix", "fresh", "is_shared", "with_prefix"]


def is_shared(url: str) -> bool:
    """A broker several processes share (not memory://)."""
    return urlsplit(url).scheme in ("redis", "rediss", "nats")


def fresh(url: str) -> str:
    """`url` with a new random prefix."""
    return with_prefix(url, f"tbench{os.urandom(4).hex()}")


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
                for stream in names.all_streams():
                    with contextlib.suppress(Exception):
                        await js.delete_stream(stream)
            finally:
                await nc.close()
