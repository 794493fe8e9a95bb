"""`tidings bench`: load scenarios against a tidings server (ours, or one at --url).

Scenarios (each prints ONE JSON line on stdout; on a terminal also a table):

    fanout   N SSE subscribers on one topic; M messages every --interval s through
             POST /api/v1/publish; per message, the time until the FIRST and the
             LAST subscriber had it, and whether every subscriber got every message.

Without --url the bench starts ``python -m tidings serve`` on a free loopback
port in a child process (with its own API key and JWT secret, a throw-away
database) and stops it afterwards; with --url it needs --key (an API key) and
--secret (the server's TIDINGS_JWT_SECRET, to mint the subscribers' tokens).

Technique: subscribers are raw asyncio protocols (no HTTP library per
connection), on uvloop when installed. Each message's data is a marker
``q<seq>t<send_ns>z``; subscribers find markers in the raw byte stream, so
neither SSE framing nor chunked encoding matters, and the latency is the
receive time minus the send time written into the marker (one host, one clock).

Exit codes: 0 complete, 1 the run finished incomplete (some delivery missing),
2 bad usage or a server that would not start.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import os
import re
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit

import orjson

__all__ = ["add_parser", "run"]

MARK = re.compile(rb"q(\d+)t(\d+)z")
_TAIL = 48  # bytes kept between reads: longer than any marker
_HEAD_LIMIT = 65536
_SPARE_FDS = 256  # for the publisher, the server's pipe, the event loop...
SERVER_START_TIMEOUT = 30.0
READY_TIMEOUT = 30.0
CONNECT_RETRIES = 2


class BenchError(Exception):
    """Ends the bench with exit code 2 and ``tidings: <message>``."""


# -- command line --------------------------------------------------------------------------------


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "bench",
        help="load-test a server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--url", help="bench this server (default: start one on a free port)")
    p.add_argument(
        "--key", default=os.environ.get("TIDINGS_API_KEY"), help="with --url: an API key"
    )
    p.add_argument(
        "--secret",
        default=os.environ.get("TIDINGS_JWT_SECRET"),
        help="with --url: the server's TIDINGS_JWT_SECRET (to mint subscriber tokens)",
    )
    p.add_argument("-n", type=int, default=1000, help="subscribers (default 1000)")
    p.add_argument("--messages", type=int, default=20, help="messages (default 20)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between messages")
    p.add_argument("--topic", default="bench", help="topic (default bench)")
    p.add_argument("--tenant", default="", help="tenant (default: the default tenant)")
    p.add_argument("--transport", choices=["sse", "ws"], default="sse")
    p.add_argument("--concurrency", type=int, default=200, help="connects in flight")
    p.add_argument("--grace", type=float, default=10.0, help="max wait for late deliveries, s")
    p.add_argument("--max-seconds", type=float, default=600.0, help="bound on the whole run")
    p.set_defaults(command=run)


def run(args: argparse.Namespace) -> int:
    tty = sys.stdout.isatty()
    try:
        _check_args(args)
        _raise_fd_limit(args.n + _SPARE_FDS)
        progress = Progress(tty)
        with _target(args, progress) as target:
            scenario = SCENARIOS[args.scenario]
            result = _run_async(lambda: scenario(args, target, progress), args.max_seconds)
    except BenchError as exc:
        print(f"tidings: {exc}", file=sys.stderr, flush=True)
        return 2
    if tty:
        print(_table(result))
    print(orjson.dumps(result).decode(), flush=True)
    return 0 if result.get("complete") else 1


def _check_args(args: argparse.Namespace) -> None:
    if args.n < 1 or args.messages < 1:
        raise BenchError("-n and --messages must be at least 1")
    if args.interval < 0 or args.grace < 0 or args.concurrency < 1:
        raise BenchError("--interval and --grace must not be negative, --concurrency >= 1")
    if args.url and not (args.key and args.secret):
        raise BenchError("with --url, give --key (an API key) and --secret (TIDINGS_JWT_SECRET)")


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(
            f"-n needs about {needed} file descriptors; the hard limit is {hard} (ulimit -Hn)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _run_async(
    scenario: Callable[[], Awaitable[dict[str, Any]]], max_seconds: float
) -> dict[str, Any]:
    async def bounded() -> dict[str, Any]:
        async with asyncio.timeout(max_seconds):
            return await scenario()

    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # slower, still correct
        factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(bounded())
    except TimeoutError:
        raise BenchError(f"the run took longer than --max-seconds {max_seconds}") from None


class Progress:
    """One status line on stderr when stdout is a terminal; silent when piped."""

    INTERVAL = 0.1  # seconds between redraws: 10,000 connects need not mean 10,000 writes

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._shown = False
        self._at = 0.0

    def show(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.enabled and (force or now - self._at >= self.INTERVAL):
            sys.stderr.write(f"\r\x1b[K{text}")
            sys.stderr.flush()
            self._shown, self._at = True, now

    def done(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False


# -- the target server ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    path: str  # base path of the API ("" normally)
    key: str
    secret: str
    pid: int | None  # the server we started, if we did


@contextlib.contextmanager
def _target(args: argparse.Namespace, progress: Progress) -> Iterator[Target]:
    if args.url:
        url = urlsplit(args.url)
        if url.scheme != "http" or not url.hostname:
            raise BenchError(f"--url must be http://host[:port] (got {args.url!r})")
        yield Target(
            url.hostname, url.port or 80, url.path.rstrip("/"), args.key, args.secret, None
        )
        return
    with _own_server(progress) as target:
        yield target


@contextlib.contextmanager
def _own_server(progress: Progress) -> Iterator[Target]:
    key, secret = secrets.token_urlsafe(24), secrets.token_urlsafe(48)
    with tempfile.TemporaryDirectory(prefix="tidings-bench-") as tmp:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        env.update(
            TIDINGS_HOST="127.0.0.1",
            TIDINGS_PORT=str(port),
            TIDINGS_API_KEYS=key,
            TIDINGS_JWT_SECRET=secret,
            TIDINGS_DATABASE_URL=f"sqlite+aiosqlite:///{tmp}/bench.db",
            TIDINGS_LOG_LEVEL="warning",
        )
        log_path = Path(tmp) / "server.log"
        progress.show(f"starting a server on 127.0.0.1:{port}", force=True)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tidings", "serve"],
                env=env,
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_healthy("127.0.0.1", port, proc, log_path)
            yield Target("127.0.0.1", port, "", key, secret, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_healthy(host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise BenchError(f"the server exited with code {proc.returncode}:\n{tail}")
        conn = http.client.HTTPConnection(host, port, timeout=1)
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    raise BenchError(f"the server did not answer /healthz within {SERVER_START_TIMEOUT:.0f} s")


# -- fanout --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """Deliveries of one fanout run, per message."""

    messages: int
    count: list[int] = field(default_factory=list)
    first_ns: list[int | None] = field(default_factory=list)
    last_ns: list[int] = field(default_factory=list)
    received: int = 0
    expected: int = -1  # known once every subscriber is connected
    duplicates: int = 0
    stray: int = 0  # markers that were not ours (another run on the topic)
    lost: int = 0  # streams that ended while we listened
    failures: Counter[str] = field(default_factory=Counter)
    closing: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.count = [0] * self.messages
        self.first_ns = [None] * self.messages
        self.last_ns = [0] * self.messages

    def record(self, sub: SSESubscriber, seq: int, latency_ns: int) -> None:
        if seq >= self.messages:
            self.stray += 1
            return
        bit = 1 << seq
        if sub.got & bit:
            self.duplicates += 1
            return
        sub.got |= bit
        self.count[seq] += 1
        first = self.first_ns[seq]
        if first is None or latency_ns < first:
            self.first_ns[seq] = latency_ns
        if latency_ns > self.last_ns[seq]:
            self.last_ns[seq] = latency_ns
        self.received += 1
        if self.received == self.expected:
            self.done.set()


class SSESubscriber(asyncio.Protocol):
    """One SSE stream on a bare transport: ready at the welcome, then counts markers."""

    __slots__ = ("_buf", "_request", "_tail", "got", "ready", "tally", "transport")

    def __init__(self, request: bytes, tally: Tally, ready: asyncio.Future[bool]) -> None:
        self._request = request
        self._buf = b""
        self._tail = b""
        self.tally = tally
        self.ready = ready
        self.got = 0  # bit k set: message k arrived
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.tally.failures["closed-before-ready"] += 1
            self.ready.set_result(False)
        elif self.ready.result() and not self.tally.closing:
            self.tally.lost += 1

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if not self.ready.done():
            data = self._handshake(data)
        if data:
            self._scan(data, now)

    def _handshake(self, data: bytes) -> bytes:
        """Wait for the 200 and the welcome event; returns the bytes after them."""
        buf = self._buf + data
        end = buf.find(b"\r\n\r\n")
        if end >= 0 and buf[9:12] != b"200":
            return self._fail(f"http-{buf[9:12].decode(errors='replace')}")
        welcome = buf.find(b"event: welcome", end) if end >= 0 else -1
        if welcome < 0:
            if len(buf) > _HEAD_LIMIT:
                return self._fail("no-welcome")
            self._buf = buf
            return b""
        self._buf = b""
        self.ready.set_result(True)
        return buf[welcome:]

    def _fail(self, why: str) -> bytes:
        self.tally.failures[why] += 1
        self.ready.set_result(False)
        if self.transport is not None:
            self.transport.close()
        return b""

    def _scan(self, data: bytes, now: int) -> None:
        if self._tail:
            data = self._tail + data
        end = 0
        for m in MARK.finditer(data):
            end = m.end()
            self.tally.record(self, int(m[1]), now - int(m[2]))
        rest = data[end:]
        self._tail = rest[-_TAIL:] if b"q" in rest else b""


class WSSubscriber(SSESubscriber):
    """One WebSocket on a bare transport: ready at the welcome message, then counts markers
    in text frames and answers the server's pings. Offers no compression."""

    __slots__ = ("_frames", "_upgraded")

    def __init__(self, request: bytes, tally: Tally, ready: asyncio.Future[bool]) -> None:
        super().__init__(request, tally, ready)
        self._frames = b""
        self._upgraded = False

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if not self._upgraded:
            data = self._upgrade(data)
        if data:
            self._parse(self._frames + data if self._frames else data, now)

    def _upgrade(self, data: bytes) -> bytes:
        """Wait for the 101; returns the bytes after it (frames)."""
        buf = self._buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _HEAD_LIMIT:
                return self._fail("no-upgrade")
            self._buf = buf
            return b""
        if buf[9:12] != b"101":
            return self._fail(f"http-{buf[9:12].decode(errors='replace')}")
        self._buf, self._upgraded = b"", True
        return buf[end + 4 :]

    def _parse(self, buf: bytes, now: int) -> None:
        pos, size = 0, len(buf)
        while size - pos >= 2:
            opcode, length, head = buf[pos] & 0x0F, buf[pos + 1] & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if size - pos < head + length:
                break
            payload = buf[pos + head : pos + head + length]
            pos += head + length
            if opcode in (0x1, 0x0):  # text, continuation
                if not self.ready.done():
                    if b'"welcome"' in payload:
                        self.ready.set_result(True)
                    continue
                for m in MARK.finditer(payload):
                    self.tally.record(self, int(m[1]), now - int(m[2]))
            elif opcode == 0x9 and self.transport is not None:  # ping: a masked pong
                mask = os.urandom(4)
                masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + mask + masked)
            elif opcode == 0x8 and self.transport is not None:  # close
                if not self.ready.done():
                    self._fail("closed-before-welcome")
                self.transport.close()
        self._frames = buf[pos:]


def _ws_request(path: str, host: str, token: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def open_subscribers(
    target: Target,
    tokens: list[str],
    topic: str,
    tally: Tally,
    concurrency: int,
    progress: Progress,
    transport: str = "sse",
) -> list[SSESubscriber]:
    """Connect one stream per token, at most `concurrency` handshakes at a time."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    subs: list[SSESubscriber] = []
    path = f"{target.path}/api/v1/stream?topics={quote(topic, safe='')}"
    kind = WSSubscriber if transport == "ws" else SSESubscriber
    if transport == "ws":
        path = f"{target.path}/api/v1/ws?topics={quote(topic, safe='')}"

    async def attempt(token: str) -> SSESubscriber | None:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        if transport == "ws":
            request = _ws_request(path, f"{target.host}:{target.port}", token)
        ready: asyncio.Future[bool] = loop.create_future()
        try:
            _, sub = await asyncio.wait_for(
                loop.create_connection(
                    lambda: kind(request, tally, ready), target.host, target.port
                ),
                READY_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            tally.failures[f"connect-{type(exc).__name__}"] += 1
            return None
        try:
            ok = await asyncio.wait_for(asyncio.shield(ready), READY_TIMEOUT)
        except TimeoutError:
            tally.failures["ready-timeout"] += 1
            ok = False
        if not ok and sub.transport is not None:
            sub.transport.close()
        return sub if ok else None

    async def one(token: str) -> None:
        for k in range(1 + CONNECT_RETRIES):
            if k:
                await asyncio.sleep(0.2 * k)  # a refused connect: let the backlog drain
            async with gate:
                sub = await attempt(token)
            if sub is not None:
                subs.append(sub)
                progress.show(f"connected {len(subs)}/{len(tokens)}")
                return

    await asyncio.gather(*(one(t) for t in tokens))
    return subs


class RawPublisher:
    """Keep-alive HTTP/1.1 POSTs of JSON bodies (answers with Content-Length)."""

    def __init__(self, target: Target, path: str) -> None:
        self.target = target
        self._head = (
            f"POST {target.path}{path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
            f"Authorization: Bearer {target.key}\r\nContent-Type: application/json\r\n"
            "Content-Length: "
        ).encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> int:
        """The answer's status; 0 for a transport failure (the next post reconnects)."""
        try:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(
                    self.target.host, self.target.port
                )
            assert self._reader is not None
            self._writer.write(self._head + b"%d\r\n\r\n" % len(body) + body)
            head = await self._reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                elif name.strip().lower() == b"connection" and b"close" in value.lower():
                    self.close()
            if self._reader is not None:
                await self._reader.readexactly(length)
            return int(head[9:12])
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self.close()
            return 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def fanout(args: argparse.Namespace, target: Target, progress: Progress) -> dict[str, Any]:
    from .auth import mint_token

    tally = Tally(args.messages)
    tokens = [
        mint_token(target.secret, f"bench-{i}", tenant=args.tenant, topics=[args.topic])
        for i in range(args.n)
    ]
    started = time.monotonic()
    subs = await open_subscribers(
        target, tokens, args.topic, tally, args.concurrency, progress, args.transport
    )
    connect_s = time.monotonic() - started
    ready = len(subs)
    tally.expected = ready * args.messages
    if ready == 0 or tally.received >= tally.expected:
        tally.done.set()

    publisher = RawPublisher(target, "/api/v1/publish")
    statuses: Counter[int] = Counter()
    loop = asyncio.get_running_loop()
    begin = loop.time()
    for seq in range(args.messages):
        delay = begin + seq * args.interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        progress.show(f"{ready} subscribers · publishing {seq + 1}/{args.messages}", force=True)
        body = {"tenant": args.tenant, "topics": [args.topic], "data": f"q{seq}t{time.time_ns()}z"}
        statuses[await publisher.post(orjson.dumps(body))] += 1
    publisher.close()
    tally.expected = ready * statuses.get(202, 0)  # a refused publish delivers nothing
    if tally.received >= tally.expected:
        tally.done.set()
    progress.show(f"{ready} subscribers · waiting for deliveries", force=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(tally.done.wait(), args.grace)
    tally.closing = True
    for sub in subs:
        if sub.transport is not None:
            sub.transport.close()
    progress.done()
    return _fanout_result(args, tally, ready, statuses, connect_s)


def _fanout_result(
    args: argparse.Namespace, tally: Tally, ready: int, statuses: Counter[int], connect_s: float
) -> dict[str, Any]:
    full = [k for k in range(args.messages) if ready and tally.count[k] == ready]
    last = [tally.last_ns[k] for k in full]
    first = [f for f in tally.first_ns if f is not None]
    accepted = statuses.get(202, 0)
    complete = (
        ready == args.n
        and accepted == args.messages
        and tally.received == tally.expected
        and not tally.duplicates
        and not tally.lost
    )
    return {
        "scenario": "fanout",
        "n": args.n,
        "messages": args.messages,
        "last_p50_ms": _ms(percentile(last, 50)),
        "last_p99_ms": _ms(percentile(last, 99)),
        "first_p50_ms": _ms(percentile(first, 50)),
        "complete": complete,
        "received": tally.received,
        "expected": args.n * args.messages,
        "transport": args.transport,
        "interval_s": args.interval,
        "subscribers_ready": ready,
        "connect_s": round(connect_s, 3),
        "last_max_ms": _ms(max(last) if last else None),
        "messages_fully_delivered": len(full),
        "duplicates": tally.duplicates,
        "lost_streams": tally.lost,
        "stray_markers": tally.stray,
        "connect_failures": dict(tally.failures),
        "publish_status": {str(k): v for k, v in sorted(statuses.items())},
    }


def percentile(values: list[int], p: float) -> int | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * p // 100)))
    return ordered[int(rank) - 1]


def _ms(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 2)


def _table(result: dict[str, Any]) -> str:
    rows = [
        ("subscribers", f"{result['subscribers_ready']}/{result['n']}"),
        ("messages", f"{result['messages']} every {result['interval_s']} s"),
        ("delivered", f"{result['received']}/{result['expected']}"),
        ("first p50", _cell(result["first_p50_ms"])),
        ("last p50", _cell(result["last_p50_ms"])),
        ("last p99", _cell(result["last_p99_ms"])),
        ("last max", _cell(result["last_max_ms"])),
        ("complete", "yes" if result["complete"] else "NO"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def _cell(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f} ms"


Scenario = Callable[[argparse.Namespace, Target, Progress], Awaitable[dict[str, Any]]]
SCENARIOS: dict[str, Scenario] = {"fanout": fanout}
