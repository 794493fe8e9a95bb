"""`Coalescer`: concurrent look-ups of single keys answered by one batched query.

Every stream that opens reads its user's unread count for the ``welcome``. Under a
burst of connects that was one SQL round trip per connect (a pooled connection checked
out, a statement executed, the connection reset), most of the server's time per
connect. The coalescer keeps at most one batch in flight: keys asked for while it runs
wait for the next one. A lone request costs one query at once, as before. While a burst
goes on (keys arrived during a batch), the next batch starts `window` seconds after the
last one returned, so that more keys share it: on SQLite a batch is a round trip to
aiosqlite's thread, and each such hand-over costs the event loop far more CPU than the
query (a 2 ms window took the server's CPU per connect from ~170 to ~130 µs in a burst
of 10,000).

Freshness is the same as a query per request: a key only ever joins a batch that has
not started, so its answer comes from a statement that began after it was asked for.
Nothing is cached between batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """``await get(key)``: the value `fetch` gives for `key`, batched with concurrent gets.

    Args:
        fetch: answers a batch of distinct keys; a key it leaves out gets `default`.
            An exception it raises is every waiter's of that batch.
        default: the value of a key `fetch` does not answer.
        limit: at most this many keys per call of `fetch` (longer batches are split).
        window: seconds a batch that follows another waits for more keys (0: none).
    """

    __slots__ = ("_default", "_fetch", "_limit", "_loop", "_task", "_waiting", "_window")

    def __init__(
        self,
        fetch: Callable[[Sequence[K]], Awaitable[dict[K, V]]],
        default: V,
        *,
        limit: int = 500,
        window: float = 0.0,
    ) -> None:
        self._fetch = fetch
        self._default = default
        self._limit = limit
        self._window = window
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def get(self, key: K) -> V:
        loop = self._loop
        # While a batch runs, its loop is the running one; else ask (on Python 3.11 that
        # is a system call, getpid).
        if self._task is None or loop is None or loop.is_closed():
            loop = asyncio.get_running_loop()
            if loop is not self._loop:  # first use, or a new event loop (tests): afresh
                self._loop, self._waiting, self._task = loop, {}, None
        future: asyncio.Future[V] = loop.create_future()
        waiters = self._waiting.get(key)
        if waiters is None:
            self._waiting[key] = [future]
        else:
            waiters.append(future)
        if self._task is None:
            # Run as a task of its own, so a waiter that is cancelled (a client that
            # leaves) cancels nobody else's query.
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        batch: dict[K, list[asyncio.Future[V]]] = {}
        try:
            while True:
                batch, self._waiting = self._waiting, {}
                keys = list(batch)
                for start in range(0, len(keys), self._limit):
                    await self._answer(batch, keys[start : start + self._limit])
                if not self._waiting:
                    break
                if self._window > 0:  # a burst: let the next batch gather company
                    await asyncio.sleep(self._window)
        except asyncio.CancelledError:  # the loop is shutting down: nobody gets an answer
            for waiters in (*batch.values(), *self._waiting.values()):
                for future in waiters:
                    future.cancel()
            self._waiting = {}
            raise
        finally:
            self._task = None

    async def _answer(self, batch: dict[K, list[asyncio.Future[V]]], keys: list[K]) -> None:
        try:
            values = await self._fetch(keys)
        except Exception as exc:
            for key in keys:
                for future in batch[key]:
                    if not future.done():
                        future.set_exception(exc)
            return
        default = self._default
        for key in keys:
            value = values.get(key, default)
            for future in batch[key]:
                if not future.done():  # its waiter was cancelled
                    future.set_result(value)
