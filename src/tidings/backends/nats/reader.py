"""Reading history on NATS: each stream's top, and the events after a position.

A stream's top is its position as of the tenant's last commit in NATS (read
when a connection opens) or as of the last one this instance knows
(views.py). Either is at least what the fan-out has handed to local
connections, so a connection positioned there misses nothing, and the first
is at least what any client may have been sent by any instance. History is
read from the stream's copies, exact by arithmetic: the copies at positions
after+1 … top, all of them, else None (the client gets a `reset`). The
copies of the tenant's newest commit may not be written yet (its publisher
is writing them, or died before it could): then this instance writes them
itself — as the publisher would have, with the same message ids — and reads
again.
"""

from __future__ import annotations

import time

from ...event import Event
from .store import Store
from .views import Views
from .writer import Writer


class Reader:
    def __init__(self, store: Store, views: Views, writer: Writer) -> None:
        self.store = store
        self.views = views
        self.writer = writer

    async def tops(self, tenant: str, streams: list[str]) -> dict[str, int]:
        # From NATS, not only from what our fan-out has read: a client's cursor may
        # come from an instance that read further (see the module docstring).
        view = await self.views.reload(tenant)
        return await self.views.positions(tenant, view, streams)

    async def history(self, tenant: str, stream: str, after: int) -> list[Event] | None:
        view = await self.views.get(tenant)
        top = (await self.views.positions(tenant, view, [stream]))[stream]
        if after > top:
            return None  # from the future: another history's cursor
        if after == top:
            return []
        store = self.store
        if store.size <= 0 or top - after > store.size:
            return None  # never kept, or beyond the window
        subject = store.names.history_subject(tenant, stream)
        events = await store.read_copies(subject, after, top)
        if events is not None and len(events) < top - after:
            # The newest copies are missing: only the last commit's can be (writer.py).
            view = await self.views.reload(tenant)
            await self.writer.ensure_materialized(tenant, view)
            events = await store.read_copies(subject, after, top)
        if events is None or len(events) < top - after:
            return None  # trimmed or expired
        if store.ttl > 0 and events[0].ts < time.time() - store.ttl:
            return None  # older than the window, even if NATS still has it
        return events
