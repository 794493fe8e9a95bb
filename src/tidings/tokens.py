"""JWT verification (HS256 secret, RS256/ES256 PEM key or JWKS) and minting for dev and tests.

The accepted algorithms, JWKS issuer scoping and the claims read are in
docs/configuration.md ("Authentication").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm
from jwt.types import Options as JWTOptions

from .config import Settings, parse_jwks_urls
from .errors import BackendUnavailable, ConfigError, Unauthorized
from .principal import MAX_ID_LENGTH, Principal, principal_from_claims

__all__ = ["JWTVerifier", "mint_token"]

log = logging.getLogger("tidings.auth")

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
# The plain shape of an HS256 token: three unpadded base64url segments, the last one a
# 32-byte signature (43 characters). Others go to PyJWT (see JWTVerifier._hs256_claims).
_HS256_TOKEN = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{43})")
_PLAIN_HEADER = frozenset({"alg", "typ", "kid"})
# Header segments already found plain (the text decides: it is signed). Bounded: a header
# with a `kid` per key, a few per issuer.
_PLAIN_HEADERS_KEPT = 64
_plain_headers: set[str] = set()
_URLSAFE = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
# base64url character -> its 6-bit value (only the alphabet: `_HS256_TOKEN` checked it)
_B64URL = {
    c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}


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
        self._hs256 = _hs256_mac(self._secret)

    async def verify(self, token: str) -> Principal:
        hit = self._verified.get(token)
        if hit is not None:
            principal, exp = hit
            if exp is None or time.time() <= exp + self._leeway:
                return principal
            del self._verified[token]
            raise Unauthorized("token expired")
        if self._hs256 is not None:
            claims = self._hs256_claims(token, self._hs256)
            if claims is not None:
                return self._remember(token, claims)
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
        return self._remember(token, self._decode(token, key, alg, self._issuer))

    def _remember(self, token: str, claims: dict[str, Any]) -> Principal:
        principal = principal_from_claims(claims)
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            # The oldest eighth at once: deleting one at a time from the front makes each
            # `iter()` step over every slot deleted before it (~15 µs at 4,096 entries).
            for old in list(itertools.islice(self._verified, _VERIFIED_CACHE_SIZE // 8)):
                del self._verified[old]
        exp = claims.get("exp")
        self._verified[token] = (principal, float(exp) if exp is not None else None)
        return principal

    def _hs256_claims(self, token: str, keyed: hmac.HMAC) -> dict[str, Any] | None:
        """The claims of `token` if it is a plain HS256 token that PyJWT would accept with
        these settings; None for anything else, which then goes through PyJWT.

        Every connect verifies a token (the bench: each subscriber its own), and PyJWT
        spends ~70 µs on one. This does PyJWT's checks for the shape nearly every token
        has, in ~10 µs, and only ever accepts: a token that is refused, or of any other
        shape (padding, other header fields, `crit`, non-integer times, an `aud` list with
        non-strings...), is PyJWT's to refuse or accept, with its own error.
        """
        match = _HS256_TOKEN.fullmatch(token)
        if match is None:
            return None
        raw = token.encode("ascii")
        cut = match.end(2)
        signer = keyed.copy()  # the key's pads are hashed once, in `_hs256_mac`
        signer.update(raw[:cut])
        mac = binascii.b2a_base64(signer.digest(), newline=False)
        if not hmac.compare_digest(mac[:-1].translate(_TO_URLSAFE), raw[cut + 1 :]):
            return None
        head = match.group(1)
        if head not in _plain_headers:  # nearly every token of an issuer has the same one
            header = _json_segment(head)
            if (
                type(header) is not dict
                or header.get("alg") != "HS256"
                or not header.keys() <= _PLAIN_HEADER
                or ("kid" in header and not isinstance(header["kid"], str))
            ):
                return None
            if len(_plain_headers) < _PLAIN_HEADERS_KEPT:
                _plain_headers.add(head)
        claims = _json_segment(match.group(2))
        if type(claims) is not dict:
            return None
        now, leeway = time.time(), self._leeway
        # PyJWT takes int(value): floats, numeric strings and booleans too. Only ints here.
        for name in ("iat", "nbf"):
            if name in claims and (type(claims[name]) is not int or claims[name] > now + leeway):
                return None
        if "exp" in claims and (type(claims["exp"]) is not int or claims["exp"] <= now - leeway):
            return None
        if self._issuer is not None and claims.get("iss") != self._issuer:
            return None
        if self._audience is not None:
            aud = claims.get("aud")
            if not aud:
                return None
            if isinstance(aud, str):
                if aud != self._audience:
                    return None
            elif not (
                isinstance(aud, list)
                and all(isinstance(a, str) for a in aud)
                and self._audience in aud
            ):
                return None
        for name in ("sub", "jti"):
            if name in claims and not isinstance(claims[name], str):
                return None
        return claims

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


def _hs256_mac(secret: bytes | None) -> hmac.HMAC | None:
    """An HMAC-SHA256 keyed with the secret, for `_hs256_claims` to copy per token; None
    where PyJWT would say more than yes or no: no secret, one it refuses as an HMAC key
    (PEM or SSH text) or warns about (short)."""
    if secret is None:
        return None
    algorithm = HMACAlgorithm(HMACAlgorithm.SHA256)
    try:
        key = algorithm.prepare_key(secret)
    except jwt.InvalidKeyError:
        return None
    return None if algorithm.check_key_length(key) else hmac.new(key, digestmod="sha256")


def _json_segment(segment: str) -> Any:
    """A base64url segment as JSON, decoded as PyJWT decodes it; None when it refuses it.

    orjson, not json (10× faster here): it refuses what json would turn into NaN,
    infinities or lone surrogates, and UTF-16/32 text (the token then goes to PyJWT).
    The one other difference, integers beyond 64 bits read as floats, decides nothing:
    the times must be ints here and every claim read is typed (strings, lists, true).
    """
    raw = segment.encode("ascii")
    rest = len(raw) % 4
    if rest == 1:
        return None
    # A last character with bits beyond the data set is a non-canonical encoding of the
    # same bytes: PyJWT refuses it.
    if rest and _B64URL[raw[-1]] & (0b1111 if rest == 2 else 0b11):
        return None
    try:
        data = binascii.a2b_base64(raw.translate(_URLSAFE) + b"=" * (-len(raw) % 4))
    except binascii.Error:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


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
