"""The Redis backend (`redis://`, `rediss://`): several instances form one service.

The keys it keeps and the Lua scripts that change them are redis_layout.py's.

Publishing is one Lua script: check the epoch, take the next position of each
stream (HINCRBY), XADD to each stream's history and PUBLISH the event, so
positions, history and fan-out always agree and the order on the channel is
the order of the positions. Positions are per-stream counters, contiguous and
small (they go into cursors), so `history(after)` is exact by arithmetic: the
entries after `after` must be exactly ``top - after`` ids ``after+1 … top``,
otherwise part of it was trimmed or expired and the answer is None. The
counters are kept without expiry (a few dozen bytes per stream ever used):
dropping one would restart a stream at 1 under the same epoch and make old
cursors point at new events.

Fan-out is one channel that every instance reads, filtered locally by the
broker (a dictionary lookup per event): the order of the channel is the order
of publishing, own events included, so per-stream order holds across
instances without any reordering logic. `subscribe`/`unsubscribe` are
therefore no-ops (see docs/scaling.md for the trade-off).

When the connection drops, `ready()` turns False and `publish` raises
`BackendUnavailable` until a reader task has reconnected (with backoff),
checked the epoch, subscribed again and let the broker catch every local
connection up from history (`Broker.resync`); events read from the channel
after that are deduplicated by position. If Redis lost its data or rolled
back to an older snapshot, a new epoch is set and local connections are
closed so their clients reconnect and get a `reset`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from ..errors import BackendUnavailable
from ..event import CONTROL, EVENT, Event
from .base import EventCallback
from .redis_layout import (
    EPOCH_ERROR,
    HISTORY,
    PUBLISH,
    PUBLISH_ONCE,
    SYNC_EPOCH,
    TOPS,
    split_url,
    tenant_part,
)

__all__ = ["RedisBackend", "split_url"]

log = logging.getLogger("tidings.backends.redis")

ResyncCallback = Callable[[], Awaitable[None]]

_PING_AFTER = 5.0  # seconds of silence on the channel before we ping it
_DEAD_AFTER = 15.0  # seconds without any answer: the connection is dead
_CLOSE_WAIT = 5.0  # seconds close() waits for the reader to stop
_BACKOFF_INITIAL = 0.05
_BACKOFF_MAX = 5.0
_CONNECT_TIMEOUT = 10.0  # at start-up, how long `connect()` waits for Redis


def _backoff(attempt: int) -> float:
    return random.uniform(0.5, 1.0) * min(_BACKOFF_MAX, _BACKOFF_INITIAL * 2.0 ** min(attempt, 16))


class RedisBackend:
    """`Backend` on one Redis (or a Sentinel/managed primary): see the module docstring."""

    def __init__(self, url: str, *, history_size: int = 1000, history_ttl: float = 86400.0) -> None:
        self.url, self.prefix = split_url(url)
        self.epoch = ""
        self._epoch_bytes = b""
        self._size = history_size
        self._ttl_ms = int(history_ttl * 1000)
        self._ttl = history_ttl
        p = self.prefix
        self._epoch_key = p + ":epoch"
        self._gen_key = p + ":gen"
        self.channel = p + ":ev"
        # No automatic retries: a publish that might have run must not run twice
        # behind our back, and an error should become a 503 now, not in a minute.
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            self.url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=2.0,
            socket_timeout=10.0,
            health_check_interval=0,
        )
        self._publish = self._redis.register_script(PUBLISH)
        self._publish_once = self._redis.register_script(PUBLISH_ONCE)
        self._history = self._redis.register_script(HISTORY)
        self._tops = self._redis.register_script(TOPS)
        self._sync = self._redis.register_script(SYNC_EPOCH)
        self._on_event: EventCallback | None = None
        self.on_resync: ResyncCallback | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._ready = False
        self._gen_seen = 0
        self._kick = False  # an epoch error: the reader must re-check and resync
        self._first: asyncio.Future[None] | None = None
        self.epoch_check_interval = 5.0  # seconds between checks that the epoch still holds
        self.reconnects = 0  # how many times the reader came back (for tests and metrics)
        self.received = 0  # events read from the channel

    # -- keys -----------------------------------------------------------------

    def _counters(self, tenant: str) -> str:
        return f"{self.prefix}:n:{tenant_part(tenant)}"

    def _hkey(self, tenant: str, stream: str) -> str:
        return f"{self.prefix}:h:{tenant_part(tenant)}:{stream}"

    def _claim_key(self, key: str) -> str:
        return f"{self.prefix}:k:{key}"

    # -- lifecycle --------------------------------------------------------------

    async def connect(
        self, on_event: EventCallback, on_resync: ResyncCallback | None = None
    ) -> None:
        """Start reading the channel; returns once subscribed, raises if Redis does not answer.

        `on_resync` (default: the `resync` of the broker whose `dispatch` is `on_event`)
        is awaited after every reconnect, before live events flow again.
        """
        self._on_event = on_event
        if on_resync is None:
            on_resync = getattr(getattr(on_event, "__self__", None), "resync", None)
        self.on_resync = on_resync
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._closing = False
        self._reader = asyncio.create_task(self._read_forever(), name="tidings-redis-reader")
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                await asyncio.shield(self._first)
        except TimeoutError:
            await self.close()
            raise BackendUnavailable(f"Redis at {self._where()} did not answer") from None

    async def close(self) -> None:
        self._ready = False
        self._closing = True
        reader, self._reader = self._reader, None
        if reader is not None:
            # redis-py can swallow a cancellation inside a read; the flag ends the loop
            # then, and the wait is bounded so a stuck read never holds up shutdown.
            reader.cancel()
            await asyncio.wait({reader}, timeout=_CLOSE_WAIT)
        self._on_event = None
        await self._redis.aclose()

    async def ready(self) -> bool:
        if not self._ready:
            return False
        try:
            async with asyncio.timeout(2.0):
                await self._redis.ping()
        except (RedisError, OSError, TimeoutError):
            return False
        return True

    def _where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or 6379}"

    # -- the reader -------------------------------------------------------------

    async def _read_forever(self) -> None:
        attempt = 0
        while not self._closing:
            pubsub = self._redis.pubsub()
            try:
                await self._subscribe(pubsub)
                await self._sync_epoch()
                if self._first is not None and not self._first.done():
                    self._first.set_result(None)
                elif self.on_resync is not None:
                    # Events published while we were away are in history: catch up
                    # before reading on (the channel buffers meanwhile).
                    await self.on_resync()
                self._ready = True
                if attempt:
                    self.reconnects += 1
                    log.warning("reconnected to Redis at %s", self._where())
                attempt = 0
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever broke, start over on a new connection
                if self._ready or attempt == 0:
                    log.warning("lost Redis at %s: %s; reconnecting", self._where(), exc)
                self._ready = False
            finally:
                self._ready = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(_backoff(attempt))
            attempt += 1

    async def _subscribe(self, pubsub: aioredis.client.PubSub) -> None:
        await pubsub.subscribe(self.channel)
        async with asyncio.timeout(_DEAD_AFTER):
            while True:  # only messages after this confirmation can follow
                message = await pubsub.get_message(timeout=_DEAD_AFTER)
                if message is not None and message["type"] == "subscribe":
                    return

    async def _sync_epoch(self) -> None:
        candidate = "r" + secrets.token_hex(5)
        epoch, gen = await self._sync(
            keys=[self._epoch_key, self._gen_key],
            args=[candidate, self.epoch, self._gen_seen],
        )
        epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        if epoch != self.epoch:
            if self.epoch:
                log.warning(
                    "Redis history changed (data lost or rolled back): epoch %s -> %s; "
                    "clients will reconnect and get a reset",
                    self.epoch,
                    epoch,
                )
            self.epoch = epoch
            self._epoch_bytes = epoch.encode()
            self._gen_seen = int(gen)
        self._kick = False

    async def _read(self, pubsub: aioredis.client.PubSub) -> None:
        on_event = self._on_event
        last = time.monotonic()
        pinged = False
        checked = last
        while not self._kick:
            message = await pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if now - checked > self.epoch_check_interval:
                # A FLUSHALL leaves our connections up; an idle instance finds out here.
                checked = now
                if await self._redis.get(self._epoch_key) != self._epoch_bytes:
                    break
            if message is None:
                if now - last > _DEAD_AFTER:
                    raise ConnectionError("no answer from Redis")
                if now - last > _PING_AFTER and not pinged:
                    await pubsub.ping()
                    pinged = True
                continue
            last, pinged = now, False
            if message["type"] != "message":
                continue
            raw: bytes = message["data"]
            gen, epoch, body = raw.split(b" ", 2)
            g = int(gen)
            if g and epoch != self._epoch_bytes:
                break  # published under another epoch: Redis lost its data, re-check
            try:
                event = Event.from_json(body)
            except (ValueError, KeyError, TypeError):
                log.warning("ignored a malformed event on %s", self.channel)
                continue
            if g > self._gen_seen:
                self._gen_seen = g
            self.received += 1
            if on_event is not None:
                on_event(event)
        raise ConnectionError("the history epoch changed under us")

    # -- test hooks: cut the fan-out off as a dropped connection would ---------------

    async def pause_fanout(self) -> None:
        """Stop reading the channel and be unavailable (as if the connection dropped)."""
        reader, self._reader = self._reader, None
        self._ready = False
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def resume_fanout(self) -> None:
        """Reconnect as after a drop: re-check the epoch, resync, read on."""
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_forever(), name="tidings-redis-reader")

    # -- publishing -------------------------------------------------------------

    def _check(self) -> None:
        if not self._ready:
            raise BackendUnavailable(f"the broker (Redis at {self._where()}) is unavailable")

    def _failed(self, exc: Exception) -> BackendUnavailable:
        if isinstance(exc, ResponseError) and EPOCH_ERROR in str(exc):
            self._kick = True
            self._ready = False
            return BackendUnavailable("the broker's history changed; retry shortly")
        return BackendUnavailable(f"the broker (Redis at {self._where()}) failed: {exc}")

    async def publish(
        self,
        tenant: str,
        streams: Sequence[str],
        name: str,
        data: Any,
        event_id: str,
        kind: str = EVENT,
    ) -> Event:
        self._check()
        ts = time.time()
        fields = {"id": event_id, "tenant": tenant, "name": name, "data": data, "ts": ts}
        fields["kind"] = kind
        if kind == CONTROL:
            # Instructions to every instance, not history: no positions.
            event = Event(event_id, tenant, name, data, tuple((s, 0) for s in streams), ts, kind)
            try:
                await self._redis.publish(self.channel, b"0 - " + event.to_json())
            except (RedisError, OSError) as exc:
                raise self._failed(exc) from exc
            return event
        published = await self._scripted(None, 0.0, fields, streams)
        assert isinstance(published, Event)  # no claim, so never an earlier id
        return published

    async def publish_once(
        self,
        key: str,
        ttl: float,
        tenant: str,
        streams: Sequence[str],
        name: str,
        data: Any,
        event_id: str,
    ) -> Event | str:
        """`publish` unless `key` is claimed; claims it for `ttl` s. -> the event, or the
        earlier publish's event id. One script: the claim exists if and only if the
        publish happened (`Hub.publish_message`)."""
        self._check()
        fields = {"id": event_id, "tenant": tenant, "name": name, "data": data}
        fields.update(ts=time.time(), kind=EVENT)
        return await self._scripted(key, ttl, fields, streams)

    async def _scripted(
        self, claim: str | None, ttl: float, fields: dict[str, Any], streams: Sequence[str]
    ) -> Event | str:
        """The event of `fields` through PUBLISH, or PUBLISH_ONCE with `claim` for `ttl` s
        (redis_layout.py): the event with its positions, or a claim's earlier event id."""
        tenant = fields["tenant"]
        head = orjson.dumps(fields)[:-1] + b',"streams":'
        keys = [self._epoch_key, self._gen_key, self._counters(tenant)]
        args: list[Any] = [self.epoch, self._size, self._ttl_ms, self.channel, head, b"}"]
        for stream in streams:
            keys.append(self._hkey(tenant, stream))
            args += [stream, orjson.dumps(stream), "1" if stream.startswith("u:") else "0"]
        script = self._publish
        if claim is not None:
            script = self._publish_once
            keys.insert(0, self._claim_key(claim))
            args[:0] = [fields["id"], max(1, int(ttl * 1000))]
        try:
            out = await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from exc
        if out and out[0] == b"claimed":
            return bytes(out[1]).decode()
        positions = tuple((s, int(q)) for s, q in zip(streams, out, strict=True))
        return Event(
            fields["id"],
            tenant,
            fields["name"],
            fields["data"],
            positions,
            fields["ts"],
            fields["kind"],
        )

    async def subscribe(self, keys: Iterable[str]) -> None:
        return None  # one channel for all (module docstring)

    async def unsubscribe(self, keys: Iterable[str]) -> None:
        return None

    # -- history ----------------------------------------------------------------

    # Reads need no readiness check: the scripts refuse a stale epoch, and a
    # reconnect's catch-up (`Broker.resync`) reads history before we are ready.

    async def tops(self, tenant: str, streams: Sequence[str]) -> dict[str, int]:
        if not streams:
            return {}
        try:
            values = await self._tops(
                keys=[self._epoch_key, self._counters(tenant)], args=[self.epoch, *streams]
            )
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from exc
        return {s: int(v) for s, v in zip(streams, values, strict=True)}

    async def history(self, tenant: str, stream: str, after: int) -> list[Event] | None:
        try:
            reply = await self._history(
                keys=[self._epoch_key, self._counters(tenant), self._hkey(tenant, stream)],
                args=[self.epoch, stream, after, self._size],
            )
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from exc
        top = int(reply[0])
        if after > top:
            return None  # from the future: another history's cursor
        if after == top:
            return []
        count = top - after
        entries = reply[1:]
        if len(entries) != 2 * count or entries[0] != f"{after + 1}-0".encode():
            return None  # trimmed (size), expired (TTL) or never kept (size 0)
        events = [Event.from_json(body) for body in entries[1::2]]
        if self._ttl > 0 and events[0].ts < time.time() - self._ttl:
            return None  # older than the window, even if Redis still has it
        return events

    # -- shared keys ------------------------------------------------------------

    async def claim(self, key: str, value: str, ttl: float) -> str | None:
        try:
            earlier = await self._redis.set(
                self._claim_key(key), value, nx=True, px=max(1, int(ttl * 1000)), get=True
            )
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from exc
        if earlier is None:
            return None
        return earlier.decode() if isinstance(earlier, bytes) else str(earlier)

    async def release(self, key: str) -> None:
        try:
            await self._redis.delete(self._claim_key(key))
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from exc
