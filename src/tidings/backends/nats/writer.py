"""Publishing on NATS: one commit per batch of events, chained per tenant.

A publish joins its tenant's lane; the lane commits what has queued up (one
event, or a burst of them) as one message on the tenant's commit subject:

1. make sure the tenant's last commit is materialised (its history copies
   and counters written: by its publisher, or else rewritten here — message
   ids make the rewrite a no-op when they were);
2. read each stream's position as of that commit (views.py) and number the
   new events on from there;
3. append the commit with ``Nats-Expected-Last-Subject-Sequence`` = that
   commit's sequence. If another publisher got there first, JetStream refuses
   it: reload the last commit and start again (bounded by a deadline; there is
   no lost race that answers 503 while the broker is well);
4. the publishers' calls return — every instance now reads the commit from
   the fan-out, with every position, in chain order — and the lane writes the
   commit's history copies and counters before it commits again.

So positions are contiguous per stream, each is given once, and they follow
the commit chain: the fan-out order is the position order of every stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import orjson

from ...errors import BackendUnavailable
from ...event import Event
from .layout import MSG_ID, POS, commit_body, copy_streams, event_head, head_of, with_streams
from .store import Conflict, Message, Store
from .views import TenantView, Views

log = logging.getLogger("tidings.backends.nats")

_BATCH_EVENTS = 256  # events per commit, at most
_BATCH_COPIES = 1024  # history copies per commit, at most (stream positions, summed)
_BATCH_BYTES = 512 * 1024  # commit body, roughly (NATS refuses messages over max_payload)


class _Pending:
    __slots__ = ("data", "event_id", "future", "head", "kind", "name", "streams", "ts")

    def __init__(
        self, event_id: str, streams: tuple[str, ...], name: str, data: Any, kind: str
    ) -> None:
        self.event_id = event_id
        self.streams = streams
        self.name = name
        self.data = data
        self.kind = kind
        self.ts = time.time()
        self.head = b""
        self.future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()


class _Lane:
    __slots__ = ("queue", "task")

    def __init__(self) -> None:
        self.queue: deque[_Pending] = deque()
        self.task: asyncio.Task[None] | None = None


class Writer:
    def __init__(self, store: Store, views: Views) -> None:
        self.store = store
        self.views = views
        self._lanes: dict[str, _Lane] = {}

    async def publish(
        self, tenant: str, streams: tuple[str, ...], name: str, data: Any, event_id: str, kind: str
    ) -> Event:
        pending = _Pending(event_id, streams, name, data, kind)
        pending.head = event_head(event_id, tenant, name, data, pending.ts, kind)
        lane = self._lanes.get(tenant)
        if lane is None:
            lane = self._lanes[tenant] = _Lane()
        lane.queue.append(pending)
        if lane.task is None:
            lane.task = asyncio.create_task(self._drain(tenant, lane), name="tidings-nats-lane")
        return await pending.future

    async def close(self) -> None:
        lanes, self._lanes = self._lanes, {}
        for lane in lanes.values():
            if lane.task is not None:
                lane.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.task
            for pending in lane.queue:
                if not pending.future.done():
                    pending.future.set_exception(BackendUnavailable("the broker was closed"))

    # -- the lane -----------------------------------------------------------------

    async def _drain(self, tenant: str, lane: _Lane) -> None:
        try:
            while lane.queue:
                batch = _take(lane.queue)
                if not batch:
                    continue
                try:
                    seq, events = await self._commit(tenant, batch)
                except Exception as exc:
                    if not isinstance(exc, BackendUnavailable):
                        exc = BackendUnavailable(f"the broker (NATS) failed: {exc!r}")
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(exc)
                    continue
                for pending, event in zip(batch, events, strict=True):
                    if not pending.future.done():
                        pending.future.set_result(event)
                heads = [p.head for p in batch]
                view = self.views.known(tenant)
                if view is not None and view.seq == seq:
                    await self._materialize_last(tenant, view, heads=heads)
                else:  # the view moved on or was dropped: write them all the same
                    await self._materialize_quietly(tenant, seq, events, heads)
        finally:
            lane.task = None

    async def _commit(self, tenant: str, batch: list[_Pending]) -> tuple[int, list[Event]]:
        streams = list(dict.fromkeys(s for p in batch for s in p.streams))
        deadline = time.monotonic() + self.store.timeout
        view = await self.views.get(tenant)
        while True:
            await self.ensure_materialized(tenant, view)
            prev = view.seq
            tops = await self.views.positions(tenant, view, streams)
            if view.seq != prev:
                _check_deadline(deadline)
                continue  # a commit arrived while we read: number from it
            events, parts = [], []
            for p in batch:
                positions = []
                for stream in p.streams:
                    tops[stream] += 1
                    positions.append((stream, tops[stream]))
                event = Event(p.event_id, tenant, p.name, p.data, tuple(positions), p.ts, p.kind)
                events.append(event)
                parts.append(with_streams(p.head, positions))
            try:
                seq = await self.store.commit(tenant, commit_body(tenant, prev, parts), prev)
            except Conflict:
                _check_deadline(deadline)
                view = await self.views.reload(tenant)
                continue
            self.views.apply(tenant, seq, prev, events)
            return seq, events

    # -- materialising: history copies and counters ---------------------------------

    async def ensure_materialized(self, tenant: str, view: TenantView) -> None:
        """Until the view's last commit is known to have its copies and counters written."""
        while not view.materialized:
            await self._materialize_last(tenant, view, quiet=False)

    async def _materialize_last(
        self,
        tenant: str,
        view: TenantView,
        quiet: bool = True,
        heads: list[bytes] | None = None,
    ) -> None:
        seq = view.seq
        running = view.materializing
        if running is None:
            running = view.materializing = asyncio.ensure_future(
                self._materialize(tenant, seq, view.events, heads)
            )
        try:
            await asyncio.shield(running)
        except Exception as exc:
            if view.materializing is running:
                view.materializing = None  # the next one to need it tries again
            if not quiet:
                raise
            log.warning("history copies of commit %d not written yet (%s)", seq, exc)
            return
        if view.seq == seq:
            view.materialized = True

    async def _materialize_quietly(
        self, tenant: str, seq: int, events: list[Event], heads: list[bytes]
    ) -> None:
        try:
            await self._materialize(tenant, seq, events, heads)
        except Exception as exc:
            log.warning("history copies of commit %d not written yet (%s)", seq, exc)

    async def _materialize(
        self, tenant: str, seq: int, events: list[Event], heads: list[bytes] | None = None
    ) -> None:
        names = self.store.names
        messages: list[Message] = []
        last: dict[str, int] = {}
        for i, event in enumerate(events):
            if self.store.size > 0:
                head = heads[i] if heads is not None else head_of(event)
                for j, (stream, position) in enumerate(event.streams):
                    body = with_streams(head, copy_streams(event.streams, stream))
                    headers = {POS: str(position), MSG_ID: f"{seq}.{event.id}.{j}"}
                    messages.append((names.history_subject(tenant, stream), body, headers))
            for stream, position in event.streams:
                last[stream] = position
        first = events[0].id if events else ""
        for k, (stream, position) in enumerate(last.items()):
            body = orjson.dumps(position)
            headers = {MSG_ID: f"{seq}.{first}.n{k}"}
            messages.append((names.counter_subject(tenant, stream), body, headers))
        await self.store.write_all(messages)


def _check_deadline(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise BackendUnavailable("too much contention on one tenant; retry")


def _take(queue: deque[_Pending]) -> list[_Pending]:
    """The next batch: as many queued publishes as fit one commit (at least one)."""
    batch: list[_Pending] = []
    copies = size = 0
    while queue:
        pending = queue[0]
        if pending.future.done():  # its caller gave up (cancelled) before it went out
            queue.popleft()
            continue
        cost = len(pending.head) + 64 * len(pending.streams)
        if batch and (
            len(batch) >= _BATCH_EVENTS
            or copies + len(pending.streams) > _BATCH_COPIES
            or size + cost > _BATCH_BYTES
        ):
            break
        batch.append(queue.popleft())
        copies += len(pending.streams)
        size += cost
    return batch
