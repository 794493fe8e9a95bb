"""Async Python SDK: `Publisher` for app servers, `Subscriber` for stream readers.

`Subscriber` reads over SSE (default) or WebSocket (``transport="ws"``); over
WebSocket its events are `WSEvent`, an `SSEEvent` that also names the ``topic``.
"""

from .errors import error_from_code, error_from_response, raise_for_error
from .publisher import Publisher, message
from .subscriber import Subscriber, backoff_delay
from .ws import WSEvent

__all__ = [
    "Publisher",
    "Subscriber",
    "WSEvent",
    "backoff_delay",
    "error_from_code",
    "error_from_response",
    "message",
    "raise_for_error",
]
