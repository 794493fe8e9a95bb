"""A real ``tidings serve`` in a child process, for end-to-end tests over real sockets.

Use the fixtures of conftest.py::

    def test_something(server):                  # one server, default settings
        token = server.token("alice", topics=["news"])
        ...

    def test_other(start_server):                # a factory: settings per test
        a = start_server(TIDINGS_HEARTBEAT_INTERVAL="5")
        b = start_server(history_size=0)        # short keys work too
        dev = start_server(TIDINGS_JWT_SECRET=None)   # dev mode: no secret set

or the class itself (``with TidingsServer(workdir) as srv: ...``).

Each server runs with a clean ``TIDINGS_*`` environment: a random JWT secret and
API key, a SQLite database in its own work directory (also its cwd), logs at
warning level going to ``workdir/server.log`` (see `log()`: put it in your
assertion messages). Calls block; from an async test, run `stop()`,
`restart()` and `kill()` with ``await asyncio.to_thread(server.restart)`` so
the test's own clients keep running meanwhile.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tidings.auth import mint_token

__all__ = ["StartServer", "TidingsServer", "free_port"]

START_TIMEOUT = 20.0  # seconds until /healthz must answer
STOP_TIMEOUT = 15.0  # seconds a graceful stop may take before it is a failure


def free_port() -> int:
    """A port free right now on 127.0.0.1 (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TidingsServer:
    """One ``python -m tidings serve`` child process.

    Args:
        workdir: its cwd; holds the database, the dev secret and server.log.
        env: extra settings, e.g. ``{"TIDINGS_HISTORY_SIZE": "10"}``; a key without
            the ``TIDINGS_`` prefix gets it (``history_size`` works); None unsets
            a default (``TIDINGS_JWT_SECRET=None`` runs in dev mode).
        port: default a free one; kept across `restart()`.
    """

    def __init__(
        self, workdir: Path, env: Mapping[str, str | None] | None = None, port: int | None = None
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings: dict[str, str | None] = {
            "TIDINGS_JWT_SECRET": secrets.token_urlsafe(48),
            "TIDINGS_API_KEYS": "test-key-" + secrets.token_urlsafe(16),
            "TIDINGS_DATABASE_URL": f"sqlite+aiosqlite:///{self.workdir / 'tidings.db'}",
            "TIDINGS_LOG_LEVEL": "warning",
        }
        for key, value in (env or {}).items():
            key = key.upper()
            settings[key if key.startswith("TIDINGS_") else "TIDINGS_" + key] = value
        self.settings = {k: v for k, v in settings.items() if v is not None}
        self._proc: subprocess.Popen[bytes] | None = None

    # -- what tests use ------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the server is not running")
        return self._proc.pid

    @property
    def api_key(self) -> str:
        """The first of TIDINGS_API_KEYS."""
        return self.settings["TIDINGS_API_KEYS"].split(",")[0].strip()

    @property
    def secret(self) -> str:
        """TIDINGS_JWT_SECRET, or in dev mode the secret the server keeps beside its database."""
        if "TIDINGS_JWT_SECRET" in self.settings:
            return self.settings["TIDINGS_JWT_SECRET"]
        return (self.workdir / ".tidings_secret").read_text().strip()

    def token(self, user: str, **claims: Any) -> str:
        """A user JWT the server accepts; claims as `tidings.auth.mint_token` takes them."""
        return mint_token(self.secret, user, **claims)

    def env(self) -> dict[str, str]:
        """The child's environment: ours without any TIDINGS_*, plus the settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        env.update(self.settings, PYTHONUNBUFFERED="1")
        return env

    def log(self) -> str:
        path = self.workdir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start and wait until GET /healthz answers 200; raises with the log if it cannot."""
        if self._proc is not None:
            raise RuntimeError("already running")
        with (self.workdir / "server.log").open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tidings", "serve", "--port", str(self.port)],
                cwd=self.workdir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.kill()
            raise

    def stop(self) -> int:
        """SIGTERM, wait for the graceful shutdown; returns the exit code."""
        return self._end(signal.SIGTERM)

    def kill(self) -> int:
        """SIGKILL: a crash, nothing flushed or said goodbye."""
        return self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Stop gracefully and start again on the same port with the same settings."""
        self.stop()
        self.start()

    def __enter__(self) -> TidingsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop if running; kill if the graceful stop hangs. Safe to call twice."""
        if self._proc is None:
            return
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            self.kill()

    # -- plumbing ------------------------------------------------------------------------

    def _end(self, sig: signal.Signals) -> int:
        proc = self._proc
        if proc is None:
            raise RuntimeError("the server is not running")
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            code = proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self._proc = None
            raise
        self._proc = None
        return code

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"tidings serve exited with {self._proc.returncode}:\n{self.log()}"
                    )
                try:
                    if client.get(self.url + "/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.02)  # polling readiness, not synchronising a test
        raise RuntimeError(f"tidings serve did not answer within {START_TIMEOUT} s:\n{self.log()}")


StartServer = Callable[..., TidingsServer]
"""The type of the `start_server` fixture: ``start_server(**env) -> TidingsServer``."""
