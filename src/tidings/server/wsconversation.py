"""A WebSocket connection's conversation once it is open (API.md §5).

The client's messages are read in order and answered: ``ping``, ``subscribe``,
``unsubscribe``, ``resume`` and ``mark_read``. Every failure is answered with an
``error`` message, and none ends the connection. `Conversation.authorize` also
gives the topics of the opening request (`server/websocket.py`).
"""

from __future__ import annotations

import logging

from .. import wsproto
from ..auth import Principal
from ..connection import WSConnection
from ..errors import InvalidRequest, TidingsError
from ..event import CloseReason, topic_stream
from ..types import Receive
from .state import State
from .streams import check_topic

log = logging.getLogger("tidings.ws")


class Conversation:
    """What one socket's client says after the opening, and the answers."""

    def __init__(self, st: State, receive: Receive) -> None:
        self.st = st
        self.settings = st.settings
        self.receive = receive

    def authorize(
        self, who: Principal, topics: list[str] | tuple[str, ...], current: int = 0
    ) -> tuple[list[str], list[bytes]]:
        """The topics `who` may add (`current` are already read) and an `error` per refusal."""
        if not topics:
            return [], []
        if not self.settings.enable_topics:
            text = "topics are disabled on this server (TIDINGS_ENABLE_TOPICS)"
            return [], [wsproto.error("invalid_request", text, topics=list(topics))]
        allowed: list[str] = []
        errors: list[bytes] = []
        for topic in dict.fromkeys(topics):
            try:
                check_topic(self.st, who, topic)
            except TidingsError as exc:
                errors.append(wsproto.error(exc.code, exc.message, topic=topic))
            else:
                allowed.append(topic)
        limit = self.settings.max_topics_per_connection
        room = max(0, limit - current)
        if len(allowed) > room:
            text = f"at most {limit} topics per connection (TIDINGS_MAX_TOPICS_PER_CONNECTION)"
            errors.append(wsproto.error("invalid_request", text, topics=allowed[room:]))
            allowed = allowed[:room]
        return allowed, errors

    # -- reading ------------------------------------------------------------------------

    async def read(self, conn: WSConnection) -> None:
        try:
            while conn.closed is None:
                message = await self.receive()
                if message["type"] == "websocket.disconnect":
                    conn.close(CloseReason.CLIENT)
                    return
                if message["type"] != "websocket.receive":
                    continue
                raw = message.get("text")
                if raw is None:
                    raw = message.get("bytes") or b""
                await self.handle(conn, raw)
        finally:
            if conn.closed is None:
                conn.close(CloseReason.CLIENT)

    async def handle(self, conn: WSConnection, raw: str | bytes) -> None:
        """One client message; every failure is answered, none ends the connection."""
        request: str | None = None
        try:
            msg = wsproto.parse(raw, max_size=self.settings.max_payload)
            request = _TYPES[type(msg)]
            answer = await self.dispatch(conn, msg)
        except wsproto.ProtocolError as exc:
            answer = [wsproto.error(exc.code, exc.message, request=exc.request)]
        except TidingsError as exc:
            answer = [wsproto.error(exc.code, exc.message, request=request)]
        except Exception:
            log.exception("ws %s: %s failed", conn.id, request)
            answer = [wsproto.error("internal", "internal error; it has been logged")]
        for frame in answer:
            conn.push(frame)  # bounded: a client that sends but does not read is slow

    async def dispatch(self, conn: WSConnection, msg: wsproto.ClientMessage) -> list[bytes]:
        if isinstance(msg, wsproto.Ping):
            return [wsproto.message("pong")]
        if isinstance(msg, wsproto.Subscribe):
            return await self.subscribe(conn, msg)
        if isinstance(msg, wsproto.Unsubscribe):
            streams = [topic_stream(t) for t in msg.topics]
            self.st.hub.broker.remove_streams(conn, streams)
            return [wsproto.message("unsubscribed", topics=list(msg.topics), id=conn.cursor())]
        if isinstance(msg, wsproto.Resume):
            broker = self.st.hub.broker
            resumption = await broker.resume(conn, msg.last_event_id)
            if resumption.reset is not None:
                conn.push(reset_frame(conn, resumption.reset), force=True)
            broker.release(conn, resumption)
            return []
        if isinstance(msg, wsproto.MarkRead):
            return await self.mark_read(conn, msg)
        raise InvalidRequest("already authenticated: auth is only the first message")

    async def subscribe(self, conn: WSConnection, msg: wsproto.Subscribe) -> list[bytes]:
        current = sum(1 for s in conn.streams if s.startswith("t:"))
        fresh = [t for t in msg.topics if not conn.reads(topic_stream(t))]
        allowed, errors = self.authorize(conn.principal, fresh, current)
        for frame in errors:
            conn.push(frame)
        topics = [t for t in msg.topics if t in allowed or conn.reads(topic_stream(t))]
        if not topics:
            return []
        broker = self.st.hub.broker
        streams = [topic_stream(t) for t in allowed]
        resumption = await broker.add_streams(conn, streams, msg.last_event_id)
        conn.push(wsproto.message("subscribed", topics=topics, id=conn.cursor()), force=True)
        if resumption.reset is not None:
            conn.push(reset_frame(conn, resumption.reset), force=True)
        broker.release(conn, resumption)
        return []

    async def mark_read(self, conn: WSConnection, msg: wsproto.MarkRead) -> list[bytes]:
        inbox = self.st.hub.inbox
        if inbox is None:
            return [wsproto.error("unavailable", "this server keeps no inbox", request="mark_read")]
        # The inbox pushes `notification.read` to every connection of the user, this one
        # included, as the acknowledgement (with no `ids` when nothing changed).
        if msg.all:
            await inbox.mark_all_read(conn.principal)
        else:
            await inbox.mark_read(conn.principal, msg.ids)
        return []


_TYPES: dict[type, str] = {
    wsproto.Ping: "ping",
    wsproto.Subscribe: "subscribe",
    wsproto.Unsubscribe: "unsubscribe",
    wsproto.MarkRead: "mark_read",
    wsproto.Resume: "resume",
    wsproto.Auth: "auth",
}


def reset_frame(conn: WSConnection, reason: str) -> bytes:
    """The `reset` message: what `conn` asked to resume from is gone (API.md §4, §5)."""
    return wsproto.message("reset", reason=reason, id=conn.cursor())
