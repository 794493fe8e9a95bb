"""`Publisher`: the app server's side — publish events, and (API.md §7) the inbox calls."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from ..errors import TidingsError
from .errors import raise_for_error

__all__ = ["Publisher"]

DEFAULT_TIMEOUT = 10.0


class Publisher:
    """Publish through ``POST /api/v1/publish`` with an API key (or a user JWT with `publish`).

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        api_key_or_token: sent as ``Authorization: Bearer ...``.
        client: an ``httpx.AsyncClient`` to share (it is not closed by `aclose`);
            by default the publisher makes its own.

    Errors come back as the typed exceptions of `tidings.errors` (`InvalidRequest`,
    `Unauthorized`, `PayloadTooLarge`, ...); network failures as ``httpx.TransportError``.
    Use it as ``async with Publisher(...) as pub:`` or call `aclose()`.
    """

    def __init__(
        self,
        base_url: str,
        api_key_or_token: str,
        *,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=DEFAULT_TIMEOUT)
        self._headers = {"Authorization": f"Bearer {api_key_or_token}"}

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    # -- publishing (API.md §6) -------------------------------------------------------------

    async def publish(
        self,
        *,
        tenant: str | None = None,
        users: Iterable[str] = (),
        topics: Iterable[str] = (),
        broadcast: bool = False,
        event: str = "message",
        data: Any = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Publish one event; returns its id. Name at least one of users, topics, broadcast."""
        body = message(
            tenant=tenant,
            users=users,
            topics=topics,
            broadcast=broadcast,
            event=event,
            data=data,
            idempotency_key=idempotency_key,
        )
        answer = await self._request("POST", "/api/v1/publish", json=body)
        return str(answer["id"])

    async def publish_batch(self, messages: list[dict[str, Any]]) -> list[str]:
        """Publish up to 1000 messages (bodies as for `publish`) at once: all or none."""
        answer = await self._request("POST", "/api/v1/publish/batch", json={"messages": messages})
        return [str(i) for i in answer["ids"]]

    # -- inbox (API.md §7) --------------------------------------------------------------------

    async def notify(
        self,
        recipients: Iterable[str],
        *,
        type: str,  # the field's name in the API
        title: str,
        content: str = "",
        priority: str = "normal",
        data: Mapping[str, Any] | None = None,
        sender: Mapping[str, Any] | None = None,
        tenant: str | None = None,
        idempotency_key: str | None = None,
    ) -> list[dict[str, Any]]:
        """Store a notification for each recipient (then pushed live); returns the records."""
        body: dict[str, Any] = {
            "recipients": _names(recipients),
            "type": type,
            "title": title,
            "content": content,
            "priority": priority,
            "data": dict(data or {}),
            "sender": dict(sender) if sender is not None else None,
        }
        if tenant is not None:
            body["tenant"] = tenant
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        answer = await self._request("POST", "/api/v1/notifications", json=body)
        return list(answer["notifications"])

    async def notifications(
        self,
        *,
        page: int = 1,
        page_size: int = 20,
        unread: bool | None = None,
        type: str | None = None,  # the query parameter's name
    ) -> dict[str, Any]:
        """The caller's inbox page: ``{"items", "page", "page_size", "total", "unread_count"}``."""
        params: dict[str, str | int] = {"page": page, "page_size": page_size}
        if unread is not None:
            params["unread"] = "true" if unread else "false"
        if type is not None:
            params["type"] = type
        return await self._request("GET", "/api/v1/notifications", params=params)

    async def notification(self, notification_id: str) -> dict[str, Any]:
        return await self._request("GET", f"/api/v1/notifications/{_segment(notification_id)}")

    async def unread_count(self) -> int:
        answer = await self._request("GET", "/api/v1/notifications/unread-count")
        return int(answer["unread_count"])

    async def mark_read(self, notification_id: str) -> dict[str, Any]:
        """Mark one read (idempotent): ``{"notification", "unread_count"}``."""
        path = f"/api/v1/notifications/{_segment(notification_id)}/read"
        return await self._request("PUT", path)

    async def mark_all_read(self) -> dict[str, Any]:
        """``{"updated", "unread_count"}``."""
        return await self._request("PUT", "/api/v1/notifications/read", json={"all": True})

    async def delete(self, notification_id: str) -> None:
        await self._request("DELETE", f"/api/v1/notifications/{_segment(notification_id)}")

    # -- plumbing -----------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str | int] | None = None,
    ) -> dict[str, Any]:
        response = await self._client.request(
            method, self.base_url + path, json=json, params=params, headers=self._headers
        )
        await response.aread()
        raise_for_error(response)
        if response.status_code == 204 or not response.content:
            return {}
        answer = response.json()
        if not isinstance(answer, dict):
            raise TidingsError(f"unexpected answer from {method} {path}: not a JSON object")
        return answer


def message(
    *,
    tenant: str | None = None,
    users: Iterable[str] = (),
    topics: Iterable[str] = (),
    broadcast: bool = False,
    event: str = "message",
    data: Any = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """A publish body (API.md §6), e.g. for `Publisher.publish_batch`."""
    body: dict[str, Any] = {"event": event, "data": data}
    if tenant is not None:
        body["tenant"] = tenant
    if users := _names(users):
        body["users"] = users
    if topics := _names(topics):
        body["topics"] = topics
    if broadcast:
        body["broadcast"] = True
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    return body


def _names(values: Iterable[str]) -> list[str]:
    # A lone string is one name, not a sequence of one-letter names.
    return [values] if isinstance(values, str) else list(values)


def _segment(value: str) -> str:
    return quote(value, safe="")
