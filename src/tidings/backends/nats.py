"""The NATS JetStream backend (`nats://`): several instances on one NATS form one service.

Layout (names from the URL's ``?prefix=``, default ``tidings``; ``P`` is its upper case)::

    stream  P_H     subjects <p>.h.<tenant>.<stream>: one message per event and
                    stream, header Tidings-Pos = the event's position there;
                    MaxMsgsPerSubject = history_size, MaxAge = history_ttl
    kv      P_SEQ   <tenant>.<stream> -> the highest position ever reserved
                    (so a stream whose history expired whole goes on counting),
                    and `epoch`
    kv      P_IDEM  idempotency claims (create = set if absent; the bucket's TTL)
    subject <p>.ctl control events (core NATS, to every instance)

Tenant and stream names become subject tokens as ``x`` + base32 (lower case,
no padding): any name, no ``.``/``*``/``>``, never empty.

Positions are contiguous per stream. A publish appends to each stream's
subject with ``Nats-Expected-Last-Subject-Sequence`` = the stream sequence of
the subject's last message (optimistic concurrency): the append that wins
takes position last+1, a loser re-reads and retries. So on each subject,
stream order is position order. Before appending, the position is reserved
in P_SEQ (compare-and-set, only upwards): a crash between the two leaves a
gap, never a reused position. `history(after)` reads the subject and is
exact by arithmetic (positions after+1 … top, all there, or None).

Each message carries the event with the positions a connection needs to
drop the copies it gets on its other streams: a user-stream copy has its own
position and those of the event's topics and broadcast; a topic or broadcast
copy has all of them. Fan-out is an ephemeral push consumer on ``<p>.h.>``
that every instance reads from its last stream sequence on: stream order per
subject is position order, so per-stream order holds across instances.

When NATS goes away, `ready()` turns False and `publish` raises
`BackendUnavailable`; nats-py reconnects (backoff), and then a recovery task
re-checks the epoch, lets the broker catch every local connection up from
history (`Broker.resync`) and re-creates the consumer after the last
message it saw.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import api
from nats.js.errors import (
    APIError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)

from ..errors import BackendUnavailable
from ..event import CONTROL, EVENT, Event
from .base import EventCallback

log = logging.getLogger("tidings.backends.nats")

ResyncCallback = Callable[[], Awaitable[None]]

POS = "Tidings-Pos"
_WRONG_LAST_SEQUENCE = 10071
_RETRIES = 50
_TIMEOUT = 5.0
_GAP_WAIT = 2.0  # seconds an append waits for its predecessor before leaving a gap


def split_url(url: str) -> tuple[str, str]:
    """-> (the URL for nats-py, the name prefix from ``?prefix=``, default ``tidings``)."""
    parts = urlsplit(url)
    prefix = "tidings"
    kept = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "prefix":
            prefix = value or prefix
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), prefix


def token(name: str) -> str:
    """A subject token (and KV key part) for any string."""
    return "x" + base64.b32encode(name.encode()).decode().rstrip("=").lower()


def _copy_streams(positions: list[tuple[str, int]], own: str) -> list[tuple[str, int]]:
    # A user stream's copy: itself and the shared streams (other users' are no
    # connection's business). A shared stream's copy: everything.
    if not own.startswith("u:"):
        return positions
    return [(s, q) for s, q in positions if s == own or not s.startswith("u:")]


class NatsBackend:
    """`Backend` on NATS JetStream: see the module docstring."""

    def __init__(self, url: str, *, history_size: int = 1000, history_ttl: float = 86400.0) -> None:
        self.url, self.prefix = split_url(url)
        self.epoch = ""
        base = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.prefix).upper()
        self.stream = base + "_H"
        self.seq_bucket = base + "_SEQ"
        self.idem_bucket = base + "_IDEM"
        self._size = history_size
        self._ttl = history_ttl
        self._nc: NATS | None = None
        self._js: Any = None
        self._seq_kv: Any = None
        self._idem_kv: Any = None
        self._idem_ttl: float | None = None
        self._on_event: EventCallback | None = None
        self.on_resync: ResyncCallback | None = None
        self._sub: Any = None
        self._ctl_sub: Any = None
        self._last_sseq = 0  # the stream sequence of the last message dispatched
        self._ready = False
        self._closing = False
        self._recovery: asyncio.Task[None] | None = None
        self._tails: dict[str, tuple[int, int]] = {}  # subject -> (stream seq, position)
        self._floors: dict[str, tuple[int, int]] = {}  # kv key -> (revision, reserved)
        self.reconnects = 0
        self.received = 0

    # -- names ----------------------------------------------------------------------

    def _subject(self, tenant: str, stream: str) -> str:
        return f"{self.prefix}.h.{token(tenant)}.{token(stream)}"

    def _floor_key(self, tenant: str, stream: str) -> str:
        return f"{token(tenant)}.{token(stream)}"

    # -- lifecycle ------------------------------------------------------------------

    async def connect(
        self, on_event: EventCallback, on_resync: ResyncCallback | None = None
    ) -> None:
        """Connect, set up the stream and buckets, start reading; raises if NATS does not answer.

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
            self._js = self._nc.jetstream(timeout=_TIMEOUT)
            await self._setup()
            await self._sync_epoch()
            info = await self._js.stream_info(self.stream)
            self._last_sseq = info.state.last_seq
            await self._consume()
        except (NatsError, OSError, TimeoutError) as exc:
            await self.close()
            raise BackendUnavailable(f"NATS at {self._where()} did not answer: {exc}") from exc
        self._ready = True

    async def _setup(self) -> None:
        config = api.StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.h.>"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.OLD,
            max_msgs_per_subject=max(1, self._size),
            max_age=self._ttl if self._ttl > 0 else None,
            duplicate_window=min(1.0, self._ttl) if self._ttl > 0 else 1.0,
        )
        try:
            await self._js.add_stream(config)
        except APIError as exc:
            if exc.err_code != 10058:  # stream name already in use (other settings): update
                raise
            await self._js.update_stream(config)
        self._seq_kv = await self._js.create_key_value(bucket=self.seq_bucket, history=1)

    async def _sync_epoch(self) -> None:
        candidate = "n" + secrets.token_hex(5)
        try:
            await self._seq_kv.create("epoch", candidate.encode())
            epoch = candidate
        except KeyWrongLastSequenceError:
            epoch = (await self._seq_kv.get("epoch")).value.decode()
        if self.epoch and epoch != self.epoch:
            log.warning(
                "NATS history changed: epoch %s -> %s; clients will reset", self.epoch, epoch
            )
            self._tails.clear()
            self._floors.clear()
        self.epoch = epoch

    async def _consume(self) -> None:
        assert self._nc is not None
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._last_sseq + 1,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=60.0,
        )
        self._sub = await self._js.subscribe(
            f"{self.prefix}.h.>",
            stream=self.stream,
            config=config,
            cb=self._on_message,
            flow_control=True,
            idle_heartbeat=5.0,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        if self._ctl_sub is None:
            self._ctl_sub = await self._nc.subscribe(f"{self.prefix}.ctl", cb=self._on_control)

    async def close(self) -> None:
        self._closing = True
        self._ready = False
        recovery, self._recovery = self._recovery, None
        if recovery is not None:
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recovery
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
        except (NatsError, OSError, TimeoutError):
            return False
        return True

    def _where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or 4222}"

    # -- connection events ------------------------------------------------------------

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
        attempt = 0
        while not self._closing:
            try:
                await self._drop_subscription()
                await self._setup()  # the server may have lost them
                await self._sync_epoch()
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

    # -- test hooks: cut the fan-out off as a lost connection would ------------------

    async def pause_fanout(self) -> None:
        self._ready = False
        await self._drop_subscription()

    async def resume_fanout(self) -> None:
        await self._reconnected()
        if self._recovery is not None:
            await self._recovery

    # -- fan-out ----------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        if msg.subject.startswith(f"{self.prefix}.h.") is False:
            return
        try:
            sseq = msg.metadata.sequence.stream
        except Exception:  # flow-control and heartbeat messages have no metadata
            return
        if sseq <= self._last_sseq:
            return  # seen before a re-subscribe
        self._last_sseq = sseq
        try:
            event = Event.from_json(msg.data)
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed message on %s", msg.subject)
            return
        self.received += 1
        if self._on_event is not None:
            self._on_event(event)

    async def _on_control(self, msg: Msg) -> None:
        try:
            event = Event.from_json(msg.data)
        except (ValueError, KeyError, TypeError):
            return
        if self._on_event is not None:
            self._on_event(event)

    # -- publishing -------------------------------------------------------------------

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
        assert self._nc is not None
        ts = time.time()
        if kind == CONTROL:
            event = Event(event_id, tenant, name, data, tuple((s, 0) for s in streams), ts, kind)
            try:
                await self._nc.publish(f"{self.prefix}.ctl", event.to_json())
                await self._nc.flush(timeout=int(_TIMEOUT))
            except (NatsError, OSError, TimeoutError) as exc:
                raise BackendUnavailable(f"the broker (NATS) failed: {exc}") from exc
            return event
        head = orjson.dumps(
            {"id": event_id, "tenant": tenant, "name": name, "data": data, "ts": ts, "kind": kind}
        )[:-1]
        try:
            # 1. Take each stream's next position (compare-and-set on its counter)…
            reserved = await asyncio.gather(*(self._next(tenant, s) for s in streams))
            positions = list(zip(streams, reserved, strict=True))
            # 2. …then append each copy, with every position final, in position order.
            await asyncio.gather(
                *(self._append(tenant, s, q, head, positions) for s, q in positions)
            )
        except (NatsError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"the broker (NATS) failed: {exc}") from exc
        return Event(event_id, tenant, name, data, tuple(positions), ts)

    async def _tail(self, subject: str) -> tuple[int, int | None]:
        """(stream seq of the subject's last message, its position), or (0, None) if empty."""
        tail = self._tails.get(subject)
        if tail is not None:
            return tail
        try:
            msg = await self._js.get_last_msg(self.stream, subject)
        except NotFoundError:
            return 0, None
        return msg.seq, int((msg.headers or {}).get(POS, "0"))

    async def _counter(self, tenant: str, stream: str) -> int:
        try:
            entry = await self._seq_kv.get(self._floor_key(tenant, stream))
        except KeyNotFoundError:
            return 0
        return int(entry.value or b"0")

    async def _next(self, tenant: str, stream: str) -> int:
        """The stream's next position: P_SEQ[stream] += 1, by compare-and-set."""
        key = self._floor_key(tenant, stream)
        for _ in range(_RETRIES):
            cached = self._floors.get(key)
            if cached is None:
                try:
                    entry = await self._seq_kv.get(key)
                    cached = (entry.revision, int(entry.value or b"0"))
                except KeyNotFoundError:
                    cached = (0, 0)
            revision, value = cached
            position = value + 1
            try:
                if revision == 0:
                    revision = await self._seq_kv.create(key, str(position).encode())
                else:
                    revision = await self._seq_kv.update(key, str(position).encode(), last=revision)
            except KeyWrongLastSequenceError:
                self._floors.pop(key, None)  # another instance took one: re-read
                continue
            self._floors[key] = (revision, position)
            return position
        raise BackendUnavailable("could not take a position (too much contention)")

    async def _append(
        self, tenant: str, stream: str, position: int, head: bytes, positions: list[tuple[str, int]]
    ) -> None:
        """Append this stream's copy right after position-1 (optimistic concurrency).

        If position-1 does not show up (its publisher died between its two steps),
        append after whatever is last: a gap, which makes resuming across it a
        `reset`, never a silent skip.
        """
        subject = self._subject(tenant, stream)
        body = head + b',"streams":' + orjson.dumps(_copy_streams(positions, stream)) + b"}"
        deadline = time.monotonic() + _GAP_WAIT
        delay = 0.001
        for _ in range(10_000):
            sseq, last = await self._tail(subject)
            if last is not None and last >= position:
                raise BackendUnavailable("lost the race for a position; publish again")
            if last is not None and last < position - 1 and time.monotonic() < deadline:
                await asyncio.sleep(delay)  # its predecessor is being appended
                delay = min(0.05, delay * 2)
                self._tails.pop(subject, None)
                continue
            headers = {POS: str(position), "Nats-Expected-Last-Subject-Sequence": str(sseq)}
            try:
                ack = await self._js.publish(subject, body, stream=self.stream, headers=headers)
            except APIError as exc:
                if exc.err_code != _WRONG_LAST_SEQUENCE:
                    raise
                self._tails.pop(subject, None)  # another instance appended: re-read
                continue
            self._tails[subject] = (ack.seq, position)
            return
        raise BackendUnavailable("could not append (too much contention on one stream)")

    async def subscribe(self, keys: Iterable[str]) -> None:
        return None  # every instance reads every subject (module docstring)

    async def unsubscribe(self, keys: Iterable[str]) -> None:
        return None

    # -- history ----------------------------------------------------------------------

    async def tops(self, tenant: str, streams: Sequence[str]) -> dict[str, int]:
        self._check_connected()
        try:
            tops = await asyncio.gather(*(self._top(tenant, s) for s in streams))
        except (NatsError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"the broker (NATS) failed: {exc}") from exc
        return dict(zip(streams, tops, strict=True))

    async def _top(self, tenant: str, stream: str) -> int:
        """The last appended position; for a stream with no history left, its counter."""
        subject = self._subject(tenant, stream)
        self._tails.pop(subject, None)
        _, last = await self._tail(subject)
        return last if last is not None else await self._counter(tenant, stream)

    def _check_connected(self) -> None:
        if self._nc is None or not self._nc.is_connected or not self.epoch:
            raise BackendUnavailable(f"the broker (NATS at {self._where()}) is unavailable")

    async def history(self, tenant: str, stream: str, after: int) -> list[Event] | None:
        self._check_connected()
        subject = self._subject(tenant, stream)
        try:
            self._tails.pop(subject, None)
            _, last = await self._tail(subject)
            top = last if last is not None else await self._counter(tenant, stream)
            if after > top:
                return None
            if after == top:
                return []
            if last is None or top - after > self._size:
                return None  # expired whole, or beyond the window
            events = await self._read_subject(subject, after, top)
        except (NatsError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"the broker (NATS) failed: {exc}") from exc
        if not events:
            return None
        if self._ttl > 0 and events[0].ts < time.time() - self._ttl:
            return None
        return events

    async def _read_subject(self, subject: str, after: int, top: int) -> list[Event] | None:
        """Events after+1 … top of `subject`, or None if one of them is missing."""
        sub = await self._js.subscribe(
            subject,
            stream=self.stream,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        events: list[Event] = []
        expected = after + 1
        try:
            while True:
                msg = await sub.next_msg(timeout=_TIMEOUT)
                position = int((msg.headers or {}).get(POS, "0"))
                if position > after:
                    if position != expected:
                        return None  # the oldest kept is past what the cursor needs
                    events.append(Event.from_json(msg.data))
                    expected += 1
                if position >= top or msg.metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return events if expected == top + 1 else None

    # -- shared keys ------------------------------------------------------------------

    async def _claims(self, ttl: float) -> Any:
        if self._idem_kv is None or self._idem_ttl != ttl:
            self._idem_kv = await self._js.create_key_value(
                bucket=self.idem_bucket, history=1, ttl=ttl if ttl > 0 else None
            )
            self._idem_ttl = ttl
        return self._idem_kv

    async def claim(self, key: str, value: str, ttl: float) -> str | None:
        self._check_connected()
        try:
            kv = await self._claims(ttl)
            k = token(key)
            try:
                await kv.create(k, value.encode())
                return None
            except KeyWrongLastSequenceError:
                entry = await kv.get(k)
                return bytes(entry.value or b"").decode()
        except (NatsError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"the broker (NATS) failed: {exc}") from exc

    async def release(self, key: str) -> None:
        self._check_connected()
        try:
            kv = self._idem_kv
            if kv is not None:
                await kv.delete(token(key))
        except (NatsError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"the broker (NATS) failed: {exc}") from exc
