"""What flows through tidings: an `Event` on one or more streams, and close reasons.

A stream is named inside its tenant: ``u:<user>`` (a user's personal stream),
``t:<topic>``, or ``b`` (the tenant's broadcast). The backend gives an event
its position (`seq`, 1, 2, 3 … per stream) in each stream it is published on.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any

import orjson

from . import wire

BROADCAST = "b"

# Event kinds: how a WebSocket frames them (SSE frames all alike).
EVENT = "event"  # published through the API or the hub
NOTIFICATION = "notification"  # an inbox record pushed to its recipient
SYNC = "sync"  # notification.read / notification.deleted across a user's devices
CONTROL = "control"  # instructions to every instance's broker (e.g. disconnect a user)

CONTROL_STREAM = "$ctl"  # reserved: `$` names cannot be topics or user streams


def user_stream(user_id: str) -> str:
    return "u:" + user_id


def topic_stream(topic: str) -> str:
    return "t:" + topic


def stream_key(tenant: str, stream: str) -> str:
    """Process-wide key of a stream; tenants are walls, so the tenant is part of it."""
    return tenant + "\x1f" + stream


class Event:
    """One published event. Encodings are built once, lazily, and shared by every recipient."""

    __slots__ = ("_sse", "_ws", "data", "id", "kind", "name", "streams", "tenant", "ts")

    def __init__(
        self,
        id: str,
        tenant: str,
        name: str,
        data: Any,
        streams: tuple[tuple[str, int], ...],
        ts: float | None = None,
        kind: str = EVENT,
    ) -> None:
        self.id = id
        self.kind = kind
        self.tenant = tenant
        self.name = name
        self.data = data
        self.streams = streams
        self.ts = time.time() if ts is None else ts
        self._sse: bytes | None = None
        self._ws: dict[str, tuple[bytes, bytes]] | None = None

    @property
    def sse_body(self) -> bytes:
        """`event:`/`data:` lines; each connection prepends its own `id:` line."""
        if self._sse is None:
            self._sse = wire.sse_body(self.name, self.data)
        return self._sse

    def ws_parts(self, stream: str) -> tuple[bytes, bytes]:
        """The WebSocket frame split around its per-connection `id`.

        A connection's frame is ``head + cursor + tail``; the cursor is ASCII
        without quotes, so it can be spliced into the JSON as-is.
        """
        if self._ws is None:
            self._ws = {}
        parts = self._ws.get(stream)
        if parts is None:
            # JSON spells the "\x00" marker `\u0000`; `id` is the second key, after a
            # `type` that never holds one, so the first occurrence is the marker.
            head, tail = orjson.dumps(self._ws_message(stream)).split(b"\\u0000", 1)
            parts = self._ws[stream] = (head, tail)
        return parts

    def _ws_message(self, stream: str) -> dict[str, Any]:
        # API.md §5: inbox records travel as `notification`, read/delete sync as
        # its own type, everything else as `event`. "\x00" marks the cursor's place.
        if self.kind == NOTIFICATION and isinstance(self.data, dict):
            record = {k: v for k, v in self.data.items() if k != "unread_count"}
            return {
                "type": "notification",
                "id": "\x00",
                "notification": record,
                "unread_count": self.data.get("unread_count"),
                "timestamp": wire.timestamp(),
            }
        if self.kind == SYNC and isinstance(self.data, dict):
            return {"type": self.name, "id": "\x00", **self.data, "timestamp": wire.timestamp()}
        message: dict[str, Any] = {"type": "event", "id": "\x00", "event": self.name}
        if stream.startswith("t:"):
            message["topic"] = stream[2:]
        message["data"] = self.data
        message["timestamp"] = wire.timestamp()
        return message

    def seq_in(self, stream: str) -> int:
        for name, seq in self.streams:
            if name == stream:
                return seq
        return 0

    def to_json(self) -> bytes:
        """The form backends store and ship between instances."""
        return orjson.dumps(
            {
                "id": self.id,
                "tenant": self.tenant,
                "name": self.name,
                "data": self.data,
                "streams": self.streams,
                "ts": self.ts,
                "kind": self.kind,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        obj = orjson.loads(raw)
        streams = tuple((str(s), int(q)) for s, q in obj["streams"])
        return cls(
            obj["id"],
            obj["tenant"],
            obj["name"],
            obj["data"],
            streams,
            obj["ts"],
            obj.get("kind", EVENT),
        )

    def __repr__(self) -> str:
        return f"Event({self.id!r}, {self.tenant!r}, {self.name!r}, streams={self.streams!r})"


class CloseReason(Enum):
    """Why the server closed a connection: (WebSocket close code, text, reconnect?).

    Codes 4000-4499 mean "reconnect and resume"; 4500+ mean "do not reconnect
    as-is". SSE has no close code, so SSE clients just reconnect.
    """

    SLOW = (4008, "slow consumer: buffer overflow", True)
    SHUTDOWN = (1001, "server shutting down", True)
    DISCONNECTED = (4009, "disconnected by the server", True)
    TIMEOUT = (4010, "client timeout", True)
    UNAUTHORIZED = (4401, "unauthorized", False)
    CLIENT = (1000, "closed by the client", False)

    @property
    def code(self) -> int:
        return self.value[0]

    @property
    def text(self) -> str:
        return self.value[1]

    @property
    def reconnect(self) -> bool:
        return self.value[2]
