"""Unread counts asked for at once (a burst of connects) share queries, and stay exact.

Every stream's `welcome` carries the user's unread count (API.md §4). The inbox
answers concurrent counts with one query per batch (`tidings.inbox.batching`); these
tests check that a burst of many users' connects — different counts each, Chinese
titles, two tenants with the same user ids — gets each user exactly its own count, on
SQLite and PostgreSQL, in process and through a real server, and that a count asked
for after a change never comes from before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx

from server import StartServer, TidingsServer
from sse_client import Api, open_stream
from test_inbox import (  # noqa: F401  (fixtures: one parametrised database for these tests)
    db_url,
    pg_session_url,
)
from tidings.inbox import Inbox, new_notification
from tidings.inbox.batching import Coalescer

BASE = "/api/v1/notifications"
TENANTS = ("acme", "globex")
USERS = [f"用户{i:02d}" if i % 5 == 0 else f"u{i:02d}" for i in range(24)]


def planned(tenant: str, index: int) -> int:
    """How many notifications a user gets: 0–10, different per user and per tenant."""
    return (index * 3 + (5 if tenant == "globex" else 0)) % 11


def test_the_plan_gives_users_different_counts_in_each_tenant() -> None:
    for tenant in TENANTS:
        counts = [planned(tenant, i) for i in range(len(USERS))]
        assert len(set(counts)) == 11
    assert all(planned("acme", i) != planned("globex", i) for i in range(len(USERS)))


# -- the coalescer ------------------------------------------------------------------------


class Recorder:
    """A `fetch` that records each batch and answers when the test lets it."""

    def __init__(self, values: dict[str, int]) -> None:
        self.values = values
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, keys: Sequence[str]) -> dict[str, int]:
        self.batches.append(list(keys))
        snapshot = dict(self.values)  # the values as of the start of the batch
        self.entered.set()
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return {k: snapshot[k] for k in keys if k in snapshot}


async def test_concurrent_gets_share_one_fetch_and_each_gets_its_own_value() -> None:
    fetch = Recorder({"a": 1, "b": 2, "c": 3})
    coalescer: Coalescer[str, int] = Coalescer(fetch, 0)
    keys = ["a", "b", "c", "a", "nobody"]
    assert await asyncio.gather(*(coalescer.get(k) for k in keys)) == [1, 2, 3, 1, 0]
    assert fetch.batches == [["a", "b", "c", "nobody"]]  # one fetch, each key once


async def test_a_key_asked_for_during_a_fetch_waits_for_the_next_one() -> None:
    """Freshness: a get never joins a fetch that started before it was made."""
    fetch = Recorder({"a": 1})
    coalescer: Coalescer[str, int] = Coalescer(fetch, 0, window=0.001)
    fetch.gate.clear()
    first = asyncio.create_task(coalescer.get("a"))
    await fetch.entered.wait()  # the first fetch has read its values
    fetch.values["a"] = 2  # a change committed while that fetch runs
    second = [asyncio.create_task(coalescer.get("a")) for _ in range(3)]
    fetch.gate.set()
    assert await first == 1
    assert await asyncio.gather(*second) == [2, 2, 2]
    assert fetch.batches == [["a"], ["a"]]


async def test_a_failed_fetch_fails_its_batch_only() -> None:
    fetch = Recorder({"a": 1, "b": 2})
    coalescer: Coalescer[str, int] = Coalescer(fetch, 0)
    fetch.fail = RuntimeError("the database is away")
    results = await asyncio.gather(coalescer.get("a"), coalescer.get("b"), return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]
    fetch.fail = None
    assert await coalescer.get("b") == 2


async def test_a_cancelled_waiter_cancels_nobody_else() -> None:
    fetch = Recorder({"a": 1, "b": 2})
    coalescer: Coalescer[str, int] = Coalescer(fetch, 0)
    fetch.gate.clear()
    leaving = asyncio.create_task(coalescer.get("a"))
    staying = asyncio.create_task(coalescer.get("a"))
    other = asyncio.create_task(coalescer.get("b"))
    await fetch.entered.wait()
    leaving.cancel()
    fetch.gate.set()
    assert await staying == 1 and await other == 2
    assert leaving.cancelled()


async def test_long_batches_are_split() -> None:
    fetch = Recorder({str(i): i for i in range(25)})
    coalescer: Coalescer[str, int] = Coalescer(fetch, 0, limit=10)
    assert await asyncio.gather(*(coalescer.get(str(i)) for i in range(25))) == list(range(25))
    assert [len(b) for b in fetch.batches] == [10, 10, 5]


# -- the store, SQLite and PostgreSQL -----------------------------------------------------


async def _fill(inbox: Inbox) -> dict[tuple[str, str], int]:
    expected = {}
    for tenant in TENANTS:
        for index, user in enumerate(USERS):
            count = planned(tenant, index)
            for n in range(count):
                title = f"第{n + 1}条通知：{user}"
                new = new_notification([user], tenant=tenant, type="system", title=title)
                await inbox.create(new)
            expected[tenant, user] = count
    return expected


async def test_a_burst_of_unread_counts_is_exact_and_shares_queries(
    db_url: str,  # noqa: F811
) -> None:
    inbox = Inbox(db_url)
    try:
        expected = await _fill(inbox)
        fetches = []
        fetch = inbox._unread._fetch

        async def counted(keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
            fetches.append(len(keys))
            return await fetch(keys)

        inbox._unread._fetch = counted
        pairs = [*expected, *list(expected)[:5]]  # some users twice, as two tabs would
        counts = await asyncio.gather(*(inbox.unread_count(t, u) for t, u in pairs))
        assert dict(zip(pairs, counts, strict=True)) == expected
        assert fetches == [len(expected)]  # asked at once: one batch of distinct users

        # A change, then a burst: every count is the new one (nothing is cached).
        tenant, user = "acme", USERS[3]
        await inbox.mark_read(tenant, user, None)
        expected[tenant, user] = 0
        tenant, user = "globex", USERS[3]
        await inbox.create(new_notification([user], tenant=tenant, type="like", title="又一条"))
        expected[tenant, user] += 1
        counts = await asyncio.gather(*(inbox.unread_count(t, u) for t, u in expected))
        assert dict(zip(expected, counts, strict=True)) == expected
    finally:
        await inbox.close()


# -- through a real server ----------------------------------------------------------------


async def _welcome_count(srv: TidingsServer, token: str) -> int:
    client = await open_stream(srv.url, token=token)
    try:
        assert client.status == 200
        count: int = (await client.next_event("welcome")).json()["unread_count"]
        return count
    finally:
        await client.close()


async def _post(api: Api, tenant: str, recipients: list[str], title: str) -> list[dict[str, Any]]:
    body = {"tenant": tenant, "recipients": recipients, "type": "system", "title": title}
    response = await api.post(BASE, body)
    assert response.status_code == 201, response.text
    records: list[dict[str, Any]] = response.json()["notifications"]
    return records


async def test_a_burst_of_connects_gets_each_users_exact_unread_count(
    start_server: StartServer,
    db_url: str,  # noqa: F811
) -> None:
    srv = start_server(TIDINGS_DATABASE_URL=db_url)
    expected: dict[tuple[str, str], int] = {}
    mine: dict[tuple[str, str], list[dict[str, Any]]] = {(t, u): [] for t in TENANTS for u in USERS}
    async with Api(srv.url, srv.api_key) as api:
        for tenant in TENANTS:
            counts = {user: planned(tenant, i) for i, user in enumerate(USERS)}
            for n in range(max(counts.values())):
                recipients = [u for u, c in counts.items() if c > n]
                for record in await _post(api, tenant, recipients, f"第{n + 1}条：你好"):
                    mine[tenant, record["recipient"]].append(record)
            expected.update(((tenant, u), c) for u, c in counts.items())
        # Read one and delete one of some users' notifications, on their own tokens.
        for tenant, user in [("acme", USERS[3]), ("globex", USERS[3]), ("acme", USERS[5])]:
            first, second = mine[tenant, user][:2]
            user_auth = {"Authorization": f"Bearer {srv.token(user, tenant=tenant)}"}
            response = await api.http.put(f"{BASE}/{first['id']}/read", headers=user_auth)
            assert response.status_code == 200, response.text
            response = await api.http.delete(f"{BASE}/{second['id']}", headers=user_auth)
            assert response.status_code == 204, response.text
            expected[tenant, user] -= 2

        tokens = {(t, u): srv.token(u, tenant=t) for t, u in expected}
        pairs = [*expected, *list(expected)[::7]]  # some users connect twice at once
        welcomes = await asyncio.gather(*(_welcome_count(srv, tokens[p]) for p in pairs))
        assert dict(zip(pairs, welcomes, strict=True)) == expected, srv.log()

        # Change some inboxes, then burst again, streams and REST counts mixed.
        tenant, user = "globex", USERS[9]
        user_auth = {"Authorization": f"Bearer {tokens[tenant, user]}"}
        response = await api.http.put(f"{BASE}/read", json={"all": True}, headers=user_auth)
        assert response.json()["unread_count"] == 0
        expected[tenant, user] = 0
        await _post(api, "acme", [USERS[9], USERS[0]], "新消息")
        expected["acme", USERS[9]] += 1
        expected["acme", USERS[0]] += 1

        async def rest_count(pair: tuple[str, str]) -> int:
            auth = {"Authorization": f"Bearer {tokens[pair]}"}
            response: httpx.Response = await api.http.get(f"{BASE}/unread-count", headers=auth)
            count: int = response.json()["unread_count"]
            return count

        streams = asyncio.gather(*(_welcome_count(srv, tokens[p]) for p in expected))
        rests = asyncio.gather(*(rest_count(p) for p in expected))
        welcomes, counts = await asyncio.gather(streams, rests)
        assert dict(zip(expected, welcomes, strict=True)) == expected, srv.log()
        assert dict(zip(expected, counts, strict=True)) == expected
