"""`POST /api/v1/publish` and `/api/v1/publish/batch` (API.md §6).

`publish_one` is the whole of a single publish after routing, on the ASGI route here
and on the fast path (`server/fastpublish.py`) alike, so the two cannot answer
differently: credential, body, message, rights, rate limit, the hub, the counters.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from ..auth import Principal
from ..errors import InvalidRequest, RateLimited, TidingsError
from ..hub import Hub, Message, authorize, parse_message
from .http import (
    Credentials,
    JSONResponse,
    authenticate,
    decode_json,
    identified,
    json_body,
    read_body,
    server_or_user,
    state,
)
from .state import State

log = logging.getLogger("tidings.publish")

MAX_BATCH = 1000


async def publish(request: Request) -> JSONResponse:
    st = state(request)
    body = partial(read_body, request, st.settings.max_payload)
    event_id = await publish_one(st, Credentials.of(request), body)
    return JSONResponse({"id": event_id}, status_code=202)


async def publish_one(
    st: State,
    credentials: Credentials | Principal,
    body: bytes | Callable[[], Awaitable[bytes]],
) -> str:
    """Publish a request's message; its event id, or a TidingsError to answer.

    `credentials`: the request's, or the principal they are already known to prove
    (`fastpublish.KnownKeys`). `body` is the raw body within TIDINGS_MAX_PAYLOAD, or a
    function that reads it (after the credential is checked).
    """
    outcomes = st.metrics.publish_requests
    try:
        if isinstance(credentials, Principal):
            who = credentials
        else:
            who = identified(await authenticate(st, credentials))
        raw = body if isinstance(body, bytes) else await body()
        message = _message(decode_json(raw), who.is_server, who.tenant)
        authorize(message, who)
        limit_publishes(st, message.tenant)
        hub = st.hub
        if not hub.running:
            await hub.start()
        # One request, one publish: nothing to pause for (see Hub.emit).
        event_id = await hub.publish_message(message, pause=False)
    except TidingsError as exc:
        outcomes.inc(exc.code)
        raise
    outcomes.inc("accepted")
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "publish %s tenant=%r users=%d topics=%d broadcast=%s event=%s",
            event_id,
            message.tenant,
            len(message.users),
            len(message.topics),
            message.broadcast,
            message.event,
        )
    return event_id


async def publish_batch(request: Request) -> JSONResponse:
    who = await server_or_user(request)
    body = await json_body(request)
    items = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise InvalidRequest("`messages` must be a non-empty list")
    if len(items) > MAX_BATCH:
        raise InvalidRequest(f"a batch holds at most {MAX_BATCH} messages")
    messages = []
    for index, item in enumerate(items):  # all valid and allowed, or nothing is published
        try:
            message = _message(item, who.is_server, who.tenant)
        except InvalidRequest as exc:
            raise InvalidRequest(f"messages[{index}]: {exc.message}") from None
        authorize(message, who)
        messages.append(message)
    for tenant in {m.tenant for m in messages}:
        rate_limit(request, tenant)
    hub = await _running_hub(request)
    ids = [await hub.publish_message(m) for m in messages]
    log.debug("publish batch of %d: %s … %s", len(ids), ids[0], ids[-1])
    state(request).metrics.publish_requests.inc("accepted")
    return JSONResponse({"ids": ids}, status_code=202)


def rate_limit(request: Request, tenant: str) -> None:
    limit_publishes(state(request), tenant)


def limit_publishes(st: State, tenant: str) -> None:
    """RateLimited when `tenant` is over TIDINGS_PUBLISH_RATE."""
    limit = st.publish_limit
    if limit.rate <= 0:
        return  # no limit configured
    wait = limit.retry_after("tenant\x1f" + tenant)
    if wait is not None:
        raise RateLimited("publish rate limit reached for this tenant", retry_after=wait)


async def _running_hub(request: Request) -> Hub:
    hub = state(request).hub
    if not hub.running:
        await hub.start()
    return hub


def _message(body: Any, is_server: bool, tenant: str) -> Message:
    # A user's tenant is its own; a missing `tenant` means it. An API key
    # names the tenant in the body (default: the default tenant "").
    return parse_message(body, tenant=None if is_server else tenant)


routes = [
    Route("/api/v1/publish", publish, methods=["POST"]),
    Route("/api/v1/publish/batch", publish_batch, methods=["POST"]),
]
