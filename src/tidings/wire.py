"""Sans-I/O wire formats: Server-Sent Events and WebSocket JSON frames.

Nothing here awaits or touches a socket, so every rule of the framing is
tested bytes in, bytes out. The broker encodes an event body once and only
prepends each connection's own ``id:`` line (see ``Event.sse_body``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

PING = b": ping\n\n"
MAX_LAST_EVENT_ID = 1024


def _clean_field(value: str) -> str:
    # A newline inside `id:` or `event:` would end the field early and let a
    # payload inject fields of its own.
    return value.replace("\r", "").replace("\n", "")


def encode_data(data: Any) -> str:
    """The text of an event's data: a string as-is, anything else as JSON."""
    if isinstance(data, str):
        return data
    return orjson.dumps(data).decode()


def sse_body(name: str, data: Any) -> bytes:
    """`event:` (omitted for `message`) and `data:` lines, ending the event."""
    head = "" if name == "message" else f"event: {_clean_field(name)}\n"
    if not isinstance(data, str):
        # JSON as orjson writes it has no line break (it escapes them in strings): one line.
        return head.encode() + b"data: " + orjson.dumps(data) + b"\n\n"
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return (head + "".join(f"data: {line}\n" for line in lines) + "\n").encode()


def sse_frame(event_id: str | None, name: str, data: Any) -> bytes:
    """A whole SSE event; `event_id` None means no `id:` line."""
    body = sse_body(name, data)
    if event_id is None:
        return body
    return b"id: " + _clean_field(event_id).encode() + b"\n" + body


def sse_retry(ms: int) -> bytes:
    return b"retry: %d\n\n" % ms


def sse_comment(text: str) -> bytes:
    return b"".join(b": " + line.encode() + b"\n" for line in text.split("\n")) + b"\n"


@dataclass(slots=True)
class SSEEvent:
    """One event as a client parses it."""

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass(slots=True)
class SSEParser:
    """Incremental client-side parser (the EventSource algorithm of the HTML spec).

    Feed it bytes as they arrive; it yields complete events. Comments
    (heartbeats) are counted in `comments` so tests can wait for them.
    """

    _buffer: bytes = b""
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None
    _retry: int | None = None
    _has_field: bool = False
    last_event_id: str | None = None
    comments: int = 0

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        self._buffer += chunk
        while True:
            cut = self._line_end()
            if cut is None:
                return
            end, skip = cut
            line = self._buffer[:end].decode("utf-8", errors="replace")
            self._buffer = self._buffer[end + skip :]
            event = self._line(line)
            if event is not None:
                yield event

    def _line_end(self) -> tuple[int, int] | None:
        for i, byte in enumerate(self._buffer):
            if byte == 0x0A:
                return i, 1
            if byte == 0x0D:
                if i + 1 == len(self._buffer):
                    return None  # might be CRLF split across chunks
                return i, 2 if self._buffer[i + 1] == 0x0A else 1
        return None

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        self._has_field = True
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if self._id is not None:
            self.last_event_id = self._id
        event = None
        if self._data:
            event = SSEEvent(self._event or "message", "\n".join(self._data), self._id)
        elif self._retry is not None and self._has_field:
            event = SSEEvent("retry", "", None, self._retry)
        if event is not None and self._retry is not None:
            event.retry = self._retry
        self._event, self._data, self._id, self._retry, self._has_field = "", [], None, None, False
        return event


def timestamp() -> str:
    """RFC 3339 UTC with milliseconds, as every WebSocket message carries."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ws_message(kind: str, **fields: Any) -> str:
    """A server → client WebSocket message (API.md §5)."""
    return orjson.dumps({"type": kind, **fields, "timestamp": timestamp()}).decode()


def last_event_id(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The resume cursor: the `Last-Event-ID` header wins over `?last_event_id=`."""
    value = headers.get("last-event-id") or query.get("last_event_id") or query.get("lastEventId")
    if not value:
        return None
    return value[: MAX_LAST_EVENT_ID + 1]


def split_list(value: str | None) -> list[str]:
    """`a,b , c` -> ["a", "b", "c"] (query lists such as `topics=`)."""
    if not value:
        return []
    return [part.strip() for part in value.split(",") if part.strip()]
