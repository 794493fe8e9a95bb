"""What SSE and WebSocket share before a stream opens: checks and the welcome."""

from __future__ import annotations

from collections.abc import Mapping

from ..auth import Principal
from ..errors import Forbidden, InvalidRequest, OverCapacity
from ..hub import TOPIC_RULE
from ..topics import valid_topic
from ..wire import split_list
from .state import State


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
