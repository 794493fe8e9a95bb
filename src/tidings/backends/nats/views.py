"""What this instance knows of each tenant's commit chain.

A `TenantView` holds the tenant's last commit that this instance has seen (its
sequence, its events, whether its history copies are known to be written) and
a cache of stream positions *as of that commit*. Two facts make the cache
exact without reading everything:

- every commit before the last one of a tenant is materialised (its history
  copies and counters written): a commit is only made on top of a
  materialised one (writer.py), so
- a stream's position as of the last commit is that commit's position for it
  if it has one, else the stream's counter in the KV bucket.

The view only moves forward: the fan-out applies every commit it reads, a
publisher applies its own, and a publisher that lost a race reloads the
tenant's last commit. A commit that does not follow the view's (some were not
seen) clears the cache (`generation` counts that, so a counter read that
started before cannot be stored after).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ...errors import BackendUnavailable
from ...event import Event

Loader = Callable[[str], Awaitable[tuple[int, int, list[Event]] | None]]
CounterLoader = Callable[[str, str], Awaitable[int]]

_CACHE_LIMIT = 50_000  # cached stream positions per tenant before the cache is trimmed
_ATTEMPTS = 20  # counter reads overtaken by a gap in the chain, before giving up


class TenantView:
    __slots__ = ("events", "generation", "materialized", "materializing", "seq", "tops")

    def __init__(self, seq: int = 0, events: list[Event] | None = None) -> None:
        self.seq = seq  # the commit's sequence in the commits stream (0: none yet)
        self.events: list[Event] = events or []
        self.tops: dict[str, int] = {}
        self.generation = 0
        self.materialized = seq == 0  # its history copies and counters are known written
        self.materializing: asyncio.Future[None] | None = None
        self._learn(self.events)

    def apply(self, seq: int, prev: int, events: list[Event]) -> bool:
        """Move to a later commit; returns False for one the view has passed."""
        if seq <= self.seq:
            return False
        if prev != self.seq:
            self.tops = {}  # commits in between were not seen: ask the counters again
            self.generation += 1
        elif len(self.tops) > _CACHE_LIMIT:
            self.tops = {}
        self.seq = seq
        self.events = events
        self.materialized = False
        self.materializing = None
        self._learn(events)
        return True

    def _learn(self, events: list[Event]) -> None:
        tops = self.tops
        for event in events:
            for stream, position in event.streams:
                tops[stream] = position

    def remember(self, generation: int, stream: str, position: int) -> None:
        """Cache a counter read while the view was at `generation` (unless it moved past it)."""
        if generation == self.generation:
            self.tops.setdefault(stream, position)


class Views:
    """Every tenant's view; a tenant first asked about is loaded from its last commit."""

    def __init__(self, loader: Loader, counter: CounterLoader) -> None:
        self._load = loader
        self._counter = counter
        self._views: dict[str, TenantView] = {}
        self._loading: dict[str, asyncio.Future[TenantView]] = {}

    def known(self, tenant: str) -> TenantView | None:
        return self._views.get(tenant)

    async def get(self, tenant: str) -> TenantView:
        view = self._views.get(tenant)
        if view is not None:
            return view
        loading = self._loading.get(tenant)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[TenantView] = asyncio.get_running_loop().create_future()
        self._loading[tenant] = future
        try:
            last = await self._load(tenant)
            view = self._views.get(tenant)  # the fan-out may have made one meanwhile
            if view is None:
                view = TenantView() if last is None else TenantView(last[0], last[2])
                self._views[tenant] = view
            elif last is not None:
                view.apply(*last)
            future.set_result(view)
            return view
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._loading[tenant]

    async def positions(self, tenant: str, view: TenantView, streams: list[str]) -> dict[str, int]:
        """Each stream's position as of the view's last commit (a new dict)."""
        for _ in range(_ATTEMPTS):
            missing = [s for s in streams if s not in view.tops]
            if missing:
                generation = view.generation
                values = await asyncio.gather(*(self._counter(tenant, s) for s in missing))
                for stream, value in zip(missing, values, strict=True):
                    view.remember(generation, stream, value)
            tops = view.tops
            if all(s in tops for s in streams):
                return {s: tops[s] for s in streams}
        raise BackendUnavailable("the tenant's commits moved too fast to read its positions")

    def apply(self, tenant: str, seq: int, prev: int, events: list[Event]) -> None:
        """A commit seen (fan-out) or made (publisher); tenants not asked about are skipped."""
        view = self._views.get(tenant)
        if view is not None:
            view.apply(seq, prev, events)

    async def reload(self, tenant: str) -> TenantView:
        """Catch the view up with the tenant's last commit in NATS, which may be ahead of
        this instance's fan-out (a race lost, a cursor from a faster instance)."""
        if tenant not in self._views:
            return await self.get(tenant)
        view = self._views[tenant]
        last = await self._load(tenant)
        if last is not None:
            view.apply(*last)
        return view

    def clear(self) -> None:
        self._views.clear()
