"""Async Python SDK: `Publisher` for app servers, `Subscriber` for stream readers."""

from .errors import error_from_response, raise_for_error
from .publisher import Publisher, message
from .subscriber import Subscriber, backoff_delay

__all__ = [
    "Publisher",
    "Subscriber",
    "backoff_delay",
    "error_from_response",
    "message",
    "raise_for_error",
]
