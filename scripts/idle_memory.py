"""Idle memory per authenticated SSE connection, and what idling costs in CPU.

Starts a fresh ``python -m tidings serve`` (memory backend, history on, SQLite in a
throw-away directory; pinned with ``--server-cpu``), reads its RSS from
``/proc/<pid>/status``, opens N SSE streams with raw asyncio connections (one JWT per
user, a user per connection, source addresses 127.0.0.2-127.0.0.9), waits for every
``welcome``, holds them ``--hold`` seconds, reads RSS and CPU time again and prints one
JSON line: ``kb_per_conn = (rss_after_hold - rss_before) / N``.

    .venv/bin/python scripts/idle_memory.py -n 10000 --hold 30
    .venv/bin/python scripts/idle_memory.py -n 19000 --hold 5     # capacity in one process

`--url`/`--secret`/`--pid` measure a server started elsewhere instead. This is a
small measuring script; `tidings bench` is the product's benchmark command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tidings.auth import mint_token

IP_BIND_ADDRESS_NO_PORT = 24
SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sub(asyncio.Protocol):
    __slots__ = ("data", "lost", "ready", "transport")

    def __init__(self, ready: asyncio.Future[None]) -> None:
        self.data = b""
        self.ready = ready
        self.lost = False
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.ready.done():
            return
        self.data += data
        if b"event: welcome" in self.data:
            self.ready.set_result(None)
            self.data = b""
        elif self.data.startswith(b"HTTP/1.1 ") and not self.data.startswith(b"HTTP/1.1 200"):
            self.ready.set_exception(RuntimeError(self.data[:200].decode(errors="replace")))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before welcome"))


async def open_sub(host: str, port: int, path: str, token: str, source: str) -> Sub:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source, 0))
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    ready: asyncio.Future[None] = loop.create_future()
    transport, proto = await loop.create_connection(lambda: Sub(ready), sock=sock)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    )
    transport.write(request.encode())  # type: ignore[attr-defined]
    await ready
    return proto


def start_server(
    port: int, secret: str, workdir: Path, cpu: str | None, extra: list[str], nofile: int | None
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(
        TIDINGS_JWT_SECRET=secret,
        TIDINGS_API_KEYS="key-" + secrets.token_urlsafe(16),
        TIDINGS_DATABASE_URL=f"sqlite+aiosqlite:///{workdir / 'tidings.db'}",
        TIDINGS_LOG_LEVEL="warning",
        PYTHONUNBUFFERED="1",
    )
    for item in extra:
        key, _, value = item.partition("=")
        env[key] = value
    cmd = [sys.executable, "-m", "tidings", "serve", "--port", str(port)]
    if cpu is not None:
        cmd = ["taskset", "-c", cpu, *cmd]
    log = (workdir / "server.log").open("ab")

    def limit() -> None:  # the server starts with this soft limit (serve raises it itself)
        if nofile is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

    proc = subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError((workdir / "server.log").read_text())


async def run(args: argparse.Namespace) -> dict[str, object]:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    proc = None
    workdir = Path(tempfile.mkdtemp(prefix="tidings-idle-"))
    if args.url:
        host, _, port_s = args.url.removeprefix("http://").partition(":")
        port, secret, pid = int(port_s), args.secret, args.pid
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        host, secret = "127.0.0.1", secrets.token_urlsafe(48)
        proc = start_server(port, secret, workdir, args.server_cpu, args.env, args.server_nofile)
        pid = proc.pid  # taskset execs the server: the same pid
    try:
        tokens = [mint_token(secret, f"idle{i}", ttl_s=3600) for i in range(args.n)]
        await asyncio.sleep(1.0)
        rss0, cpu0 = rss_kb(pid), cpu_s(pid)
        limit = asyncio.Semaphore(args.concurrency)
        failures: list[str] = []

        async def one(i: int) -> Sub | None:
            async with limit:
                try:
                    return await open_sub(host, port, args.path, tokens[i], SOURCES[i % 8])
                except Exception as exc:
                    failures.append(repr(exc))
                    return None

        t0 = time.monotonic()
        subs = await asyncio.gather(*(one(i) for i in range(args.n)))
        open_s = time.monotonic() - t0
        ready = [s for s in subs if s is not None]
        rss1, cpu1 = rss_kb(pid), cpu_s(pid)
        await asyncio.sleep(args.hold)
        rss2, cpu2 = rss_kb(pid), cpu_s(pid)
        alive = sum(not s.lost for s in ready)
        for s in ready:
            if s.transport is not None:
                s.transport.close()
        return {
            "n": args.n,
            "ready": len(ready),
            "alive_after_hold": alive,
            "failures": failures[:5],
            "open_s": round(open_s, 2),
            "hold_s": args.hold,
            "rss_kb_before": rss0,
            "rss_kb_connected": rss1,
            "rss_kb_after_hold": rss2,
            "kb_per_conn": round((rss2 - rss0) / max(len(ready), 1), 2),
            "server_cpu_s_open": round(cpu1 - cpu0, 2),
            "server_cpu_s_hold": round(cpu2 - cpu1, 2),
            "server_nofile": _nofile(pid),
            "loadavg": os.getloadavg(),
        }
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
            if proc.poll() is None:
                proc.kill()


def _nofile(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return "/".join(line.split()[3:5])
    return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", type=int, default=10000)
    p.add_argument("--hold", type=float, default=30.0)
    p.add_argument("--path", default="/api/v1/stream")
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--server-cpu", default="0", help="taskset CPU list for the server ('' = none)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    p.add_argument("--server-nofile", type=int, help="start the server with this soft fd limit")
    p.add_argument("--url", help="measure a running server instead (needs --secret, --pid)")
    p.add_argument("--secret")
    p.add_argument("--pid", type=int)
    args = p.parse_args()
    if args.server_cpu == "":
        args.server_cpu = None
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
