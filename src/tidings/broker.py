"""The local registry of connections and the fan-out of events to them.

The broker indexes this process's connections by stream key (a user's
personal stream, a topic, a tenant's broadcast) and offers each event the
backend hands it to every connection reading one of its streams. Opening a
connection registers it first (so live events are held, not missed), then
reads the backend's history after the client's cursor, then releases the
replay followed by the held events; positions drop anything seen twice.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from . import cursor as cursors
from .backends.base import Backend
from .connection import Connection
from .event import CONTROL, CloseReason, Event, stream_key, user_stream

log = logging.getLogger("tidings.broker")


@dataclass(slots=True)
class Resumption:
    """What opening a connection found: events to replay, or why it could not."""

    replay: list[Event] = field(default_factory=list)
    reset: str | None = None


@dataclass(slots=True)
class TenantCounts:
    published: int = 0
    delivered: int = 0
    dropped: int = 0
    connections: int = 0  # open here now


@dataclass(slots=True)
class BrokerStats:
    published: int = 0
    delivered: int = 0
    dropped: int = 0
    connects: int = 0
    disconnects: int = 0
    overflows: int = 0
    disconnect_reasons: dict[str, int] = field(default_factory=dict)


class Broker:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.stats = BrokerStats()
        self.connections: dict[str, Connection] = {}
        self._readers: dict[str, set[Connection]] = {}
        self.latency_observer: Callable[[float], None] | None = None
        self.tenant_counts: dict[str, TenantCounts] = {}
        # Stream keys whose local reader count changed since shared presence last
        # looked (presence.py swaps the set out); None: nobody looks, keep nothing.
        self.touched: set[str] | None = None

    # -- fan-out --------------------------------------------------------------

    def dispatch(self, event: Event) -> None:
        """The backend's callback: offer `event` to every local reader, once each."""
        tenant = event.tenant
        streams = event.streams
        if event.kind == CONTROL:
            self._control(event)
            return
        delivered = 0
        if len(streams) == 1:
            readers = self._readers.get(stream_key(tenant, streams[0][0]))
            if readers:
                for conn in tuple(readers):
                    delivered += conn.offer(event)
        else:
            seen: set[Connection] = set()
            for stream, _ in streams:
                readers = self._readers.get(stream_key(tenant, stream))
                if readers:
                    seen.update(readers)
            for conn in seen:
                delivered += conn.offer(event)
        self.stats.delivered += delivered
        counts = self.tenant_counts.get(tenant)
        if counts is None:
            counts = self.tenant_counts[tenant] = TenantCounts()
        counts.delivered += delivered
        if self.latency_observer is not None:
            self.latency_observer(time.time() - event.ts)

    def _control(self, event: Event) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        if event.name == "disconnect" and isinstance(data.get("user"), str):
            conns = self.user_connections(event.tenant, data["user"])
            self.close_all(CloseReason.DISCONNECTED, conns)
        else:
            log.warning("unknown control event %r ignored", event.name)

    # -- connections ----------------------------------------------------------

    async def attach(self, conn: Connection, cursor: str | None) -> Resumption:
        """Register `conn` and find what it missed since `cursor`.

        Live events for `conn` are held in `conn.pending` until `release()`.
        """
        conn.epoch = self.backend.epoch
        self.connections[conn.id] = conn
        self.stats.connects += 1
        counts = self.tenant_counts.get(conn.tenant)
        if counts is None:
            counts = self.tenant_counts[conn.tenant] = TenantCounts()
        counts.connections += 1
        try:
            await self._register(conn, conn.streams)
            return await self._resume(conn, cursor, conn.streams)
        except BaseException:
            self.detach(conn)  # the backend failed (or we were cancelled): leave no trace
            raise

    async def add_streams(
        self, conn: Connection, streams: list[str], cursor: str | None = None
    ) -> Resumption:
        """Let an open `conn` read `streams` too (a WebSocket `subscribe`).

        Each new stream resumes from its position in `cursor`, else starts live.
        As with `attach`, live events are held until `release()`.
        """
        if conn.pending is None:
            conn.pending = []
        new = conn.add_streams(streams)
        if conn.id not in self.connections:
            return Resumption()
        await self._register(conn, new)
        return await self._resume(conn, cursor, new)

    def remove_streams(self, conn: Connection, streams: list[str]) -> None:
        """Stop `conn` reading `streams` (a WebSocket `unsubscribe`)."""
        gone = conn.remove_streams(streams)
        if conn.id in self.connections:
            self._unregister(conn, gone)

    async def resume(self, conn: Connection, cursor: str) -> Resumption:
        """Replay to an open `conn` what followed `cursor` (a WebSocket `resume`).

        Streams the cursor names go back (or forward) to its positions; the others
        keep theirs. Live events are held until `release()`.
        """
        if conn.pending is None:
            conn.pending = []
        return await self._resume(conn, cursor, conn.streams)

    async def _register(self, conn: Connection, streams: list[str]) -> None:
        fresh = []
        touched = self.touched
        for stream in streams:
            key = stream_key(conn.tenant, stream)
            if touched is not None:
                touched.add(key)
            readers = self._readers.get(key)
            if readers is None:
                readers = self._readers[key] = set()
                fresh.append(key)
            readers.add(conn)
        if fresh:
            await self.backend.subscribe(fresh)

    def _unregister(self, conn: Connection, streams: list[str]) -> None:
        gone = []
        touched = self.touched
        for stream in streams:
            key = stream_key(conn.tenant, stream)
            if touched is not None:
                touched.add(key)
            readers = self._readers.get(key)
            if readers is not None:
                readers.discard(conn)
                if not readers:
                    del self._readers[key]
                    gone.append(key)
        if gone:
            task = asyncio.ensure_future(self.backend.unsubscribe(gone))
            task.add_done_callback(_log_failure)

    async def _resume(self, conn: Connection, cursor: str | None, streams: list[str]) -> Resumption:
        # A stream the cursor does not name keeps the connection's position (an open
        # connection's `resume`), or starts live (a new connection or stream).
        result = Resumption()
        streams = list(streams)
        tops = await self.backend.tops(conn.tenant, streams)
        wanted: dict[str, int] = {}
        if cursor is not None:
            try:
                epoch, positions = cursors.decode(cursor)
            except cursors.CursorError as exc:
                result.reset = str(exc)
            else:
                if epoch != conn.epoch:
                    result.reset = "history epoch changed (server restarted)"
                else:
                    by_hash = {conn.stream_hash(s): s for s in streams}
                    wanted = {by_hash[h]: seq for h, seq in positions.items() if h in by_hash}
        runs: list[list[Event]] = []
        for stream in streams:
            if not conn.reads(stream):
                continue  # removed while this awaited
            start = wanted.get(stream)
            if start is not None and start < tops[stream]:
                events = await self.backend.history(conn.tenant, stream, start)
                if events is None:
                    result.reset = result.reset or f"history of {stream[:1]}-stream no longer kept"
                    start = None
                else:
                    runs.append(events)
            elif start is not None and start > tops[stream]:
                result.reset = result.reset or "cursor is ahead of the history"
                start = None
            if start is None:
                start = conn.positions.get(stream, tops[stream])
            conn.set_position(stream, start)
        result.replay = _merge(runs)
        return result

    def release(self, conn: Connection, resumption: Resumption) -> None:
        """Deliver the replay, then the live events held since `attach`, then go live."""
        held, conn.pending = conn.pending or [], None
        count = 0
        for event in resumption.replay:
            count += conn.deliver(event, force=True)
        for event in held:
            count += conn.deliver(event, force=True)
        self.stats.delivered += count

    async def resync(self) -> None:
        """Catch every local connection up from history (the backend reconnected).

        While a backend's fan-out was cut off, other instances went on
        publishing; their events are in history. Each connection gets what
        follows its positions (duplicates are dropped by position, as ever).
        A connection whose history is gone, or that was opened under another
        epoch (the backend lost its data), is closed with DISCONNECTED: its
        client reconnects and gets a proper `reset`. Connections still
        opening hold what this finds until their `release`.
        """
        epoch = self.backend.epoch
        caught_up = 0
        for conn in tuple(self.connections.values()):
            if conn.closed is not None:
                continue
            if conn.epoch != epoch:
                conn.close(CloseReason.DISCONNECTED)
                continue
            runs: list[list[Event]] = []
            lost = False
            for stream in tuple(conn.streams):
                position = conn.positions.get(stream)
                if position is None:
                    continue  # not positioned yet: its own attach reads from now on
                events = await self.backend.history(conn.tenant, stream, position)
                if events is None:
                    lost = True
                    break
                if events:
                    runs.append(events)
            if lost:
                conn.close(CloseReason.DISCONNECTED)
                continue
            if conn.closed is not None or conn.id not in self.connections:
                continue
            for event in _merge(runs):
                caught_up += conn.offer(event)
        self.stats.delivered += caught_up
        if caught_up:
            log.info("resync: caught up %d deliveries from history", caught_up)

    def detach(self, conn: Connection) -> None:
        if self.connections.pop(conn.id, None) is None:
            return
        self.stats.disconnects += 1
        self.tenant_counts[conn.tenant].connections -= 1
        self._unregister(conn, conn.streams)
        if conn.closed is None:
            conn.close(CloseReason.CLIENT)
        reason = conn.closed.name.lower() if conn.closed else "client"
        reasons = self.stats.disconnect_reasons
        reasons[reason] = reasons.get(reason, 0) + 1
        if conn.closed is CloseReason.SLOW:
            # The unsent frames are lost to this socket, not to the client:
            # its reconnect replays them from history.
            self.stats.overflows += 1
            lost = len(conn.buffer) + 1
            self.stats.dropped += lost
            self.tenant_counts.setdefault(conn.tenant, TenantCounts()).dropped += lost
            conn.buffer.clear()

    # -- presence -------------------------------------------------------------

    def user_connections(self, tenant: str, user_id: str) -> list[Connection]:
        return list(self._readers.get(stream_key(tenant, user_stream(user_id)), ()))

    def readers(self, key: str) -> int:
        """How many local connections read the stream `key` (see `stream_key`)."""
        return len(self._readers.get(key, ()))

    def stream_readers(self) -> Iterator[tuple[str, int]]:
        """(stream key, local readers) of every stream read here."""
        for key, readers in self._readers.items():
            yield key, len(readers)

    def users(self, tenant: str | None = None) -> set[tuple[str, str]]:
        return {
            (c.tenant, c.user_id)
            for c in self.connections.values()
            if tenant is None or c.tenant == tenant
        }

    def topic_count(self, tenant: str | None = None) -> int:
        prefix = "" if tenant is None else tenant + "\x1ft:"
        return sum(
            1
            for key in self._readers
            if ("\x1ft:" in key if tenant is None else key.startswith(prefix))
        )

    def heartbeat(self) -> None:
        for conn in tuple(self.connections.values()):
            conn.heartbeat()

    def close_stalled(self, timeout: float) -> None:
        """Close connections whose writes have not completed for `timeout` seconds."""
        horizon = time.monotonic() - timeout
        for conn in tuple(self.connections.values()):
            if conn.busy_since and conn.busy_since < horizon:
                conn.close(CloseReason.TIMEOUT)

    def close_all(self, reason: CloseReason, conns: Iterable[Connection] | None = None) -> int:
        targets = tuple(self.connections.values() if conns is None else conns)
        for conn in targets:
            conn.close(reason)
        return len(targets)


def _merge(runs: list[list[Event]]) -> list[Event]:
    """Merge per-stream histories by publish time; each stream keeps its own order.

    An event on several streams appears in several runs; delivery drops the
    second copy because the connection's positions already passed it.
    """
    if len(runs) <= 1:  # nearly every opening: nothing to replay (no heapq.merge set up)
        return runs[0] if runs else []
    return list(heapq.merge(*runs, key=lambda e: e.ts))


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("backend unsubscribe failed", exc_info=task.exception())
