"""Ingest from a Redis stream through a consumer group (at least once).

Producers add entries whose ``body`` field holds the message's JSON::

    XADD notifications MAXLEN ~ 100000 * body '{"users": ["alice"], "data": "工资已发放"}'

Every tidings instance with the same `TIDINGS_INGEST_GROUP` is a consumer in
one group (created at the start of the stream, so entries added before the
first start are read too), so each entry goes to one instance. An entry is
acknowledged (XACK) after it was published or rejected; tidings does not
delete entries — cap the stream when adding (``MAXLEN ~``), as above.

Entries a consumer read but never acknowledged stay pending: the consumer
re-reads its own after a reconnect, and every instance claims (XAUTOCLAIM)
those left idle longer than ``?claim_idle=`` (default 60 s) by a consumer
that died — at start and then periodically. A consumer holding an entry while
the broker is down keeps it from being claimed by resetting its idle time.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from .keys import position

if TYPE_CHECKING:
    from . import Ingest

log = logging.getLogger("tidings.ingest")

BATCH = 16  # entries read at once; handled in order, one at a time
BLOCK_MS = 5000  # how long one read waits for new entries
FORGET_AFTER = 3600.0  # seconds idle after which a consumer with nothing pending is removed

Entry = tuple[Any, dict[bytes, bytes] | None]


class RedisSource:
    def __init__(self, url: str, stream: str, *, group: str, claim_idle: float) -> None:
        self.url = url
        self.stream = stream
        self.group = group
        self.claim_idle = claim_idle
        self.consumer = ""  # named in the process that reads (see `run`)
        parts = urlsplit(url)
        host = parts.netloc.rsplit("@", 1)[-1]
        self.where = f"Redis {host}{parts.path} stream {stream!r} (consumer group {group!r})"
        self._redis: Redis | None = None

    async def run(self, ingest: Ingest) -> None:
        if not self.consumer.startswith(f"{socket.gethostname()}-{os.getpid()}-"):
            # Made here, not in __init__: a worker forked after create_app is its own consumer.
            self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        r = self._redis = Redis.from_url(
            self.url, socket_connect_timeout=2.0, socket_timeout=BLOCK_MS / 1000 + 10.0
        )
        try:
            await r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        ingest.up()
        own = True  # our own pending entries first: those a failure left unacknowledged
        next_claim = 0.0
        while not ingest.stopping:
            if own:
                entries = await self._read(r, "0")
                own = bool(entries)
            elif time.monotonic() >= next_claim:
                entries = await self._claim(r)
                next_claim = 0.0 if len(entries) >= BATCH else time.monotonic() + self._period()
            else:
                entries = await self._read(r, ">", block=BLOCK_MS)
            for entry_id, fields in entries:
                async with ingest.holding() as go:
                    if not go or not await self._handle(ingest, r, entry_id, fields):
                        return  # stopping: it stays pending, for us or another to claim

    async def close(self) -> None:
        r, self._redis = self._redis, None
        if r is not None:
            await r.aclose()

    def _period(self) -> float:
        return max(1.0, self.claim_idle / 2)

    async def _handle(self, ingest: Ingest, r: Redis, entry_id: Any, fields: Any) -> bool:
        name = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        if fields is None:  # trimmed or deleted while pending: nothing left to publish
            log.warning("ingest: entry %s of %r was deleted before it was read", name, self.stream)
        else:

            async def keepalive() -> None:  # reset its idle time, so no one claims it
                await r.xclaim(self.stream, self.group, self.consumer, 0, [entry_id], justid=True)

            origin = position("redis", self.stream, name)
            if not await ingest.handle(fields.get(b"body"), origin, keepalive=keepalive):
                return False
        await r.xack(self.stream, self.group, entry_id)
        return True

    async def _read(self, r: Redis, start: str, block: int | None = None) -> list[Entry]:
        reply: Any = await r.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=BATCH, block=block
        )
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3: {stream: [entries]}
            return list(next(iter(reply.values()), []))
        return list(reply[0][1])  # RESP2: [[stream, [entries]]]

    async def _claim(self, r: Redis) -> list[Entry]:
        """Entries idle longer than claim_idle at other consumers (dead ones) become ours."""
        idle_ms = int(self.claim_idle * 1000)
        reply = await r.xautoclaim(
            self.stream, self.group, self.consumer, idle_ms, start_id="0-0", count=BATCH
        )
        entries: list[Entry] = [(i, f) for i, f in reply[1] if i is not None]
        if entries:
            log.info("ingest: claimed %d entries left pending by another consumer", len(entries))
        await self._forget_dead(r)
        return entries

    async def _forget_dead(self, r: Redis) -> None:
        """Remove consumers idle for an hour with nothing pending (instances long gone)."""
        for info in await r.xinfo_consumers(self.stream, self.group):
            raw = info.get("name")
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            idle = int(info.get("inactive", info.get("idle", 0)) or 0)
            if name != self.consumer and not info.get("pending") and idle > FORGET_AFTER * 1000:
                await r.xgroup_delconsumer(self.stream, self.group, name)
