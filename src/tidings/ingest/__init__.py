"""Ingest from an event bus: publish requests read from NATS or a Redis stream.

Business services put messages on a bus instead of calling the publish API;
`TIDINGS_INGEST_URL` names where (docs/scaling.md, "Ingest from an event bus"):

- ``nats://host:4222/<subject>`` — a JetStream durable pull consumer (at least
  once; a stream capturing the subject is created if none does), or with
  ``?mode=core`` a plain queue subscription (at most once);
- ``redis://host:6379/0?stream=<name>`` — a consumer group on a Redis stream
  (at least once), the message's JSON in the entry's ``body`` field.

Each message is one of the API's request bodies, told apart by shape:
``{"messages": [...]}`` is a batch (``POST /api/v1/publish/batch``),
``{"recipients": [...], ...}`` an inbox notification (``POST
/api/v1/notifications``), anything else a single publish (``POST
/api/v1/publish``). They go through the same validation and authorisation
as over HTTP, as the API-key identity — or, with `TIDINGS_INGEST_TENANT`, as
a publisher confined to that one tenant.

Guarantees (at-least-once sources): a message is acknowledged only once it
was published or rejected for good. When the broker or the inbox database
is unavailable (the HTTP API's 503) it is retried in place with backoff and
never acknowledged meanwhile, so nothing is lost; a redelivery publishes
nothing twice, because every message carries an idempotency key — its own
``idempotency_key``, else one derived (keys.py: an HMAC no API publisher can
reproduce) from the NATS ``Nats-Msg-Id`` header, else from its position on the
bus. A malformed message is logged with the reason, counted in
``tidings_ingest_messages_total{outcome=...}`` and acknowledged: never fatal,
never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge

from ..auth import Principal
from ..errors import (
    BackendUnavailable,
    Forbidden,
    InvalidRequest,
    OverCapacity,
    TidingsError,
)
from ..hub import Hub, Message, authorize, parse_message
from ..inbox.schema import NewNotification, parse_new
from .keys import BusKeys
from .url import create_source

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["BusKeys", "Ingest", "Source", "create_source"]

log = logging.getLogger("tidings.ingest")

MAX_BATCH = 1000  # messages in one batch, as `POST /api/v1/publish/batch`
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0  # seconds between attempts, doubling, jittered
STOP_GRACE = 5.0  # seconds `stop()` lets the message in hand finish
OUTCOMES = ("published", "malformed", "too_large", "invalid", "forbidden", "failed")

Publish = Callable[[], Awaitable[Any]]


class Source(Protocol):
    """One bus: `run` connects, reads and hands each message to `Ingest.handle` until
    stopped (it returns) or broken (it raises; `Ingest` reconnects with backoff)."""

    where: str

    async def run(self, ingest: Ingest) -> None: ...

    async def close(self) -> None: ...


class Rejected(Exception):
    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


class Backoff:
    """Jittered exponential delays: 0.1 s doubling up to 5 s; `reset` after a success."""

    def __init__(self) -> None:
        self.attempt = 0

    def next(self) -> float:
        delay: float = min(BACKOFF_MAX, BACKOFF_MIN * 2.0**self.attempt)
        self.attempt = min(self.attempt + 1, 16)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0


class Ingest:
    """Reads one bus and publishes what it reads through the hub.

    Args:
        hub: where messages go (its inbox for notifications).
        source: the bus (see `create_source`).
        registry: where the ``tidings_ingest_*`` metrics live.
        tenant: None: messages name any tenant (as an API key); a tenant: they may
            name only that one (as a user token with ``publish: true`` there).
        max_payload: bytes a message may have (TIDINGS_MAX_PAYLOAD).
        keys: derives the idempotency keys of messages without their own (default: with
            a secret of this process only; `from_settings` shares one across instances).
    """

    def __init__(
        self,
        hub: Hub,
        source: Source,
        *,
        registry: CollectorRegistry | None = None,
        tenant: str | None = None,
        max_payload: int = 65536,
        keys: BusKeys | None = None,
    ) -> None:
        self.hub = hub
        self.keys = keys or BusKeys()
        self.source = source
        self.tenant = tenant
        self.max_payload = max_payload
        self.principal = (
            Principal.server()
            if tenant is None
            else Principal(user_id="$ingest", tenant=tenant, publish=True)
        )
        self.messages = Counter(
            "tidings_ingest_messages",
            "Messages read from the ingest bus, by outcome (published, or why rejected).",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.messages.labels(outcome)
        self.retries = Counter(
            "tidings_ingest_retries",
            "Ingest publishes refused as unavailable (broker or database) and retried.",
            registry=registry,
        )
        self.connected = Gauge(
            "tidings_ingest_connected",
            "1 while the ingest consumer is connected to its bus.",
            registry=registry,
        )
        self.stopping = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._holding = False
        self._backoff = Backoff()

    @classmethod
    def from_settings(
        cls, settings: Settings, hub: Hub, registry: CollectorRegistry | None = None
    ) -> Ingest | None:
        """The ingest TIDINGS_INGEST_URL asks for, or None when it is unset.

        Raises ConfigError for a URL it cannot use.
        """
        if not settings.ingest_url:
            return None
        source = create_source(settings.ingest_url, group=settings.ingest_group)
        return cls(
            hub,
            source,
            registry=registry,
            tenant=settings.ingest_tenant,
            max_payload=settings.max_payload,
            keys=BusKeys.from_settings(settings),
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start consuming in the background; connection failures are retried, never raised."""
        if self._task is None:
            self.stopping = False
            self._stop.clear()
            self._task = asyncio.create_task(self._run(), name="tidings-ingest")

    async def stop(self) -> None:
        """Finish the message in hand (up to 5 s), leave the rest on the bus, disconnect."""
        task, self._task = self._task, None
        if task is None:
            return
        self.stopping = True
        self._stop.set()
        if not self._holding:  # waiting for the bus, or connecting: nothing to finish
            task.cancel()
        await asyncio.wait({task}, timeout=STOP_GRACE)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.connected.set(0)

    async def _run(self) -> None:
        while not self.stopping:
            failure = "it stopped reading"
            try:
                await self.source.run(self)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the bus is down, or refused our set-up: try again
                failure = f"{type(exc).__name__}: {exc}"
                log.debug("ingest from %s failed", self.source.where, exc_info=True)
            finally:
                self.connected.set(0)
                with contextlib.suppress(Exception):
                    await self.source.close()
            if not self.stopping:
                delay = self._backoff.next()
                log.warning(
                    "ingest from %s failed (%s); reconnecting in %.1f s",
                    self.source.where,
                    failure,
                    delay,
                )
                await self.pause(delay)

    def up(self) -> None:
        """The source is connected and set up."""
        self._backoff.reset()
        self.connected.set(1)
        log.info("ingesting from %s", self.source.where)

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake up at once when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    @contextlib.asynccontextmanager
    async def holding(self) -> AsyncIterator[bool]:
        """Around handling a message and acknowledging it, which `stop()` lets finish
        (anywhere else it cancels). Yields False when stopping: take no new message."""
        self._holding = True
        try:
            yield not self.stopping
        finally:
            self._holding = False

    # -- one message ----------------------------------------------------------------------

    async def handle(
        self, body: bytes | None, origin: str | None, keepalive: Publish | None = None
    ) -> bool:
        """Publish one bus message. True: done with it (published, or rejected for good) —
        acknowledge it. False: not published, because we are stopping while the broker is
        unavailable — leave it for a redelivery.

        `origin` names the message on the bus (keys.py: its Nats-Msg-Id or position): its
        idempotency key, unless it has its own, is derived from it; `keepalive` tells the
        bus we still hold the message while we wait to retry.
        """
        try:
            publish = self.prepare(body, origin)
        except Rejected as exc:
            self.messages.labels(exc.outcome).inc()
            log.warning("ingest: rejected a message (%s, origin %s): %s", exc.outcome, origin, exc)
            return True
        backoff, retried = Backoff(), 0
        while True:
            try:
                await publish()
            except (BackendUnavailable, OverCapacity) as exc:
                self.retries.inc()
                retried += 1
                if self.stopping:
                    return False
                delay = backoff.next()
                say = log.warning if retried == 1 else log.debug  # once per message
                say("ingest: %s; holding message %s, retrying with backoff", exc, origin)
                if keepalive is not None:
                    with contextlib.suppress(Exception):
                        await keepalive()
                await self.pause(delay)
                if self.stopping:
                    return False
                continue
            except (InvalidRequest, Forbidden) as exc:  # e.g. an inbox-less hub
                return self._rejected("invalid" if exc.status == 400 else "forbidden", exc, origin)
            except Exception as exc:  # a bug: do not stall the bus on it
                log.exception("ingest: message %s failed", origin)
                return self._rejected("failed", exc, origin)
            self.messages.labels("published").inc()
            if retried:
                log.warning("ingest: message %s published after %d retries", origin, retried)
            return True

    def _rejected(self, outcome: str, exc: Exception, origin: str | None) -> bool:
        self.messages.labels(outcome).inc()
        log.warning("ingest: rejected a message (%s, origin %s): %s", outcome, origin, exc)
        return True

    def prepare(self, body: bytes | None, origin: str | None) -> Publish:
        """Validate and authorise a message; returns what publishes it. Raises Rejected."""
        key = None if origin is None else self.keys.key(origin)
        if body is None:
            raise Rejected("malformed", "the entry has no `body` field")
        if len(body) > self.max_payload:
            raise Rejected(
                "too_large", f"{len(body)} bytes is over {self.max_payload} (TIDINGS_MAX_PAYLOAD)"
            )
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise Rejected("malformed", f"malformed JSON: {exc}") from None
        try:
            return self._prepare(doc, key)
        except InvalidRequest as exc:
            raise Rejected("invalid", exc.message) from None
        except Forbidden as exc:
            raise Rejected("forbidden", exc.message) from None

    def _prepare(self, doc: Any, key: str | None) -> Publish:
        if not isinstance(doc, dict):
            raise InvalidRequest("a message must be a JSON object")
        targets = [k for k in ("users", "topics", "broadcast") if k in doc]
        if "messages" in doc:
            if targets or "recipients" in doc:
                raise InvalidRequest("a batch (`messages`) names no targets of its own")
            return self._batch(doc["messages"], key)
        if "recipients" in doc:
            if targets:
                raise InvalidRequest(
                    "`recipients` (a notification) cannot be combined with "
                    "`users`, `topics` or `broadcast` (a publish)"
                )
            return self._notification(doc, key)
        message = self._message(doc, key)
        return lambda: self.hub.publish_message(message)

    def _message(self, body: Any, key: str | None) -> Message:
        message = parse_message(body, tenant=self.tenant)
        authorize(message, self.principal)
        if message.idempotency_key is None and key is not None:
            message = replace(message, idempotency_key=key)
        return message

    def _batch(self, items: Any, key: str | None) -> Publish:
        if not isinstance(items, list) or not items:
            raise InvalidRequest("`messages` must be a non-empty list")
        if len(items) > MAX_BATCH:
            raise InvalidRequest(f"a batch holds at most {MAX_BATCH} messages")
        messages = []
        for index, item in enumerate(items):  # all valid and allowed, or nothing is published
            try:
                messages.append(self._message(item, None if key is None else f"{key}/{index}"))
            except TidingsError as exc:
                raise type(exc)(f"messages[{index}]: {exc.message}") from None

        async def publish() -> None:
            for message in messages:  # a retry skips those already out (idempotency keys)
                await self.hub.publish_message(message)

        return publish

    def _notification(self, doc: dict[str, Any], key: str | None) -> Publish:
        new: NewNotification = parse_new(doc, tenant=self.tenant or "")
        if self.tenant is not None and new.tenant != self.tenant:
            raise Forbidden(f"this ingest publishes only in tenant {self.tenant!r}")
        if new.idempotency_key is None and key is not None:
            new = replace(new, idempotency_key=key)
        inbox = self.hub.inbox
        if inbox is None:
            raise InvalidRequest("this server keeps no inbox")
        return lambda: inbox.notify(new)
