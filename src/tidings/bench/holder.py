"""A child process of the capacity scenario: holds its share of the connections.

One process can hold at most RLIMIT_NOFILE sockets (20,000 here, and the hard
limit cannot be raised), so the capacity scenario spreads its connections over
children. Line protocol, JSON on stdin/stdout::

    parent -> child   {"target": {...}, "first": 0, "count": 19000, "topic": ..., ...}
    child  -> parent  {"ready": 19000, "failures": {}, "retries": 0, "seconds": 4.2, "cpu_s": 3.1}
    parent -> child   {"expect": 1}        (then the parent publishes that many messages)
    child  -> parent  {"received": 19000, "alive": 19000, "cpu_s": 3.2}
    parent closes stdin: the child closes its connections and exits.

Run as ``python -m tidings.bench.holder``; not a command of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Any

import orjson

from .dial import Dial, close_all, open_subscribers
from .procstat import harness_cpu_s
from .report import Progress
from .subscribers import Collector
from .target import Target

__all__ = ["main"]


async def _read() -> dict[str, Any]:
    line = await asyncio.to_thread(sys.stdin.readline)
    if not line:
        raise EOFError
    value: dict[str, Any] = orjson.loads(line)
    return value


def _write(value: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(value).decode() + "\n")
    sys.stdout.flush()


async def hold() -> None:
    spec = await _read()
    cpu0 = harness_cpu_s()  # the interpreter's start is not the harness's work
    target = Target.from_spec(spec["target"])
    dial = Dial(
        concurrency=spec["concurrency"],
        src_ips=spec["src_ips"],
        retries=spec["retries"],
        ready_timeout=spec["ready_timeout"],
    )
    tokens = target.tokens(spec["first"], spec["count"], spec["topic"], spec["tenant"])
    collector = Collector()
    started = time.monotonic()
    subs = await open_subscribers(
        target,
        collector,
        tokens,
        spec["topic"],
        spec["transport"],
        dial,
        Progress(False),
        first=spec["first"],
    )
    _write(
        {
            "ready": len(subs),
            "failures": dict(collector.failures),
            "retries": collector.retries,
            "seconds": round(time.monotonic() - started, 3),
            "cpu_s": round(harness_cpu_s() - cpu0, 2),
        }
    )
    try:
        expect = int((await _read())["expect"])
        collector.expect(expect * len(subs))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(collector.done.wait(), spec["grace"])
        _write(
            {
                "received": sum(1 for s in subs if s.count >= expect),
                "alive": sum(1 for s in subs if s.alive),
                "cpu_s": round(harness_cpu_s() - cpu0, 2),
            }
        )
        with contextlib.suppress(EOFError):
            await _read()
    except EOFError:
        pass
    finally:
        close_all(subs, collector)


def main() -> None:
    try:
        import uvloop
    except ImportError:  # slower, still correct
        asyncio.run(hold())
    else:
        uvloop.run(hold())


if __name__ == "__main__":
    main()
