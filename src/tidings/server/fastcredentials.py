"""A fast-path request's `Credentials`, read from its head as the ASGI path reads them.

`credentials(head)` gives what `Credentials.of` gives for the same request: Starlette's
`Headers`, `QueryParams` and cookie dict. The two mappings are subclasses whose `get`
looks a name up without raising: `Mapping.get` answers a missing name by catching the
`KeyError` of `__getitem__`, and a stream's opening asks for several names that are
nearly always missing (``Last-Event-ID``, ``?last_event_id=``, ``?lastEventId=``,
``?topics=``). Every other method is Starlette's own, and `get` gives the same value
(or raises the same error for a key that is not a string) as Starlette's. The query is
read as `QueryParams(raw)` reads it, without its generic steps (`query_params`).
"""

from __future__ import annotations

from typing import TypeVar, overload
from urllib.parse import parse_qsl

from starlette.datastructures import Headers, QueryParams
from starlette.requests import cookie_parser

from .fasthttp import RequestHead
from .http import Credentials

__all__ = ["HeadHeaders", "HeadQuery", "credentials"]

D = TypeVar("D")


class HeadHeaders(Headers):
    """`Headers` whose `get` finds the first value of a name, case-insensitively, as
    `Headers.__getitem__` does, without an exception for a missing one."""

    @overload
    def get(self, key: str) -> str | None: ...
    @overload
    def get(self, key: str, default: str | D) -> str | D: ...
    def get(self, key: str, default: object = None) -> object:
        name = key.lower().encode("latin-1")
        for header, value in self._list:
            if header == name:
                return value.decode("latin-1")
        return default


class HeadQuery(QueryParams):
    """`QueryParams` whose `get` is its dict's (the last value of a name, as
    `ImmutableMultiDict.__getitem__`), without an exception for a missing one."""

    @overload
    def get(self, key: str) -> str | None: ...
    @overload
    def get(self, key: str, default: str | D) -> str | D: ...
    def get(self, key: str, default: object = None) -> object:
        return self._dict.get(key, default)


_NO_QUERY = HeadQuery("")


def query_params(raw: bytes) -> HeadQuery:
    """`QueryParams(raw)` as a `HeadQuery`: `parse_qsl` of the latin-1 text, blank values
    kept. A query with neither ``%`` nor ``+`` (the usual ``topics=a,b``) has nothing to
    unquote, and is split here as `parse_qsl` splits it, at a third of its cost."""
    text = raw.decode("latin-1")
    if "%" in text or "+" in text:
        items = parse_qsl(text, keep_blank_values=True)
    else:
        fields = (part.partition("=") for part in text.split("&") if part)
        items = [(name, value) for name, _, value in fields]
    query = HeadQuery.__new__(HeadQuery)  # what QueryParams.__init__ sets, from str pairs
    query._list = items
    query._dict = dict(items)
    return query


def credentials(head: RequestHead) -> Credentials:
    """What `Credentials.of` gives for the same request on the ASGI path."""
    cookies: dict[str, str] = {}
    for name, value in head.headers:
        if name == b"cookie":  # every Cookie header, a later one's names winning
            cookies.update(cookie_parser(value.decode("latin-1")))
    return Credentials(
        HeadHeaders(raw=head.headers),
        query_params(head.query) if head.query else _NO_QUERY,
        cookies,
    )
