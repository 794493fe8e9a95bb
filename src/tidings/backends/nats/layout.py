"""Names, stream settings and message bodies of the NATS layout (no I/O).

Every name comes from the URL's ``?prefix=`` (default ``tidings``; ``P`` is its
upper case with anything but letters, digits, ``-`` and ``_`` as ``_``).
Tenant and stream names become subject tokens as ``x`` + base32 (lower case,
no padding): any name, no ``.``/``*``/``>``, never empty, never a fixed word
such as ``epoch``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from nats.js import api

from ...event import EVENT, Event

POS = "Tidings-Pos"  # a history copy's position in its stream
MSG_ID = "Nats-Msg-Id"
EXPECT_LAST = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = 10071  # JetStream: the expected last sequence did not hold
STREAM_NAME_IN_USE = 10058  # JetStream: add_stream on an existing stream with other settings
COMMITS_KEPT = 1000  # per tenant: how far an instance's fan-out may lag before it resyncs
DUPLICATE_WINDOW = 120.0  # seconds a Nats-Msg-Id is remembered (rewrites are deduplicated)


def split_url(url: str) -> tuple[str, str]:
    """-> (the URL for nats-py, the name prefix from ``?prefix=``, default ``tidings``)."""
    parts = urlsplit(url)
    prefix = "tidings"
    kept = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "prefix":
            prefix = value or prefix
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), prefix


def token(name: str) -> str:
    """A subject token (and KV key part) for any string."""
    return "x" + base64.b32encode(name.encode()).decode().rstrip("=").lower()


def untoken(tok: str) -> str:
    """The string `token` made `tok` from."""
    body = tok[1:].upper()
    return base64.b32decode(body + "=" * (-len(body) % 8)).decode()


@dataclass(frozen=True, slots=True)
class Names:
    """The JetStream streams, KV buckets and subjects of one service (one prefix)."""

    prefix: str
    commits: str  # stream P_E: one message per commit, per tenant chained
    history: str  # stream P_H: one copy per event and stream
    counters: str  # KV bucket P_SEQ: each stream's last position, and `epoch`
    claims: str  # KV bucket P_IDEM: idempotency claims

    @classmethod
    def of(cls, prefix: str) -> Names:
        base = "".join(c if c.isalnum() or c in "-_" else "_" for c in prefix).upper()
        return cls(prefix, base + "_E", base + "_H", base + "_SEQ", base + "_IDEM")

    def streams(self) -> list[str]:
        """Every JetStream stream this layout uses (KV buckets are streams ``KV_<bucket>``),
        with the presence store's two buckets (backends/nats_presence.py) under the prefix."""
        base = self.commits.removesuffix("_E")
        buckets = (self.counters, self.claims, base + "_LIVE", base + "_PRESENCE")
        return [self.commits, self.history, *("KV_" + bucket for bucket in buckets)]

    def commit_subject(self, tenant: str) -> str:
        return f"{self.prefix}.e.{token(tenant)}"

    def history_subject(self, tenant: str, stream: str) -> str:
        return f"{self.prefix}.h.{token(tenant)}.{token(stream)}"

    def counter_key(self, tenant: str, stream: str) -> str:
        return f"{token(tenant)}.{token(stream)}"

    def counter_subject(self, tenant: str, stream: str) -> str:
        """The KV bucket's own subject for a counter (written directly, with a message id)."""
        return f"$KV.{self.counters}.{self.counter_key(tenant, stream)}"

    @property
    def control_subject(self) -> str:
        return f"{self.prefix}.ctl"


def stream_configs(names: Names, history_size: int, history_ttl: float) -> list[api.StreamConfig]:
    """The two JetStream streams (the KV buckets are made through the KV API)."""
    commits = api.StreamConfig(
        name=names.commits,
        subjects=[f"{names.prefix}.e.>"],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_msgs_per_subject=COMMITS_KEPT,
        duplicate_window=DUPLICATE_WINDOW,
        allow_direct=True,
    )
    history = api.StreamConfig(
        name=names.history,
        subjects=[f"{names.prefix}.h.>"],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_msgs_per_subject=max(1, history_size),
        max_age=history_ttl if history_ttl > 0 else None,
        duplicate_window=min(DUPLICATE_WINDOW, history_ttl)
        if history_ttl > 0
        else DUPLICATE_WINDOW,
        allow_direct=True,
    )
    return [commits, history]


# -- bodies ----------------------------------------------------------------------------
#
# An event's JSON is built once as a "head" (the object without its closing brace
# and without positions); a commit and each history copy add their `streams`.


def event_head(event_id: str, tenant: str, name: str, data: Any, ts: float, kind: str) -> bytes:
    fields = {"id": event_id, "tenant": tenant, "name": name, "data": data, "ts": ts, "kind": kind}
    return orjson.dumps(fields)[:-1]


def head_of(event: Event) -> bytes:
    return event_head(event.id, event.tenant, event.name, event.data, event.ts, event.kind)


def with_streams(head: bytes, positions: Iterable[tuple[str, int]]) -> bytes:
    return head + b',"streams":' + orjson.dumps(list(positions)) + b"}"


def commit_body(tenant: str, prev: int, parts: list[bytes]) -> bytes:
    """A commit: the tenant, the sequence of its previous commit, its events in order."""
    head = orjson.dumps({"tenant": tenant, "prev": prev})[:-1]
    return head + b',"events":[' + b",".join(parts) + b"]}"


def decode_commit(raw: bytes) -> tuple[str, int, list[Event]]:
    """-> (tenant, the previous commit's sequence, the events with all their positions)."""
    obj = orjson.loads(raw)
    events = [
        Event(
            e["id"],
            e["tenant"],
            e["name"],
            e["data"],
            tuple((str(s), int(q)) for s, q in e["streams"]),
            e["ts"],
            e.get("kind", EVENT),
        )
        for e in obj["events"]
    ]
    return str(obj["tenant"]), int(obj["prev"]), events


def copy_streams(positions: tuple[tuple[str, int], ...], own: str) -> list[tuple[str, int]]:
    """The positions a history copy carries, so a replay drops what a connection has.

    A user stream's copy: itself and the shared streams (other users' are no
    connection's business). A shared stream's copy: everything.
    """
    if not own.startswith("u:"):
        return list(positions)
    return [(s, q) for s, q in positions if s == own or not s.startswith("u:")]
