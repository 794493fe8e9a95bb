"""capacity: how many connections one server holds, all of them live.

Opens -n streams (default 19,000: the open-file cap here is 20,000 per process,
for the server and the harness alike), holds them --hold s, then publishes one
message that every stream must receive. The connections are spread over child
processes of the harness (`holder`), each within its own open-file cap, so more
than 20,000 can be opened: with ``--servers 2 --broker redis://...`` (two
instances on one broker, streams spread over both) or a server started with
``--workers 2`` the bound is twice that.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from typing import Any

import orjson

from .procstat import Window
from .publishers import Publisher, marker
from .report import BenchError, Headline
from .scenario import Context, Result, Spec

__all__ = ["SPEC", "per_process"]

SPARE_FDS = 300  # the child's event loop, pipes, the interpreter's own files
CHILD_TIMEOUT = 600.0


def per_process() -> int:
    """Connections one harness process may hold."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    cap = hard if hard != resource.RLIM_INFINITY else 1 << 20
    return max(1, cap - SPARE_FDS)


class Child:
    """One `holder` process and its line protocol."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, spec: dict[str, Any]) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tidings.bench.holder",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        child = cls(proc)
        child.send(spec)
        return child

    def send(self, value: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(value) + b"\n")

    async def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), CHILD_TIMEOUT)
        if not line:
            raise BenchError(f"a capacity child exited early (code {await self.proc.wait()})")
        value: dict[str, Any] = orjson.loads(line)
        return value

    async def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def run(ctx: Context) -> Result:
    args, target, topic = ctx.args, ctx.target, ctx.new_topic()
    share = min(ctx.args.per_process or per_process(), per_process())
    window = Window(ctx.tree)
    children: list[Child] = []
    try:
        started = time.monotonic()
        for first in range(0, args.n, share):
            spec = {
                "target": target.to_spec(),
                "first": first,
                "count": min(share, args.n - first),
                "topic": topic,
                "tenant": ctx.tenant,
                "transport": args.transport,
                "concurrency": max(1, ctx.dial.concurrency // -(-args.n // share)),
                "src_ips": list(ctx.dial.src_ips),
                "retries": ctx.dial.retries,
                "ready_timeout": ctx.dial.ready_timeout,
                "grace": args.grace,
            }
            children.append(await Child.start(spec))
        ctx.progress.show(f"{target.kind}: opening {args.n} in {len(children)} process(es)")
        opened = [await c.receive() for c in children]
        open_s = time.monotonic() - started
        ready = sum(o["ready"] for o in opened)
        connected, open_cpu = window.close("open")
        holding = Window(ctx.tree)
        ctx.progress.show(f"{target.kind}: holding {ready} for {args.hold} s", force=True)
        await asyncio.sleep(args.hold)
        held, hold_cpu = holding.close("hold")
        for child in children:
            child.send({"expect": 1})
        publisher = Publisher(target.host, target.pub_port)
        status, _ = await publisher.send(target.publish_request(topic, ctx.tenant, marker(0)))
        publisher.close()
        probed = [await c.receive() for c in children]
    finally:
        await asyncio.gather(*(c.stop() for c in children))
        ctx.progress.done()
    reached = sum(p["received"] for p in probed)
    alive = sum(p["alive"] for p in probed)
    failures: dict[str, int] = {}
    for o in opened:
        for why, k in o["failures"].items():
            failures[why] = failures.get(why, 0) + k
    # The children's CPU is the harness's: move it out of "other".
    _move(open_cpu, "open", sum(o["cpu_s"] for o in opened))
    _move(
        hold_cpu, "hold", sum(p["cpu_s"] - o["cpu_s"] for o, p in zip(opened, probed, strict=True))
    )
    before = window.start
    slowest = max(o["seconds"] for o in opened)  # opening only, not the children's start
    return {
        "scenario": "capacity",
        "n": args.n,
        "transport": args.transport,
        "connections": ready,
        "alive_after_hold": alive,
        "probe_received": reached,
        "complete": ready == args.n and reached == ready and 200 <= status < 300,
        "hold_s": args.hold,
        "open_s": round(open_s, 2),
        "connects_per_s": round(ready / slowest, 1) if slowest > 0 else None,
        "harness_processes": len(children),
        "server_processes": held.procs,
        "server_rss_kb_before": before.rss_kb,
        "server_rss_kb_held": held.rss_kb,
        "kb_per_conn": round((held.rss_kb - before.rss_kb) / max(ready, 1), 2),
        "server_rss_kb_connected": connected.rss_kb,
        "connect_failures": failures,
        "connect_retries": sum(o["retries"] for o in opened),
        "probe_status": status,
        **open_cpu,
        **hold_cpu,
    }


def _move(cpu: dict[str, float], phase: str, children_s: float) -> None:
    cpu[f"harness_cpu_s_{phase}"] = round(cpu[f"harness_cpu_s_{phase}"] + children_s, 2)
    cpu[f"other_cpu_s_{phase}"] = round(max(0.0, cpu[f"other_cpu_s_{phase}"] - children_s), 2)


SPEC = Spec(
    name="capacity",
    run=run,
    default_n=19_000,
    headline=Headline("connections", higher_is_better=True),
    rows=(
        ("connections", "connections"),
        ("alive after hold", "alive_after_hold"),
        ("probe received by", "probe_received"),
        ("harness processes", "harness_processes"),
        ("server processes", "server_processes"),
        ("open s", "open_s"),
        ("RSS held KB", "server_rss_kb_held"),
        ("KB per connection", "kb_per_conn"),
        ("server CPU s in hold", "server_cpu_s_hold"),
        ("failures", "connect_failures"),
        ("complete", "complete"),
    ),
    help="N connections held by one server (or --servers/--workers), all live",
)
