"""HTTP helpers shared by the routes: JSON answers, errors, bodies, credentials."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from ..auth import Principal
from ..errors import InvalidRequest, PayloadTooLarge, TidingsError, Unauthorized
from .state import State

log = logging.getLogger("tidings.http")

INTERNAL = "internal error; it has been logged"  # the answer to a bug (app.py's handler's)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: TidingsError) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def state(conn: HTTPConnection) -> State:
    found: State = conn.app.state.tidings
    return found


class Credentials(NamedTuple):
    """Where a request's credential may be (`auth.extract_credential`)."""

    headers: Mapping[str, str]
    query: Mapping[str, str]
    cookies: Mapping[str, str]

    @classmethod
    def of(cls, conn: HTTPConnection) -> Credentials:
        return cls(conn.headers, conn.query_params, conn.cookies)


async def principal(conn: HTTPConnection) -> Principal:
    """The caller's identity (JWT, API key, or the app's own authenticator)."""
    return await authenticate(state(conn), Credentials.of(conn))


async def authenticate(st: State, credentials: Credentials) -> Principal:
    """`principal` of a request's `credentials`; refusals are counted by reason."""
    try:
        return await st.authenticator.authenticate(*credentials)
    except Unauthorized as exc:
        st.metrics.auth_failures.labels(_failure_reason(exc.message)).inc()
        raise


def _failure_reason(message: str) -> str:
    # A bounded label set: the message itself may quote client input.
    text = message.lower()
    for reason in ("missing", "expired", "signature", "issuer", "audience", "kid"):
        if reason in text:
            return reason
    return "invalid"


def client_ip(conn: HTTPConnection) -> str:
    return conn.client.host if conn.client else "?"


async def server_or_user(conn: HTTPConnection) -> Principal:
    return identified(await principal(conn))


def identified(who: Principal) -> Principal:
    """`who`, unless it is nobody (an authenticator's anonymous principal): 401."""
    if not who.user_id and not who.is_server:
        raise Unauthorized("missing credential")
    return who


async def json_body(request: Request) -> Any:
    """The request body as JSON, refusing more than TIDINGS_MAX_PAYLOAD bytes."""
    return decode_json(await read_body(request, state(request).settings.max_payload))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; PayloadTooLarge past `limit` bytes (declared or sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the body is over {limit} bytes (TIDINGS_MAX_PAYLOAD)")


def decode_json(raw: bytes) -> Any:
    """A request body as JSON: InvalidRequest when empty or malformed."""
    if not raw.strip():
        raise InvalidRequest("the body is empty; send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
