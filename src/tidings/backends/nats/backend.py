"""`NatsBackend`: the connection, its recovery, the fan-out reader and shared keys.

Publishing is writer.py, history reader.py; this module connects them to one
NATS connection and to the broker. The fan-out is an ephemeral push consumer
on the commits stream that every instance reads from the last sequence it
dispatched: each commit once, with every position, in the stream's order —
which, per tenant, is the chain order and so the position order of every
stream. A commit whose ``prev`` is not the last one this instance dispatched
for its tenant means commits were missed (trimmed before this instance read
them): the broker first catches every local connection up from history
(`Broker.resync`), then the commit is dispatched.

When NATS goes away, `ready()` turns False and `publish` raises
`BackendUnavailable`; nats-py reconnects (with backoff), and a recovery task
re-checks the set-up and the epoch, lets the broker catch up from history and
re-creates the consumer after the last commit it dispatched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import api

from ...errors import BackendUnavailable
from ...event import CONTROL, EVENT, Event
from ..base import EventCallback
from .layout import Names, decode_commit, split_url, token
from .reader import Reader
from .store import Store
from .views import Views
from .writer import Writer

log = logging.getLogger("tidings.backends.nats")

ResyncCallback = Callable[[], Awaitable[None]]

_TIMEOUT = 5.0  # seconds for one JetStream request
_FAILURES = (NatsError, OSError, TimeoutError)


class NatsBackend:
    """`Backend` on NATS JetStream: see the package docstring."""

    def __init__(self, url: str, *, history_size: int = 1000, history_ttl: float = 86400.0) -> None:
        self.url, self.prefix = split_url(url)
        self.names = Names.of(self.prefix)
        self.epoch = ""
        # the names as earlier versions called them (tools that clean up use them)
        self.stream = self.names.history
        self.seq_bucket = self.names.counters
        self.idem_bucket = self.names.claims
        self._size = history_size
        self._ttl = history_ttl
        self._nc: NATS | None = None
        self._store: Store | None = None
        self._views: Views | None = None
        self._writer: Writer | None = None
        self._reader: Reader | None = None
        self._on_event: EventCallback | None = None
        self.on_resync: ResyncCallback | None = None
        self._sub: Any = None
        self._ctl_sub: Any = None
        self._last_sseq = 0  # the commits stream's sequence of the last commit dispatched
        self._chains: dict[str, int] = {}  # tenant -> sequence of its last commit dispatched
        self._ready = False
        self._closing = False
        self._recovery: asyncio.Task[None] | None = None
        self.reconnects = 0
        self.received = 0  # events read from the fan-out

    def all_streams(self) -> list[str]:
        """Every JetStream stream of this layout (to delete a test's or a benchmark's)."""
        return self.names.streams()

    # -- lifecycle ------------------------------------------------------------------

    async def connect(
        self, on_event: EventCallback, on_resync: ResyncCallback | None = None
    ) -> None:
        """Connect, set up the streams and buckets, start reading; raises if NATS does not answer.

        `on_resync` (default: the `resync` of the broker whose `dispatch` is `on_event`)
        is awaited after every reconnect, before the fan-out goes on.
        """
        self._on_event = on_event
        if on_resync is None:
            on_resync = getattr(getattr(on_event, "__self__", None), "resync", None)
        self.on_resync = on_resync
        try:
            self._nc = await nats.connect(
                self.url,
                connect_timeout=2,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                allow_reconnect=True,
                disconnected_cb=self._disconnected,
                reconnected_cb=self._reconnected,
                error_cb=self._error,
            )
            js = self._nc.jetstream(timeout=_TIMEOUT)
            store = self._store = Store(
                js, self.names, history_size=self._size, history_ttl=self._ttl, timeout=_TIMEOUT
            )
            self._views = Views(store.last_commit, store.counter)
            self._writer = Writer(store, self._views)
            self._reader = Reader(store, self._views, self._writer)
            await store.setup()
            await self._sync_epoch()
            self._last_sseq = await store.last_seq(self.names.commits)  # from now on
            await self._consume()
        except (TimeoutError, *_FAILURES) as exc:
            await self.close()
            raise BackendUnavailable(f"NATS at {self._where()} did not answer: {exc}") from exc
        self._ready = True

    async def _sync_epoch(self) -> None:
        """Read (or set) the epoch; after a reconnect, notice a commits stream made anew."""
        assert self._store is not None and self._views is not None
        epoch, made = await self._store.sync_epoch()
        first, last = await self._store.bounds(self.names.commits)
        changed = bool(self.epoch) and epoch != self.epoch
        if changed:
            log.warning(
                "NATS history changed: epoch %s -> %s; clients will reset", self.epoch, epoch
            )
        if changed or made or last < self._last_sseq:
            # Everything the stream holds now was written since (NATS lost its data,
            # or the commits were purged): read it all, as new.
            self._last_sseq = max(0, first - 1) if self.epoch else last
            self._views.clear()
            self._chains.clear()
        self.epoch = epoch

    async def _consume(self) -> None:
        assert self._nc is not None and self._store is not None
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._last_sseq + 1,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=60.0,
        )
        self._sub = await self._store.js.subscribe(
            f"{self.prefix}.e.>",
            stream=self.names.commits,
            config=config,
            cb=self._on_commit,
            flow_control=True,
            idle_heartbeat=5.0,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        if self._ctl_sub is None:
            self._ctl_sub = await self._nc.subscribe(
                self.names.control_subject, cb=self._on_control
            )

    async def close(self) -> None:
        self._closing = True
        self._ready = False
        recovery, self._recovery = self._recovery, None
        if recovery is not None:
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recovery
        if self._writer is not None:
            await self._writer.close()
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
            with contextlib.suppress(Exception):
                await nc.close()
        self._on_event = None

    async def ready(self) -> bool:
        nc = self._nc
        if not self._ready or nc is None or not nc.is_connected:
            return False
        try:
            await nc.flush(timeout=2)
        except _FAILURES:
            return False
        return True

    def _where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or 4222}"

    # -- connection events ----------------------------------------------------------

    async def _disconnected(self) -> None:
        if not self._closing:
            if self._ready:
                log.warning("lost NATS at %s; reconnecting", self._where())
            self._ready = False

    async def _reconnected(self) -> None:
        if self._closing:
            return
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover(), name="tidings-nats-recover")

    async def _error(self, exc: Exception) -> None:
        log.debug("nats: %s", exc)

    async def _recover(self) -> None:
        assert self._store is not None and self._views is not None
        attempt = 0
        while not self._closing:
            try:
                await self._drop_subscription()
                await self._store.setup()  # the server may have lost them
                await self._sync_epoch()
                self._views.clear()  # re-learn each tenant's chain from NATS
                if self.on_resync is not None:
                    await self.on_resync()
                await self._consume()
                self._ready = True
                self.reconnects += 1
                log.warning("reconnected to NATS at %s", self._where())
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("NATS recovery failed (%s); retrying", exc)
                await asyncio.sleep(min(5.0, 0.1 * 2**attempt))
                attempt += 1

    async def _drop_subscription(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # -- test hooks: cut the fan-out off as a lost connection would ----------------

    async def pause_fanout(self) -> None:
        self._ready = False
        await self._drop_subscription()

    async def resume_fanout(self) -> None:
        await self._reconnected()
        if self._recovery is not None:
            await self._recovery

    # -- fan-out --------------------------------------------------------------------

    async def _on_commit(self, msg: Msg) -> None:
        try:
            sseq = msg.metadata.sequence.stream
        except Exception:  # flow-control and heartbeat messages have no metadata
            return
        if sseq <= self._last_sseq:
            return  # dispatched before a re-subscribe
        try:
            tenant, prev, events = decode_commit(msg.data)
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed commit on %s", msg.subject)
            self._last_sseq = sseq
            return
        last = self._chains.get(tenant)
        if last is not None and prev != last and self._views is not None:
            # Commits of this tenant were trimmed before we read them: bring the
            # view up to date, then every local connection, from history.
            log.warning("fan-out missed commits %d..%d; catching up from history", last, prev)
            await self._views.reload(tenant)
            if self.on_resync is not None:
                await self.on_resync()
        self._chains[tenant] = sseq
        self._last_sseq = sseq
        if self._views is not None:
            self._views.apply(tenant, sseq, prev, events)
        self.received += len(events)
        on_event = self._on_event
        if on_event is not None:
            for event in events:
                on_event(event)

    async def _on_control(self, msg: Msg) -> None:
        try:
            event = Event.from_json(msg.data)
        except (ValueError, KeyError, TypeError):
            return
        if self._on_event is not None:
            self._on_event(event)

    # -- publishing -----------------------------------------------------------------

    def _check(self) -> None:
        if not self._ready or self._nc is None or not self._nc.is_connected:
            raise BackendUnavailable(f"the broker (NATS at {self._where()}) is unavailable")

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
        assert self._nc is not None and self._writer is not None
        if kind == CONTROL:
            # Instructions to every instance, not history: no positions.
            event = Event(event_id, tenant, name, data, tuple((s, 0) for s in streams), kind=kind)
            try:
                await self._nc.publish(self.names.control_subject, event.to_json())
                await self._nc.flush(timeout=int(_TIMEOUT))
            except _FAILURES as exc:
                raise BackendUnavailable(f"the broker (NATS) failed: {exc}") from exc
            return event
        try:
            return await self._writer.publish(tenant, tuple(streams), name, data, event_id, kind)
        except _FAILURES as exc:
            raise BackendUnavailable(f"the broker (NATS) failed: {exc}") from exc

    async def subscribe(self, keys: Iterable[str]) -> None:
        return None  # every instance reads every commit (module docstring)

    async def unsubscribe(self, keys: Iterable[str]) -> None:
        return None

    # -- history --------------------------------------------------------------------

    # Reads need no readiness check beyond a live connection: a reconnect's
    # catch-up (`Broker.resync`) reads history before we are ready again.

    def _check_connected(self) -> Reader:
        if self._nc is None or not self._nc.is_connected or not self.epoch:
            raise BackendUnavailable(f"the broker (NATS at {self._where()}) is unavailable")
        assert self._reader is not None
        return self._reader

    async def tops(self, tenant: str, streams: Sequence[str]) -> dict[str, int]:
        reader = self._check_connected()
        if not streams:
            return {}
        try:
            return await reader.tops(tenant, list(streams))
        except _FAILURES as exc:
            raise BackendUnavailable(f"the broker (NATS) failed: {exc}") from exc

    async def history(self, tenant: str, stream: str, after: int) -> list[Event] | None:
        reader = self._check_connected()
        try:
            return await reader.history(tenant, stream, after)
        except _FAILURES as exc:
            raise BackendUnavailable(f"the broker (NATS) failed: {exc}") from exc

    # -- shared keys ----------------------------------------------------------------

    async def claim(self, key: str, value: str, ttl: float) -> str | None:
        self._check_connected()
        assert self._store is not None
        try:
            return await self._store.claim(token(key), value, ttl)
        except _FAILURES as exc:
            raise BackendUnavailable(f"the broker (NATS) failed: {exc}") from exc

    async def release(self, key: str) -> None:
        self._check_connected()
        assert self._store is not None
        try:
            await self._store.release(token(key))
        except _FAILURES as exc:
            raise BackendUnavailable(f"the broker (NATS) failed: {exc}") from exc
