"""`tidings serve --workers N`: N server processes on one port, and their supervisor.

Each worker is a whole tidings server (its own hub, broker, fast path and
uvicorn) and a separate *instance* of the service: they share history,
fan-out and presence through the broker (Redis or NATS), exactly as several
`tidings serve` processes behind a load balancer do. Hence ``memory://``
cannot have more than one worker (`check` refuses it).

Listening: the supervisor binds the port, then forks each worker with its
socket, so a port already in use fails once, at start, and port 0 means the
same free port for all. On Linux each worker gets its own socket with
``SO_REUSEPORT``, and the kernel spreads new connections evenly across them (a
single shared socket lets whichever worker wakes first take a burst of
reconnecting clients, and long-lived streams keep that imbalance). Elsewhere
the workers share one socket. The SSE fast path is a protocol on that same
socket, so it needs nothing of its own.

Supervision: SIGTERM or SIGINT to the supervisor sends SIGTERM to every
worker, which shuts down gracefully (streams are told to reconnect, presence
is removed), and waits up to TIDINGS_SHUTDOWN_TIMEOUT + 5 s before SIGKILL. A
worker that exits by itself after it served is started again; one that fails
before it serves (the broker does not answer, a bad setting) stops them all,
exit code 1, as a single server's failed start does. A worker whose
supervisor disappears (``kill -9``) stops gracefully by itself: at once on
Linux (``PR_SET_PDEATHSIG``), else within a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from ..config import Settings
from ..errors import ConfigError, TidingsError

log = logging.getLogger("tidings.workers")

_QUICK_DEATH = 10.0  # a worker that exits within this many seconds of its start…
_QUICK_DEATHS = 5  # …this many times in a row: give up
_KILL_MARGIN = 5.0  # seconds beyond TIDINGS_SHUTDOWN_TIMEOUT before SIGKILL
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1
_REUSEPORT = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def check(settings: Settings) -> None:
    """Refuse what several workers cannot do, with the reason and the way out."""
    scheme = settings.broker_url.split("://", 1)[0].lower()
    if scheme == "memory":
        raise ConfigError(
            f"TIDINGS_WORKERS={settings.workers} needs a shared broker: with memory:// each "
            "worker would keep its own history and fan-out, so clients would miss events "
            "published through another worker. Set TIDINGS_BROKER_URL to redis://… or "
            "nats://…, or run one worker"
        )
    if sys.platform == "win32":
        raise ConfigError("TIDINGS_WORKERS > 1 is not supported on Windows; run one per port")
    if settings.metrics_port:
        last = settings.metrics_port + settings.workers - 1
        if settings.metrics_port <= settings.port <= last or last > 65535:
            raise ConfigError(
                f"with TIDINGS_WORKERS={settings.workers}, worker i serves /metrics on "
                f"TIDINGS_METRICS_PORT + i: {settings.metrics_port}-{last} must be valid "
                f"ports other than TIDINGS_PORT ({settings.port})"
            )


def _listen(host: str, port: int, backlog: int = 4096) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if _REUSEPORT:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _worker(
    settings: Settings,
    index: int,
    sock: socket.socket,
    ready: Any,
    parent: int,
    wakeup: tuple[int, int],
) -> None:
    """The body of a worker process (forked from the supervisor)."""
    # The supervisor's signal handling is not ours: uvicorn installs its own.
    signal.set_wakeup_fd(-1)
    for fd in wakeup:
        os.close(fd)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.platform == "linux":
        # SIGTERM (a graceful stop) the moment the supervisor dies, even by kill -9;
        # elsewhere the server notices within a second (`_Server.on_tick`).
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if settings.metrics_port:
        settings = settings.model_copy(update={"metrics_port": settings.metrics_port + index})
    from .run import serve_one

    serve_one(settings, sock, ready=ready, parent=parent)


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    ready: Any = None
    started: float = 0.0
    quick_deaths: int = 0


class Supervisor:
    """Start, watch and stop the worker processes (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = multiprocessing.get_context("fork")
        self.slots = [_Slot(i) for i in range(settings.workers)]
        self.port = settings.port
        self.shared: socket.socket | None = None  # the one socket, where not SO_REUSEPORT
        self._stop: int | None = None  # the signal that asked us to stop
        self._wake_r, self._wake_w = -1, -1

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a signal; returns the exit code (0: a clean stop)."""
        if not self._prepare_database():
            return 1
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        previous = {sig: signal.signal(sig, self._signal) for sig in _STOP_SIGNALS}
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        try:
            try:
                for slot in self.slots:
                    self._start(slot)
            except OSError as exc:
                log.error("cannot listen on %s:%s: %s", self.settings.host, self.port, exc)
                return self._shutdown(1)
            log.info(
                "supervisor (pid %d): %d workers on http://%s:%d (%s)",
                os.getpid(),
                len(self.slots),
                self.settings.host,
                self.port,
                "a socket each, SO_REUSEPORT" if _REUSEPORT else "one shared socket",
            )
            return self._watch()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            if self.shared is not None:
                self.shared.close()

    def _signal(self, sig: int, frame: FrameType | None) -> None:
        if self._stop is None:
            self._stop = sig

    def _watch(self) -> int:
        while True:
            waitables: list[Any] = [self._wake_r]
            waitables += [s.process.sentinel for s in self.slots if s.process is not None]
            multiprocessing.connection.wait(waitables, timeout=5.0)
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(self._wake_r, 512)
            if self._stop is not None:
                log.info("supervisor: %s, stopping the workers", signal.Signals(self._stop).name)
                return self._shutdown(0)
            for slot in self.slots:
                process = slot.process
                if process is None or process.is_alive():
                    continue
                process.join()
                code = process.exitcode
                if not slot.ready.is_set():
                    log.error(
                        "worker %d (pid %s) failed to start (exit code %s): stopping",
                        slot.index,
                        process.pid,
                        code,
                    )
                    slot.process = None
                    return self._shutdown(1)
                quick = time.monotonic() - slot.started < _QUICK_DEATH
                slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
                if slot.quick_deaths >= _QUICK_DEATHS:
                    log.error("worker %d keeps exiting (code %s): stopping", slot.index, code)
                    slot.process = None
                    return self._shutdown(1)
                log.warning(
                    "worker %d (pid %s) exited (code %s); starting it again",
                    slot.index,
                    process.pid,
                    code,
                )
                try:
                    self._start(slot)
                except OSError as exc:
                    log.error("cannot listen again for worker %d: %s", slot.index, exc)
                    return self._shutdown(1)

    # -- workers -----------------------------------------------------------------------

    def _socket(self) -> socket.socket:
        if not _REUSEPORT:
            if self.shared is None:
                self.shared = _listen(self.settings.host, self.port)
                self.port = self.shared.getsockname()[1]
            return self.shared
        sock = _listen(self.settings.host, self.port)
        self.port = sock.getsockname()[1]  # port 0: the others take the same one
        return sock

    def _start(self, slot: _Slot) -> None:
        sock = self._socket()
        slot.ready = self.ctx.Event()
        slot.process = self.ctx.Process(
            target=_worker,
            args=(
                self.settings,
                slot.index,
                sock,
                slot.ready,
                os.getpid(),
                (self._wake_r, self._wake_w),
            ),
            name=f"tidings-worker-{slot.index}",
            daemon=False,
        )
        try:
            slot.process.start()
        finally:
            if sock is not self.shared:
                # The worker has its copy. Ours would keep the socket in the port's
                # group after the worker died, with nobody accepting what lands on it.
                sock.close()
        slot.started = time.monotonic()

    def _shutdown(self, code: int) -> int:
        """SIGTERM every worker, wait for them (SIGKILL after the grace time)."""
        live = [s.process for s in self.slots if s.process is not None and s.process.is_alive()]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid or 0, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout + _KILL_MARGIN
        for process in live:
            process.join(max(0.0, deadline - time.monotonic()))
        killed = 0
        for process in live:
            if process.is_alive():
                log.error("worker pid %s did not stop in time: SIGKILL", process.pid)
                process.kill()
                process.join()
                killed += 1
        log.info("supervisor: all workers stopped")
        return code or (1 if killed else 0)

    def _prepare_database(self) -> bool:
        """SQLite is migrated once, before the workers start, so they do not race to.

        In a child process: the database driver's threads must not be running in
        the supervisor when it forks the workers.
        """
        if not self.settings.database_url.lower().startswith("sqlite"):
            return True  # PostgreSQL: `tidings migrate`, and each worker checks the schema
        process = self.ctx.Process(target=_migrate, args=(self.settings,), name="tidings-migrate")
        process.start()
        process.join()
        return process.exitcode == 0


def _migrate(settings: Settings) -> None:
    from ..inbox.commands import migrate

    try:
        migrate(settings)
    except TidingsError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(1)
