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

import base64
import hashlib
import re

HASH_LEN = 6
MAX_LEN = 1024
_EPOCH = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_TOKEN = re.compile(rf"^[a-z2-7]{{{HASH_LEN}}}[0-9a-f]{{1,16}}$")


class CursorError(ValueError):
    """The cursor is garbled, too long or of another format."""


def stream_hash(stream: str) -> str:
    digest = hashlib.blake2b(stream.encode(), digest_size=5).digest()
    return base64.b32encode(digest).decode().lower()[:HASH_LEN]


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
