"""Idempotency keys for bus messages that carry no `idempotency_key` of their own.

Such a message is known by its *origin*: the publisher's ``Nats-Msg-Id``, else its
position on the bus (JetStream stream sequence, Redis stream entry id). Origins are
guessable, and ingest shares each tenant's idempotency keys with the publish API, so
a key equal to the origin could be claimed first through the API by a user allowed to
publish in the tenant — and the ingested message would then be dropped as a repeat.
The key is therefore an HMAC of the origin under a server secret the API's users do
not know. Every instance must derive the same key (a message redelivered to another
instance is recognised by it), so the secret comes from the settings every instance
shares: TIDINGS_JWT_SECRET, else TIDINGS_API_KEYS.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger("tidings.ingest")

PREFIX = "$bus:"
_DOMAIN = b"tidings ingest idempotency keys\x1f"  # this secret's use, apart from its others


def position(*parts: str) -> str:
    """The origin of a message known by its place on the bus: ``bus:nats:S:<created>:7``."""
    return "bus:" + ":".join(parts)


def message_id(value: str) -> str:
    """The origin of a message its publisher named (``Nats-Msg-Id``)."""
    return "id:" + value


class BusKeys:
    """Origin → idempotency key: ``$bus:`` and 40 hex digits of HMAC-SHA256."""

    def __init__(self, secret: bytes | None = None) -> None:
        # None: a secret of this process only (tests, a single instance).
        self._secret = _DOMAIN + (secret if secret is not None else secrets.token_bytes(32))

    @classmethod
    def from_settings(cls, settings: Settings) -> BusKeys:
        if settings.jwt_secret is not None:
            return cls(settings.jwt_secret.get_secret_value().encode())
        if settings.api_keys:
            return cls("\x1f".join(sorted(settings.api_keys)).encode())
        log.warning(
            "ingest: neither TIDINGS_JWT_SECRET nor TIDINGS_API_KEYS is set, so this "
            "process keys bus messages' idempotency keys with its own secret: a message "
            "redelivered to another instance or worker may be published twice"
        )
        return cls()

    def key(self, origin: str) -> str:
        digest = hmac.new(self._secret, origin.encode(), hashlib.sha256).hexdigest()
        return PREFIX + digest[:40]
