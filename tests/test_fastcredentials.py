"""The fast path's credentials read from a request head give what `Credentials.of` gives."""

from __future__ import annotations

import random

import pytest
from starlette.datastructures import Headers, QueryParams
from starlette.requests import HTTPConnection

from tidings.server.fastcredentials import HeadHeaders, HeadQuery, credentials, query_params
from tidings.server.fasthttp import parse_head
from tidings.server.http import Credentials

RAW_HEADERS = [
    (b"host", b"x"),
    (b"authorization", b"Bearer first"),
    (b"authorization", b"Bearer second"),
    (b"last-event-id", b"m1.abc"),
    (b"x-caf\xe9", b"cr\xe8me"),
    (b"cookie", b"tidings_token=t1; other=2"),
    (b"cookie", b"tidings_token=t2"),
]
NAMES = ["authorization", "Authorization", "AUTHORIZATION", "last-event-id", "Last-Event-ID",
         "x-café", "cookie", "missing", ""]  # fmt: skip


def test_head_headers_get_as_starlette_headers() -> None:
    ours, theirs = HeadHeaders(raw=RAW_HEADERS), Headers(raw=RAW_HEADERS)
    for name in NAMES:
        assert ours.get(name) == theirs.get(name)
        assert ours.get(name, "default") == theirs.get(name, "default")
    assert ours.get("missing", None) is None
    assert dict(ours) == dict(theirs) and ours.raw == theirs.raw
    for bad in ("naïve ☃", 3):  # not latin-1, not a string: the same error either way
        with pytest.raises(Exception) as ours_error:
            ours.get(bad)  # type: ignore[arg-type]
        with pytest.raises(Exception) as theirs_error:
            theirs.get(bad)  # type: ignore[arg-type]
        assert type(ours_error.value) is type(theirs_error.value)


def test_head_query_get_as_query_params() -> None:
    raw = b"topics=a,b&token=&x=1&x=2&flag&=v&last_event_id=c%2Fd"
    ours, theirs = query_params(raw), QueryParams(raw)
    assert isinstance(ours, HeadQuery)
    for name in ["topics", "token", "x", "flag", "", "last_event_id", "lastEventId", "missing"]:
        assert ours.get(name) == theirs.get(name)
        assert ours.get(name, "default") == theirs.get(name, "default")
        assert ours.getlist(name) == theirs.getlist(name)
    assert ours.multi_items() == theirs.multi_items() and dict(ours) == dict(theirs)
    with pytest.raises(TypeError):
        ours.get([])  # type: ignore[call-overload]


def test_query_params_as_starlette_parses_them() -> None:
    """Random queries, with and without escapes: the same pairs, in the same order."""
    pieces = ["a", "b", "=", "&", "&&", "%", "%2", "%2F", "%e9", "+", "é", "topics", ";", " ", "x"]
    rng = random.Random(8)
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 10)))
        raw = text.encode("utf-8") if rng.random() < 0.5 else text.encode("latin-1", "replace")
        ours, theirs = query_params(raw), QueryParams(raw)
        assert ours.multi_items() == theirs.multi_items(), raw
        assert dict(ours) == dict(theirs), raw


@pytest.mark.parametrize(
    "target",
    [b"/api/v1/stream", b"/api/v1/stream?topics=a,b", b"/api/v1/stream?topics=a%2Cb&token=t+1"],
)
def test_credentials_as_the_asgi_path_reads_them(target: bytes) -> None:
    head = parse_head(
        b"GET %s HTTP/1.1\r\n%s\r\n"
        % (target, b"".join(b"%s: %s\r\n" % pair for pair in RAW_HEADERS if b"\xe9" not in pair[0]))
    )
    scope = {
        "type": "http",
        "headers": head.headers,
        "query_string": head.query,
        "path": head.path,
    }
    ours, theirs = credentials(head), Credentials.of(HTTPConnection(scope))
    assert ours.headers.items() == theirs.headers.items()
    assert ours.query.multi_items() == theirs.query.multi_items()  # type: ignore[attr-defined]
    # Every Cookie header, as Starlette reads them (the fast path read only the first).
    assert ours.cookies == theirs.cookies == {"tidings_token": "t2", "other": "2"}
