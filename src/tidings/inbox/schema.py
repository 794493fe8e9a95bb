"""What callers send to the inbox, validated: new notifications, page queries, ids.

Pure functions, no I/O: the HTTP routes and `Hub.notify` share them, so both
refuse the same things with the same `InvalidRequest` messages (API.md §2).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import InvalidRequest
from .models import PRIORITIES

__all__ = [
    "MAX_CONTENT",
    "MAX_IDS",
    "MAX_PAGE",
    "MAX_PAGE_SIZE",
    "MAX_RECIPIENTS",
    "MAX_TITLE",
    "MAX_TYPE",
    "NewNotification",
    "Query",
    "ReadRequest",
    "new_notification",
    "parse_id",
    "parse_new",
    "parse_query",
    "parse_read",
]

MAX_RECIPIENTS = 1000  # recipients per create request
MAX_ID = 128  # characters of a user or tenant id (as in JWT `sub` / `tenant`)
MAX_TYPE = 64  # characters of `type`
MAX_TITLE = 200  # characters of `title`
MAX_CONTENT = 10_000  # characters of `content`
MAX_KEY = 200  # characters of `idempotency_key`
MAX_PAGE_SIZE = 100  # items per page
MAX_PAGE = 1_000_000  # page numbers beyond this are refused, not run as a huge OFFSET
MAX_IDS = 1000  # ids per mark-read request
SENDER_FIELDS = ("id", "username", "avatar")


@dataclass(frozen=True, slots=True)
class NewNotification:
    """One create request: a record per recipient, all with the same fields."""

    recipients: tuple[str, ...]
    type: str
    title: str
    tenant: str = ""
    content: str = ""
    priority: str = "normal"
    data: dict[str, Any] = field(default_factory=dict)
    sender: dict[str, Any] | None = None
    idempotency_key: str | None = None


def new_notification(
    recipients: Iterable[str] | str,
    *,
    type: str,
    title: str,
    tenant: str = "",
    content: str = "",
    priority: str = "normal",
    data: Mapping[str, Any] | None = None,
    sender: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> NewNotification:
    """Validate the fields of a create request; raises InvalidRequest naming the field."""
    return NewNotification(
        recipients=_recipients(recipients),
        type=_text("type", type, 1, MAX_TYPE),
        title=_text("title", title, 1, MAX_TITLE),
        tenant=_text("tenant", tenant, 0, MAX_ID),
        content=_text("content", content, 0, MAX_CONTENT),
        priority=_priority(priority),
        data=_data(data),
        sender=_sender(sender),
        idempotency_key=None
        if idempotency_key is None
        else _text("idempotency_key", idempotency_key, 1, MAX_KEY),
    )


def parse_new(body: Any, *, tenant: str) -> NewNotification:
    """A `POST /api/v1/notifications` body; `tenant` is used when the body names none."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    if "recipients" not in body:
        raise InvalidRequest("`recipients` is required: a list of 1-1000 user ids")
    for name in ("type", "title"):
        if name not in body:
            raise InvalidRequest(f"`{name}` is required")
    return new_notification(
        body["recipients"],
        type=body["type"],
        title=body["title"],
        tenant=_or(body.get("tenant"), tenant),
        content=_or(body.get("content"), ""),
        priority=_or(body.get("priority"), "normal"),
        data=body.get("data"),
        sender=body.get("sender"),
        idempotency_key=body.get("idempotency_key"),
    )


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _text(name: str, value: object, least: int, most: int) -> str:
    if not isinstance(value, str) or not least <= len(value) <= most:
        raise InvalidRequest(f"`{name}` must be a string of {least}-{most} characters")
    _no_nul(name, value)
    return value


def _no_nul(name: str, value: str) -> None:
    # PostgreSQL's text cannot hold U+0000 (SQLite's can): refused alike on both.
    if "\x00" in value:
        raise InvalidRequest(f"`{name}` must not contain NUL (U+0000) characters")


def _recipients(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(v, str) and 0 < len(v) <= MAX_ID for v in value)
    ):
        raise InvalidRequest(
            f"`recipients` must be a list of 1-{MAX_RECIPIENTS} user ids "
            f"(non-empty strings of at most {MAX_ID} characters)"
        )
    if len(value) > MAX_RECIPIENTS:
        raise InvalidRequest(f"`recipients` may name at most {MAX_RECIPIENTS} users")
    for recipient in value:
        _no_nul("recipients", recipient)
    return tuple(dict.fromkeys(value))  # de-duplicated, order kept


def _priority(value: object) -> str:
    if value not in PRIORITIES:
        raise InvalidRequest(f"`priority` must be one of {', '.join(PRIORITIES)}")
    return str(value)


def _data(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequest("`data` must be a JSON object")
    try:  # in-process callers may hand over what JSON cannot hold
        orjson.dumps(value)
    except TypeError as exc:
        raise InvalidRequest(f"`data` must be JSON: {exc}") from None
    return dict(value)


def _sender(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidRequest("`sender` must be an object {id, username, avatar} or null")
    unknown = set(value) - set(SENDER_FIELDS)
    if unknown:
        raise InvalidRequest(f"`sender` has unknown fields: {', '.join(sorted(map(str, unknown)))}")
    sender = {name: value.get(name) for name in SENDER_FIELDS}
    for name, got in sender.items():
        ok = got is None or isinstance(got, str) or (name == "id" and type(got) is int)
        if not ok or (isinstance(got, str) and len(got) > 2048):
            raise InvalidRequest(f"`sender.{name}` must be a string (at most 2048 characters)")
    return sender


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """A page of one inbox: `unread` True lists unread only, False read only, None all."""

    page: int = 1
    page_size: int = 20
    unread: bool | None = None
    type: str | None = None


def parse_query(params: Mapping[str, str]) -> Query:
    """The query string of `GET /api/v1/notifications`."""
    unread = params.get("unread") or None
    if unread is not None and unread.lower() not in ("true", "false"):
        raise InvalidRequest("`unread` must be true or false")
    kind = params.get("type") or None
    if kind is not None:
        _text("type", kind, 1, MAX_TYPE)
    return Query(
        page=_int(params, "page", 1, 1, MAX_PAGE),
        page_size=_int(params, "page_size", 20, 1, MAX_PAGE_SIZE),
        unread=None if unread is None else unread.lower() == "true",
        type=kind,
    )


def _int(params: Mapping[str, str], name: str, default: int, least: int, most: int) -> int:
    raw = params.get(name) or None
    if raw is None:
        return default
    value = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 9 else -1
    if not least <= value <= most:
        raise InvalidRequest(f"`{name}` must be a whole number from {least} to {most}")
    return value


def parse_id(value: str) -> uuid.UUID | None:
    """A notification id, or None for anything that is not a UUID (so: not found)."""
    if len(value) not in (32, 36):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """`PUT /api/v1/notifications/read`: these ids (strings as sent), or every one."""

    ids: tuple[str, ...] = ()
    all: bool = False


def parse_read(body: Any) -> ReadRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    every = body.get("all", False)
    if not isinstance(every, bool):
        raise InvalidRequest("`all` must be true or false")
    if every:
        return ReadRequest(all=True)
    ids = body.get("ids")
    if (
        not isinstance(ids, list)
        or not 0 < len(ids) <= MAX_IDS
        or not all(isinstance(i, str) for i in ids)
    ):
        raise InvalidRequest(f'send {{"ids": [...]}} with 1-{MAX_IDS} ids, or {{"all": true}}')
    return ReadRequest(ids=tuple(dict.fromkeys(ids)))
