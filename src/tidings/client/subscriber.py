"""`Subscriber`: read a user's SSE stream (API.md §4), reconnecting and resuming by itself.

One background task owns the HTTP stream: it connects, parses events into a
bounded queue and, when the network or the server drops the stream, waits a
jittered backoff and reconnects with ``Last-Event-ID`` set to the last id it
read. The consumer just iterates; the queue's bound is its backpressure (a
consumer that stops reading lets the server drop it as slow, and the resume
recovers the rest from history).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any

import httpx
import orjson

from ..errors import TidingsError, Unauthorized
from ..wire import SSEEvent, SSEParser
from .errors import error_from_response, retryable

__all__ = ["Subscriber", "backoff_delay"]

STREAM_PATH = "/api/v1/stream"
QUEUE_SIZE = 256
"""Events read ahead of the consumer before the reader stops reading the socket."""
IDLE_TIMEOUT = 75.0
"""Seconds of silence after which a stream counts as dead, until the welcome names
the server's heartbeat interval; from then on it is 2 × heartbeat + 5 s."""
CONNECT_TIMEOUT = 10.0
_STREAM_TIMEOUT = httpx.Timeout(CONNECT_TIMEOUT, read=None)  # silence is judged per stream
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
        token_provider: called for a fresh token when the server answers 401 (say the
            token expired). Without one, a 401 raises `tidings.errors.Unauthorized`.
        backoff_initial, backoff_max: seconds; see `backoff_delay`.
        client: an ``httpx.AsyncClient`` to share (not closed by `close`).
        on_state: called with ``"connecting"``, ``"open"``, ``"reconnecting"``, ``"closed"``.

    Every event is yielded, including ``welcome`` (each connect) and ``reset`` (the
    server could not resume from our id: refetch whatever the app shows, e.g. the
    inbox). Network errors, 5xx/429/503 answers and the server ending the stream
    are retried forever with backoff, reset after each successful connect;
    400, 403 and 404 raise (retrying cannot help). The server's ``retry:`` hint
    is deliberately not used: jittered backoff spreads a reconnecting crowd,
    a fixed delay does not. A ``Retry-After`` on 429/503 is the least delay.
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
    ) -> None:
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        self.url = base_url.rstrip("/") + STREAM_PATH
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._token = token
        self._token_provider = token_provider
        self._on_state = on_state
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=_STREAM_TIMEOUT)
        self._last_event_id = last_event_id  # the last id handed to the consumer
        self._cursor = last_event_id  # the last id read from the wire (resume point)
        self._idle_timeout = IDLE_TIMEOUT
        self._queue: asyncio.Queue[SSEEvent | BaseException | None] = asyncio.Queue(QUEUE_SIZE)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._opened = False  # the current connection got its 200
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
        if self._owns_client:
            await self._client.aclose()
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
            except httpx.UnsupportedProtocol:
                raise  # a base_url such as ftp://... will not get better
            except (httpx.TransportError, TimeoutError):
                pass  # network trouble, or a stream silent for too long: reconnect
            if self._opened:  # however it ended, it connected: start small again
                attempt, token_is_fresh = 0, False
            await self._backoff(attempt, least)
            attempt += 1

    async def _connect_and_read(self) -> None:
        """One connection: returns when the server ends the stream; raises on failures."""
        self._set_state("connecting")
        async with self._client.stream(
            "GET", self.url, params=self._params(), headers=self._headers(), timeout=_STREAM_TIMEOUT
        ) as response:
            if response.status_code != 200:
                await response.aread()
                raise error_from_response(response)
            self._opened = True
            self._set_state("open")
            await self._read(response)

    async def _read(self, response: httpx.Response) -> None:
        parser = SSEParser()
        chunks = response.aiter_raw()
        while True:
            async with asyncio.timeout(self._idle_timeout):
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
            for event in parser.feed(chunk):
                if event.event == "retry" and event.retry is not None and not event.data:
                    continue  # a bare `retry:` line, not an event (see class docstring)
                if event.id is not None:
                    self._cursor = event.id
                if event.event == "welcome":
                    self._learn_heartbeat(event)
                await self._queue.put(event)

    async def _backoff(self, attempt: int, least: float = 0.0) -> None:
        self._set_state("reconnecting")
        delay = backoff_delay(attempt, self.backoff_initial, self.backoff_max)
        await asyncio.sleep(max(delay, least))

    def _learn_heartbeat(self, welcome: SSEEvent) -> None:
        try:
            data: Any = orjson.loads(welcome.data)
            interval = float(data["heartbeat_interval"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return
        if interval > 0:
            self._idle_timeout = 2 * interval + 5

    def _headers(self) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {self._token}",
            "Accept": "text/event-stream",
            "Cache-Control": "no-cache",
            "Accept-Encoding": "identity",  # a compressing proxy would hold events back
        }
        if self._cursor is not None:
            headers["Last-Event-ID"] = self._cursor
        return headers

    def _params(self) -> dict[str, str]:
        return {"topics": ",".join(self.topics)} if self.topics else {}

    def _set_state(self, state: str) -> None:
        self.state = state
        if self._on_state is not None:
            self._on_state(state)
