"""`Principal`: who is asking, and what that identity may subscribe to, publish and administer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import Unauthorized
from .topics import TopicPatterns, claim_patterns, valid_topic

__all__ = ["MAX_ID_LENGTH", "Principal", "principal_from_claims"]

MAX_ID_LENGTH = 128
_NO_PATTERNS = TopicPatterns()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking. `is_server` marks an API key: every tenant, every topic.

    `publish=True` lets a user publish to any topic, user or broadcast of its own tenant; a
    tuple of patterns limits the topics it may name (users and broadcast stay allowed). Keeping
    a user inside its own tenant is the caller's check: `tenant` is the only one it may name.
    """

    user_id: str
    tenant: str = ""
    name: str | None = None
    topics: tuple[str, ...] = ()
    publish: bool | tuple[str, ...] = False
    admin: bool = False
    is_server: bool = False

    @classmethod
    def server(cls) -> Principal:
        return _SERVER

    def may_subscribe(self, topic: str, public: TopicPatterns = _NO_PATTERNS) -> bool:
        if not valid_topic(topic):
            return False
        if self.is_server:
            return True
        return public.matches(topic) or claim_patterns(self.topics).matches(topic)

    def may_publish(self, topics: Iterable[str] = ()) -> bool:
        if self.is_server or self.publish is True:
            return True
        if not self.publish:
            return False
        return claim_patterns(self.publish).all_match(topics)

    def may_administer(self, tenant: str) -> bool:
        """Stats, presence, disconnect: an API key anywhere, an admin token in its tenant."""
        return self.is_server or (self.admin and tenant == self.tenant)


_SERVER = Principal(user_id="$server", is_server=True, publish=True, admin=True)


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """Claims of a verified token → Principal; raises Unauthorized for a bad `sub`/`tenant`."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 0 < len(sub) <= MAX_ID_LENGTH:
        raise Unauthorized(f"token needs a sub claim of 1–{MAX_ID_LENGTH} characters")
    tenant = claims.get("tenant", "")
    if not isinstance(tenant, str) or len(tenant) > MAX_ID_LENGTH:
        raise Unauthorized(f"token tenant claim must be a string of at most {MAX_ID_LENGTH}")
    if "\x00" in sub or "\x00" in tenant:  # no database keeps it alike (PostgreSQL refuses)
        raise Unauthorized("token sub and tenant claims must not contain NUL (U+0000)")
    name = claims.get("name")
    publish = claims.get("publish")
    return Principal(
        user_id=sub,
        tenant=tenant,
        name=name if isinstance(name, str) else None,
        topics=_pattern_list(claims.get("topics")),
        publish=True if publish is True else _pattern_list(publish) or False,
        admin=claims.get("admin") is True,
    )


def _pattern_list(value: object) -> tuple[str, ...]:
    # Claims come from elsewhere: drop what is not a valid pattern rather than refuse the token.
    if not isinstance(value, list | tuple):
        return ()
    return claim_patterns(tuple(v for v in value if isinstance(v, str))).patterns
