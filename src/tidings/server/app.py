"""`create_app()`: wire settings, hub, authenticator and routes into one ASGI app."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..auth import Authenticator, RequestAuthenticator
from ..config import Settings
from ..errors import InvalidRequest, NotFound, TidingsError
from ..hub import Hub
from . import ops, publish
from .http import error_response
from .sse import SSEEndpoint
from .state import State

log = logging.getLogger("tidings.app")

SSE_PATHS = ("/api/v1/stream", "/api/v1/notifications/stream", "/api/sse/events", "/sse/stream")


def create_app(
    settings: Settings | None = None,
    *,
    hub: Hub | None = None,
    authenticator: RequestAuthenticator | None = None,
) -> Starlette:
    """The tidings ASGI app. Its lifespan starts and stops the hub.

    An app that mounts it (where sub-app lifespans do not run) starts the hub
    itself with `async with hub:` or lets the first request start it.
    """
    settings = settings or Settings()
    hub = hub or Hub(settings)
    state = State(settings, hub, authenticator or Authenticator(settings))
    sse = SSEEndpoint()
    routes: list[BaseRoute] = [Route(path, sse, methods=["GET"]) for path in SSE_PATHS]
    routes += publish.routes + ops.routes

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            TidingsError: _tidings_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
    app.state.tidings = state
    return app


async def _tidings_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TidingsError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(NotFound(f"no route for {request.url.path}"))
    if exc.status_code == 405:
        response = error_response(InvalidRequest(f"{request.method} is not allowed here"))
        response.status_code = 405
        return response
    err = TidingsError(exc.detail)
    err.status, err.code = exc.status_code, "http_error"
    return error_response(err)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(TidingsError("internal error; it has been logged"))
