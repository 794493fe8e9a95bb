"""What the streams share before they open: the checks, and for SSE the whole opening.

`open_sse` is the one way an SSE stream opens, on the ASGI path (`server/sse.py`) and
on the fast path (`server/fastpath.py`, through the ASGI stack or straight from the
request head) alike, so the two cannot answer differently: connect rate, credential,
subscriber, topics, capacity, the attach with the client's cursor, then the unread
count for the welcome. Its inputs are what every path has: the `State`, the request's
`Credentials` and its client address (asked for only when a connect rate is set).
`greet` queues what every stream starts with. WebSocket uses the checks below on its
own opening (auth may come as a message).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .. import wire
from ..auth import Principal
from ..broker import Resumption
from ..connection import Connection
from ..errors import Forbidden, InvalidRequest, OverCapacity, RateLimited
from ..hub import TOPIC_RULE
from ..topics import valid_topic
from ..wire import split_list
from .http import Credentials, authenticate
from .state import State

C = TypeVar("C", bound=Connection)


@dataclass(slots=True)
class Opened(Generic[C]):
    """A stream that passed every check and is attached; live events are held until `greet`."""

    conn: C
    resumption: Resumption
    welcome: dict[str, Any]


async def open_sse(
    st: State, credentials: Credentials, client_ip: Callable[[], str], connection: type[C]
) -> Opened[C]:
    """Check an SSE stream request and attach a new `connection` for it; `client_ip()`
    is the address the connect rate counts (as `http.client_ip` gives it).

    Raises `TidingsError` before anything is registered (connect rate 429, credential
    401, API key or topic 403, topic names and counts 400, capacity 503, a broker that
    does not answer 503): the caller answers it as JSON. Any other exception is a bug.
    """
    if st.connect_limit.rate > 0:
        wait = st.connect_limit.retry_after(client_ip())
        if wait is not None:
            raise RateLimited("too many connection attempts from this address", retry_after=wait)
    who = await authenticate(st, credentials)
    subscriber(who)
    topics = requested_topics(st, who, credentials.query)
    check_capacity(st, who)
    hub = st.hub
    if not hub.running:
        await hub.start()
    # Interned stream names: every connection's dicts share one key object per stream,
    # so fan-out's lookups compare pointers and touch no per-connection string.
    streams = [sys.intern(s) for s in hub.streams_for(who, topics)]
    conn = connection(who, streams, limit=st.settings.client_buffer_size)
    cursor = wire.last_event_id(credentials.headers, credentials.query)
    resumption = await hub.broker.attach(conn, cursor)  # on failure it leaves no trace
    try:
        # Read once attached: an inbox change committed before the read is in the count,
        # one committed after reaches `conn` as a push carrying the new count (held until
        # the welcome is out). Read before the attach, a change committed in between
        # would be in neither, and the client's badge would stay wrong.
        unread = await st.unread_count(who)
    except BaseException:
        hub.broker.detach(conn)
        raise
    welcome = {
        "connection_id": conn.id,
        "user_id": who.user_id,
        "tenant": who.tenant,
        "topics": topics,
        "unread_count": unread,
        "heartbeat_interval": st.settings.heartbeat_interval,
    }
    return Opened(conn, resumption, welcome)


def greet(st: State, opened: Opened[C], wrap: Callable[[bytes], bytes] | None = None) -> None:
    """Queue ``retry:``, the ``welcome`` and any ``reset`` (each through `wrap`, e.g. into
    an HTTP chunk), then release the replay and the held live events: the stream is live."""
    conn = opened.conn
    wrap = wrap or _as_is
    conn.push(wrap(wire.sse_retry(st.settings.retry_ms)), force=True)
    conn.push(wrap(wire.sse_frame(conn.cursor(), "welcome", opened.welcome)), force=True)
    reset = opened.resumption.reset
    if reset is not None:
        conn.push(wrap(wire.sse_frame(conn.cursor(), "reset", {"reason": reset})), force=True)
    st.hub.broker.release(conn, opened.resumption)


def _as_is(frame: bytes) -> bytes:
    return frame


def requested_topics(state: State, principal: Principal, query: Mapping[str, str]) -> list[str]:
    """The `topics=` of a stream request, each checked against the caller's rights."""
    topics = list(dict.fromkeys(split_list(query.get("topics"))))
    if not topics:
        return []
    if not state.settings.enable_topics:
        raise InvalidRequest("topics are disabled on this server (TIDINGS_ENABLE_TOPICS)")
    limit = state.settings.max_topics_per_connection
    if len(topics) > limit:
        raise InvalidRequest(f"at most {limit} topics per connection")
    for topic in topics:
        check_topic(state, principal, topic)
    return topics


def check_topic(state: State, principal: Principal, topic: str) -> None:
    if not valid_topic(topic):
        raise InvalidRequest(f"bad topic name {topic[:50]!r}: {TOPIC_RULE}")
    if not state.hub.may_subscribe(principal, topic):
        raise Forbidden(f"not allowed to subscribe to {topic!r}")


def check_capacity(state: State, principal: Principal) -> None:
    settings = state.settings
    broker = state.hub.broker
    if settings.max_connections and len(broker.connections) >= settings.max_connections:
        raise OverCapacity("the server is at its connection limit", retry_after=5)
    per_user = settings.max_connections_per_user
    if per_user and len(broker.user_connections(principal.tenant, principal.user_id)) >= per_user:
        raise OverCapacity("this user is at the per-user connection limit", retry_after=5)


def subscriber(principal: Principal) -> None:
    if principal.is_server or not principal.user_id:
        raise Forbidden("streams are for users: present a user token, not an API key")
