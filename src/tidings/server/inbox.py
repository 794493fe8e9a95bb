"""The inbox over HTTP (API.md §7): create (server side) and the caller's own inbox.

Walls: every lookup is by (tenant, recipient, id) of the caller, so another
user's or tenant's notification — or an id that is not a UUID — is 404, the
same answer as one that never existed.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..auth import Principal
from ..errors import BackendUnavailable, Forbidden, Unauthorized
from ..inbox import InboxService
from ..inbox.schema import parse_new, parse_query, parse_read
from .http import JSONResponse, json_body, principal, server_or_user, state
from .publish import rate_limit

BASE = "/api/v1/notifications"


def _inbox(request: Request) -> InboxService:
    inbox = state(request).hub.inbox
    if inbox is None:
        raise BackendUnavailable("this server keeps no inbox")
    return inbox


async def _user(request: Request) -> Principal:
    """The caller's own inbox needs a user: an API key has none."""
    who = await principal(request)
    if who.is_server:
        raise Forbidden("the inbox belongs to a user: send a user token, not an API key")
    if not who.user_id:
        raise Unauthorized("missing credential")
    return who


async def create(request: Request) -> JSONResponse:
    """API key (any tenant, named in the body) or a user token with `publish: true`."""
    who = await server_or_user(request)
    if not who.is_server and who.publish is not True:
        raise Forbidden("creating notifications needs an API key or a token with publish: true")
    new = parse_new(await json_body(request), tenant="" if who.is_server else who.tenant)
    if not who.is_server and new.tenant != who.tenant:
        raise Forbidden("a token creates notifications only in its own tenant")
    rate_limit(request, new.tenant)
    records = await _inbox(request).notify(new)
    return JSONResponse({"notifications": records}, status_code=201)


async def list_notifications(request: Request) -> JSONResponse:
    who = await _user(request)
    query = parse_query(request.query_params)
    return JSONResponse(await _inbox(request).list(who, query))


async def unread_count(request: Request) -> JSONResponse:
    who = await _user(request)
    return JSONResponse({"unread_count": await _inbox(request).unread_count(who)})


async def mark_read(request: Request) -> JSONResponse:
    """Body ``{"ids": [...]}`` or ``{"all": true}``."""
    who = await _user(request)
    wanted = parse_read(await json_body(request))
    inbox = _inbox(request)
    if wanted.all:
        return JSONResponse(await inbox.mark_all_read(who))
    return JSONResponse(await inbox.mark_read(who, wanted.ids))


async def get_one(request: Request) -> JSONResponse:
    who = await _user(request)
    return JSONResponse(await _inbox(request).get(who, request.path_params["id"]))


async def mark_one_read(request: Request) -> JSONResponse:
    who = await _user(request)  # any body (the seed sends `{}`) is ignored
    return JSONResponse(await _inbox(request).mark_one_read(who, request.path_params["id"]))


async def delete_one(request: Request) -> Response:
    who = await _user(request)
    await _inbox(request).delete(who, request.path_params["id"])
    return Response(status_code=204)


# Fixed paths before `{id}`, so `unread-count` and `read` are never taken for ids.
# (`/stream` and `/ws` are routed by the app before these.)
routes = [
    Route(BASE, create, methods=["POST"]),
    Route(BASE, list_notifications, methods=["GET"]),
    Route(BASE + "/unread-count", unread_count, methods=["GET"]),
    Route(BASE + "/read", mark_read, methods=["PUT"]),
    Route(BASE + "/{id}", get_one, methods=["GET"]),
    Route(BASE + "/{id}", delete_one, methods=["DELETE"]),
    Route(BASE + "/{id}/read", mark_one_read, methods=["PUT"]),
]
