"""Embedding tidings in a FastAPI app (seed S4's design, done with tidings).

The app mounts tidings' routes (streams, publish API, health) under its own
server and calls the hub in process when something happens — here, when a
piece-work record is approved. Run it with:

    TIDINGS_JWT_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(48))') \
        uvicorn examples.embedded_fastapi:app --port 8000

then open `GET /api/v1/stream` with a token minted by `tidings token` (same secret)
and `POST /records/42/approve?user_id=alice`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tidings import Hub, Settings, create_app

settings = Settings()  # TIDINGS_* from the environment
hub = Hub(settings)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # A mounted app's own lifespan does not run, so the host app starts the hub.
    async with hub:
        yield


app = FastAPI(title="payroll", lifespan=lifespan)


@app.post("/records/{record_id}/approve")
async def approve(record_id: int, user_id: str) -> dict[str, object]:
    # ... the app's own work: mark the record approved in its database ...
    event_id = await hub.send_to_user(
        user_id,
        {"type": "record_approved", "record_id": record_id, "title": "计件记录已审批"},
        event="notification",
    )
    return {"approved": record_id, "event_id": event_id}


# Everything else (streams, /api/v1/publish, /healthz) is tidings' own app.
app.mount("/", create_app(settings, hub=hub))
