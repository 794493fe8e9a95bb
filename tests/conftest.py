"""Shared fixtures: real `tidings serve` processes (see tests/server.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server import StartServer, TidingsServer  # tests/ is on sys.path (rootless, prepend)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """A factory: ``start_server(**env)`` starts a server (see `TidingsServer` for env).

    Every server it started is stopped at the end of the test.
    """
    started: list[TidingsServer] = []

    def start(**env: str | None) -> TidingsServer:
        srv = TidingsServer(tmp_path / f"server{len(started)}", env)
        started.append(srv)
        srv.start()
        return srv

    yield start
    for srv in started:
        srv.close()


@pytest.fixture
def server(start_server: StartServer) -> TidingsServer:
    """One server with default settings (a random JWT secret and API key)."""
    return start_server()
