"""The SSE transport of `Subscriber`: one ``GET /api/v1/stream`` (API.md §4) on httpx.

Credentials go in ``Authorization: Bearer``, the resume point in ``Last-Event-ID``.
A non-200 answer is raised as its typed error (`errors.error_from_response`). A
stream silent for longer than its heartbeat allows counts as dead (TimeoutError).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable
from typing import Any

import httpx
import orjson

from ..wire import SSEEvent, SSEParser
from .errors import error_from_response
from .transport import OPEN, Item

__all__ = ["CONNECT_TIMEOUT", "IDLE_TIMEOUT", "STREAM_PATH", "SSETransport"]

STREAM_PATH = "/api/v1/stream"
IDLE_TIMEOUT = 75.0
"""Seconds of silence after which a stream counts as dead, until the welcome names
the server's heartbeat interval; from then on it is 2 × heartbeat + 5 s."""
CONNECT_TIMEOUT = 10.0
_STREAM_TIMEOUT = httpx.Timeout(CONNECT_TIMEOUT, read=None)  # silence is judged per stream


class SSETransport:
    """Reads a user's event stream; `client` is shared when given (not closed by `aclose`)."""

    def __init__(
        self, base_url: str, topics: Iterable[str], client: httpx.AsyncClient | None = None
    ) -> None:
        self.url = base_url.rstrip("/") + STREAM_PATH
        self.topics = list(topics)
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=_STREAM_TIMEOUT)
        self._idle_timeout = IDLE_TIMEOUT

    async def connect(self, token: str, cursor: str | None) -> AsyncGenerator[Item, None]:
        async with self._client.stream(
            "GET",
            self.url,
            params=self._params(),
            headers=self._headers(token, cursor),
            timeout=_STREAM_TIMEOUT,
        ) as response:
            if response.status_code != 200:
                await response.aread()
                raise error_from_response(response)
            yield OPEN
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
                        # A bare `retry:` line, not an event. The hint itself is not used:
                        # jittered backoff spreads a reconnecting crowd, a fixed delay does not.
                        continue
                    if event.event == "welcome":
                        self._learn_heartbeat(event)
                    yield event

    def transient(self, exc: Exception) -> bool:
        if isinstance(exc, httpx.UnsupportedProtocol):
            return False  # a base_url such as ftp://... will not get better
        # Network trouble, or a stream silent for too long.
        return isinstance(exc, (httpx.TransportError, TimeoutError))

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def _learn_heartbeat(self, welcome: SSEEvent) -> None:
        try:
            data: Any = orjson.loads(welcome.data)
            interval = float(data["heartbeat_interval"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return
        if interval > 0:
            self._idle_timeout = 2 * interval + 5

    def _headers(self, token: str, cursor: str | None) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "text/event-stream",
            "Cache-Control": "no-cache",
            "Accept-Encoding": "identity",  # a compressing proxy would hold events back
        }
        if cursor is not None:
            headers["Last-Event-ID"] = cursor
        return headers

    def _params(self) -> dict[str, str]:
        return {"topics": ",".join(self.topics)} if self.topics else {}
