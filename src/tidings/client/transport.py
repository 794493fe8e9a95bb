"""What a `Subscriber` asks of a transport: one connection, opened and read to its end.

`Subscriber` owns everything that spans connections — the consumer's queue, the
resume cursor, backoff, token refresh and the state callbacks. A transport
(`sse.SSETransport`, `ws.WSTransport`) knows only how to open one connection with
a given token and cursor and turn what arrives into events:

* `Transport.connect` is an async generator. It yields `OPEN` once the server has
  accepted the connection (the HTTP 200 of a stream; the WebSocket ``welcome``),
  then every event, ids included, in order. It returns when the server ends the
  connection normally, and raises a `tidings.errors.TidingsError` when the server
  refused or closed it for a reason (401, 403, 429, 503 …, or the matching
  WebSocket close codes), or its library's own errors for network trouble.
* `Transport.transient` tells those network errors (retry) from the ones retrying
  cannot fix (a URL with an unknown scheme).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Literal, Protocol

from ..wire import SSEEvent

__all__ = ["OPEN", "Item", "Transport"]

OPEN: Literal["open"] = "open"
"""Yielded by `Transport.connect` once the connection is accepted."""

Item = SSEEvent | Literal["open"]


class Transport(Protocol):
    url: str
    """Where it connects (without the query), e.g. ``http://host/api/v1/stream``."""

    def connect(self, token: str, cursor: str | None) -> AsyncGenerator[Item, None]:
        """One connection with `token`, resuming after `cursor` (None: from now)."""
        ...

    def transient(self, exc: Exception) -> bool:
        """Whether `exc` (raised by `connect`, not a TidingsError) is worth a retry."""
        ...

    async def aclose(self) -> None:
        """Release what the transport holds (e.g. an HTTP client it created)."""
        ...
