"""The server under test: what it is, how to subscribe and publish to it, how to start ours.

A `Target` is target-agnostic data (addresses, credentials, PIDs) plus the few
protocol details that differ between tidings and Nchan: the subscribe request,
when a fresh stream counts as ready, and the publish request. `tidings_servers`
starts ``python -m tidings serve`` (one or more instances on one broker), each
pinned with taskset when asked, with a throw-away database and fresh credentials.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import orjson

from .report import BenchError, Progress

__all__ = [
    "Target",
    "free_port",
    "taskset",
    "tidings_servers",
    "url_target",
    "wait_http",
]

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
Transport = Literal["sse", "ws"]


@dataclass(frozen=True, slots=True)
class Target:
    """One server (or a cluster of instances) and how to talk to it."""

    kind: Literal["tidings", "nchan"]
    host: str
    ports: tuple[int, ...]  # subscribers are spread over these
    pub_port: int  # publishes go here (cluster: another instance than the subscribers')
    base: str = ""  # path prefix of the API
    key: str = ""  # tidings: an API key for publishing
    secret: str = ""  # tidings: TIDINGS_JWT_SECRET, to mint subscriber tokens
    pids: tuple[int, ...] = ()  # for /proc sampling; empty: unknown (--url without --pid)
    info: dict[str, Any] = field(default_factory=dict, compare=False)  # broker, workers...

    # -- subscribing ---------------------------------------------------------------------

    def tokens(self, first: int, count: int, topic: str, tenant: str) -> list[str]:
        """One JWT per subscriber (distinct users, so each connect verifies its own)."""
        if self.kind != "tidings":
            return [""] * count
        from ..auth import mint_token

        return [
            mint_token(self.secret, f"bench-{i}", tenant=tenant, topics=[topic])
            for i in range(first, first + count)
        ]

    def sub_request(self, port: int, topic: str, token: str, transport: Transport) -> bytes:
        host = f"{self.host}:{port}"
        if self.kind == "nchan":
            if transport != "sse":
                raise BenchError("the Nchan peer is benched over SSE only")
            path = f"/sub?topic={quote(topic, safe='')}"
            return (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
            )
        auth = f"Authorization: Bearer {token}\r\n"
        if transport == "ws":
            path = f"{self.base}/api/v1/ws?topics={quote(topic, safe='')}"
            key = base64.b64encode(os.urandom(16)).decode()
            return (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Upgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        path = f"{self.base}/api/v1/stream?topics={quote(topic, safe='')}"
        return (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Accept: text/event-stream\r\n\r\n"
        ).encode()

    def ready_marker(self, transport: Transport) -> bytes | None:
        """Bytes that mark a stream as subscribed; None: the response head is enough."""
        if self.kind == "nchan":
            return None
        return b'"welcome"' if transport == "ws" else b"event: welcome"

    # -- publishing ----------------------------------------------------------------------

    def publish_request(self, topic: str, tenant: str, payload: str) -> bytes:
        """One complete HTTP/1.1 request publishing `payload` (a marker) to `topic`."""
        host = f"{self.host}:{self.pub_port}"
        if self.kind == "nchan":
            body = payload.encode()
            path = f"/pub?topic={quote(topic, safe='')}"
            head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\n"
        else:
            body = orjson.dumps({"tenant": tenant, "topics": [topic], "data": payload})
            head = (
                f"POST {self.base}/api/v1/publish HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
            )
        return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body

    # -- the capacity scenario's child processes get a target as JSON ---------------------

    def to_spec(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Target:
        spec = dict(spec)
        spec["ports"] = tuple(spec["ports"])
        spec["pids"] = tuple(spec["pids"])
        return cls(**spec)


def url_target(url: str, key: str, secret: str, pids: tuple[int, ...]) -> Target:
    """A tidings server already running at `url` (loopback only)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise BenchError(f"--url must be http://host[:port] (got {url!r})")
    from ..config import is_loopback

    if not is_loopback(parts.hostname):
        raise BenchError(f"refusing a non-loopback target {parts.hostname!r}")
    port = parts.port or 80
    return Target(
        "tidings", parts.hostname, (port,), port, parts.path.rstrip("/"), key, secret, pids
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def taskset(cpus: str | None) -> list[str]:
    """The command prefix that pins a child to `cpus` ([] when not pinning)."""
    if not cpus:
        return []
    tool = shutil.which("taskset")
    if tool is None:
        raise BenchError("pinning needs taskset (util-linux)")
    return [tool, "-c", cpus]


@contextlib.contextmanager
def tidings_servers(
    progress: Progress,
    *,
    count: int = 1,
    broker: str = "memory://",
    workers: int | None = None,
    cpus: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Target]:
    """Start `count` fresh ``tidings serve`` processes on one broker; stop them afterwards.

    All share one API key and JWT secret; subscribers are spread over all of them and
    publishes go to the first.
    """
    key, secret = secrets.token_urlsafe(24), secrets.token_urlsafe(48)
    procs: list[subprocess.Popen[bytes]] = []
    with (
        tempfile.TemporaryDirectory(prefix="tidings-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        stack.callback(_stop_all, procs)
        ports = []
        for k in range(count):
            port = free_port()
            settings = {
                "TIDINGS_HOST": "127.0.0.1",
                "TIDINGS_PORT": str(port),
                "TIDINGS_API_KEYS": key,
                "TIDINGS_JWT_SECRET": secret,
                "TIDINGS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/bench{k}.db",
                "TIDINGS_BROKER_URL": broker,
                "TIDINGS_LOG_LEVEL": "warning",
                **(env or {}),
            }
            if workers is not None:
                settings["TIDINGS_WORKERS"] = str(workers)
            progress.show(f"starting tidings on 127.0.0.1:{port}", force=True)
            log = Path(tmp) / f"server{k}.log"
            procs.append(_spawn([sys.executable, "-m", "tidings", "serve"], settings, cpus, log))
            wait_http("127.0.0.1", port, "/healthz", procs[-1], log)
            ports.append(port)
        where = urlsplit(broker)  # no credentials, no query: this goes into the results
        info = {
            "broker": f"{where.scheme}://{where.hostname or ''}"
            + (f":{where.port}" if where.port else "")
            + where.path,
            "workers": workers or 1,
            "instances": count,
        }
        yield Target(
            "tidings",
            "127.0.0.1",
            tuple(ports),
            ports[0],
            key=key,
            secret=secret,
            pids=tuple(p.pid for p in procs),
            info=info,
        )


def _spawn(
    argv: list[str], settings: dict[str, str], cpus: str | None, log: Path
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(settings)
    with log.open("wb") as out:
        return subprocess.Popen(
            [*taskset(cpus), *argv],
            env=env,
            cwd=log.parent,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(
    host: str, port: int, path: str, proc: subprocess.Popen[bytes], log: Path, ok: int = 200
) -> None:
    """Poll `path` until it answers `ok` (bounded); a child that exits first is an error."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise BenchError(f"the server exited with code {proc.returncode}:\n{tail}")
        conn = http.client.HTTPConnection(host, port, timeout=1)
        try:
            conn.request("GET", path)
            if conn.getresponse().status == ok:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    raise BenchError(
        f"the server on port {port} did not answer {path} within {START_TIMEOUT:.0f} s"
    )
