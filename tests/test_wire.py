"""SSE framing and parsing, bytes in, bytes out."""

from __future__ import annotations

import pytest

from tidings import wire


def test_message_event_omits_event_line() -> None:
    assert wire.sse_frame("c1", "message", {"a": 1}) == b'id: c1\ndata: {"a":1}\n\n'


def test_named_event_and_string_payload_split_per_line() -> None:
    frame = wire.sse_frame(None, "notice", "第一行\r\n第二行\rthird")
    assert frame == "event: notice\ndata: 第一行\ndata: 第二行\ndata: third\n\n".encode()


@pytest.mark.parametrize(
    "data",
    [
        {"text": "two\nlines\r\nand\rmore", "n": 1, "ok": True, "none": None},
        ["a\n", "\u2028", "消息", 1.5, [], {}],
        {"nested": {"deep": ["\x00\x1f", "\ud7ff"]}},
        0,
        None,
    ],
)
def test_json_payload_is_one_data_line_as_the_text_split_gives(data: object) -> None:
    """Non-string data is written as orjson's one line: what splitting its text gives."""
    text = wire.encode_data(data)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    assert lines == [text]
    for name in ("message", "welcome"):
        head = "" if name == "message" else f"event: {name}\n"
        assert wire.sse_body(name, data) == f"{head}data: {text}\n\n".encode()


def test_newlines_in_id_and_event_cannot_inject_fields() -> None:
    frame = wire.sse_frame("a\nb", "x\r\ndata: evil", 1)
    assert frame == b"id: ab\nevent: xdata: evil\ndata: 1\n\n"


def test_retry_and_comment() -> None:
    assert wire.sse_retry(3000) == b"retry: 3000\n\n"
    assert wire.sse_comment("ping") == wire.PING


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_parser_reassembles_any_chunking(size: int) -> None:
    stream = (
        wire.sse_retry(1500)
        + wire.sse_frame("c1", "welcome", {"user_id": "张三"})
        + wire.PING
        + wire.sse_frame("c2", "message", "多行\n文本")
    ).replace(b"\n", b"\r\n")
    parser = wire.SSEParser()
    events = [e for i in range(0, len(stream), size) for e in parser.feed(stream[i : i + size])]
    assert [(e.event, e.id) for e in events] == [
        ("retry", None),
        ("welcome", "c1"),
        ("message", "c2"),
    ]
    assert events[0].retry == 1500
    assert events[1].json() == {"user_id": "张三"}
    assert events[2].data == "多行\n文本"
    assert parser.comments == 1
    assert parser.last_event_id == "c2"


def test_last_event_id_header_wins_over_query() -> None:
    assert wire.last_event_id({"last-event-id": "h"}, {"last_event_id": "q"}) == "h"
    assert wire.last_event_id({}, {"last_event_id": "q"}) == "q"
    assert wire.last_event_id({}, {}) is None


def test_ws_message_has_type_and_timestamp() -> None:
    import orjson

    msg = orjson.loads(wire.ws_message("pong"))
    assert msg["type"] == "pong"
    assert msg["timestamp"].endswith("Z")


def test_split_list() -> None:
    assert wire.split_list(" a, b,,c ") == ["a", "b", "c"]
    assert wire.split_list(None) == []
