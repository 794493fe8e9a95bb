"""Publish requests on the fast path: ``POST /api/v1/publish`` without the ASGI stack.

`FastProtocol` serves a publish request itself when `takes` says so: HTTP/1.1, a plain
``Content-Length`` body within TIDINGS_MAX_PAYLOAD, no ``Expect``. It reads the whole
body, then `answer` runs `publish.publish_one`, the very function the ASGI route runs,
and renders its outcome as uvicorn writes the route's: ``202 {"id"}``, or the error's
JSON body with its status and headers (`http.error_response`: ``Retry-After``,
``WWW-Authenticate``); the app's middleware (CORS) sees it on the way out
(`FastPath.publish`). Anything else (a body over the limit, chunked, other paths and
methods, a CORS preflight) is handed to uvicorn with the bytes read so far, and the
ASGI app answers it as before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import orjson
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from ..auth import Authenticator, Principal, bearer_token
from ..backends.memory import MemoryBackend
from ..errors import TidingsError
from .fastcredentials import credentials
from .fasthttp import RequestHead, body_length, json_response, response_head
from .http import INTERNAL, error_response
from .publish import publish_one
from .state import State

log = logging.getLogger("tidings.fastpath")

PUBLISH_PATH = "/api/v1/publish"
REQUEST_LINE = b"POST " + PUBLISH_PATH.encode()

RawHeaders = list[tuple[bytes, bytes]]


EAGER = os.environ.get("TIDINGS_FASTPATH_EAGER", "1") != "0"
"""Publishes start at once where they may (`may_start_eagerly`); else each is a task.
``TIDINGS_FASTPATH_EAGER=0``: always a task (benchmarks, tests of that path)."""


def may_start_eagerly(st: State, middleware: Iterable[Middleware] = ()) -> bool:
    """Whether a publish may start outside a task (`server/eager.py`): nothing it runs
    before it first suspends asks for the current task. True for the memory backend
    (nothing in it awaits) with the built-in authenticator and no JWKS URL (a key in
    hand, no fetch), through no middleware but CORS (`middleware`: the app's); Redis
    and NATS clients use timeouts that need a task, as may other middleware."""
    return (
        EAGER
        and isinstance(st.hub.backend, MemoryBackend)
        and type(st.authenticator) is Authenticator
        and not st.settings.jwt_jwks_url
        and all(m.cls is CORSMiddleware for m in middleware)  # type: ignore[comparison-overlap]
    )


def takes(head: RequestHead, limit: int) -> int | None:
    """The body length of a publish request the fast path serves, else None."""
    if head.method != "POST" or head.path != PUBLISH_PATH:
        return None
    length = body_length(head)
    return None if length is None or length > limit else length


@dataclass(slots=True)
class Answer:
    """The outcome of one request; `render` gives the bytes uvicorn would write."""

    status: int
    body: bytes
    headers: RawHeaders | None = None  # an error's, from its JSONResponse; None: 202's own
    fatal: bool = False  # an unexpected error: uvicorn closes the connection after it

    def render(self, defaults: RawHeaders, close: bool) -> bytes:
        if self.headers is None:
            return json_response(self.status, self.body, defaults, close=close)
        return response_head(self.status, self.headers, defaults, close=close) + self.body


async def answer(st: State, head: RequestHead, body: bytes, keys: KnownKeys) -> Answer:
    """Publish one request's message (`publish_one`); never raises."""
    try:
        event_id = await publish_one(st, keys.principal(head) or credentials(head), body)
    except TidingsError as exc:
        return refusal(exc)
    except Exception as exc:  # as the app's handler of unexpected errors answers them
        log.error("unhandled error on %s %s", head.method, head.path, exc_info=exc)
        return refusal(TidingsError(INTERNAL), fatal=True)
    return Answer(202, orjson.dumps({"id": event_id}))


class KnownKeys:
    """Authorization header values already proven to carry an API key, so a backend
    publishing on a keep-alive connection is not authenticated from scratch each time.

    Exact: the built-in authenticator takes the first ``Authorization: Bearer`` before
    any other credential, and a valid API key there makes the caller the server; the
    keys are fixed for the process's life. So a request whose first Authorization
    value is a known one is the server's, and the rest of its head need not be read.
    An app's own authenticator may decide otherwise: then nothing is known. Only
    proven values are kept (a few per configured key), at most `SIZE`. A lookup hashes
    the presented bytes with the process's secret hash seed, so its timing tells a
    caller nothing of the keys.
    """

    SIZE = 64

    def __init__(self, authenticator: object) -> None:
        self._keys = authenticator.api_keys if type(authenticator) is Authenticator else None
        self._known: dict[bytes, Principal] = {}

    def principal(self, head: RequestHead) -> Principal | None:
        """The server, if `head` proves an API key; else None (authenticate as usual)."""
        keys = self._keys
        if keys is None:
            return None
        value = head.first(b"authorization")  # the first counts, as in Starlette's `Headers`
        if value is None:
            return None
        who = self._known.get(value)
        if who is None:
            token = bearer_token(value.decode("latin-1"))
            if token is None or not keys.check(token):
                return None
            if len(self._known) >= self.SIZE:
                self._known.clear()
            who = self._known[value] = Principal.server()
        return who


def json_headers(body: bytes) -> RawHeaders:
    """The headers of Starlette's `JSONResponse` with `body` (as `json_response` writes)."""
    return [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]


def refusal(exc: TidingsError, *, fatal: bool = False) -> Answer:
    """`exc` as the ASGI route answers it: `http.error_response`'s status, headers, body."""
    response = error_response(exc)
    return Answer(response.status_code, bytes(response.body), response.raw_headers, fatal)
