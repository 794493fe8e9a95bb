"""Subscribers on bare asyncio transports: SSE and WebSocket, no HTTP library per connection.

Every published message carries a marker ``q<seq>t<send_ns>z``; a subscriber
finds markers anywhere in its raw byte stream, so neither SSE framing, chunked
encoding nor JSON around the data matters, and a delivery's latency is its
receive time minus the send time in the marker (one host, one clock).

A `Collector` holds what all subscribers of one run saw. With ``messages > 0``
it tracks each message (sequence numbers 0..messages-1): who got it, the first
and last latency, every latency, duplicates. With ``messages == 0`` it only
counts markers (the throughput hot path: one C call per read) and keeps the
latencies of a few sample subscribers.

Connecting them is dial.py's business.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

__all__ = ["MARK", "Collector", "Stream", "WSStream"]

MARK = re.compile(rb"q(\d+)t(\d+)z")
MARK_ONLY = re.compile(rb"q\d+t\d+z")
_TAIL = 48  # bytes kept between reads: longer than any marker
_HEAD_LIMIT = 65536
SAMPLED = 5  # subscribers whose latencies are kept in count mode


@dataclass(slots=True)
class Collector:
    """What the subscribers of one run saw (see the module docstring)."""

    messages: int = 0
    count: list[int] = field(default_factory=list)
    first_ns: list[int | None] = field(default_factory=list)
    last_ns: list[int] = field(default_factory=list)
    latencies: list[int] = field(default_factory=list)
    received: int = 0
    expected: int = -1  # set by the scenario; `done` fires when `received` reaches it
    duplicates: int = 0
    stray: int = 0  # markers of another run on the topic
    lost: int = 0  # streams that ended while we listened
    ready: int = 0
    retries: int = 0
    connect_ns: list[int] = field(default_factory=list)  # each ready stream: dial to ready
    bytes_after_ready: int = 0
    last_delivery_ns: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    closing: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.count = [0] * self.messages
        self.first_ns = [None] * self.messages
        self.last_ns = [0] * self.messages

    def expect(self, total: int) -> None:
        self.expected = total
        if self.received >= total:
            self.done.set()

    def _got(self, n: int, now: int) -> None:
        self.received += n
        self.last_delivery_ns = now
        if self.received == self.expected:
            self.done.set()

    def record(self, sub: Stream, seq: int, latency_ns: int, now: int) -> None:
        if self.messages == 0:
            sub.count += 1
            if sub.index < SAMPLED:
                self.latencies.append(latency_ns)
            self._got(1, now)
            return
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
        self.latencies.append(latency_ns)
        self._got(1, now)


class Stream(asyncio.Protocol):
    """One SSE stream: ready at the response head (or at the target's ready marker)."""

    __slots__ = (
        "_buf",
        "_head_done",
        "_request",
        "_tail",
        "alive",
        "collector",
        "count",
        "got",
        "index",
        "marker",
        "ready",
        "transport",
    )

    def __init__(
        self,
        index: int,
        request: bytes,
        marker: bytes | None,
        collector: Collector,
        ready: asyncio.Future[bool],
    ) -> None:
        self.index = index
        self._request = request
        self.marker = marker
        self.collector = collector
        self.ready = ready
        self._buf = b""
        self._head_done = False
        self._tail = b""
        self.got = 0  # bit k set: message k arrived (tracking mode)
        self.count = 0  # markers seen (count mode)
        self.alive = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.alive = True
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if not self.ready.done():
            self.collector.failures["closed-before-ready"] += 1
            self.ready.set_result(False)
        elif self.ready.result() and not self.collector.closing:
            self.collector.lost += 1

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if not self.ready.done():
            data = self._handshake(data)
        elif data:
            self.collector.bytes_after_ready += len(data)
        if data:
            self._scan(data, now)

    def _head(self, data: bytes, status: bytes) -> tuple[bytes, bytes] | None:
        """(head, rest) once the response head is complete and has `status`; else None."""
        buf = self._buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self._buf = buf
            if len(buf) > _HEAD_LIMIT:
                self._fail("head-too-large")
            return None
        self._buf = b""
        if buf[9:12] != status:
            self._fail(f"http-{buf[9:12].decode(errors='replace')}")
            return None
        return buf[:end], buf[end + 4 :]

    def _handshake(self, data: bytes) -> bytes:
        """Wait for the 200 (and the ready marker); returns the bytes after them."""
        if not self._head_done:
            parts = self._head(data, b"200")
            if parts is None:
                return b""
            self._head_done, data = True, parts[1]
        if self.marker is None:
            return self._ready(data)
        buf = self._buf + data
        at = buf.find(self.marker)
        if at < 0:
            self._buf = buf  # the marker may be split over reads
            return self._fail("no-ready-marker") if len(buf) > _HEAD_LIMIT else b""
        self._buf = b""
        return self._ready(buf[at:])

    def _ready(self, rest: bytes) -> bytes:
        self.collector.ready += 1
        self.ready.set_result(True)
        return rest

    def _fail(self, why: str) -> bytes:
        self.collector.failures[why] += 1
        if not self.ready.done():
            self.ready.set_result(False)
        if self.transport is not None:
            self.transport.close()
        return b""

    def _scan(self, data: bytes, now: int) -> None:
        if self._tail:
            data = self._tail + data
        collector = self.collector
        if collector.messages == 0 and self.index >= SAMPLED:  # count only: one C call
            found = len(MARK_ONLY.findall(data))
            if found:
                self.count += found
                collector._got(found, now)
            rest = data[data.rfind(b"z") + 1 :]
        else:
            end = 0
            for m in MARK.finditer(data):
                end = m.end()
                collector.record(self, int(m[1]), now - int(m[2]), now)
            rest = data[end:]
        self._tail = rest[-_TAIL:] if b"q" in rest else b""


class WSStream(Stream):
    """One WebSocket: after the 101, ready at the first text frame holding the marker.
    Answers pings with masked pongs; offers no compression."""

    __slots__ = ("_frames",)

    def __init__(
        self,
        index: int,
        request: bytes,
        marker: bytes | None,
        collector: Collector,
        ready: asyncio.Future[bool],
    ) -> None:
        super().__init__(index, request, marker, collector, ready)
        self._frames = b""

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if not self._head_done:
            parts = self._head(data, b"101")
            if parts is None:
                return
            self._head_done, data = True, parts[1]
            if self.marker is None:
                self._ready(b"")
        elif self.ready.done():
            self.collector.bytes_after_ready += len(data)
        if data:
            self._parse(self._frames + data if self._frames else data, now)

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
            if buf[pos + 1] & 0x80:
                head += 4  # a server must not mask; skip the key if one does
            if size - pos < head + length:
                break
            payload = buf[pos + head : pos + head + length]
            pos += head + length
            if opcode in (0x0, 0x1, 0x2):
                if not self.ready.done():
                    if self.marker is not None and self.marker in payload:
                        self._ready(b"")
                    continue
                self._scan(payload, now)
            elif opcode == 0x9:
                self._send(0xA, payload)
            elif opcode == 0x8:
                if not self.ready.done():
                    self._fail("closed-before-ready")
                elif self.transport is not None:
                    self.transport.close()
                break
        self._frames = buf[pos:]

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or len(payload) > 125:
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)
