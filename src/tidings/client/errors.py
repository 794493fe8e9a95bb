"""Turn the server's JSON errors (API.md §2) back into the typed exceptions of `tidings.errors`.

The server answers every error as ``{"error": {"code": ..., "message": ...}}``.
The ``code`` picks the class (two 503s differ only by it); the status is the
fallback for answers that did not come from tidings itself (a proxy's 502, say).
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from ..errors import (
    BackendUnavailable,
    Forbidden,
    InvalidRequest,
    NotFound,
    OverCapacity,
    PayloadTooLarge,
    RateLimited,
    TidingsError,
    Unauthorized,
)

__all__ = ["error_from_code", "error_from_response", "raise_for_error", "retryable"]

_CLASSES: tuple[type[TidingsError], ...] = (
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    OverCapacity,
    BackendUnavailable,
)
_BY_CODE = {cls.code: cls for cls in _CLASSES}
_BY_STATUS = {cls.status: cls for cls in _CLASSES if cls is not BackendUnavailable}


def error_from_response(response: httpx.Response) -> TidingsError:
    """The exception an error answer stands for. The body must have been read."""
    code, message = _parse_body(response)
    cls = _BY_CODE.get(code) or _BY_STATUS.get(response.status_code)
    retry_after = _retry_after(response.headers.get("retry-after"))
    if cls is not None and cls.status == response.status_code:
        return cls(message, retry_after=retry_after)
    # Not one of ours (or a code that disagrees with the status): keep both as given.
    error = TidingsError(message, retry_after=retry_after)
    error.status = response.status_code
    error.code = code or "http_error"
    return error


def error_from_code(code: str, message: str, *, retry_after: int | None = None) -> TidingsError:
    """The exception for an error `code` without an HTTP answer (a WebSocket ``error``).

    An unknown code keeps its name on a plain `TidingsError` (status 500: retryable).
    """
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(message, retry_after=retry_after)
    error = TidingsError(message, retry_after=retry_after)
    error.code = code or "internal"
    return error


def raise_for_error(response: httpx.Response) -> None:
    """Raise the typed exception for a 4xx/5xx answer; return quietly otherwise."""
    if response.status_code >= 400:
        raise error_from_response(response)


def retryable(error: TidingsError) -> bool:
    """Whether trying again later may succeed: rate limits, capacity, 5xx."""
    return error.status == 429 or error.status >= 500


def _parse_body(response: httpx.Response) -> tuple[str, str]:
    fallback = f"HTTP {response.status_code} {response.reason_phrase}".strip()
    try:
        body: Any = orjson.loads(response.content)
    except (orjson.JSONDecodeError, httpx.ResponseNotRead):
        return "", fallback
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", fallback
    code, message = error.get("code"), error.get("message")
    return (
        code if isinstance(code, str) else "",
        message if isinstance(message, str) and message else fallback,
    )


def _retry_after(value: str | None) -> int | None:
    # Only the delay-seconds form; an HTTP date is rare enough to ignore.
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())
