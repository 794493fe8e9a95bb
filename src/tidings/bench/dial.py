"""Opening subscribers: how many handshakes at once, from which addresses, with retries.

Connections are spread over source addresses (``--src-ips``, e.g.
127.0.0.2-127.0.0.9) with ``IP_BIND_ADDRESS_NO_PORT``, so more than one address's
~28k ephemeral ports are available; a failed subscribe is retried (bounded),
as a browser's EventSource would.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .report import BenchError, Progress
from .subscribers import Collector, Stream, WSStream
from .target import Target, Transport

__all__ = ["Dial", "close_all", "open_subscribers", "parse_src_ips"]

_IP_BIND_ADDRESS_NO_PORT = 24  # Linux: pick the port at connect(), per destination


def parse_src_ips(spec: str) -> list[str | None]:
    """'127.0.0.2-127.0.0.9' or '127.0.0.2,127.0.0.3' -> addresses; '' -> [None] (any)."""
    if not spec:
        return [None]
    out: list[str | None] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            a = ipaddress.ip_address(lo.strip())
            b = ipaddress.ip_address(hi.strip()) if hi else a
            out += [str(ipaddress.ip_address(int(a) + k)) for k in range(int(b) - int(a) + 1)]
    except ValueError as exc:
        raise BenchError(f"--src-ips: {exc}") from None
    if not out or any(not ipaddress.ip_address(ip).is_loopback for ip in out if ip):
        raise BenchError("--src-ips must name loopback addresses, e.g. 127.0.0.2-127.0.0.9")
    return out


@dataclass(frozen=True, slots=True)
class Dial:
    """How subscribers connect: concurrency, source addresses, retries, patience."""

    concurrency: int = 200
    src_ips: Sequence[str | None] = (None,)
    retries: int = 2
    ready_timeout: float = 60.0


async def open_subscribers(
    target: Target,
    collector: Collector,
    tokens: Sequence[str],
    topic: str,
    transport: Transport,
    dial: Dial,
    progress: Progress,
    first: int = 0,
) -> list[Stream]:
    """One stream per token over `target.ports` in turn, at most `concurrency` handshakes
    at a time; a failed subscribe is retried (bounded), as a browser's EventSource would."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(dial.concurrency)
    streams: list[Stream] = []
    kind: type[Stream] = WSStream if transport == "ws" else Stream
    marker = target.ready_marker(transport)
    ports = target.ports
    family = socket.AF_INET6 if ":" in target.host else socket.AF_INET

    async def attempt(i: int, token: str) -> Stream | None:
        port = ports[i % len(ports)]
        request = target.sub_request(port, topic, token, transport)
        ready: asyncio.Future[bool] = loop.create_future()
        factory: Callable[[], Stream] = lambda: kind(i, request, marker, collector, ready)  # noqa: E731
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        dialed = time.monotonic_ns()
        try:
            src = dial.src_ips[i % len(dial.src_ips)]
            if src and family == socket.AF_INET:
                sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((src, 0))
            async with asyncio.timeout(10):
                await loop.sock_connect(sock, (target.host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _, stream = await loop.create_connection(factory, sock=sock)
        except (OSError, TimeoutError) as exc:
            collector.failures[f"connect-{type(exc).__name__}"] += 1
            sock.close()
            return None
        try:
            async with asyncio.timeout(dial.ready_timeout):
                ok = await asyncio.shield(ready)
        except TimeoutError:
            collector.failures["ready-timeout"] += 1
            ok = False
        if not ok:
            if stream.transport is not None:
                stream.transport.close()
            return None
        collector.connect_ns.append(time.monotonic_ns() - dialed)
        return stream

    async def one(i: int, token: str) -> None:
        for k in range(1 + dial.retries):
            if k:
                collector.retries += 1
                await asyncio.sleep(0.25 * k + random.random() * 0.25)
            async with gate:
                stream = await attempt(i, token)
            if stream is not None:
                streams.append(stream)
                progress.show(f"{target.kind}: connected {len(streams)}/{len(tokens)}")
                return

    await asyncio.gather(*(one(first + k, t) for k, t in enumerate(tokens)))
    return streams


def close_all(streams: Sequence[Stream], collector: Collector) -> None:
    collector.closing = True
    for stream in streams:
        if stream.transport is not None:
            stream.transport.close()
