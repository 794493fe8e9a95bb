"""Request authentication: credentials (API key, JWT, dev query) → `Principal`.

Lookup order and the claims read are in docs/configuration.md ("Authentication").
JWT verification lives in `tokens`, the identity itself in `principal`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple, Protocol, runtime_checkable

from .config import Settings
from .errors import Unauthorized
from .principal import MAX_ID_LENGTH, Principal, principal_from_claims
from .tokens import JWTVerifier, mint_token
from .topics import TopicPatterns

# Principal, principal_from_claims, JWTVerifier and mint_token are re-exported: callers that
# authenticate requests usually need them together.
__all__ = [
    "MAX_ID_LENGTH",
    "ApiKeys",
    "Authenticator",
    "Credential",
    "JWTVerifier",
    "Principal",
    "RequestAuthenticator",
    "bearer_token",
    "extract_credential",
    "mint_token",
    "principal_from_claims",
]


class ApiKeys:
    """Configured server keys. `check` compares SHA-256 digests with `hmac.compare_digest`
    against every key, so neither which key matched nor the key length shows in timing."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def check(self, candidate: str) -> bool:
        digest = hashlib.sha256(candidate.encode()).digest()
        found = False
        for key in self._digests:  # no early exit
            found |= hmac.compare_digest(key, digest)
        return found


class Credential(NamedTuple):
    token: str
    source: Literal["header", "query", "cookie"]


def extract_credential(
    headers: Mapping[str, str], query: Mapping[str, str], cookies: Mapping[str, str]
) -> Credential | None:
    """First of: ``Authorization: Bearer``, ``?token=``/``?access_token=``, cookie
    ``tidings_token``. Empty values count as absent; other Authorization schemes are skipped."""
    token = bearer_token(headers.get("authorization") or headers.get("Authorization") or "")
    if token is not None:
        return Credential(token, "header")
    token = query.get("token") or query.get("access_token")
    if token:
        return Credential(token, "query")
    token = cookies.get("tidings_token")
    if token:
        return Credential(token, "cookie")
    return None


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value; None for other schemes
    or an empty token."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    return None


@runtime_checkable
class RequestAuthenticator(Protocol):
    """What an embedding app may pass instead of `Authenticator`."""

    async def authenticate(
        self, headers: Mapping[str, str], query: Mapping[str, str], cookies: Mapping[str, str]
    ) -> Principal: ...


class Authenticator:
    """The built-in RequestAuthenticator: API keys, JWTs and (dev only) ``?user_id=``."""

    def __init__(self, settings: Settings, *, verifier: JWTVerifier | None = None) -> None:
        if verifier is None and settings.has_jwt_key:
            verifier = JWTVerifier(settings)
        self._verifier = verifier
        self.api_keys = ApiKeys(settings.api_keys)
        self._insecure = settings.insecure_query_auth
        self.public_topics = TopicPatterns(settings.public_topics)

    async def authenticate(
        self, headers: Mapping[str, str], query: Mapping[str, str], cookies: Mapping[str, str]
    ) -> Principal:
        credential = extract_credential(headers, query, cookies)
        if credential is None:
            if self._insecure and query.get("user_id"):
                return _insecure_principal(query)
            raise Unauthorized("missing credential")
        # API keys belong in a header only: query strings end up in proxies' logs.
        if credential.source == "header" and self.api_keys.check(credential.token):
            return Principal.server()
        return await self.principal_from_token(credential.token)

    async def principal_from_token(self, token: str) -> Principal:
        """A user JWT (also the WebSocket ``{"type": "auth"}`` message) → Principal."""
        if self._verifier is None:
            raise Unauthorized("no JWT key is configured")
        return await self._verifier.verify(token)

    async def aclose(self) -> None:
        if self._verifier is not None:
            await self._verifier.aclose()


def _insecure_principal(query: Mapping[str, str]) -> Principal:
    # Only public topics: trusting a query string for identity is bad enough; it grants no topics.
    user, tenant = query.get("user_id", ""), query.get("tenant_id", "")
    if len(user) > MAX_ID_LENGTH or len(tenant) > MAX_ID_LENGTH:
        raise Unauthorized(f"user_id and tenant_id are at most {MAX_ID_LENGTH} characters")
    if "\x00" in user or "\x00" in tenant:
        raise Unauthorized("user_id and tenant_id must not contain NUL (U+0000)")
    return Principal(user_id=user, tenant=tenant)
