"""Publishes in process: the fast path's `FastProtocol` fed one publish request at a time.

    PYTHONPATH=src taskset -c 0 python scripts/publish_inproc.py [N]

One keep-alive connection with an in-memory transport sends N (default 70000) times the
same ``POST /api/v1/publish`` with an API key (`tidings bench publish`'s request: one
topic, a short marker), SQLite inbox, memory broker, after 1,200 to fill the history;
prints the wall-clock µs per publish, the best of 7 slices. No socket, so the kernel's
part of a publish is not in it. Instructions per publish: run it under
``valgrind --tool=callgrind`` with two values of N and divide the difference.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from typing import Any

import orjson
import uvicorn
import uvloop
from uvicorn.server import ServerState

from tidings.config import Settings
from tidings.server import fastpath
from tidings.server.app import create_app

KEY = "k" * 32
WARM_UP = 1200
SLICES = 7


class Transport(asyncio.Transport):
    """Keeps the last answer; the socket is always writable and reading."""

    def __init__(self) -> None:
        super().__init__()
        self.last = b""

    def write(self, data: Any) -> None:
        self.last = data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def is_closing(self) -> bool:
        return False

    def is_reading(self) -> bool:
        return True


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            api_keys=[KEY], jwt_secret="s" * 48, database_url=f"sqlite+aiosqlite:///{tmp}/p.db"
        )
        app = create_app(settings)
        config = uvicorn.Config(
            app, http=fastpath.protocol_class(app), log_config=None, access_log=False
        )
        config.load()
        async with app.state.tidings.hub:
            protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=ServerState(), app_state={}
            )
            transport = Transport()
            protocol.connection_made(transport)
            body = orjson.dumps({"tenant": "t", "topics": ["bench"], "data": "m123456789"})
            request = (
                b"POST /api/v1/publish HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
                b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            for _ in range(WARM_UP):
                protocol.data_received(request)
            assert transport.last.startswith(b"HTTP/1.1 202"), transport.last
            best = float("inf")
            for _ in range(SLICES):
                start = time.perf_counter()
                for _ in range(n // SLICES):
                    protocol.data_received(request)
                best = min(best, time.perf_counter() - start)
            print(f"{best / (n // SLICES) * 1e6:.2f} µs per publish")


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 70000))
