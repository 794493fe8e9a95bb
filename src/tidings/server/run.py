"""`tidings serve`: run the app under uvicorn (uvloop + httptools)."""

from __future__ import annotations

import logging
import socket
import sys

import uvicorn

from ..auth import mint_token
from ..config import Settings
from ..event import CloseReason
from ..hub import Hub
from ..logs import configure
from . import fastpath
from .app import create_app
from .websocket import said_goodbye, uvicorn_options

log = logging.getLogger("tidings.serve")


def serve(settings: Settings) -> None:
    """Check the settings, print the dev hints, and serve until stopped."""
    settings = settings.with_dev_secret()
    settings.check_startup()
    configure(settings.log_level, settings.log_format)
    if settings.dev_mode:
        _dev_hint(settings)
    hub = Hub(settings)
    app = create_app(settings, hub=hub)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        # SSE streams on our own protocol, everything else on uvicorn's (server/fastpath.py)
        http=fastpath.protocol_class(app) if fastpath.enabled() else "httptools",
        lifespan="on",
        log_config=None,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=int(settings.shutdown_timeout) or None,
        backlog=4096,
        **uvicorn_options(settings),  # WebSocket keep-alive, frame size, compression
    )
    _Server(config, hub).run()


class _Server(uvicorn.Server):
    """uvicorn, but streams hear about a shutdown at its start.

    uvicorn waits for open responses to finish before the lifespan shutdown
    runs, and a stream never finishes by itself: without this, clients would
    only learn of the shutdown when TIDINGS_SHUTDOWN_TIMEOUT cut them off.
    """

    def __init__(self, config: uvicorn.Config, hub: Hub) -> None:
        super().__init__(config)
        self.hub = hub

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        closed = self.hub.broker.close_all(CloseReason.SHUTDOWN)
        log.info("shutting down: told %d connections to reconnect elsewhere", closed)
        await said_goodbye(self.hub)  # WebSockets close with 1001 before uvicorn's 1012
        await super().shutdown(sockets)


def _dev_hint(settings: Settings) -> None:
    secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else ""
    example = mint_token(secret, "alice", ttl_s=3600)
    log.warning(
        "dev mode: no TIDINGS_JWT_SECRET set, so a local one is kept in %s. "
        "Mint tokens with: tidings token --user alice",
        settings.dev_secret_path(),
    )
    print(
        f"\n  tidings on http://{settings.host}:{settings.port}\n"
        f"  token for alice (1 h): {example}\n"
        f"  stream:  curl -N http://{settings.host}:{settings.port}/api/v1/stream "
        f"-H 'Authorization: Bearer <token>'\n",
        file=sys.stderr,
        flush=True,
    )
