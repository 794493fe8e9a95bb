"""JetStream primitives of the NATS backend: set-up, commits, counters, history copies.

Everything here is one JetStream operation (or a pipelined batch of them) on
the layout of layout.py; the ordering rules that make them exact live in
writer.py (publishing) and reader.py (history).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from ...event import Event
from .layout import (
    DUPLICATE_WINDOW,
    EXPECT_LAST,
    POS,
    STREAM_NAME_IN_USE,
    WRONG_LAST_SEQUENCE,
    Names,
    decode_commit,
    stream_configs,
)

Message = tuple[str, bytes, dict[str, str]]  # subject, body, headers


class Conflict(Exception):
    """A commit was refused: the tenant's chain moved on (another publisher won)."""


class Store:
    def __init__(
        self, js: Any, names: Names, *, history_size: int, history_ttl: float, timeout: float
    ) -> None:
        self.js = js
        self.names = names
        self.size = history_size
        self.ttl = history_ttl
        self.timeout = timeout
        self.counters: Any = None  # the KV bucket
        self._claims: Any = None
        self._claims_ttl: float | None = None

    # -- set-up -------------------------------------------------------------------

    async def setup(self) -> None:
        """Create (or update to these settings) the streams and the counters bucket."""
        for config in stream_configs(self.names, self.size, self.ttl):
            try:
                await self.js.add_stream(config)
            except APIError as exc:
                if exc.err_code != STREAM_NAME_IN_USE:
                    raise
                await self.js.update_stream(config)
        self.counters = await self._bucket(self.names.counters)

    async def _bucket(self, name: str, ttl: float | None = None) -> Any:
        """A KV bucket, made if new; an existing one (an earlier version's, or another
        TTL) is used as it is, with its TTL set to `ttl`."""
        try:
            return await self.js.create_key_value(bucket=name, history=1, ttl=ttl)
        except APIError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
        config = (await self.js.stream_info("KV_" + name)).config
        if (config.max_age or None) != ttl:
            config.max_age = ttl
            config.duplicate_window = min(DUPLICATE_WINDOW, ttl or DUPLICATE_WINDOW)
            await self.js.update_stream(config)
        return await self.js.key_value(name)

    async def sync_epoch(self) -> tuple[str, bool]:
        """-> (the shared epoch, whether this call set it).

        Whoever sets a new epoch purges the commits and history written before
        it (left by a lost counters bucket, say): they belong to no epoch now.
        """
        try:
            entry = await self.counters.get("epoch")
            return bytes(entry.value or b"").decode(), False
        except KeyNotFoundError:
            pass
        marks = [(s, await self.last_seq(s)) for s in (self.names.commits, self.names.history)]
        candidate = "n" + secrets.token_hex(5)
        try:
            await self.counters.create("epoch", candidate.encode())
        except KeyWrongLastSequenceError:
            entry = await self.counters.get("epoch")
            return bytes(entry.value or b"").decode(), False
        for stream, last in marks:
            if last:
                await self.js.purge_stream(stream, seq=last + 1)
        return candidate, True

    async def last_seq(self, stream: str) -> int:
        return (await self.bounds(stream))[1]

    async def bounds(self, stream: str) -> tuple[int, int]:
        """(first, last) sequence of the messages a stream holds (first = last + 1: none)."""
        state = (await self.js.stream_info(stream)).state
        return int(state.first_seq), int(state.last_seq)

    # -- commits ------------------------------------------------------------------

    async def commit(self, tenant: str, body: bytes, prev: int) -> int:
        """Append a commit right after `prev` (0: the tenant's first); -> its sequence."""
        headers = {EXPECT_LAST: str(prev)}
        try:
            ack = await self.js.publish(
                self.names.commit_subject(tenant),
                body,
                stream=self.names.commits,
                headers=headers,
                timeout=self.timeout,
            )
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise Conflict from exc
            raise
        return int(ack.seq)

    async def last_commit(self, tenant: str) -> tuple[int, int, list[Event]] | None:
        """The tenant's last commit: (sequence, previous one's, events), None if it has none."""
        try:
            msg = await self.js.get_msg(
                self.names.commits, subject=self.names.commit_subject(tenant), direct=True
            )
        except NotFoundError:
            return None
        _, prev, events = decode_commit(msg.data or b"")
        return int(msg.seq), prev, events

    # -- counters -----------------------------------------------------------------

    async def counter(self, tenant: str, stream: str) -> int:
        """The stream's last materialised position (0 when it never had one)."""
        try:
            entry = await self.counters.get(self.names.counter_key(tenant, stream))
        except KeyNotFoundError:
            return 0
        return int(entry.value or b"0")

    # -- writing many at once -----------------------------------------------------

    async def write_all(self, messages: list[Message]) -> None:
        """Publish in this order without waiting in between, then wait for every ack.

        One connection's messages reach a stream in the order they were sent, so
        copies of one subject land in position order. A message id seen before
        is acknowledged as a duplicate and not stored again: rewriting is safe.
        """
        js = self.js
        futures = [await js.publish_async(s, b, headers=h) for s, b, h in messages]
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.gather(*futures)
        except BaseException:
            for future in futures:
                future.cancel()
            raise

    # -- history copies -----------------------------------------------------------

    async def read_copies(self, subject: str, after: int, top: int) -> list[Event] | None:
        """The copies at positions after+1 … top of `subject`, in order.

        None when one before the last copy kept is missing (trimmed or expired:
        not exact); a shorter list when the newest are not written yet.
        """
        try:  # the newest copy first: often all a client one event behind needs
            msg = await self.js.get_msg(self.names.history, subject=subject, direct=True)
        except NotFoundError:
            return []
        position = _position(msg.headers)
        if position < top:
            return []
        if position == top and top - after == 1:
            return [Event.from_json(msg.data or b"")]
        sub = await self.js.subscribe(
            subject,
            stream=self.names.history,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        events: list[Event] = []
        expected = after + 1
        try:
            while expected <= top:
                try:
                    msg = await sub.next_msg(timeout=self.timeout)
                except NatsTimeoutError:
                    break  # fewer than announced (expired meanwhile): what we have
                position = _position(msg.headers)
                if position == expected:
                    events.append(Event.from_json(msg.data))
                    expected += 1
                elif position > expected:
                    return None  # the oldest copy kept is past what is asked for
                if msg.metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return events

    # -- idempotency claims -------------------------------------------------------

    async def claim(self, key: str, value: str, ttl: float) -> str | None:
        """Set `key` unless present (the bucket's TTL is the claims' TTL); -> the earlier value."""
        if self._claims is None or self._claims_ttl != ttl:
            self._claims = await self._bucket(self.names.claims, ttl if ttl > 0 else None)
            self._claims_ttl = ttl
        try:
            await self._claims.create(key, value.encode())
            return None
        except KeyWrongLastSequenceError:
            entry = await self._claims.get(key)
            return bytes(entry.value or b"").decode()

    async def release(self, key: str) -> None:
        if self._claims is not None:
            await self._claims.delete(key)


def _position(headers: dict[str, str] | None) -> int:
    return int((headers or {}).get(POS, "0"))
