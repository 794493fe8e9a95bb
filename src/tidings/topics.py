"""Topic names and the patterns that grant access to them.

A pattern is a topic name whose `:`-separated segments may be wildcards:

    *     exactly one non-empty segment        chat:*    matches chat:42, not chat:42:x
    **    as the last segment only: one or      chat:**   matches chat:42, chat:42:x,
          more remaining segments                         but not chat itself
    else  literal

`**` alone matches every topic. `*` inside a segment (`a*b`) is not a wildcard and makes the
pattern invalid, as does `**` anywhere but last.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

__all__ = ["MAX_TOPIC_LENGTH", "TopicPatterns", "claim_patterns", "valid_pattern", "valid_topic"]

MAX_TOPIC_LENGTH = 200

_TOPIC = re.compile(r"[A-Za-z0-9_\-.:/@]{1,200}")
# A literal segment of a pattern: topic characters other than ':' (may be empty, as in a topic).
_LITERAL_SEGMENT = re.compile(r"[A-Za-z0-9_\-./@]*")
_CACHE_SIZE = 4096


def valid_topic(name: str) -> bool:
    """1–200 chars of ``A-Z a-z 0-9 _ - . : / @``. (`$`, reserved, is not among them.)"""
    return _TOPIC.fullmatch(name) is not None


def valid_pattern(pattern: str) -> bool:
    return _pattern_regex(pattern) is not None


def _pattern_regex(pattern: str) -> str | None:
    """The regex source for one pattern, or None when the pattern is invalid."""
    if not 0 < len(pattern) <= MAX_TOPIC_LENGTH:
        return None
    segments = pattern.split(":")
    parts: list[str] = []
    for i, segment in enumerate(segments):
        if segment == "*":
            parts.append("[^:]+")
        elif segment == "**":
            if i != len(segments) - 1:
                return None
            parts.append(".+")
        elif _LITERAL_SEGMENT.fullmatch(segment):
            parts.append(re.escape(segment))
        else:
            return None
    return ":".join(parts)


class TopicPatterns:
    """A compiled set of patterns; `matches()` answers from a bounded cache after the first ask.

    `strict=True` (for settings) raises ValueError on an invalid pattern; `strict=False` (for
    token claims, which an operator cannot fix at start-up) drops it.
    """

    __slots__ = ("_cache", "_literals", "_regex", "patterns")

    def __init__(self, patterns: Iterable[str] = (), *, strict: bool = True) -> None:
        literals: set[str] = set()
        wildcards: list[str] = []
        kept: list[str] = []
        for pattern in patterns:
            source = _pattern_regex(pattern)
            if source is None:
                if strict:
                    raise ValueError(
                        f"invalid topic pattern {pattern!r} (segments are topic characters, "
                        "'*', or a last '**')"
                    )
                continue
            kept.append(pattern)
            if "*" in pattern:
                wildcards.append(source)
            else:
                literals.add(pattern)
        self.patterns: tuple[str, ...] = tuple(kept)
        self._literals = frozenset(literals)
        self._regex = re.compile("|".join(f"(?:{w})" for w in wildcards)) if wildcards else None
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __repr__(self) -> str:
        return f"TopicPatterns({list(self.patterns)!r})"

    def matches(self, topic: str) -> bool:
        """Whether any pattern matches `topic`. Does not check that `topic` is a valid name."""
        if topic in self._literals:
            return True
        if self._regex is None:
            return False
        hit = self._cache.get(topic)
        if hit is None:
            hit = self._regex.fullmatch(topic) is not None
            if len(self._cache) >= _CACHE_SIZE:
                # Oldest first: dicts keep insertion order, so this is a cheap FIFO bound.
                del self._cache[next(iter(self._cache))]
            self._cache[topic] = hit
        return hit

    def all_match(self, topics: Iterable[str]) -> bool:
        return all(self.matches(t) for t in topics)


@lru_cache(maxsize=1024)
def claim_patterns(patterns: tuple[str, ...]) -> TopicPatterns:
    """Lenient patterns from a token claim, compiled once: many users carry the same claims."""
    return TopicPatterns(patterns, strict=False)
