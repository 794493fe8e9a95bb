"""Presence across instances on NATS JetStream (see presence.py for the model).

Two key-value buckets (names from the broker URL's ``?prefix=``, ``P`` its
upper case; memory storage: presence is rebuilt by the next flushes anyway)::

    kv  P_LIVE       <i> -> JSON info (host, pid, totals, uptime); the bucket's
                     TTL is TIDINGS_PRESENCE_TTL, so an instance that stops
                     beating disappears from it
    kv  P_PRESENCE   <i>.r            this instance has records (for clean-up)
                     <i>.<T>.u.<U>    i's connections of user U in tenant T
                     <i>.<T>.t.<X>    i's connections reading topic X
                     <i>.<T>.s        JSON [connections, published, delivered, dropped]

Tenant, user and topic names are subject tokens: ``x`` + base32 (lower case,
no padding), as in the NATS backend. A heartbeat is an update of ``<i>``
expecting its last revision: if it expired (or was removed) meanwhile, the
update fails, and the caller rewrites this instance's records. A count that
drops to 0 is purged from the stream (no delete marker is left behind), so
listing a tenant's subjects (one STREAM.INFO request with a subject filter,
paged) lists its users. Reads keep to instances present in P_LIVE.

Clean-up of crashed instances: every TTL/2, an instance lists the registered
instances (``*.r``) and the live ones, and purges ``<i>.>`` of each
registered one that is not live. The last instance to stop deletes both
buckets. Another instance that loses a bucket this way re-creates it at its
next flush (a flush failure always re-creates and rewrites).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import api
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from ..errors import BackendUnavailable
from ..presence_store import USER, Change, InstanceView, Summary, TenantView, chunks, decode_summary
from .nats.layout import split_url, token, untoken

log = logging.getLogger("tidings.backends.nats_presence")

_TIMEOUT = 5.0
_BATCH = 256  # concurrent requests of one write
_STREAM_IN_USE = 10058  # stream name already in use with a different configuration


class NatsPresence:
    """`PresenceStore` on the broker's NATS: see the module docstring."""

    def __init__(self, url: str, instance: str, ttl: float) -> None:
        self.url, self.prefix = split_url(url)
        self.instance = instance
        self.ttl = ttl
        base = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.prefix).upper()
        self.live_bucket = base + "_LIVE"
        self.data_bucket = base + "_PRESENCE"
        self._nc: NATS | None = None
        self._js: Any = None
        self._live: Any = None
        self._data: Any = None
        self._rev: int | None = None  # our heartbeat's revision in P_LIVE
        self._swept = 0.0

    # -- plumbing --------------------------------------------------------------------

    def _stream(self, bucket: str) -> str:
        return "KV_" + bucket

    def _subject(self, bucket: str, key: str) -> str:
        return f"$KV.{bucket}.{key}"

    def _failed(self, exc: BaseException) -> BackendUnavailable:
        self._data = None  # set up again (buckets may be gone) and rewrite at the next flush
        return BackendUnavailable(f"presence on NATS failed: {exc or type(exc).__name__}")

    async def _bucket(self, name: str, ttl: float | None) -> Any:
        try:
            return await self._js.create_key_value(
                bucket=name, history=1, ttl=ttl, storage=api.StorageType.MEMORY
            )
        except APIError as exc:
            if exc.err_code != _STREAM_IN_USE:
                raise
        # Made by an instance with another TIDINGS_PRESENCE_TTL: the last one started wins.
        info = await self._js.stream_info(self._stream(name))
        if info.config.max_age != ttl:
            log.warning("presence bucket %s: TTL %s s -> %s s", name, info.config.max_age, ttl)
            await self._js.update_stream(info.config.evolve(max_age=ttl))
        return await self._js.key_value(name)

    async def _setup(self) -> None:
        if self._data is not None:
            return
        self._live = await self._bucket(self.live_bucket, self.ttl)
        self._data = await self._bucket(self.data_bucket, None)
        self._rev = None

    async def _subjects(self, bucket: str, pattern: str) -> list[str]:
        """Keys of `bucket` matching `pattern` (wildcards allowed), from the stream's state."""
        assert self._nc is not None
        stream, prefix = self._stream(bucket), f"$KV.{bucket}."
        found: list[str] = []
        while True:
            request: dict[str, Any] = {"subjects_filter": prefix + pattern}
            if found:
                request["offset"] = len(found)
            msg = await self._nc.request(
                f"$JS.API.STREAM.INFO.{stream}", orjson.dumps(request), timeout=_TIMEOUT
            )
            reply = orjson.loads(msg.data)
            if "error" in reply:
                if reply["error"].get("err_code") == 10059:  # stream not found: nothing stored
                    return []
                raise BackendUnavailable(f"presence on NATS: {reply['error'].get('description')}")
            subjects = (reply.get("state") or {}).get("subjects") or {}
            found += [s[len(prefix) :] for s in subjects]
            if not subjects or len(found) >= int(reply.get("total") or 0):
                return found

    async def _live_ids(self) -> list[str]:
        return await self._subjects(self.live_bucket, ">")

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._nc = await nats.connect(
                self.url,
                name="tidings-presence",
                connect_timeout=2,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                allow_reconnect=True,
                error_cb=self._error,
            )
            self._js = self._nc.jetstream(timeout=_TIMEOUT)
            await self._setup()
        except (NatsError, OSError, TimeoutError) as exc:
            await self.close()
            raise BackendUnavailable(f"presence: NATS does not answer: {exc}") from exc

    async def _error(self, exc: Exception) -> None:
        log.debug("nats (presence): %s", exc)

    async def close(self) -> None:
        self._live = self._data = self._rev = None  # bound to this connection
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    # -- writing ---------------------------------------------------------------------

    async def heartbeat(self, info: dict[str, Any]) -> bool:
        try:
            await self._setup()
            body = orjson.dumps(info)
            missing = self._rev is None
            if not missing:
                try:
                    self._rev = await self._live.update(self.instance, body, last=self._rev)
                except (KeyWrongLastSequenceError, APIError) as exc:
                    if isinstance(exc, APIError) and exc.err_code != 10071:
                        raise
                    missing = True  # expired (we were silent too long) or removed
            if missing:
                self._rev = await self._live.put(self.instance, body)
                await self._data.put(f"{self.instance}.r", b"1")
            now = time.monotonic()
            if now - self._swept > self.ttl / 2:
                self._swept = now
                await self._sweep()
        except (NatsError, OSError, TimeoutError) as exc:
            raise self._failed(exc) from exc
        return missing

    async def _sweep(self) -> None:
        """Purge what crashed instances left (registered, no longer live)."""
        registered = [key[: -len(".r")] for key in await self._subjects(self.data_bucket, "*.r")]
        if not registered:
            return
        live = set(await self._live_ids())
        for instance in registered:
            if instance not in live and instance != self.instance:
                log.info("presence: removing the records of instance %s (expired)", instance)
                await self._purge(f"{instance}.>")

    async def _purge(self, pattern: str) -> None:
        subject = self._subject(self.data_bucket, pattern)
        with contextlib.suppress(NotFoundError):
            await self._js.purge_stream(self._stream(self.data_bucket), subject=subject)

    async def write(
        self, changes: dict[Change, int], summaries: dict[str, Summary], *, full: bool
    ) -> None:
        me = self.instance
        ops: list[tuple[str, bytes | None]] = []  # key, value (None: purge)
        for (tenant, kind, name), count in changes.items():
            key = f"{me}.{token(tenant)}.{kind}.{token(name)}"
            ops.append((key, str(count).encode() if count else None))
        for tenant, summary in summaries.items():
            ops.append((f"{me}.{token(tenant)}.s", orjson.dumps(summary)))
        try:
            if full:
                await self._purge(f"{me}.>")
                await self._data.put(f"{me}.r", b"1")
            for batch in chunks(ops, _BATCH):
                await asyncio.gather(*(self._apply(key, value) for key, value in batch))
        except (NatsError, OSError, TimeoutError) as exc:
            raise self._failed(exc) from exc

    async def _apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            await self._purge(key)
        else:
            await self._data.put(key, value)

    async def remove(self) -> None:
        try:
            if self._data is None:
                return
            # Purged from the stream, not deleted: a delete marker would still list it.
            with contextlib.suppress(NotFoundError):
                await self._js.purge_stream(
                    self._stream(self.live_bucket),
                    subject=self._subject(self.live_bucket, self.instance),
                )
            await self._purge(f"{self.instance}.>")
            # The last one out removes the buckets (an instance starting meanwhile
            # re-creates them at its next flush).
            if not await self._live_ids() and not await self._subjects(self.data_bucket, ">"):
                for bucket in (self.live_bucket, self.data_bucket):
                    with contextlib.suppress(NotFoundError):
                        await self._js.delete_key_value(bucket)
        except (NatsError, OSError, TimeoutError) as exc:
            raise self._failed(exc) from exc

    # -- reading ---------------------------------------------------------------------

    async def _others(self) -> list[str]:
        return [i for i in await self._live_ids() if i != self.instance]

    async def users(self, tenant: str) -> set[str]:
        try:
            others = set(await self._others())
            if not others:
                return set()
            keys = await self._subjects(self.data_bucket, f"*.{token(tenant)}.{USER}.*")
        except (NatsError, OSError, TimeoutError) as exc:
            raise self._failed(exc) from exc
        users = set()
        for key in keys:
            instance, _, _, user = key.split(".")
            if instance in others:
                users.add(untoken(user))
        return users

    async def connections(self, tenant: str, user_id: str) -> int:
        try:
            others = await self._others()
            if not others:
                return 0
            await self._setup()
            suffix = f".{token(tenant)}.{USER}.{token(user_id)}"
            values = await asyncio.gather(*(self._get(i + suffix) for i in others))
        except (NatsError, OSError, TimeoutError) as exc:
            raise self._failed(exc) from exc
        return sum(int(v) for v in values if v)

    async def _get(self, key: str, bucket: Any = None) -> bytes | None:
        try:
            entry = await (bucket or self._data).get(key)
        except (KeyNotFoundError, NotFoundError):
            return None
        value: bytes | None = entry.value
        return value

    async def instances(self, tenant: str | None) -> list[InstanceView]:
        try:
            others = await self._others()
            if not others:
                return []
            await self._setup()
            infos = await asyncio.gather(*(self._get(i, self._live) for i in others))
            views = {
                i: InstanceView(i, orjson.loads(info) if info else {})
                for i, info in zip(others, infos, strict=True)
            }
            pattern = ">" if tenant is None else f"*.{token(tenant)}.>"
            summaries: list[tuple[TenantView, str]] = []
            for key in await self._subjects(self.data_bucket, pattern):
                parts = key.split(".")
                view = views.get(parts[0])
                if view is None or len(parts) < 3:
                    continue  # not live, or the `<i>.r` marker
                tv = view.tenants.setdefault(untoken(parts[1]), TenantView())
                if parts[2] == "s":
                    summaries.append((tv, key))
                elif parts[2] == USER:
                    tv.users.add(untoken(parts[3]))
                else:
                    tv.topics.add(untoken(parts[3]))
            for batch in chunks(summaries, _BATCH):
                values = await asyncio.gather(*(self._get(key) for _, key in batch))
                for (tv, _), value in zip(batch, values, strict=True):
                    if value:
                        tv.summary(decode_summary(value))
        except (NatsError, OSError, TimeoutError) as exc:
            raise self._failed(exc) from exc
        if tenant is not None:
            for view in views.values():
                view.tenants.setdefault(tenant, TenantView())
        return list(views.values())
