"""Ingest from NATS: a JetStream durable pull consumer (default) or a core queue subscription.

JetStream (at least once): the subject must be captured by a stream. If one
already does, it is used as it is; otherwise a stream is created
(``?stream=`` names it, default ``TIDINGS_INGEST``; work-queue retention, so
an acknowledged message leaves it, file storage). Business services may keep
publishing with plain core NATS: the stream stores what arrives. Every
tidings instance with the same `TIDINGS_INGEST_GROUP` pulls from one durable
consumer of that name, so each message goes to one instance; a message is
acknowledged after it was published (or rejected), and one not acknowledged
within 30 s (an instance died holding it) is delivered again.

Core (``?mode=core``, at most once): a queue subscription in the group; a
message is lost if the instance holding it dies (or its broker stays down
until it stops). For servers without JetStream.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
)
from nats.js.errors import NotFoundError

from .keys import message_id, position

if TYPE_CHECKING:
    from . import Ingest

log = logging.getLogger("tidings.ingest")

DEFAULT_STREAM = "TIDINGS_INGEST"
FETCH_BATCH = 16  # messages pulled at once; handled in order, one at a time
FETCH_WAIT = 5.0  # seconds one pull request waits for messages
ACK_WAIT = 30.0  # seconds until an unacknowledged message goes to another instance
RECONNECT_ATTEMPTS = 4  # the client's own tries, 0.5 s apart, before it gives up
CHECK_EVERY = 6  # idle pulls between checks that the consumer still exists
_BAD_NAME = re.compile(r"[^A-Za-z0-9_-]")


class NatsSource:
    def __init__(
        self, server: str, subject: str, *, group: str, stream: str | None, core: bool
    ) -> None:
        self.server = server
        self.subject = subject
        self.group = group
        self.durable = _BAD_NAME.sub("_", group)
        self.stream = stream
        self.core = core
        host = urlsplit(server).netloc.rsplit("@", 1)[-1]  # no credentials in logs
        mode = "core, queue group" if core else "JetStream, durable consumer"
        self.where = f"NATS {host} subject {subject!r} ({mode} {group!r})"
        self._nc: Any = None
        self._resetup = False

    async def run(self, ingest: Ingest) -> None:
        self._nc = await nats.connect(
            self.server,
            name="tidings-ingest",
            connect_timeout=2,
            # A blip is bridged by the client (it resubscribes); after that the client
            # closes and Ingest connects again with its backoff (0.1 s doubling to 5 s).
            allow_reconnect=True,
            max_reconnect_attempts=RECONNECT_ATTEMPTS,
            reconnect_time_wait=0.5,
            disconnected_cb=self._disconnected(ingest),
            reconnected_cb=self._reconnected(ingest),
            error_cb=self._error,
        )
        if self.core:
            await self._run_core(ingest)
        else:
            await self._run_jetstream(ingest)

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            await nc.close()

    # -- JetStream ------------------------------------------------------------------------

    async def _setup(self) -> tuple[Any, Any, str, str]:
        js = self._nc.jetstream(timeout=5.0)
        name = self.stream
        if name is None:
            try:
                name = await js.find_stream_name_by_subject(self.subject)
            except NotFoundError:
                name = DEFAULT_STREAM
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            info = await js.add_stream(
                name=name,
                subjects=[self.subject],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
            log.info("ingest: created JetStream stream %s for %r", name, self.subject)
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=1000,
        )
        sub = await js.pull_subscribe(
            self.subject, durable=self.durable, stream=name, config=config
        )
        # An origin from the position must not repeat if the stream is deleted and made again.
        created = str(int(info.created.timestamp() * 1e6)) if info.created else "0"
        return js, sub, name, f"{name}:{created}"

    async def _run_jetstream(self, ingest: Ingest) -> None:
        js, sub, stream, incarnation = await self._setup()
        ingest.up()
        idle = 0
        while not ingest.stopping:
            if self._resetup:  # the server may have come back without our stream or consumer
                self._resetup = False
                await sub.unsubscribe()
                js, sub, stream, incarnation = await self._setup()
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_WAIT)
            except NatsTimeout:
                msgs = []
            if not msgs:
                idle += 1
                if idle % CHECK_EVERY == 0:
                    await js.consumer_info(stream, self.durable)  # NotFound: set up again
                continue
            for index, msg in enumerate(msgs):
                async with ingest.holding() as go:
                    if go:
                        go = await ingest.handle(
                            msg.data, self._origin(msg, incarnation), msg.in_progress
                        )
                    if go:
                        await msg.ack()
                        continue
                    for rest in msgs[index:]:  # stopping: let another instance have them now
                        await rest.nak()
                    return

    def _origin(self, msg: Any, incarnation: str) -> str:
        headers = msg.headers or {}
        if "Nats-Msg-Id" in headers:
            return message_id(headers["Nats-Msg-Id"])
        return position("nats", incarnation, str(msg.metadata.sequence.stream))

    # -- core -----------------------------------------------------------------------------

    async def _run_core(self, ingest: Ingest) -> None:
        sub = await self._nc.subscribe(self.subject, queue=self.group)
        await self._nc.flush()
        ingest.up()
        while not ingest.stopping:
            try:
                msg = await sub.next_msg(timeout=FETCH_WAIT)  # ConnectionClosed: reconnect
            except NatsTimeout:
                continue
            headers = msg.headers or {}
            origin = message_id(headers["Nats-Msg-Id"]) if "Nats-Msg-Id" in headers else None
            async with ingest.holding():  # taken: handle it even when stopping
                if not await ingest.handle(msg.data, origin):
                    log.error("ingest: stopped holding core NATS message %s: it is lost", origin)

    # -- callbacks ------------------------------------------------------------------------

    def _disconnected(self, ingest: Ingest) -> Any:
        async def disconnected() -> None:
            if not ingest.stopping:
                ingest.connected.set(0)
                log.warning("ingest: disconnected from %s; reconnecting", self.where)

        return disconnected

    def _reconnected(self, ingest: Ingest) -> Any:
        async def reconnected() -> None:
            self._resetup = True
            ingest.connected.set(1)
            log.info("ingest: reconnected to %s", self.where)

        return reconnected

    async def _error(self, exc: Exception) -> None:
        if not isinstance(exc, asyncio.CancelledError):
            log.debug("ingest: NATS client error: %s", exc)
