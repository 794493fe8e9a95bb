"""Errors that cross module boundaries.

    TidingsError                 base; carries an HTTP status and a stable code
     ├── InvalidRequest          400 invalid_request
     ├── Unauthorized            401 unauthorized
     ├── Forbidden               403 forbidden
     ├── NotFound                404 not_found
     ├── PayloadTooLarge         413 payload_too_large
     ├── RateLimited             429 rate_limited   (retry_after seconds)
     ├── OverCapacity            503 over_capacity  (retry_after seconds)
     └── BackendUnavailable      503 unavailable    (the broker/database does not answer)
    ConfigError                  start-up refused: names the setting and the rule

The HTTP layer turns every TidingsError into the JSON body of API.md §2.
"""

from __future__ import annotations


class TidingsError(Exception):
    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidRequest(TidingsError):
    status, code = 400, "invalid_request"


class Unauthorized(TidingsError):
    status, code = 401, "unauthorized"


class Forbidden(TidingsError):
    status, code = 403, "forbidden"


class NotFound(TidingsError):
    status, code = 404, "not_found"


class PayloadTooLarge(TidingsError):
    status, code = 413, "payload_too_large"


class RateLimited(TidingsError):
    status, code = 429, "rate_limited"


class OverCapacity(TidingsError):
    status, code = 503, "over_capacity"


class BackendUnavailable(TidingsError):
    status, code = 503, "unavailable"


class ConfigError(Exception):
    """A setting is invalid; the message names the key and the rule it broke."""
