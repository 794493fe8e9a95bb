"""Health and readiness (API.md §8)."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.routing import Route

from .http import JSONResponse, state

log = logging.getLogger("tidings.ops")


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    hub = state(request).hub
    try:
        broker_ok = hub.running and await hub.backend.ready()
    except Exception:  # readiness must answer, whatever the backend raises
        log.warning("backend readiness check failed", exc_info=True)
        broker_ok = False
    checks = {"broker": "ok" if broker_ok else "unavailable"}
    if hub.inbox is not None:
        try:
            database_ok = await hub.inbox.ping()
        except Exception:  # as above: readiness answers whatever the database raises
            log.warning("database readiness check failed", exc_info=True)
            database_ok = False
        checks["database"] = "ok" if database_ok else "unavailable"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
