"""Stream requests opened straight from the request head, without the ASGI stack.

`FastProtocol` opens a stream with `open_stream` (no ASGI scope, middleware, Starlette
request objects nor `Capture`) when that cannot change its answer, as `goes_direct`
decides; otherwise through `FastPath.stack` (`server/fastapp.py`), as before. The rule:

- the app has no user middleware (`app.user_middleware` empty: no CORS, which adds
  ``Vary: Origin`` to every answer, nor an embedder's), and
- the client address the connect rate counts is the socket's peer: no connect rate is
  set (then nothing asks for the address), or uvicorn's ``proxy_headers`` is off, or
  the request has no ``X-Forwarded-For``. Only then may uvicorn's
  `ProxyHeadersMiddleware` change the client (and with ``X-Forwarded-Proto`` the
  scheme, which no check reads): such a request goes through the stack, which has it.

Both ways call `streams.open_sse` with the same inputs (the `State`, the request's
`Credentials` as `fastcredentials.credentials` reads them from the head, the client
address), so the checks, the errors and the opened stream are the same; a refusal is
`http.error_response`'s status, headers and JSON body (`Answer`), as the ASGI route's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..errors import TidingsError
from .fastcredentials import credentials
from .fasthttp import RequestHead, chunk
from .fastpublish import Answer, refusal
from .fastwriter import ChunkedSSEConnection
from .http import INTERNAL
from .state import State
from .streams import Opened, greet, open_sse

log = logging.getLogger("tidings.fastpath")

_FORWARDED_FOR = b"x-forwarded-for"


def goes_direct(
    head: RequestHead, *, middleware: bool, proxy_headers: bool, connect_rate: float
) -> bool:
    """Whether the stream request `head` opens without the ASGI stack (the rule above).
    `middleware`: the app has user middleware; `proxy_headers`: uvicorn's setting;
    `connect_rate`: TIDINGS_CONNECT_RATE (0: none)."""
    if middleware:
        return False
    if connect_rate <= 0 or not proxy_headers:
        return True
    return all(name != _FORWARDED_FOR for name, _ in head.headers)


async def open_stream(
    st: State, head: RequestHead, client_ip: Callable[[], str]
) -> Opened[ChunkedSSEConnection] | Answer:
    """`open_sse` for `head`: the attached connection, or the answer refusing it."""
    try:
        return await open_sse(st, credentials(head), client_ip, ChunkedSSEConnection)
    except TidingsError as exc:  # nothing registered (a broker that fails: 503)
        return refusal(exc)
    except Exception as exc:  # as `FastPath.open_stream` answers a bug
        log.error("unhandled error opening a stream", exc_info=exc)
        return refusal(TidingsError(INTERNAL))


def greet_chunked(st: State, opened: Opened[ChunkedSSEConnection]) -> None:
    """Queue the stream's first frames as HTTP chunks (`streams.greet`) and log it open;
    both ways do this once the protocol took the connection (`FastProtocol.adopt`)."""
    greet(st, opened, chunk)
    conn = opened.conn
    who = conn.principal
    log.debug(
        "sse open %s user=%r tenant=%r topics=%s (fast path)",
        conn.id,
        who.user_id,
        who.tenant,
        opened.welcome["topics"],
    )
