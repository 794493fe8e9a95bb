"""Shared fixtures: real `tidings serve` processes (see tests/server.py)."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from server import StartServer, TidingsServer  # tests/ is on sys.path (rootless, prepend)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, None]:
    """A failed test's report carries the logs of the servers it started (a rare failure
    in CI, where the temporary directories are gone afterwards, can still be read)."""
    outcome = yield
    report = outcome.get_result()
    servers: list[TidingsServer] = getattr(item, "tidings_servers", [])
    if report.failed:
        for srv in servers:
            report.sections.append((f"server log {srv.workdir.name}", srv.log()[-20_000:]))


@pytest.fixture
def start_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StartServer]:
    """A factory: ``start_server(**env)`` starts a server (see `TidingsServer` for env).

    Every server it started is stopped at the end of the test.
    """
    started: list[TidingsServer] = []
    request.node.tidings_servers = started  # for the report of a failure (above)

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
