"""`tidings bench SCENARIO`: the command line, the run against one target, --compare.

Without --url the bench starts fresh ``tidings serve`` processes itself (with
--pin: servers on one CPU under taskset, the harness on another) and stops them
afterwards. With --compare it runs the same scenario against a fresh Nchan too and
prints the ratio of the scenario's headline number with issue 8's bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import capacity, cluster, connects, fanout, idle, nchan, publish, throughput
from .brokers import drop_prefix, fresh, is_shared
from .dial import Dial, parse_src_ips
from .report import (
    BenchError,
    Progress,
    compare_line,
    compare_table,
    emit,
    print_text,
    write_json,
)
from .scenario import Context, Result, Spec
from .target import Target, tidings_servers, url_target

__all__ = ["SCENARIOS", "add_parser", "run"]

SCENARIOS: dict[str, Spec] = {
    s.name: s
    for s in (
        fanout.SPEC,
        idle.SPEC,
        throughput.SPEC,
        publish.SPEC,
        connects.SPEC,
        capacity.SPEC,
        cluster.SPEC,
    )
}
SPARE_FDS = 256  # for publishers, the servers' pipes, the event loop
WS_BOUND = 1.2  # issue 8: WebSocket fan-out p99 ≤ 1.2 × Nchan's SSE p99
DEFAULT_SRC_IPS = "127.0.0.2-127.0.0.9"


def add_parser(commands: Any) -> None:
    from . import __doc__ as doc

    p = commands.add_parser(
        "bench",
        help="load-test a server (alone or against Nchan)",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "scenario",
        choices=list(SCENARIOS),
        help="; ".join(f"{s.name}: {s.help}" for s in SCENARIOS.values()),
    )
    t = p.add_argument_group("target")
    t.add_argument("--url", help="bench this running server (default: start fresh ones)")
    t.add_argument(
        "--key", default=os.environ.get("TIDINGS_API_KEY"), help="with --url: an API key"
    )
    t.add_argument(
        "--secret",
        default=os.environ.get("TIDINGS_JWT_SECRET"),
        help="with --url: the server's TIDINGS_JWT_SECRET (to mint subscriber tokens)",
    )
    t.add_argument("--pid", default="", help="with --url: server PIDs for RSS/CPU, comma separated")
    t.add_argument("--compare", action="store_true", help="run against Nchan too; print the ratio")
    t.add_argument(
        "--pin",
        nargs="?",
        const="0:1",
        metavar="SERVER:HARNESS",
        help="pin started servers (taskset) and this harness to CPU lists (bare --pin: 0:1)",
    )
    t.add_argument(
        "--broker", help="broker of started servers: memory:// (default), redis://, nats://"
    )
    t.add_argument("--servers", type=int, default=1, help="instances to start on --broker")
    t.add_argument("--workers", type=int, help="TIDINGS_WORKERS of started servers")
    t.add_argument("--nginx", default=nchan.NGINX, help=f"nginx binary (default {nchan.NGINX})")
    t.add_argument("--nchan-module", default=nchan.NCHAN_MODULE, help="the nchan module file")
    w = p.add_argument_group("load")
    w.add_argument(
        "-n",
        type=int,
        help="subscribers (default per scenario: "
        + ", ".join(f"{s.name} {s.default_n}" for s in SCENARIOS.values())
        + ")",
    )
    w.add_argument("--messages", type=int, default=20, help="fanout: messages (default 20)")
    w.add_argument("--interval", type=float, default=0.2, help="fanout: seconds between messages")
    w.add_argument("--hold", type=float, default=30.0, help="idle/capacity: seconds to hold")
    w.add_argument("--duration", type=float, default=10.0, help="throughput/publish: seconds")
    w.add_argument("--publishers", type=int, default=8, help="throughput/publish: connections")
    w.add_argument("--transport", choices=["sse", "ws"], default="sse")
    w.add_argument("--topic", default="", help="topic (default: a fresh one per run)")
    w.add_argument("--tenant", default="", help="tenant (default: the default tenant)")
    w.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="cluster and --compare: alternating rounds; the verdict takes medians",
    )
    w.add_argument("--settle", type=float, default=1.0, help="pause after subscribing, s")
    w.add_argument("--grace", type=float, default=10.0, help="max wait for late deliveries, s")
    d = p.add_argument_group("connections")
    d.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    d.add_argument(
        "--src-ips",
        default=DEFAULT_SRC_IPS,
        help=f"source addresses to spread connections over (default {DEFAULT_SRC_IPS}; '' = any)",
    )
    d.add_argument("--retries", type=int, default=2, help="re-subscribe attempts after a failure")
    d.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to subscribe")
    d.add_argument(
        "--per-process",
        type=int,
        help="capacity: connections per harness process (default: the open-file cap less spare)",
    )
    p.add_argument("--max-seconds", type=float, default=900.0, help="bound on each run")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    spec = SCENARIOS[args.scenario]
    progress = Progress(sys.stdout.isatty())
    try:
        _check(args, spec)
        server_cpus, harness_cpus = _pins(args.pin)
        if harness_cpus:
            try:
                os.sched_setaffinity(0, _cpu_set(harness_cpus))
            except OSError as exc:
                raise BenchError(f"--pin: cannot run on CPUs {harness_cpus}: {exc}") from None
        _raise_fd_limit()
        dial = Dial(args.concurrency, parse_src_ips(args.src_ips), args.retries, args.ready_timeout)
        servers = functools.partial(_servers, progress, args, server_cpus)
        ctx = Context(args, progress, dial, servers)
        if not args.compare:
            with _ours(ctx, spec) as target:
                result = _bounded(spec, ctx.on(target) if target else ctx)
            emit(result, spec.rows, args.out)
            return 0 if result.get("complete") else 1
        ours, theirs = _compare(ctx, spec, server_cpus)
    except BenchError as exc:
        progress.done()
        print(f"tidings: {exc}", file=sys.stderr, flush=True)
        return 2
    headline = spec.headline
    if args.transport == "ws":
        headline = dataclasses.replace(headline, bound=WS_BOUND if spec.name == "fanout" else None)
    line = compare_line(spec.name, headline, ours, theirs)
    print_text(compare_table(line, spec.rows, ours[-1], theirs[-1]))
    for mine, peer in zip(ours, theirs, strict=True):
        write_json(mine, args.out)
        write_json(peer, args.out)
    write_json(line, args.out)
    return 0 if line["complete"] else 1


def _check(args: argparse.Namespace, spec: Spec) -> None:
    if args.n is None:
        args.n = spec.default_n
    if args.n < 0 or (args.n == 0 and spec.name != "publish"):
        raise BenchError("-n must be at least 1 (publish: at least 0)")
    if args.per_process is not None and args.per_process < 1:
        raise BenchError("--per-process must be at least 1")
    if min(args.messages, args.publishers, args.concurrency, args.servers, args.rounds) < 1:
        raise BenchError(
            "--messages, --publishers, --concurrency, --servers and --rounds must be >= 1"
        )
    if min(args.interval, args.grace, args.hold, args.duration, args.settle) < 0:
        raise BenchError("durations must not be negative")
    if args.url and not (args.key and args.secret):
        raise BenchError("with --url, give --key (an API key) and --secret (TIDINGS_JWT_SECRET)")
    if args.url and spec.starts_servers:
        raise BenchError(f"{spec.name} starts its own servers; it takes no --url")
    if args.compare and not spec.nchan:
        raise BenchError(f"{spec.name} has no Nchan counterpart; drop --compare")
    if args.servers > 1 and not is_shared(args.broker or "memory://"):
        raise BenchError("--servers > 1 needs a shared --broker redis://... or nats://...")
    if spec.name != "capacity" and args.n + SPARE_FDS > _fd_hard():
        raise BenchError(
            f"-n {args.n} needs more than the open-file cap {_fd_hard()} allows one process "
            "(the capacity scenario spreads connections over processes)"
        )


def _pins(pin: str | None) -> tuple[str | None, str | None]:
    if not pin:
        return None, None
    server, sep, harness = pin.partition(":")
    if not sep or not server or not harness:
        raise BenchError(f"--pin takes SERVER_CPUS:HARNESS_CPUS such as 0:1 (got {pin!r})")
    return server, harness


def _cpu_set(cpus: str) -> set[int]:
    """'1', '0,2' or '2-3' -> CPU numbers."""
    out: set[int] = set()
    try:
        for part in cpus.split(","):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise BenchError(f"--pin: not a CPU list: {cpus!r}") from None
    return out


def _fd_hard() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def _raise_fd_limit() -> None:
    """Soft open-file limit up to the hard one, for us and the servers we start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _servers(
    progress: Progress, args: argparse.Namespace, cpus: str | None, count: int, broker: str
) -> contextlib.AbstractContextManager[Target]:
    return tidings_servers(progress, count=count, broker=broker, workers=args.workers, cpus=cpus)


@contextlib.contextmanager
def _ours(ctx: Context, spec: Spec) -> Iterator[Target | None]:
    """The tidings target of a run: --url, fresh servers, or none (scenario starts its own)."""
    args = ctx.args
    if spec.starts_servers:
        yield None
    elif args.url:
        pids = tuple(int(p) for p in args.pid.split(",") if p.strip())
        yield url_target(args.url, args.key, args.secret, pids)
    elif args.broker and is_shared(args.broker):
        url = fresh(args.broker)
        try:
            with ctx.servers(args.servers, url) as target:
                yield target
        finally:
            asyncio.run(drop_prefix(url))
    else:
        with ctx.servers(args.servers, args.broker or "memory://") as target:
            yield target


def _compare(ctx: Context, spec: Spec, cpus: str | None) -> tuple[list[Result], list[Result]]:
    """--rounds alternating runs against fresh tidings and fresh Nchan (always over SSE)."""
    nchan_args = argparse.Namespace(**{**vars(ctx.args), "transport": "sse"})
    their_ctx = dataclasses.replace(ctx, args=nchan_args)
    ours: list[Result] = []
    theirs: list[Result] = []
    for _ in range(ctx.args.rounds):
        with _ours(ctx, spec) as target:
            assert target is not None
            ours.append(_bounded(spec, ctx.on(target)))
        with nchan.nchan_server(
            ctx.progress, cpus=cpus, nginx=ctx.args.nginx, module=ctx.args.nchan_module
        ) as peer:
            theirs.append(_bounded(spec, their_ctx.on(peer)))
    return ours, theirs


def _bounded(spec: Spec, ctx: Context) -> Result:
    """Run one scenario on a fresh event loop (uvloop when installed), within --max-seconds."""
    limit = ctx.args.max_seconds

    async def bounded() -> Result:
        async with asyncio.timeout(limit):
            return await spec.run(ctx)

    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # slower, still correct
        factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            result = runner.run(bounded())
    except TimeoutError:
        raise BenchError(f"the run took longer than --max-seconds {limit}") from None
    finally:
        ctx.progress.done()
    return _stamp(result, ctx)


def _stamp(result: Result, ctx: Context) -> Result:
    """Where and when: the target, the machine's load, the pinning."""
    target = ctx.own
    result["target"] = target.kind if target else "tidings"
    if target and target.info:
        result["server"] = target.info
    result["ts"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    result["harness_cpus"] = sorted(os.sched_getaffinity(0))
    if ctx.args.pin:
        result["pin"] = ctx.args.pin
    return result
