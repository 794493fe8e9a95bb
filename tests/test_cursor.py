"""Resume cursors: compact, header-safe, strict when parsed."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings import cursor


def test_round_trip() -> None:
    parts = [cursor.part(cursor.stream_hash("u:张三"), 17), cursor.part(cursor.stream_hash("b"), 0)]
    epoch, positions = cursor.decode(cursor.encode("m0a1b2", parts))
    assert epoch == "m0a1b2"
    assert positions == {cursor.stream_hash("u:张三"): 17, cursor.stream_hash("b"): 0}


@given(st.dictionaries(st.text(min_size=1, max_size=40), st.integers(0, 2**60), max_size=66))
def test_any_positions_round_trip_within_limit(streams: dict[str, int]) -> None:
    hashes = {cursor.stream_hash(s): seq for s, seq in streams.items()}
    text = cursor.encode("e1", [cursor.part(h, seq) for h, seq in hashes.items()])
    assert text.isascii() and "\n" not in text and len(text) <= cursor.MAX_LEN + 200
    assert cursor.decode(text) == ("e1", hashes)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "ep.",
        "ep.abc",
        "ep.abcdef",
        "ep.ABCDEF1",
        "ep.abcdefxyz",
        "ep.abcdef-1",
        "bad epoch.x",
        "e." + "abcdef1." * 200,
    ],
)
def test_garbled_cursors_are_refused(bad: str) -> None:
    with pytest.raises(cursor.CursorError):
        cursor.decode(bad)


@given(st.text(min_size=1, max_size=300))
def test_stream_hash_is_the_first_six_base32_characters_of_blake2b(name: str) -> None:
    """The spelled-out base32 of `stream_hash` is the format cursors already carry."""
    for stream in (name, "u:" + name, "t:" + name):
        digest = hashlib.blake2b(stream.encode("utf-8", "surrogatepass"), digest_size=5).digest()
        expected = base64.b32encode(digest).decode().lower()[: cursor.HASH_LEN]
        assert cursor.stream_hash(stream) == expected
        assert cursor.stream_hash(stream) == expected  # again, from the cache for shared ones


def test_stream_hash_known_values() -> None:
    assert cursor.stream_hash("b") == cursor.stream_hash("b")
    for stream in ("b", "u:张三", "t:news"):
        digest = hashlib.blake2b(stream.encode(), digest_size=5).digest()
        assert cursor.stream_hash(stream) == base64.b32encode(digest).decode().lower()[:6]
