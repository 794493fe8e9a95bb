"""Where a held WebSocket connection's memory goes: Python allocations per socket, by line.

Serves the app in this process (uvicorn with `uvicorn_options`, as `tidings serve`,
SQLite in a throw-away directory, memory broker), opens 50 sockets to warm up, then N
more from a child process (raw sockets, one JWT per user, each waiting for its
``welcome``), and prints tracemalloc's difference over those N, per connection:

    .venv/bin/python scripts/ws_memory.py 1000              # top lines
    .venv/bin/python scripts/ws_memory.py 1000 --by filename

`tidings bench idle --transport ws` gives the RSS per connection of a real server.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
import subprocess
import sys
import tempfile
import tracemalloc

import uvicorn
import uvloop

from tidings.auth import mint_token
from tidings.config import Settings
from tidings.hub import Hub
from tidings.server.app import create_app
from tidings.server.websocket import uvicorn_options

SECRET = "s" * 48

# The child: N sockets, each upgraded with its own token and held once the welcome came.
CLIENT = r"""
import base64, os, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
tokens = sys.stdin.read().split()
held = []
for token in tokens[:n]:
    s = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((
        "GET /api/v1/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token + "\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key + "\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    got = b""
    while b"welcome" not in got:
        got += s.recv(65536)
    held.append(s)
print("ready", flush=True)
time.sleep(3600)
"""


async def clients(port: int, tokens: list[str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        str(port),
        str(len(tokens)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n".join(tokens).encode())
    proc.stdin.close()
    line = await proc.stdout.readline()
    if not line.startswith(b"ready"):
        raise SystemExit(f"the client did not get its sockets up: {line!r}")
    return proc


async def main(n: int, by: str, top: int) -> None:
    workdir = tempfile.mkdtemp(prefix="tidings-wsmem-")
    settings = Settings(
        jwt_secret=SECRET,
        api_keys=["k" * 24],
        database_url=f"sqlite+aiosqlite:///{workdir}/tidings.db",
    )
    app = create_app(settings, hub=Hub(settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, lifespan="on", log_config=None, log_level="warning", **uvicorn_options(settings)
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    port = sock.getsockname()[1]
    tokens = [mint_token(SECRET, f"user{i}") for i in range(n + 50)]
    warm = await clients(port, tokens[n:])
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held = await clients(port, tokens[:n])
    gc.collect()
    after = tracemalloc.take_snapshot()
    stats = after.compare_to(before, by)
    print(f"{sum(s.size_diff for s in stats) / n:.0f} bytes per connection")
    for stat in stats[:top]:
        where = str(stat.traceback[0]).split("site-packages/")[-1].split("/src/")[-1]
        print(f"{stat.size_diff / n:8.0f} B {stat.count_diff / n:6.1f} objects  {where}")
    for proc in (held, warm):
        proc.kill()
    os._exit(0)  # the held sockets would make a graceful shutdown wait


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, nargs="?", default=1000)
    parser.add_argument("--by", choices=("lineno", "filename"), default="lineno")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    uvloop.run(main(args.n, args.by, args.top))
