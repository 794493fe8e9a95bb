"""Stats, presence, disconnect and metrics (API.md §8).

API keys see every tenant (`?tenant=` picks one); an admin JWT sees only
its own tenant. Anyone else is refused with 403. Stats and presence cover
every live instance of the service (presence.py); /metrics is this process's.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..auth import Principal
from ..errors import Forbidden, InvalidRequest
from .http import JSONResponse, json_body, principal, state


async def _admin(request: Request) -> Principal:
    who = await principal(request)
    if not (who.is_server or who.admin):
        raise Forbidden("stats and presence need an API key or an admin token")
    return who


def _tenant(request: Request, who: Principal) -> str | None:
    """The tenant in scope: an admin JWT's own; an API key's `?tenant=` or all (None)."""
    if not who.is_server:
        return who.tenant
    return request.query_params.get("tenant")


async def stats(request: Request) -> JSONResponse:
    who = await _admin(request)
    return JSONResponse(await state(request).hub.presence.stats(_tenant(request, who)))


async def presence(request: Request) -> JSONResponse:
    who = await _admin(request)
    tenant = _tenant(request, who) or ""
    users = await state(request).hub.presence.users(tenant)
    return JSONResponse({"tenant": tenant, "users": users})


async def user_presence(request: Request) -> JSONResponse:
    who = await _admin(request)
    tenant = _tenant(request, who) or ""
    user_id = request.path_params["user_id"]
    count = await state(request).hub.presence.connections(user_id, tenant)
    return JSONResponse({"user_id": user_id, "online": count > 0, "connections": count})


async def disconnect(request: Request) -> JSONResponse:
    who = await _admin(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("user"), str) or not body["user"]:
        raise InvalidRequest('the body is {"tenant": "...", "user": "..."}')
    tenant = body.get("tenant", who.tenant)
    if not isinstance(tenant, str):
        raise InvalidRequest("`tenant` must be a string")
    if not who.is_server and tenant != who.tenant:
        raise Forbidden("an admin token acts only in its own tenant")
    count = await state(request).hub.disconnect(body["user"], tenant)
    return JSONResponse({"disconnected": count})


async def metrics(request: Request) -> Response:
    body = state(request).metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


routes = [
    Route("/api/v1/stats", stats, methods=["GET"]),
    Route("/api/v1/presence", presence, methods=["GET"]),
    Route("/api/v1/presence/{user_id:path}", user_presence, methods=["GET"]),
    Route("/api/v1/disconnect", disconnect, methods=["POST"]),
]
metrics_route = Route("/metrics", metrics, methods=["GET"])
