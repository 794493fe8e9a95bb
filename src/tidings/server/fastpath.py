"""The SSE fast path: stream requests served by our own asyncio protocol.

`tidings serve` gives uvicorn `protocol_class(app)` as its HTTP protocol. Each new
socket starts in a `FastProtocol`. A ``GET`` on an SSE path (`STREAM_PATHS`) is
served natively; any other request (other paths and methods, WebSocket upgrades,
bodies, HTTP/1.0, anything odd) goes, with the bytes read so far, to uvicorn's own
`HttpToolsProtocol`, which serves the ASGI app as before; a keep-alive connection
stays with uvicorn from then on.

One idea per module:

- `fasthttp`: sans-I/O HTTP/1.1 — which requests are ours, response heads, chunks;
- `fastproto`: the socket — head reading, hand-off, back-pressure, closing;
- `faststream`: a stream opened straight from the request head, with the very checks
  and opening of `server/sse.py` (`streams.open_sse`), so failures are the same JSON
  errors with the same status codes — unless user middleware (CORS) or a proxy header
  may change the answer (the rule is in its docstring);
- `fastapp`: then the stream request as an ASGI call through the app's middleware and
  uvicorn's proxy-headers middleware, to the same `open_sse`; the publish's middleware;
- `fastwriter`: frames as HTTP chunks, the inline fan-out offer, coalesced writes.

`TIDINGS_FASTPATH=0` (or `ENABLED = False` with the variable unset) makes `tidings
serve` use plain uvicorn, and `server/sse.py` for streams too.
"""

from __future__ import annotations

import asyncio
import os

from starlette.applications import Starlette

from .fastapp import FastPath
from .fastproto import STREAM_PATHS, FastProtocol
from .fastwriter import COALESCE, ChunkedSSEConnection

__all__ = [
    "COALESCE",
    "ENABLED",
    "STREAM_PATHS",
    "ChunkedSSEConnection",
    "FastPath",
    "FastProtocol",
    "enabled",
    "protocol_class",
]

ENABLED = True
"""The default; ``TIDINGS_FASTPATH=0`` or ``=1`` in the environment overrides it."""


def enabled() -> bool:
    """Whether `tidings serve` uses the fast path: ``TIDINGS_FASTPATH`` if set, else `ENABLED`."""
    flag = os.environ.get("TIDINGS_FASTPATH", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    return ENABLED


def protocol_class(app: Starlette) -> type[asyncio.Protocol]:
    """uvicorn's ``http=`` for `app` (a `create_app()` app): streams here, the rest to uvicorn."""

    class BoundFastProtocol(FastProtocol):
        __slots__ = ()

    BoundFastProtocol.fast = FastPath(app)
    return BoundFastProtocol
