from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tidings.auth import (
    ApiKeys,
    Authenticator,
    Credential,
    JWTVerifier,
    Principal,
    RequestAuthenticator,
    extract_credential,
    mint_token,
    principal_from_claims,
)
from tidings.config import Settings
from tidings.errors import BackendUnavailable, ConfigError, Unauthorized
from tidings.logs import RedactingFilter, redact
from tidings.topics import TopicPatterns, valid_pattern, valid_topic

SECRET = "test-secret-" + "x" * 32


def settings(**overrides: Any) -> Settings:
    return Settings(**overrides)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}."


def hs256_by_hand(key: bytes, claims: dict[str, Any]) -> str:
    """HS256 computed without PyJWT, which refuses PEM keys as HMAC secrets."""
    signing_input = unsigned_token({"alg": "HS256", "typ": "JWT"}, claims)[:-1]
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def pem(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "u1", "exp": int(time.time()) + 600, **extra}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# -- topics --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("approval:pending", True),
        ("a", True),
        ("A-z_0.9:/@x", True),
        ("x" * 200, True),
        ("x" * 201, False),
        ("", False),
        ("$sys", False),
        ("has space", False),
        ("通知", False),
        ("café", False),
        ("a*", False),
        ("a\n", False),
    ],
)
def test_valid_topic(name: str, ok: bool) -> None:
    assert valid_topic(name) is ok


@pytest.mark.parametrize(
    ("pattern", "topic", "hit"),
    [
        ("chat:42", "chat:42", True),
        ("chat:42", "chat:43", False),
        ("chat:*", "chat:42", True),
        ("chat:*", "chat:42:x", False),
        ("chat:*", "chat", False),
        ("chat:*", "chat:", False),
        ("*:pending", "approval:pending", True),
        ("chat:**", "chat:42", True),
        ("chat:**", "chat:42:x:y", True),
        ("chat:**", "chat", False),
        ("**", "anything:at:all", True),
        ("a.b", "a.b", True),
        ("a.b", "aXb", False),  # literal: '.' is not a regex wildcard
        ("user/1:*", "user/1:x", True),
    ],
)
def test_topic_patterns(pattern: str, topic: str, hit: bool) -> None:
    patterns = TopicPatterns([pattern])
    assert patterns.matches(topic) is hit
    assert patterns.matches(topic) is hit  # second answer comes from the cache


@pytest.mark.parametrize(
    "pattern", ["a:**:b", "a*", "a:b*c", "user/*", "", "$x", "通知:*", "a b", "x" * 201]
)
def test_invalid_patterns(pattern: str) -> None:
    assert not valid_pattern(pattern)
    with pytest.raises(ValueError, match="invalid topic pattern"):
        TopicPatterns([pattern])
    lenient = TopicPatterns([pattern, "ok:*"], strict=False)
    assert lenient.patterns == ("ok:*",)


def test_pattern_cache_is_bounded() -> None:
    patterns = TopicPatterns(["t:*"])
    for i in range(5000):
        assert patterns.matches(f"t:{i}")
    assert len(patterns._cache) <= 4096
    assert not TopicPatterns() and patterns


# -- principals ----------------------------------------------------------------------------


def test_principal_permissions() -> None:
    public = TopicPatterns(["news:*"])
    user = Principal("u1", "acme", topics=("chat:*",))
    assert user.may_subscribe("chat:1", public)
    assert user.may_subscribe("news:today", public)
    assert not user.may_subscribe("orders:1", public)
    assert not user.may_subscribe("$chat:1", TopicPatterns(["**"]))
    assert not user.may_publish(["chat:1"]) and not user.may_publish([])
    assert not user.may_administer("acme")

    publisher = Principal("u2", "acme", publish=("chat:*",))
    assert publisher.may_publish(["chat:1", "chat:2"])
    assert not publisher.may_publish(["chat:1", "orders:1"])
    assert publisher.may_publish([])  # users and broadcast of its own tenant
    assert Principal("u3", publish=True).may_publish(["anything"])

    admin = Principal("a", "acme", admin=True)
    assert admin.may_administer("acme") and not admin.may_administer("other")

    server = Principal.server()
    assert server is Principal.server() and server.is_server
    assert server.may_subscribe("x:y") and server.may_publish(["x"])
    assert server.may_administer("any-tenant")
    assert not server.may_subscribe("bad topic")


def test_principal_from_claims() -> None:
    p = principal_from_claims(
        {
            "sub": "u1",
            "tenant": "acme",
            "name": "张三",
            "topics": ["chat:*", 7, "bad*", "news:**"],
            "publish": ["chat:*"],
            "admin": "yes",
        }
    )
    assert p == Principal(
        "u1", "acme", name="张三", topics=("chat:*", "news:**"), publish=("chat:*",)
    )
    assert principal_from_claims({"sub": "u", "publish": True, "admin": True}).publish is True
    assert principal_from_claims({"sub": "u", "admin": True}).admin is True
    assert principal_from_claims({"sub": "u", "publish": "yes", "name": 5}) == Principal("u")


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"sub": ""},
        {"sub": 5},
        {"sub": "x" * 129},
        {"sub": "u", "tenant": 3},
        {"sub": "u\x00"},
        {"sub": "u", "tenant": "acme\x00"},
    ],
)
def test_principal_from_bad_claims(bad: dict[str, Any]) -> None:
    with pytest.raises(Unauthorized):
        principal_from_claims(bad)


# -- HS256 ---------------------------------------------------------------------------------


async def test_hs256_round_trip_with_chinese_name() -> None:
    token = mint_token(SECRET, "u1", tenant="acme", topics=["chat:*"], publish=True, name="李雷")
    p = await JWTVerifier(settings(jwt_secret=SECRET)).verify(token)
    assert p == Principal("u1", "acme", name="李雷", topics=("chat:*",), publish=True)


async def test_mint_token_issuer_audience_and_validation() -> None:
    verifier = JWTVerifier(
        settings(jwt_secret=SECRET, jwt_issuer="https://app", jwt_audience="tidings")
    )
    token = mint_token(SECRET, "u1", issuer="https://app", audience="tidings", admin=True)
    assert (await verifier.verify(token)).admin
    with pytest.raises(ValueError):
        mint_token(SECRET, "")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [  # built when the test runs: times relative to collection go stale in a long session
        (lambda: claims(exp=int(time.time()) - 100), "token expired"),
        (lambda: claims(nbf=int(time.time()) + 100), "token not yet valid"),
        (lambda: {"exp": int(time.time()) + 60}, "sub claim"),
        (lambda: claims(sub=""), "sub claim"),
        (lambda: claims(exp="tomorrow"), "malformed token"),
        (lambda: claims(iat="yesterday"), "token"),
    ],
)
async def test_hs256_claims_refused(payload: Any, reason: str) -> None:
    verifier = JWTVerifier(settings(jwt_secret=SECRET))
    with pytest.raises(Unauthorized, match=reason):
        await verifier.verify(jwt.encode(payload(), SECRET, algorithm="HS256"))


async def test_leeway_is_honoured() -> None:
    verifier = JWTVerifier(settings(jwt_secret=SECRET, jwt_leeway="30s"))
    now = int(time.time())
    assert await verifier.verify(jwt.encode(claims(exp=now - 10), SECRET, algorithm="HS256"))
    assert await verifier.verify(jwt.encode(claims(nbf=now + 10), SECRET, algorithm="HS256"))
    strict = JWTVerifier(settings(jwt_secret=SECRET, jwt_leeway=0))
    with pytest.raises(Unauthorized, match="expired"):
        await strict.verify(jwt.encode(claims(exp=now - 10), SECRET, algorithm="HS256"))


async def test_token_without_exp_is_accepted() -> None:
    token = jwt.encode({"sub": "u1"}, SECRET, algorithm="HS256")
    assert (await JWTVerifier(settings(jwt_secret=SECRET)).verify(token)).user_id == "u1"


@pytest.mark.parametrize(
    "token",
    [
        jwt.encode(claims(), "another-secret-" + "y" * 32, algorithm="HS256"),
        unsigned_token({"alg": "none"}, claims()),
        unsigned_token({"alg": "HS512"}, claims()) + "c2ln",
        "not-a-token",
        "a.b.c",
        "",
        "通知.x.y",
    ],
)
async def test_hs256_bad_tokens_refused(token: str) -> None:
    with pytest.raises(Unauthorized):
        await JWTVerifier(settings(jwt_secret=SECRET)).verify(token)


async def test_issuer_and_audience_checked_when_configured() -> None:
    verifier = JWTVerifier(settings(jwt_secret=SECRET, jwt_issuer="https://a", jwt_audience="t"))
    ok = claims(iss="https://a", aud="t")
    assert await verifier.verify(jwt.encode(ok, SECRET, algorithm="HS256"))
    for bad, reason in [
        ({**ok, "iss": "https://b"}, "wrong token issuer"),
        ({**ok, "aud": "other"}, "wrong token audience"),
        (claims(aud="t"), "iss"),
    ]:
        with pytest.raises(Unauthorized, match=reason):
            await verifier.verify(jwt.encode(bad, SECRET, algorithm="HS256"))
    # Not configured: an aud claim is not held against the token.
    plain = JWTVerifier(settings(jwt_secret=SECRET))
    assert await plain.verify(jwt.encode(claims(aud="x", iss="y"), SECRET, algorithm="HS256"))


async def test_verified_tokens_are_cached_until_exp(monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = JWTVerifier(settings(jwt_secret=SECRET, jwt_leeway=0))
    now = time.time()
    token = jwt.encode(claims(exp=int(now) + 60), SECRET, algorithm="HS256")
    first = await verifier.verify(token)
    assert await verifier.verify(token) is first
    monkeypatch.setattr(time, "time", lambda: now + 120)
    with pytest.raises(Unauthorized, match="expired"):
        await verifier.verify(token)


def hs_signed(
    header: dict[str, Any] | bytes,
    payload: dict[str, Any] | bytes,
    *,
    key: str = SECRET,
    digest: Any = hashlib.sha256,
    mangle: Any = None,
) -> str:
    """A token signed by hand, so its segments can be anything (`mangle` edits the
    header.payload text before it is signed)."""
    raw_header = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw_payload = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    text = f"{b64(raw_header)}.{b64(raw_payload)}"
    if mangle is not None:
        text = mangle(text)
    return f"{text}.{b64(hmac.new(key.encode(), text.encode(), digest).digest())}"


def _stray_bits(text: str) -> str:
    """The payload segment's last character with its unused low bits set: the same bytes
    to a lenient decoder, a non-canonical encoding that PyJWT refuses."""
    head, payload = text.split(".")
    if len(payload) % 4 in (2, 3):
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        index = alphabet.index(payload[-1]) | (0b1111 if len(payload) % 4 == 2 else 0b11)
        payload = payload[:-1] + alphabet[index]
    return f"{head}.{payload}"


HS = {"alg": "HS256", "typ": "JWT"}


def odd_tokens() -> dict[str, str]:
    """Tokens of every shape the fast path must leave to PyJWT, and the plain ones it
    takes (built when the test runs: their times are relative to now)."""
    now = int(time.time())
    return {
        "plain": hs_signed(HS, claims()),
        "plain, Chinese name": hs_signed(HS, claims(name="李雷", tenant="租户")),
        "no typ": hs_signed({"alg": "HS256"}, claims()),
        "kid": hs_signed({**HS, "kid": "k1"}, claims()),
        "kid not a string": hs_signed({**HS, "kid": 7}, claims()),
        "kid null": hs_signed({**HS, "kid": None}, claims()),
        "typ not a string": hs_signed({"alg": "HS256", "typ": 5}, claims()),
        "another header field": hs_signed({**HS, "cty": "x"}, claims()),
        "crit": hs_signed({**HS, "crit": ["exp"]}, claims()),
        "b64 false": hs_signed({**HS, "b64": False, "crit": ["b64"]}, claims()),
        "alg none": hs_signed({"alg": "none"}, claims()),
        "alg missing": hs_signed({"typ": "JWT"}, claims()),
        "alg HS512": hs_signed({"alg": "HS512"}, claims(), digest=hashlib.sha512),
        "alg HS256 twice, last wins": hs_signed(b'{"alg":"none","alg":"HS256"}', claims()),
        "alg none twice, last wins": hs_signed(b'{"alg":"HS256","alg":"none"}', claims()),
        "header a list": hs_signed(b'["HS256"]', claims()),
        "header not JSON": hs_signed(b"{alg", claims()),
        "payload a list": hs_signed(HS, b'["u1"]'),
        "payload not JSON": hs_signed(HS, b"{sub"),
        "payload UTF-16": hs_signed(HS, json.dumps(claims()).encode("utf-16")),
        "payload NaN": hs_signed(HS, b'{"sub": "u1", "x": NaN}'),
        "payload deep": hs_signed(HS, b'{"sub": "u1", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        "duplicate sub": hs_signed(HS, b'{"sub": "u1", "sub": "u2"}'),
        "wrong key": hs_signed(HS, claims(), key="another-secret-" + "y" * 32),
        "padded segments": hs_signed(HS, claims(), mangle=lambda t: t.replace(".", "==.")),
        "stray bits": hs_signed(HS, claims(pad="x"), mangle=_stray_bits),
        "no exp": hs_signed(HS, {"sub": "u1"}),
        "exp past": hs_signed(HS, claims(exp=now - 100)),
        "exp past, in leeway": hs_signed(HS, claims(exp=now - 10)),
        "exp float": hs_signed(HS, claims(exp=now + 600.5)),
        "exp numeric string": hs_signed(HS, claims(exp=str(now + 600))),
        "exp true": hs_signed(HS, claims(exp=True)),
        "exp word": hs_signed(HS, claims(exp="tomorrow")),
        "exp huge": hs_signed(HS, b'{"sub": "u1", "exp": 123456789012345678901234567890}'),
        "exp null": hs_signed(HS, claims(exp=None)),
        "nbf future": hs_signed(HS, claims(nbf=now + 100)),
        "nbf in leeway": hs_signed(HS, claims(nbf=now + 10)),
        "nbf past": hs_signed(HS, claims(nbf=now - 10)),
        "nbf float": hs_signed(HS, claims(nbf=now - 10.5)),
        "iat future": hs_signed(HS, claims(iat=now + 100)),
        "iat now": hs_signed(HS, claims(iat=now)),
        "iat word": hs_signed(HS, claims(iat="yesterday")),
        "sub a number": hs_signed(HS, claims(sub=7)),
        "sub empty": hs_signed(HS, claims(sub="")),
        "sub missing": hs_signed(HS, {"exp": now + 600}),
        "jti": hs_signed(HS, claims(jti="j1")),
        "jti a number": hs_signed(HS, claims(jti=7)),
        "tenant a number": hs_signed(HS, claims(tenant=7)),
        "iss": hs_signed(HS, claims(iss="https://a")),
        "iss other": hs_signed(HS, claims(iss="https://b")),
        "iss a number": hs_signed(HS, claims(iss=7)),
        "aud": hs_signed(HS, claims(aud="t")),
        "aud other": hs_signed(HS, claims(aud="u")),
        "aud empty": hs_signed(HS, claims(aud="")),
        "aud list": hs_signed(HS, claims(aud=["u", "t"])),
        "aud list without": hs_signed(HS, claims(aud=["u"])),
        "aud list with a number": hs_signed(HS, claims(aud=["t", 7])),
        "aud a number": hs_signed(HS, claims(aud=7)),
        "aud and iss": hs_signed(HS, claims(aud="t", iss="https://a")),
        "signature cut": hs_signed(HS, claims())[:-1],
        "signature longer": hs_signed(HS, claims()) + "A",
        "signature stray bits": hs_signed(HS, claims())[:-1] + "z",
        "four segments": hs_signed(HS, claims()) + ".x",
        "not ASCII": hs_signed(HS, claims()) + "通",
    }


VERIFIER_SETTINGS = {
    "plain": {},
    "no leeway": {"jwt_leeway": 0},
    "issuer": {"jwt_issuer": "https://a"},
    "audience": {"jwt_audience": "t"},
    "both": {"jwt_issuer": "https://a", "jwt_audience": "t"},
}


async def _outcome(verifier: JWTVerifier, token: str) -> tuple[str, Any]:
    try:
        return "ok", await verifier.verify(token)
    except Unauthorized as exc:
        return "refused", exc.message


@pytest.mark.parametrize("config", VERIFIER_SETTINGS)
async def test_hs256_fast_path_answers_exactly_as_pyjwt(config: str) -> None:
    """Every token, under every setting, is accepted (with the same principal) or
    refused (with the same reason) with the fast path as with PyJWT alone."""
    options = {"jwt_secret": SECRET, **VERIFIER_SETTINGS[config]}
    fast_hits = 0
    for name, token in odd_tokens().items():
        fast = JWTVerifier(settings(**options))
        assert fast._hs256 is not None
        slow = JWTVerifier(settings(**options))
        slow._hs256 = None  # PyJWT only
        expected = await _outcome(slow, token)
        assert await _outcome(fast, token) == expected, name
        assert fast._hs256 is not None
        quick = fast._hs256_claims(token, fast._hs256)
        if quick is not None:  # only ever the claims PyJWT gives: it never refuses here
            fast_hits += 1
            assert quick == slow._decode(token, SECRET.encode(), "HS256", slow._issuer), name
    assert fast_hits >= 1  # and it does serve the tokens each setting lets in


async def test_hs256_fast_path_skips_pyjwt_for_plain_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_pyjwt(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("PyJWT was called")

    verifier = JWTVerifier(settings(jwt_secret=SECRET))
    monkeypatch.setattr(jwt, "decode", no_pyjwt)
    token = mint_token(SECRET, "u1", tenant="acme", topics=["chat:*"], name="李雷")
    p = await verifier.verify(token)
    assert p == Principal("u1", "acme", name="李雷", topics=("chat:*",))


def test_hs256_fast_path_is_off_for_keys_pyjwt_refuses_or_warns_about() -> None:
    pem_secret = "-----BEGIN PUBLIC KEY-----\n" + "A" * 64 + "\n-----END PUBLIC KEY-----"
    assert JWTVerifier(settings(jwt_secret=pem_secret))._hs256 is None
    assert JWTVerifier(settings(jwt_public_key=None, jwt_secret=SECRET))._hs256 is not None


async def test_verified_token_cache_stays_bounded_and_keeps_recent_tokens() -> None:
    verifier = JWTVerifier(settings(jwt_secret=SECRET))
    tokens = [mint_token(SECRET, f"u{i}") for i in range(5000)]
    for token in tokens:
        await verifier.verify(token)
    assert len(verifier._verified) <= 4096
    assert tokens[-1] in verifier._verified and tokens[0] not in verifier._verified


# -- RS256 / ES256 with a PEM key ----------------------------------------------------------


async def test_rs256_and_es256_with_pem(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, tmp_path: Any
) -> None:
    rs = JWTVerifier(settings(jwt_public_key=pem(rsa_key)))
    assert (await rs.verify(jwt.encode(claims(), rsa_key, algorithm="RS256"))).user_id == "u1"
    path = tmp_path / "ec.pem"
    path.write_text(pem(ec_key))
    es = JWTVerifier(settings(jwt_public_key=str(path)))
    assert (await es.verify(jwt.encode(claims(), ec_key, algorithm="ES256"))).user_id == "u1"
    with pytest.raises(Unauthorized, match="algorithm"):
        await rs.verify(jwt.encode(claims(), ec_key, algorithm="ES256"))
    with pytest.raises(Unauthorized, match="algorithm"):
        await rs.verify(jwt.encode(claims(), rsa_key, algorithm="RS512"))
    with pytest.raises(Unauthorized, match="expired"):
        await rs.verify(jwt.encode(claims(exp=1), rsa_key, algorithm="RS256"))


async def test_rs256_wrong_key_refused(
    rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    verifier = JWTVerifier(settings(jwt_public_key=pem(rsa_key)))
    with pytest.raises(Unauthorized, match="bad token signature"):
        await verifier.verify(jwt.encode(claims(), rsa_key2, algorithm="RS256"))


async def test_hs_rs_confusion_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    public_pem = pem(rsa_key)
    forged = hs256_by_hand(public_pem.encode(), claims())
    with pytest.raises(Unauthorized, match="algorithm"):
        await JWTVerifier(settings(jwt_public_key=public_pem)).verify(forged)
    # With a secret configured as well, HS256 is checked against the secret only.
    both = JWTVerifier(settings(jwt_public_key=public_pem, jwt_secret=SECRET))
    with pytest.raises(Unauthorized, match="signature"):
        await both.verify(forged)
    assert await both.verify(mint_token(SECRET, "u1"))


def test_bad_public_key_is_a_config_error(ec_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ConfigError, match="TIDINGS_JWT_PUBLIC_KEY"):
        JWTVerifier(settings(jwt_public_key="-----BEGIN PUBLIC KEY-----\nnope\n-----END"))
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ConfigError, match="P-256"):
        JWTVerifier(settings(jwt_public_key=pem(p384)))


# -- JWKS over a real local HTTP server ------------------------------------------------------


class JwksServer:
    """Serves JSON documents by path; counts requests per path."""

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}
        self.hits: Counter[str] = Counter()
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        path = request_line.split()[1].decode()
        self.hits[path] += 1
        document = self.documents.get(path)
        status = "200 OK" if document is not None else "500 Internal Server Error"
        body = json.dumps(document).encode()
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        writer.close()


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    async with listener:
        yield server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def jwk(private: Any, kid: str) -> dict[str, Any]:
    algorithm = RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else ECAlgorithm
    return {**algorithm.to_jwk(private.public_key(), as_dict=True), "kid": kid, "use": "sig"}


def signed(private: Any, kid: str, **extra: Any) -> str:
    alg = "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
    return jwt.encode(claims(**extra), private, algorithm=alg, headers={"kid": kid})


async def test_jwks_fetch_cache_and_rate_limited_refetch(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    jwks.documents["/keys"] = {"keys": [jwk(rsa_key, "k1")]}
    clock = Clock()
    verifier = JWTVerifier(settings(jwt_jwks_url=f"{jwks.url}/keys"), clock=clock)
    try:
        assert (await verifier.verify(signed(rsa_key, "k1"))).user_id == "u1"
        assert (await verifier.verify(signed(rsa_key, "k1", sub="u2"))).user_id == "u2"
        assert jwks.hits["/keys"] == 1

        # The IdP rotates in an EC key: unknown kid, but the last fetch was just now.
        jwks.documents["/keys"] = {"keys": [jwk(rsa_key, "k1"), jwk(ec_key, "k2")]}
        with pytest.raises(Unauthorized, match="unknown token kid"):
            await verifier.verify(signed(ec_key, "k2"))
        assert jwks.hits["/keys"] == 1

        clock.now += 30
        assert (await verifier.verify(signed(ec_key, "k2"))).user_id == "u1"
        assert jwks.hits["/keys"] == 2
        # A burst of tokens with yet another unknown kid costs one fetch per interval.
        clock.now += 30
        results = await asyncio.gather(
            *(verifier.verify(signed(ec_key, "k3")) for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, Unauthorized) for r in results)
        assert jwks.hits["/keys"] == 3
    finally:
        await verifier.aclose()


async def test_jwks_ignores_symmetric_keys(jwks: JwksServer) -> None:
    oct_key = {"kty": "oct", "kid": "h", "k": b64(SECRET.encode()), "alg": "HS256"}
    jwks.documents["/keys"] = {"keys": [oct_key]}
    verifier = JWTVerifier(settings(jwt_jwks_url=f"{jwks.url}/keys"))
    try:
        forged = jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "h"})
        with pytest.raises(Unauthorized, match="algorithm"):
            await verifier.verify(forged)
        fake_rs = unsigned_token({"alg": "RS256", "kid": "h"}, claims()) + "c2ln"
        with pytest.raises(Unauthorized, match="unknown token kid"):
            await verifier.verify(fake_rs)
    finally:
        await verifier.aclose()


async def test_jwks_issuer_scoping(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    jwks.documents["/a"] = {"keys": [jwk(rsa_key, "ka")]}
    jwks.documents["/b"] = {"keys": [jwk(rsa_key2, "kb")]}
    url = f"https://idp-a={jwks.url}/a,https://idp-b={jwks.url}/b"
    verifier = JWTVerifier(settings(jwt_jwks_url=url))
    try:
        assert (await verifier.verify(signed(rsa_key, "ka", iss="https://idp-a"))).user_id
        assert (await verifier.verify(signed(rsa_key2, "kb", iss="https://idp-b"))).user_id
        # Issuer A's key must not vouch for a token that claims to come from B...
        with pytest.raises(Unauthorized, match="unknown token kid"):
            await verifier.verify(signed(rsa_key, "ka", iss="https://idp-b"))
        # ...nor for an issuer nobody configured, nor without an issuer.
        with pytest.raises(Unauthorized, match="issuer not trusted"):
            await verifier.verify(signed(rsa_key, "ka", iss="https://idp-c"))
        with pytest.raises(Unauthorized, match="issuer not trusted"):
            await verifier.verify(signed(rsa_key, "ka"))
    finally:
        await verifier.aclose()


async def test_jwks_single_url_with_configured_issuer(
    jwks: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks.documents["/keys"] = {"keys": [jwk(rsa_key, "k1")]}
    verifier = JWTVerifier(settings(jwt_jwks_url=f"{jwks.url}/keys", jwt_issuer="https://i"))
    try:
        assert await verifier.verify(signed(rsa_key, "k1", iss="https://i"))
        with pytest.raises(Unauthorized, match="issuer"):
            await verifier.verify(signed(rsa_key, "k1", iss="https://other"))
        # A lone key in the set also serves a token without kid.
        no_kid = jwt.encode(claims(iss="https://i"), rsa_key, algorithm="RS256")
        assert await verifier.verify(no_kid)
    finally:
        await verifier.aclose()


async def test_jwks_unavailable_is_503(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = JWTVerifier(settings(jwt_jwks_url=f"{jwks.url}/missing"))
    try:
        with pytest.raises(BackendUnavailable):
            await verifier.verify(signed(rsa_key, "k1"))
    finally:
        await verifier.aclose()


# -- credentials and the authenticator --------------------------------------------------------


def test_extract_credential_order() -> None:
    header = {"authorization": "Bearer H"}
    query = {"token": "Q", "access_token": "A"}
    cookies = {"tidings_token": "C"}
    assert extract_credential(header, query, cookies) == Credential("H", "header")
    assert extract_credential({}, query, cookies) == Credential("Q", "query")
    assert extract_credential({}, {"access_token": "A"}, cookies) == Credential("A", "query")
    assert extract_credential({}, {}, cookies) == Credential("C", "cookie")
    assert extract_credential({"Authorization": "bearer  H2 "}, {}, {}) == ("H2", "header")
    assert extract_credential({"authorization": "Basic dXNlcg=="}, query, {}) == ("Q", "query")
    assert extract_credential({"authorization": "Bearer "}, {"token": ""}, {}) is None


async def test_authenticator_lookup_order_and_no_fallthrough() -> None:
    auth = Authenticator(settings(jwt_secret=SECRET))
    h, q, c = (mint_token(SECRET, user) for user in ("header", "query", "cookie"))
    cookies = {"tidings_token": c}
    assert (await auth.authenticate({"authorization": f"Bearer {h}"}, {"token": q}, cookies)) == (
        Principal("header")
    )
    assert (await auth.authenticate({}, {"token": q}, cookies)).user_id == "query"
    assert (await auth.authenticate({}, {"access_token": q}, cookies)).user_id == "query"
    assert (await auth.authenticate({}, {}, cookies)).user_id == "cookie"
    with pytest.raises(Unauthorized):  # the first credential found decides
        await auth.authenticate({"authorization": "Bearer garbage"}, {"token": q}, {})
    with pytest.raises(Unauthorized, match="missing credential"):
        await auth.authenticate({}, {}, {})
    assert (await auth.principal_from_token(q)).user_id == "query"
    assert isinstance(auth, RequestAuthenticator)
    await auth.aclose()


async def test_api_keys() -> None:
    auth = Authenticator(settings(jwt_secret=SECRET, api_keys="key-one,key-two"))
    for key in ("key-one", "key-two"):
        assert await auth.authenticate({"authorization": f"Bearer {key}"}, {}, {}) == (
            Principal.server()
        )
    for wrong in ("key-on", "key-one2", "KEY-ONE"):
        with pytest.raises(Unauthorized):
            await auth.authenticate({"authorization": f"Bearer {wrong}"}, {}, {})
    with pytest.raises(Unauthorized):  # keys travel in the Authorization header only
        await auth.authenticate({}, {"token": "key-one"}, {})

    keys = ApiKeys(["a", "b"])
    assert keys.check("a") and keys.check("b") and not keys.check("c") and not keys.check("")
    assert not ApiKeys([]) and not ApiKeys([]).check("")


async def test_insecure_query_auth() -> None:
    auth = Authenticator(settings(jwt_secret=SECRET, insecure_query_auth=True))
    p = await auth.authenticate({}, {"user_id": "alice", "tenant_id": "acme"}, {})
    assert p == Principal("alice", "acme")  # no topic grants: public topics only
    assert (await auth.authenticate({}, {"user_id": "bob"}, {})).tenant == ""
    token = mint_token(SECRET, "carol")
    assert (await auth.authenticate({}, {"user_id": "x", "token": token}, {})).user_id == "carol"
    with pytest.raises(Unauthorized, match="missing credential"):
        await auth.authenticate({}, {}, {})
    with pytest.raises(Unauthorized):
        await auth.authenticate({}, {"user_id": "u" * 129}, {})
    strict = Authenticator(settings(jwt_secret=SECRET))
    with pytest.raises(Unauthorized, match="missing credential"):
        await strict.authenticate({}, {"user_id": "alice"}, {})


async def test_no_jwt_key_configured() -> None:
    auth = Authenticator(settings())
    with pytest.raises(Unauthorized, match="no JWT key"):
        await auth.authenticate({}, {"token": mint_token(SECRET, "u")}, {})


def test_public_topics_compiled() -> None:
    auth = Authenticator(settings(public_topics="news:*"))
    assert auth.public_topics.matches("news:x")


# -- redaction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /api/v1/stream?token=abc.def&topics=a", "GET /api/v1/stream?token=***&topics=a"),
        ("/ws?topics=a&access_token=xyz", "/ws?topics=a&access_token=***"),
        ("Cookie: tidings_token=abc; other=1", "Cookie: tidings_token=***; other=1"),
        ("Authorization: Bearer abc.def.ghi", "Authorization: Bearer ***"),
        ("authorization: bearer key-1, next", "authorization: bearer ***, next"),
        ("?TOKEN=abc", "?TOKEN=***"),
        ("no secrets here, topics=a", "no secrets here, topics=a"),
        ("?token=", "?token="),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redacting_filter(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tidings.test.redact")
    logger.addFilter(RedactingFilter())
    try:
        with caplog.at_level(logging.INFO, logger="tidings.test.redact"):
            logger.info('%s - "%s %s" %d', "1.2.3.4", "GET", "/stream?token=secret1", 200)
            logger.info("Bearer secret2 in message")
            logger.info("%(path)s", {"path": "/ws?access_token=secret3"})
    finally:
        logger.filters.clear()
    assert "secret" not in caplog.text
    assert '"GET /stream?token=***" 200' in caplog.text
