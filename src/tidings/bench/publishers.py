"""Publishers: keep-alive HTTP/1.1 connections sending a target's publish request.

`Publisher.send` writes one complete request and reads the answer (Content-Length
or chunked body), returning its status and round-trip time. `flat_out` runs P
publishers, each sending its next publish as soon as the previous one answered,
for a fixed time: the throughput and publish scenarios.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FlatOut", "Publisher", "accepted", "flat_out", "marker"]

_RTT_KEPT = 200_000  # round-trip times kept for percentiles


def marker(seq: int) -> str:
    """The payload every subscriber looks for: sequence number and send time."""
    return f"q{seq}t{time.time_ns()}z"


def accepted(statuses: Counter[int]) -> int:
    """Publishes the server took (2xx: tidings answers 202, Nchan 201 or 202)."""
    return sum(n for status, n in statuses.items() if 200 <= status < 300)


class Publisher:
    """One keep-alive connection; reconnects after a failure or ``Connection: close``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.errors: Counter[str] = Counter()  # why sends failed (status 0)

    async def send(self, request: bytes) -> tuple[int, int]:
        """(status, round trip ns); status 0 for a transport failure."""
        started = time.perf_counter_ns()
        try:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
                sock = self._writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert self._reader is not None
            self._writer.write(request)
            status = await self._answer(self._reader)
            return status, time.perf_counter_ns() - started
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.errors[type(exc).__name__] += 1
            self.close()
            return 0, time.perf_counter_ns() - started

    async def _answer(self, reader: asyncio.StreamReader) -> int:
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked, close = 0, False, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                close = b"close" in value
        if chunked:
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await reader.readexactly(size + 2)
            await reader.readuntil(b"\r\n")
        elif length:
            await reader.readexactly(length)
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


@dataclass(slots=True)
class FlatOut:
    """What `flat_out` measured."""

    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # why sends failed (status 0)
    rtts: list[int] = field(default_factory=list)
    started_ns: int = 0
    ended_ns: int = 0

    @property
    def seconds(self) -> float:
        return max(1e-9, (self.ended_ns - self.started_ns) / 1e9)


async def flat_out(
    host: str, port: int, request: Callable[[int], bytes], publishers: int, duration: float
) -> FlatOut:
    """`publishers` connections, each publishing ``request(seq)`` back to back for `duration`."""
    result = FlatOut()
    seqs = itertools.count()
    stop_at = time.monotonic() + duration

    async def one() -> None:
        pub = Publisher(host, port)
        try:
            while time.monotonic() < stop_at:
                status, rtt = await pub.send(request(next(seqs)))
                result.statuses[status] += 1
                if len(result.rtts) < _RTT_KEPT:
                    result.rtts.append(rtt)
                if status == 0:
                    await asyncio.sleep(0.01)  # a transport failure: back off, stay bounded
        finally:
            pub.close()
            result.errors.update(pub.errors)

    result.started_ns = time.time_ns()
    await asyncio.gather(*(one() for _ in range(publishers)))
    result.ended_ns = time.time_ns()
    return result
