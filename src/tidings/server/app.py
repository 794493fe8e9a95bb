"""`create_app()`: wire settings, hub, authenticator and routes into one ASGI app."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import start_http_server
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from ..auth import Authenticator, RequestAuthenticator
from ..config import Settings
from ..errors import InvalidRequest, NotFound, TidingsError
from ..hub import Hub
from ..inbox import InboxService
from ..ingest import Ingest
from ..metrics import Metrics
from ..ratelimit import RateLimiter
from . import admin, inbox, openapi, ops, publish, web
from .http import error_response
from .sse import SSEEndpoint
from .state import State
from .websocket import WS_PATHS, WebSocketEndpoint

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
    if hub.inbox is None:
        hub.inbox = InboxService.from_settings(hub, settings)
    state = State(
        settings,
        hub,
        authenticator or Authenticator(settings),
        Metrics(hub),
        unread_count=hub.inbox.unread_count,
        connect_limit=RateLimiter(settings.connect_rate),
        publish_limit=RateLimiter(settings.publish_rate),
    )
    sse = SSEEndpoint()
    routes: list[BaseRoute] = [Route(path, sse, methods=["GET"]) for path in SSE_PATHS]
    routes += [WebSocketRoute(path, WebSocketEndpoint()) for path in WS_PATHS]
    routes += publish.routes + ops.routes + admin.routes + inbox.routes  # after the streams
    routes += web.routes + openapi.routes  # /tidings.js, /demo, /admin; /openapi.json, /docs
    if settings.metrics_port is None:
        routes.append(admin.metrics_route)
    # TIDINGS_INGEST_URL: publish requests read from NATS or a Redis stream (ingest/).
    ingest = Ingest.from_settings(settings, hub, state.metrics.registry)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.metrics_port is not None:
            # A separate listener keeps /metrics off the public port.
            start_http_server(settings.metrics_port, settings.host, registry=state.metrics.registry)
        await hub.start()  # and its inbox: migrates SQLite, refuses an old PostgreSQL schema
        if ingest is not None:
            await ingest.start()  # in the background: a bus that is down is retried, not fatal
        try:
            yield
        finally:
            if ingest is not None:
                await ingest.stop()  # before the hub: the message in hand is published first
            await hub.stop()

    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "PUT", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                allow_credentials="*" not in settings.cors_origins,
                max_age=600,
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            TidingsError: _tidings_error,
            HTTPException: _http_error,
            ClientDisconnect: _client_left,
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


async def _client_left(request: Request, exc: Exception) -> Response:
    # The client went away while sending its request body: nobody to answer (the
    # server drops this response), nothing went wrong here.
    log.debug("client left during %s %s", request.method, request.url.path)
    return Response(status_code=400)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(TidingsError("internal error; it has been logged"))
