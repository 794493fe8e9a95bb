"""Identity: credentials (JWT, API key, dev query) → `Principal`, and what a principal may do.

Lookup order, JWT algorithms, JWKS issuer scoping and the claims read are in
docs/configuration.md ("Authentication").
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.types import Options as JWTOptions

from .config import Settings, parse_jwks_urls
from .errors import BackendUnavailable, ConfigError, Unauthorized
from .topics import TopicPatterns, claim_patterns, valid_topic

__all__ = [
    "ApiKeys",
    "Authenticator",
    "Credential",
    "JWTVerifier",
    "Principal",
    "RedactingFilter",
    "RequestAuthenticator",
    "extract_credential",
    "mint_token",
    "principal_from_claims",
    "redact",
]

log = logging.getLogger("tidings.auth")

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


# -- JWT ----------------------------------------------------------------------------------

_JWT_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidSignatureError, "bad token signature"),
    (jwt.InvalidIssuerError, "wrong token issuer"),
    (jwt.InvalidAudienceError, "wrong token audience"),
    (jwt.InvalidAlgorithmError, "token algorithm not accepted"),
    (jwt.DecodeError, "malformed token"),
)
_ASYMMETRIC = ("RS256", "ES256")
_VERIFIED_CACHE_SIZE = 4096


def _peek_header(token: str) -> dict[str, Any]:
    """The unverified header, only to pick a key: jwt.decode parses it again, strictly."""
    segment = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:
        raise Unauthorized("malformed token") from None
    if not isinstance(header, dict):
        raise Unauthorized("malformed token")
    return header


class _JwkSet:
    """Keys fetched from one JWKS URL, for one issuer (or for the configured one)."""

    def __init__(self, url: str, issuer: str | None) -> None:
        self.url, self.issuer = url, issuer
        self.keys: dict[str | None, jwt.PyJWK] = {}
        self.loaded = False
        self.last_fetch: float | None = None
        self.lock = asyncio.Lock()

    def find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        return self.keys.get(kid)

    def store(self, document: object) -> None:
        keys: dict[str | None, jwt.PyJWK] = {}
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError("no 'keys' list")
        for entry in entries:
            # Only RSA/EC signing keys: a symmetric ("oct") key in a JWKS is never trusted.
            if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC"):
                continue
            if entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWKError:
                continue
            if key.algorithm_name in _ASYMMETRIC:
                keys[entry.get("kid")] = key
        self.keys, self.loaded = keys, True


class JWTVerifier:
    """Verifies HS256 (secret), RS256/ES256 (PEM key or JWKS) tokens.

    The accepted algorithm follows from the configured key, never from the token alone, so
    ``alg: none`` and HS/RS confusion are refused. Only a JWKS needs I/O: HS256 and PEM
    verification never await.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        http: httpx.AsyncClient | None = None,
        refetch_interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        secret = settings.jwt_secret
        self._secret = secret.get_secret_value().encode() if secret is not None else None
        self._pem: Any = None
        self._pem_alg: str | None = None
        if settings.jwt_public_key:
            self._pem, self._pem_alg = _load_pem(settings.jwt_public_key)
        self._jwks: dict[str | None, _JwkSet] = {}
        if settings.jwt_jwks_url:
            for issuer, url in parse_jwks_urls(settings.jwt_jwks_url):
                self._jwks[issuer] = _JwkSet(url, issuer or settings.jwt_issuer)
        self._issuer, self._audience = settings.jwt_issuer, settings.jwt_audience
        self._leeway = settings.jwt_leeway
        self._options: JWTOptions = {"verify_aud": self._audience is not None}
        self._http, self._own_http = http, http is None
        self._refetch_interval, self._clock = refetch_interval, clock
        self._verified: dict[str, tuple[Principal, float | None]] = {}

    async def verify(self, token: str) -> Principal:
        hit = self._verified.get(token)
        if hit is not None:
            principal, exp = hit
            if exp is None or time.time() <= exp + self._leeway:
                return principal
            del self._verified[token]
            raise Unauthorized("token expired")
        header = _peek_header(token)
        alg, kid = header.get("alg"), header.get("kid")
        if alg == "HS256" and self._secret is not None:
            return self._verify_static(token, self._secret, alg)
        if alg in _ASYMMETRIC and alg == self._pem_alg and not (kid and self._jwks):
            return self._verify_static(token, self._pem, alg)
        if alg in _ASYMMETRIC and self._jwks:
            jwk_set = self._jwk_set_for(token)
            key = await self._jwk(jwk_set, kid)
            return principal_from_claims(self._decode(token, key, alg, jwk_set.issuer))
        raise Unauthorized(f"token algorithm {alg!r} not accepted")

    def _verify_static(self, token: str, key: Any, alg: str) -> Principal:
        # A static key cannot be rotated under a running process, so a token verified once
        # stays good until its exp: repeat connects (reconnects, tabs) skip PyJWT (~40 µs).
        claims = self._decode(token, key, alg, self._issuer)
        principal = principal_from_claims(claims)
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        exp = claims.get("exp")
        self._verified[token] = (principal, float(exp) if exp is not None else None)
        return principal

    def _decode(self, token: str, key: Any, alg: str, issuer: str | None) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                options=self._options,
                leeway=self._leeway,
                issuer=issuer,
                audience=self._audience,
            )
        except jwt.InvalidTokenError as exc:
            reason = next((r for t, r in _JWT_ERRORS if isinstance(exc, t)), None)
            raise Unauthorized(reason or f"invalid token: {exc}") from None

    def _jwk_set_for(self, token: str) -> _JwkSet:
        if None in self._jwks:  # a single URL: its keys serve the configured issuer (or any)
            return self._jwks[None]
        # issuer=url pairs: the (unverified) iss picks the set; decode then insists on that iss,
        # so a key fetched for one issuer never verifies a token claiming another.
        try:
            iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.InvalidTokenError:
            raise Unauthorized("malformed token") from None
        jwk_set = self._jwks.get(iss) if isinstance(iss, str) else None
        if jwk_set is None:
            raise Unauthorized("token issuer not trusted")
        return jwk_set

    async def _jwk(self, jwk_set: _JwkSet, kid: object) -> jwt.PyJWK:
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("malformed token")
        key = jwk_set.find(kid)
        if key is not None:
            return key
        async with jwk_set.lock:  # one fetch for a burst of tokens with a new kid
            key = jwk_set.find(kid)
            now = self._clock()
            last = jwk_set.last_fetch
            if key is None and (last is None or now - last >= self._refetch_interval):
                jwk_set.last_fetch = now
                await self._fetch(jwk_set)
                key = jwk_set.find(kid)
        if key is not None:
            return key
        if not jwk_set.loaded:
            raise BackendUnavailable("signing keys (JWKS) unavailable", retry_after=5)
        raise Unauthorized("unknown token kid")

    async def _fetch(self, jwk_set: _JwkSet) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=5.0)
        try:
            response = await self._http.get(jwk_set.url)
            response.raise_for_status()
            jwk_set.store(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            # Keep the old keys: an IdP hiccup must not log everybody out.
            log.warning("cannot fetch JWKS from %s: %s", jwk_set.url, exc)

    async def aclose(self) -> None:
        if self._http is not None and self._own_http:
            await self._http.aclose()
            self._http = None


def _load_pem(pem: str) -> tuple[Any, str]:
    try:
        key = load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise ConfigError(f"TIDINGS_JWT_PUBLIC_KEY is not a PEM public key ({exc})") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ConfigError("TIDINGS_JWT_PUBLIC_KEY must be an RSA or P-256 EC public key")


def mint_token(
    secret: str,
    user: str,
    *,
    tenant: str = "",
    topics: Iterable[str] = (),
    publish: bool | Iterable[str] = False,
    admin: bool = False,
    name: str | None = None,
    ttl_s: float = 3600 * 24,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """An HS256 token (CLI, dev mode, tests). A negative `ttl_s` gives an already expired one."""
    if not 0 < len(user) <= MAX_ID_LENGTH:
        raise ValueError(f"user must be 1–{MAX_ID_LENGTH} characters")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, "iat": now, "exp": int(now + ttl_s)}
    optional = {
        "tenant": tenant,
        "name": name,
        "topics": list(topics),
        "publish": publish if isinstance(publish, bool) else list(publish),
        "admin": admin,
        "iss": issuer,
        "aud": audience,
    }
    claims.update((k, v) for k, v in optional.items() if v)
    return jwt.encode(claims, secret, algorithm="HS256")


# -- API keys and request authentication ----------------------------------------------------


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
    auth = headers.get("authorization") or headers.get("Authorization") or ""
    scheme, _, value = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return Credential(value.strip(), "header")
    token = query.get("token") or query.get("access_token")
    if token:
        return Credential(token, "query")
    token = cookies.get("tidings_token")
    if token:
        return Credential(token, "cookie")
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
        self._keys = ApiKeys(settings.api_keys)
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
        if credential.source == "header" and self._keys.check(credential.token):
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
    return Principal(user_id=user, tenant=tenant)


# -- log redaction ------------------------------------------------------------------------

_TOKEN_PARAM = re.compile(r"(\b[\w-]*token=)[^&\s\"';,]+", re.IGNORECASE)
_BEARER = re.compile(r"(\bbearer\s+)[^\s\"',;]+", re.IGNORECASE)


def redact(text: str) -> str:
    """Masks ``…token=`` parameter values (token, access_token, tidings_token) and Bearer values."""
    return _BEARER.sub(r"\1***", _TOKEN_PARAM.sub(r"\1***", text))


class RedactingFilter(logging.Filter):
    """Applies `redact` to a record's final message (e.g. uvicorn's access log).

    The message is formatted first and the redacted text kept with no
    arguments left: redacting the template alone could remove a `%s` after
    `token=` and leave an argument (the token itself) with no place to go.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # a broken record: let logging report it as usual
        redacted = redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        return True
