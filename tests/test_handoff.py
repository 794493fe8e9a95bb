"""`server/handoff.py` in process: uvicorn's protocol for handed-off connections, driven
with an in-memory transport where the timing matters (the real-socket cases are in
test_fastpath.py: malformed and pipelined requests, a client that leaves)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from sse_client import WAIT
from tidings.config import Settings
from tidings.server.app import create_app
from tidings.server.handoff import HandOffProtocol


class _Transport(asyncio.Transport):
    """Closes itself on the client's EOF, as uvloop's does; counts writes after that."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.written: list[bytes] = []
        self.written_after_close = 0

    def write(self, data: Any) -> None:
        if self.closed:
            self.written_after_close += 1  # uvloop: RuntimeError, "the handler is closed"
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_an_answer_due_when_the_client_ends_its_side_is_not_written(
    tmp_path: Path,
) -> None:
    # On EOF the transport closes at once, but connection_lost comes a turn later: the
    # answer to a request still being handled must not be written in between.
    app = create_app(
        Settings(api_keys=["k" * 20], database_url=f"sqlite+aiosqlite:///{tmp_path}/t.db")
    )
    config = uvicorn.Config(app, log_config=None)
    config.load()
    state = ServerState()
    async with app.state.tidings.hub:
        protocol = HandOffProtocol(config=config, server_state=state, app_state={})
        transport = _Transport()
        protocol.connection_made(transport)
        protocol.data_received(b"GET /readyz HTTP/1.1\r\nHost: test\r\n\r\n")
        protocol.eof_received()
        transport.close()  # what uvloop does when eof_received returns nothing
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*state.tasks)
        protocol.connection_lost(None)
    assert transport.written_after_close == 0, transport.written
