"""What an idle stream costs: memory per connection, no timer or task per connection,
and the open-file limit that bounds how many one process can hold.

The full measurement (10,000 real streams on a fresh server, RSS per connection) is
``scripts/idle_memory.py``; see docs/benchmarks.md, "Idle memory". These tests keep
the parts that made it small from quietly coming back.
"""

from __future__ import annotations

import asyncio
import gc
import resource
import subprocess
import sys
import tracemalloc

from tidings.auth import Principal
from tidings.event import Event
from tidings.hub import Hub
from tidings.server.fastwriter import PING_CHUNK, ChunkedSSEConnection
from tidings.server.run import raise_open_file_limit

N = 1000


async def open_idle(hub: Hub, n: int, offset: int = 0) -> list[ChunkedSSEConnection]:
    """`n` attached, released, writable streams of `n` users (as the fast path leaves them)."""
    conns = []
    for i in range(offset, offset + n):
        who = Principal(f"user{i}")
        conn = ChunkedSSEConnection(who, hub.streams_for(who, []), limit=256)
        hub.broker.release(conn, await hub.broker.attach(conn, None))
        conn.drain()
        conn.direct = _discard
        conns.append(conn)
    return conns


def _discard(data: bytes) -> None:
    pass


async def test_an_idle_stream_keeps_under_2_25_kb_of_python_objects() -> None:
    """Connection, principal, positions and cursor parts, the broker's registrations: about
    1.8 KB. A `deque` for the buffer alone used to add 1.2 KB (it keeps a 64-slot block)."""
    async with Hub() as hub:
        await open_idle(hub, 100)  # the shared structures exist and have grown already
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            conns = await open_idle(hub, N, offset=100)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        per_conn = sum(s.size_diff for s in after.compare_to(before, "filename")) / N
        assert len(conns) == N
        assert per_conn < 2304, f"{per_conn:.0f} bytes per idle connection"


async def test_idle_streams_have_no_timer_or_task_of_their_own() -> None:
    """Heartbeats are one chore for every connection (the hub's), not a timer each."""
    loop = asyncio.get_running_loop()
    scheduled: list[object] = getattr(loop, "_scheduled", [])
    async with Hub() as hub:
        await asyncio.sleep(0)
        tasks, timers = len(asyncio.all_tasks()), len(scheduled)
        conns = await open_idle(hub, N)
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) == tasks
        assert len(scheduled) == timers
        # One heartbeat pass writes one ping to each idle stream, from one call.
        writes: list[bytes] = []
        for conn in conns:
            conn.direct = writes.append
        hub.broker.heartbeat()
        assert writes == [PING_CHUNK] * N
        assert all(not conn.buffer for conn in conns)


async def test_one_event_to_idle_streams_leaves_their_buffers_empty() -> None:
    async with Hub() as hub:
        conns = await open_idle(hub, 10)
        writes: list[bytes] = []
        for conn in conns:
            conn.direct = writes.append
        await hub.broadcast("hello")
        await asyncio.sleep(0)  # the coalesced writes of this loop iteration
        assert len(writes) == 10 and all(b"hello" in w for w in writes)
        assert all(conn.buffer == [] for conn in conns)
        stray = Event("x", "", "n", 1, (("u:nobody", 1),))
        assert not any(conn.offer(stray) for conn in conns)


def test_serve_raises_the_open_file_limit_to_the_hard_limit() -> None:
    """`tidings serve` lifts a low soft limit (often 1024) before it listens."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = (
        "import resource\n"
        "from tidings.server.run import raise_open_file_limit\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "got = raise_open_file_limit()\n"
        "print(got, *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got, soft_after, hard_after = (int(v) for v in out.stdout.split())
    if hard == resource.RLIM_INFINITY:
        assert soft_after == 256  # nothing sensible to raise it to
    else:
        assert got == soft_after == hard_after == hard
    assert raise_open_file_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
