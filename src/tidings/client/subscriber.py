"""`Subscriber`: read a user's stream over SSE or WebSocket, reconnecting and resuming.

One background task owns the connection: it asks the transport (`sse.SSETransport`,
API.md §4, or `ws.WSTransport`, §5) for one connection at a time, queues the events
it yields in a bounded queue and, when the network or the server drops it, waits a
jittered backoff and reconnects with the last id it read as the resume point. The
rules for what is retried, the backoff, the resume point and token refresh live
here once, for both transports. The consumer just iterates; the queue's bound is
its backpressure (a consumer that stops reading lets the server drop it as slow,
and the resume recovers the rest from history).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable
from contextlib import aclosing
from types import TracebackType
from typing import Literal

import httpx

from ..errors import TidingsError, Unauthorized
from ..wire import SSEEvent
from .errors import retryable
from .sse import SSETransport
from .transport import Transport
from .ws import WSTransport

__all__ = ["Subscriber", "backoff_delay"]

QUEUE_SIZE = 256
"""Events read ahead of the consumer before the reader stops reading the socket."""
_MAX_EXPONENT = 64  # 2.0**64 × any sane `initial` is far above any cap; no float overflow

TokenProvider = Callable[[], Awaitable[str]]
StateCallback = Callable[[str], object]


def backoff_delay(
    attempt: int,
    initial: float,
    cap: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before reconnect number `attempt` (0-based): "full jitter".

    Uniform in ``[0, min(cap, initial × 2**attempt))``, so clients dropped together
    (a server restart) come back spread out rather than in a herd.
    """
    if attempt < 0 or initial < 0 or cap < 0:
        raise ValueError("attempt, initial and cap must not be negative")
    return rand() * min(cap, initial * 2.0 ** min(attempt, _MAX_EXPONENT))


class Subscriber:
    """``async for event in Subscriber(url, token):`` — every `wire.SSEEvent` of the stream.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        token: the user's JWT, sent as ``Authorization: Bearer``.
        topics: topics to subscribe to besides the user's own stream and broadcasts.
        last_event_id: resume after this id (e.g. kept from an earlier run).
        token_provider: called for a fresh token when the server refuses the token (HTTP
            401, WebSocket close 4401: say it expired). Without one, that raises
            `tidings.errors.Unauthorized`.
        backoff_initial, backoff_max: seconds; see `backoff_delay`.
        client: an ``httpx.AsyncClient`` to share (not closed by `close`); SSE only.
        on_state: called with ``"connecting"``, ``"open"``, ``"reconnecting"``, ``"closed"``.
        transport: ``"sse"`` (default: ``GET /api/v1/stream``) or ``"ws"`` (the WebSocket
            ``/api/v1/ws``; events are `ws.WSEvent`, an `SSEEvent` that also names the
            ``topic``). Both yield the same events and follow the same rules.

    Every event is yielded, including ``welcome`` (each connect) and ``reset`` (the
    server could not resume from our id: refetch whatever the app shows, e.g. the
    inbox). Network errors, 5xx/429/503 answers (WebSocket: 1013, 4429) and the
    server ending the stream (WebSocket: any other close) are retried forever with
    backoff, reset after each successful connect; 400, 403 and 404 (WebSocket: 1008,
    4403, an ``error`` message such as a forbidden topic) raise: retrying cannot
    help. A ``Retry-After`` on 429/503 is the least delay.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        topics: Iterable[str] = (),
        last_event_id: str | None = None,
        token_provider: TokenProvider | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        client: httpx.AsyncClient | None = None,
        on_state: StateCallback | None = None,
        transport: Literal["sse", "ws"] = "sse",
    ) -> None:
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self._transport: Transport
        if transport == "sse":
            self._transport = SSETransport(base_url, self.topics, client)
        elif transport == "ws":
            if client is not None:
                raise ValueError("client is an httpx client, for transport='sse' only")
            self._transport = WSTransport(base_url, self.topics)
        else:
            raise ValueError(f"transport must be 'sse' or 'ws', not {transport!r}")
        self.transport = transport
        self.url = self._transport.url
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._token = token
        self._token_provider = token_provider
        self._on_state = on_state
        self._last_event_id = last_event_id  # the last id handed to the consumer
        self._cursor = last_event_id  # the last id read from the wire (resume point)
        self._queue: asyncio.Queue[SSEEvent | BaseException | None] = asyncio.Queue(QUEUE_SIZE)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._opened = False  # the current connection was accepted
        self.state = "idle"

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event yielded: pass it to a new Subscriber to resume there."""
        return self._last_event_id

    # -- consumer side --------------------------------------------------------------------

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> SSEEvent:
        if self._closed:
            raise StopAsyncIteration
        self._start()
        item = await self._queue.get()
        if item is None:  # closed while we waited
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            await self.close()
            raise item
        if item.id is not None:
            self._last_event_id = item.id
        return item

    async def __aenter__(self) -> Subscriber:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop reading and reconnecting; a pending or later `__anext__` ends the iteration."""
        if self._closed and self._task is None:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)
        await self._transport.aclose()
        self._set_state("closed")

    # -- reader task ----------------------------------------------------------------------

    def _start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._main(), name="tidings-subscriber")

    async def _main(self) -> None:
        try:
            await self._run()
        except Exception as exc:  # handed to the consumer, raised from __anext__
            await self._queue.put(exc)

    async def _run(self) -> None:
        attempt = 0
        token_is_fresh = False  # the token just came from token_provider
        while True:
            least = 0.0
            self._opened = False
            try:
                await self._connect_and_read()
            except Unauthorized:
                if self._token_provider is None:
                    raise
                if token_is_fresh:  # a fresh token was refused too: do not spin
                    await self._backoff(attempt)
                    attempt += 1
                self._token = await self._token_provider()
                token_is_fresh = True
                continue
            except TidingsError as exc:
                if not retryable(exc):
                    raise
                least = float(exc.retry_after or 0)
            except Exception as exc:
                if not self._transport.transient(exc):
                    raise
                # network trouble, or a connection silent for too long: reconnect
            if self._opened:  # however it ended, it connected: start small again
                attempt, token_is_fresh = 0, False
            await self._backoff(attempt, least)
            attempt += 1

    async def _connect_and_read(self) -> None:
        """One connection: returns when the server ends it; raises on failures."""
        self._set_state("connecting")
        async with aclosing(self._transport.connect(self._token, self._cursor)) as items:
            async for item in items:
                if isinstance(item, str):  # OPEN: accepted
                    self._opened = True
                    self._set_state("open")
                    continue
                if item.id is not None:
                    self._cursor = item.id
                await self._queue.put(item)

    async def _backoff(self, attempt: int, least: float = 0.0) -> None:
        self._set_state("reconnecting")
        delay = backoff_delay(attempt, self.backoff_initial, self.backoff_max)
        await asyncio.sleep(max(delay, least))

    def _set_state(self, state: str) -> None:
        self.state = state
        if self._on_state is not None:
            self._on_state(state)
