"""Sans-I/O WebSocket protocol of API.md §5: client messages in, server messages out.

`parse()` turns one text (or binary) frame from a client into a typed
message or raises `ProtocolError` naming the `error` code to answer with.
`message()` builds a server → client message. Nothing here awaits or
touches a socket, so every rule is tested bytes in, values out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from . import wire

__all__ = [
    "MAX_IDS",
    "MAX_TOPICS",
    "Auth",
    "ClientMessage",
    "MarkRead",
    "Ping",
    "ProtocolError",
    "Resume",
    "Subscribe",
    "Unsubscribe",
    "error",
    "message",
    "parse",
]

MAX_TOPICS = 100  # per message; the per-connection limit is TIDINGS_MAX_TOPICS_PER_CONNECTION
MAX_IDS = 1000  # notification ids per mark_read
MAX_TOKEN = 8192
MAX_STRING = 1024  # a topic, an id or a cursor (API.md §4: cursors are at most 1024 chars)
TYPES = ("ping", "subscribe", "unsubscribe", "mark_read", "resume", "auth")


class ProtocolError(ValueError):
    """A frame the server answers with ``{"type": "error", "code": ...}``."""

    def __init__(self, message: str, code: str = "invalid_request", request: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.request = request


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Subscribe:
    topics: tuple[str, ...]
    last_event_id: str | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MarkRead:
    """`notification_ids` (alias `ids`), or `all: true` for the whole inbox."""

    ids: tuple[str, ...] = ()
    all: bool = False


@dataclass(frozen=True, slots=True)
class Resume:
    last_event_id: str


@dataclass(frozen=True, slots=True)
class Auth:
    token: str


ClientMessage = Ping | Subscribe | Unsubscribe | MarkRead | Resume | Auth


def parse(raw: str | bytes, *, max_size: int = 65536) -> ClientMessage:
    """One client frame → a message; raises ProtocolError for anything else.

    Unknown fields are ignored (clients may add their own, e.g. a request id);
    unknown types, missing or mistyped fields are errors.
    """
    if len(raw) > max_size:
        raise ProtocolError(f"message over {max_size} bytes", "payload_too_large")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProtocolError("not JSON: send one JSON object per message") from None
    if not isinstance(obj, dict):
        raise ProtocolError('a message is a JSON object with a "type"')
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError('a message needs a string "type"')
    try:
        if kind == "ping":
            return Ping()
        if kind == "subscribe":
            return Subscribe(_topics(obj, required=True), _cursor(obj, required=False))
        if kind == "unsubscribe":
            return Unsubscribe(_topics(obj, required=True))
        if kind == "mark_read":
            return _mark_read(obj)
        if kind == "resume":
            cursor = _cursor(obj, required=True)
            assert cursor is not None
            return Resume(cursor)
        if kind == "auth":
            token = obj.get("token")
            if not isinstance(token, str) or not token.strip() or len(token) > MAX_TOKEN:
                raise ProtocolError('"token" must be a non-empty string (a JWT)')
            return Auth(token.strip())
    except ProtocolError as exc:
        exc.request = kind
        raise
    shown = kind if len(kind) <= 40 else kind[:40] + "…"
    raise ProtocolError(f"unknown message type {shown!r}; expected one of {', '.join(TYPES)}")


def _strings(obj: dict[str, Any], key: str, limit: int) -> tuple[str, ...] | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(
        isinstance(v, str) and 0 < len(v) <= MAX_STRING for v in value
    ):
        raise ProtocolError(f'"{key}" must be a list of non-empty strings')
    if len(value) > limit:
        raise ProtocolError(f'"{key}" may name at most {limit} entries')
    return tuple(dict.fromkeys(value))  # de-duplicated, order kept


def _topics(obj: dict[str, Any], *, required: bool) -> tuple[str, ...]:
    topics = _strings(obj, "topics", MAX_TOPICS)
    if not topics:
        if required:
            raise ProtocolError('"topics" must name at least one topic')
        return ()
    return topics


def _cursor(obj: dict[str, Any], *, required: bool) -> str | None:
    value = obj.get("last_event_id")
    if value is None or value == "":
        if required:
            raise ProtocolError('"last_event_id" must be the id of the last message received')
        return None
    if not isinstance(value, str) or len(value) > wire.MAX_LAST_EVENT_ID:
        raise ProtocolError(
            f'"last_event_id" must be a string of at most {wire.MAX_LAST_EVENT_ID} characters'
        )
    return value


def _mark_read(obj: dict[str, Any]) -> MarkRead:
    every = obj.get("all", False)
    if not isinstance(every, bool):
        raise ProtocolError('"all" must be true or false')
    key = "notification_ids" if "notification_ids" in obj else "ids"
    ids = _strings(obj, key, MAX_IDS) or ()
    if not ids and not every:
        raise ProtocolError('"notification_ids" must name at least one notification')
    return MarkRead(ids, every)


# -- server → client ------------------------------------------------------------------------


def message(kind: str, **fields: Any) -> bytes:
    """A server message with its `type` and RFC 3339 `timestamp` (API.md §5)."""
    return wire.ws_message(kind, **fields).encode()


def error(code: str, text: str, **fields: Any) -> bytes:
    return message("error", code=code, message=text, **fields)
