"""Resume cursors: one opaque, header-safe string naming a position in every stream.

Format: ``<epoch>.<h><seq>.<h><seq>…`` where ``h`` is a 6-character hash of
the stream's name and ``seq`` its position in hex. The epoch identifies the
backend's history; a cursor from another epoch (a restarted memory backend)
cannot be honoured, and the server says so with a `reset` event.

Hashes keep the cursor short (about 12 characters per stream, so 64 topics
fit in the 1024-character limit of API.md §4) while a reconnect may list its
topics in any order, add or drop some.
"""

from __future__ import annotations

import hashlib
import re

HASH_LEN = 6
MAX_LEN = 1024
_EPOCH = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_TOKEN = re.compile(rf"^[a-z2-7]{{{HASH_LEN}}}[0-9a-f]{{1,16}}$")


class CursorError(ValueError):
    """The cursor is garbled, too long or of another format."""


_B32 = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lower case
_B32_PAIRS = [a + b for a in _B32 for b in _B32]  # 10 bits → two characters
_SHARED_HASHES = 4096  # streams whose hashes are kept (broadcasts, popular topics)
_hashes: dict[str, str] = {}


def stream_hash(stream: str) -> str:
    """The first 6 base32 characters of the stream name's 5-byte BLAKE2b digest."""
    found = _hashes.get(stream)
    if found is not None:
        return found
    digest = hashlib.blake2b(stream.encode(), digest_size=5).digest()
    # Six base32 characters are the digest's top 30 bits, 5 bits each (what
    # base64.b32encode gives, without its pure-Python loop over the whole digest).
    bits = int.from_bytes(digest, "big") >> 10
    found = _B32_PAIRS[bits >> 20] + _B32_PAIRS[(bits >> 10) & 1023] + _B32_PAIRS[bits & 1023]
    if not stream.startswith("u:"):  # users' streams are many and read by few
        if len(_hashes) >= _SHARED_HASHES:
            _hashes.clear()
        _hashes[stream] = found
    return found


def encode(epoch: str, parts: list[str]) -> str:
    """`parts` are `stream_hash(s) + format(seq, "x")`, kept by each connection."""
    return epoch + "." + ".".join(parts) if parts else epoch


def part(hash_: str, seq: int) -> str:
    return hash_ + format(seq, "x")


def decode(cursor: str) -> tuple[str, dict[str, int]]:
    """-> (epoch, {stream hash: seq}); raises CursorError on anything malformed."""
    if len(cursor) > MAX_LEN:
        raise CursorError("cursor too long")
    epoch, *tokens = cursor.strip().split(".")
    if not _EPOCH.match(epoch):
        raise CursorError("not a tidings cursor")
    positions: dict[str, int] = {}
    for token in tokens:
        if not _TOKEN.match(token):
            raise CursorError("garbled cursor")
        positions[token[:HASH_LEN]] = int(token[HASH_LEN:], 16)
    return epoch, positions
