"""The WebSocket protocol's pure parts: client frames in, typed values out; server messages."""

from __future__ import annotations

import contextlib
import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings import wsproto
from tidings.server.websocket import origin_allowed, pong_deadline
from tidings.wsproto import Auth, MarkRead, Ping, ProtocolError, Resume, Subscribe, Unsubscribe


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ('{"type":"ping"}', Ping()),
        (b'{"type":"ping","request_id":7}', Ping()),  # unknown fields are ignored
        ('{"type":"subscribe","topics":["a","b","a"]}', Subscribe(("a", "b"))),
        ('{"type":"subscribe","topics":"a"}', Subscribe(("a",))),
        (
            '{"type":"subscribe","topics":["a"],"last_event_id":"e.x1"}',
            Subscribe(("a",), "e.x1"),
        ),
        ('{"type":"subscribe","topics":["a"],"last_event_id":""}', Subscribe(("a",))),
        ('{"type":"subscribe","topics":["a"],"last_event_id":null}', Subscribe(("a",))),
        ('{"type":"unsubscribe","topics":["订单"]}', Unsubscribe(("订单",))),
        ('{"type":"mark_read","notification_ids":["n1","n2"]}', MarkRead(("n1", "n2"))),
        ('{"type":"mark_read","ids":["n1"]}', MarkRead(("n1",))),
        ('{"type":"mark_read","all":true}', MarkRead((), all=True)),
        ('{"type":"resume","last_event_id":"e.x1"}', Resume("e.x1")),
        ('{"type":"auth","token":" a.b.c "}', Auth("a.b.c")),
    ],
)
def test_parse(raw: str | bytes, value: wsproto.ClientMessage) -> None:
    assert wsproto.parse(raw) == value


@pytest.mark.parametrize(
    ("raw", "words", "kind"),
    [
        ("", "not JSON", None),
        ("{", "not JSON", None),
        (b"\xff", "not JSON", None),
        ("[]", "JSON object", None),
        ("null", "JSON object", None),
        ("{}", '"type"', None),
        ('{"type":null}', '"type"', None),
        ('{"type":"PING"}', "unknown message type 'PING'", None),
        ('{"type":"通知"}', "unknown message type '通知'", None),
        ('{"type":"subscribe"}', '"topics"', "subscribe"),
        ('{"type":"subscribe","topics":[]}', '"topics"', "subscribe"),
        ('{"type":"subscribe","topics":[""]}', '"topics"', "subscribe"),
        ('{"type":"subscribe","topics":{"a":1}}', '"topics"', "subscribe"),
        ('{"type":"subscribe","topics":["a"],"last_event_id":1}', "last_event_id", "subscribe"),
        ('{"type":"unsubscribe","topics":[null]}', '"topics"', "unsubscribe"),
        ('{"type":"mark_read"}', "notification_ids", "mark_read"),
        ('{"type":"mark_read","notification_ids":[1]}', "notification_ids", "mark_read"),
        ('{"type":"mark_read","all":"yes"}', '"all"', "mark_read"),
        ('{"type":"resume"}', "last_event_id", "resume"),
        ('{"type":"resume","last_event_id":""}', "last_event_id", "resume"),
        ('{"type":"auth"}', '"token"', "auth"),
        ('{"type":"auth","token":"  "}', '"token"', "auth"),
        ('{"type":"auth","token":5}', '"token"', "auth"),
    ],
)
def test_parse_refuses(raw: str | bytes, words: str, kind: str | None) -> None:
    with pytest.raises(ProtocolError) as refused:
        wsproto.parse(raw)
    assert refused.value.code == "invalid_request"
    assert words in refused.value.message
    assert refused.value.request == kind


def test_limits() -> None:
    topics = orjson.dumps({"type": "subscribe", "topics": [f"t{i}" for i in range(101)]})
    with pytest.raises(ProtocolError, match="at most 100"):
        wsproto.parse(topics)
    cursor = orjson.dumps({"type": "resume", "last_event_id": "x" * 1025})
    with pytest.raises(ProtocolError, match="1024"):
        wsproto.parse(cursor)
    with pytest.raises(ProtocolError) as big:
        wsproto.parse('{"type":"ping","pad":"' + "x" * 100 + '"}', max_size=50)
    assert big.value.code == "payload_too_large"
    long_type = orjson.dumps({"type": "x" * 500})
    with pytest.raises(ProtocolError) as unknown:
        wsproto.parse(long_type)
    assert len(unknown.value.message) < 200


@given(st.binary(max_size=200) | st.text(max_size=200))
def test_parse_never_fails_otherwise(raw: bytes | str) -> None:
    try:
        wsproto.parse(raw)
    except ProtocolError as exc:
        assert exc.message and exc.code in ("invalid_request", "payload_too_large")


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(), st.lists))
def test_parse_any_json_value_in_any_field(value: object) -> None:
    for kind in wsproto.TYPES:
        for key in ("topics", "notification_ids", "last_event_id", "token", "all"):
            raw = json.dumps({"type": kind, key: value})  # stdlib: big integers too
            with contextlib.suppress(ProtocolError):
                wsproto.parse(raw)


def test_server_messages() -> None:
    message = orjson.loads(wsproto.message("subscribed", topics=["订单"]))
    assert message["type"] == "subscribed" and message["topics"] == ["订单"]
    assert message["timestamp"].endswith("Z")
    error = orjson.loads(wsproto.error("forbidden", "no", topic="x"))
    assert error == {
        "type": "error",
        "code": "forbidden",
        "message": "no",
        "topic": "x",
        "timestamp": error["timestamp"],
    }


@pytest.mark.parametrize(
    ("origin", "allowed", "ok"),
    [
        ("https://evil.example", [], True),
        (None, ["https://app.example.com"], True),
        ("https://app.example.com", ["https://app.example.com"], True),
        ("HTTPS://App.Example.com/", ["https://app.example.com"], True),
        ("https://evil.example", ["https://app.example.com"], False),
        ("http://app.example.com", ["https://app.example.com"], False),
        ("https://app.example.com.evil", ["https://app.example.com"], False),
        ("https://anything", ["*"], True),
        ("https://a.example.com", ["https://*.example.com"], True),
        ("https://a.b.example.com", ["https://*.example.com"], True),
        ("https://example.com", ["https://*.example.com"], False),
        ("https://badexample.com", ["https://*.example.com"], False),
        ("http://a.example.com", ["https://*.example.com"], False),
        ("null", ["https://app.example.com"], False),
    ],
)
def test_origin_allowed(origin: str | None, allowed: list[str], ok: bool) -> None:
    assert origin_allowed(origin, allowed) is ok


def test_pong_deadline_counts_from_the_last_pong() -> None:
    assert pong_deadline(54, 60) == 6
    assert pong_deadline(0.2, 0.1) == 0.1
    assert pong_deadline(30, 30) == 30
