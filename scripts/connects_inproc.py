"""Stream connects in process: the fast path's `FastProtocol` fed with in-memory transports.

    PYTHONPATH=src taskset -c 0 python scripts/connects_inproc.py MODE [N] [--calls] [--topic]

MODE ``direct``: as `tidings serve` opens streams with no middleware (server/faststream.py);
``stack``: through the app's ASGI stack, as with CORS (or a build before faststream.py).
N connects (default 5000), 200 at a time, each with its own JWT, SQLite inbox, memory
broker; prints the process's CPU µs per connect until every response head was written
(the aiosqlite thread included), and with ``--calls`` the Python and C calls per connect
(slow: a profile hook counts them). ``--topic``: each request as `tidings bench connects`
sends it, a tenant and a topic in the token and ``?topics=`` in the target.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tempfile
import time
from typing import Any

import uvicorn
import uvloop
from uvicorn.server import ServerState

from tidings.auth import mint_token
from tidings.config import Settings
from tidings.server import fastpath, fastproto
from tidings.server.app import create_app
from tidings.server.run import gc_threshold

SECRET = "s" * 48
BATCH = 200  # handshakes in flight, as `tidings bench connects`


class Transport(asyncio.Transport):
    """Takes the writes; the first (the response head) counts the connect as done."""

    def __init__(self, done: Any) -> None:
        super().__init__()
        self.done = done
        self.writes = 0

    def write(self, data: Any) -> None:
        self.writes += 1
        if self.writes == 1:
            self.done()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def is_closing(self) -> bool:
        return False

    def is_reading(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def main(mode: str, n: int, count_calls: bool, topic: bool) -> None:
    if mode == "stack" and hasattr(fastproto, "goes_direct"):
        fastproto.goes_direct = lambda *a, **k: False  # type: ignore[attr-defined]
    url = f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/t.db"
    app = create_app(Settings(jwt_secret=SECRET, api_keys=["k" * 20], database_url=url))
    config = uvicorn.Config(app, http=fastpath.protocol_class(app), log_config=None)
    config.load()
    protocol = config.http_protocol_class
    target, claims = b"/api/v1/stream", {}
    if topic:
        target, claims = b"/api/v1/stream?topics=t1", {"tenant": "bench", "topics": ["t1"]}
    requests = [
        b"GET %s HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
        b"Authorization: Bearer %s\r\n\r\n"
        % (target, mint_token(SECRET, f"u{i}", **claims).encode())  # type: ignore[arg-type]
        for i in range(n)
    ]
    async with app.state.tidings.hub:
        server_state = ServerState()
        left = n
        all_done = asyncio.get_running_loop().create_future()

        def done() -> None:
            nonlocal left
            left -= 1
            if left == 0:
                all_done.set_result(None)

        calls = 0

        def profile(frame: Any, event: str, arg: Any) -> None:
            nonlocal calls
            if event in ("call", "c_call"):
                calls += 1

        gc.collect()
        gc.freeze()
        gc.set_threshold(*gc_threshold())  # as `tidings serve` runs
        started = time.process_time()
        if count_calls:
            sys.setprofile(profile)
        for at in range(0, n, BATCH):
            for raw in requests[at : at + BATCH]:
                proto = protocol(config=config, server_state=server_state, app_state={})
                proto.connection_made(Transport(done))
                proto.data_received(raw)
            await asyncio.sleep(0)
        await all_done
        sys.setprofile(None)
        cpu = time.process_time() - started
    line = f"{mode}: {cpu / n * 1e6:.1f} µs per connect"
    print(line + (f", {calls / n:.0f} calls per connect" if count_calls else ""))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[1]) if len(args) > 1 else 5000
    uvloop.run(main(args[0], n, "--calls" in sys.argv, "--topic" in sys.argv))
