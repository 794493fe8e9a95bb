"""`tidings serve`: run the app under uvicorn (uvloop + httptools).

With ``--workers N`` (``TIDINGS_WORKERS``) a supervisor runs N such servers in
worker processes on the same port (server/workers.py).
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
from typing import Any

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
    """Check the settings, print the dev hints, and serve until stopped.

    Raises ConfigError for settings that cannot serve (e.g. several workers on
    ``memory://``), and SystemExit(1) when the workers could not be kept running.
    """
    from . import workers

    settings = settings.with_dev_secret()
    settings.check_startup()
    if settings.workers > 1:
        workers.check(settings)
    configure(settings.log_level, settings.log_format)
    if settings.dev_mode:
        _dev_hint(settings)
    if settings.workers > 1:
        code = workers.Supervisor(settings).run()
        if code:
            raise SystemExit(code)
        return
    serve_one(settings)


def serve_one(
    settings: Settings,
    sock: socket.socket | None = None,
    *,
    ready: Any = None,
    parent: int | None = None,
) -> None:
    """One server process: on `sock` when a supervisor gives it one (then `ready.set()`
    once it serves, and it stops by itself if the `parent` process goes away)."""
    raise_open_file_limit()
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
    server = _Server(config, hub)
    server.ready, server.parent = ready, parent
    server.run(sockets=None if sock is None else [sock])


class _Server(uvicorn.Server):
    """uvicorn, but streams hear about a shutdown at its start.

    uvicorn waits for open responses to finish before the lifespan shutdown
    runs, and a stream never finishes by itself: without this, clients would
    only learn of the shutdown when TIDINGS_SHUTDOWN_TIMEOUT cut them off.
    """

    def __init__(self, config: uvicorn.Config, hub: Hub) -> None:
        super().__init__(config)
        self.hub = hub
        self.ready: Any = None  # a worker's multiprocessing Event, set once serving
        self.parent: int | None = None  # a worker's supervisor (pid)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What start-up built (modules, the app, SQLAlchemy's and pydantic's tables: a few
        # hundred thousand objects) lives as long as the process. Frozen, the collector's
        # full passes skip it: while thousands of streams open, each of those passes
        # scanned it all again (0.3 s each; ~1/3 of the CPU time of a connect burst).
        gc.freeze()
        gc.set_threshold(*gc_threshold())
        if self.started and self.ready is not None:
            self.ready.set()

    async def on_tick(self, counter: int) -> bool:
        if self.parent is not None and counter % 10 == 0 and os.getppid() != self.parent:
            log.warning("the supervisor (pid %d) is gone: stopping this worker", self.parent)
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Stop listening first (uvicorn would only after our goodbyes), so a client told to
        # reconnect cannot land on this process again while it says goodbye.
        for listener in self.servers:
            listener.close()
        closed = self.hub.broker.close_all(CloseReason.SHUTDOWN)
        log.info("shutting down: told %d connections to reconnect elsewhere", closed)
        await said_goodbye(self.hub)  # WebSockets close with 1001 before uvicorn's 1012
        await super().shutdown(sockets)


GC_THRESHOLD = (50_000, 20, 10)
"""The collector's thresholds once serving (Python's are 700, 10, 10). A WebSocket holds
~130 tracked objects, and each full pass scans every live one (~1 s for 10,000
sockets on a busy machine): with Python's thresholds such passes took half the CPU of
a burst of WebSocket connects; with these, full passes are ~100x rarer (2x the
connects/s; docs/benchmarks.md, "Fan-out: profile and changes"). Cyclic garbage of
closed connections waits longer for a full pass. ``TIDINGS_GC_THRESHOLD=700,10,10``
(three integers) sets others."""


def gc_threshold() -> tuple[int, int, int]:
    """`GC_THRESHOLD`, or ``TIDINGS_GC_THRESHOLD`` (three comma-separated integers) if set."""
    raw = os.environ.get("TIDINGS_GC_THRESHOLD", "").strip()
    if raw:
        try:
            first, second, third = (int(part) for part in raw.split(","))
        except ValueError:
            log.warning("TIDINGS_GC_THRESHOLD=%r is not three integers: ignored", raw)
        else:
            return first, second, third
    return GC_THRESHOLD


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit (RLIMIT_NOFILE) to its hard limit; returns it.

    Every connection is a file descriptor, and the soft limit is often 1024: without
    this, the process refuses connections (EMFILE) far below what its memory allows.
    """
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    log.debug("open-file limit: %d", soft)
    return int(soft)


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
