"""The inbox over HTTP (API.md §7), on SQLite and PostgreSQL alike.

REST answers run in memory (httpx.ASGITransport). Live pushes run against a
real `tidings serve` over real sockets (tests/server.py, tests/sse_client.py),
the way a browser's EventSource sees them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from server import StartServer, TidingsServer
from sse_client import Api, SSEClient, expect_marker, sse_stream
from test_inbox import (  # noqa: F401  (fixtures: one parametrised database for both files)
    db_url,
    empty_db_url,
    fresh_pg,
    pg_session_url,
)
from tidings import Hub, Settings, create_app
from tidings.auth import mint_token
from tidings.inbox.migrations import is_up_to_date

SECRET = "inbox-secret-" + "x" * 32
KEY = "backend-key"
BASE = "/api/v1/notifications"


def token(user: str, **claims: Any) -> str:
    return mint_token(SECRET, user, **claims)


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


SERVER = bearer(KEY)
ALICE = bearer(token("alice", tenant="acme"))


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[httpx.AsyncClient]:  # noqa: F811
    settings = Settings(jwt_secret=SECRET, api_keys=[KEY], database_url=db_url, inbox_retention=0)
    hub = Hub(settings)
    app = create_app(settings, hub=hub)
    async with hub:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


async def create(
    client: httpx.AsyncClient, recipients: list[str], **fields: Any
) -> list[dict[str, Any]]:
    body = {"tenant": "acme", "recipients": recipients, "type": "system", "title": "hi", **fields}
    response = await client.post(BASE, json=body, headers=SERVER)
    assert response.status_code == 201, response.text
    records: list[dict[str, Any]] = response.json()["notifications"]
    return records


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# -- create ---------------------------------------------------------------------------------


async def test_create_with_an_api_key_for_any_tenant(client: httpx.AsyncClient) -> None:
    body = {
        "tenant": "acme",
        "recipients": ["alice", "bob"],
        "type": "salary",
        "title": "工资已发放",
        "content": "十月工资已到账",
        "priority": "high",
        "data": {"amount": 12345},
        "sender": {"id": "hr", "username": "张三", "avatar": None},
    }
    response = await client.post(BASE, json=body, headers=SERVER)
    assert response.status_code == 201, response.text
    records = response.json()["notifications"]
    assert [r["recipient"] for r in records] == ["alice", "bob"]
    assert set(records[0]) == {
        "id",
        "tenant",
        "recipient",
        "type",
        "title",
        "content",
        "priority",
        "data",
        "sender",
        "created_at",
        "read_at",
    }
    assert records[0]["sender"]["username"] == "张三" and records[0]["title"] == "工资已发放"
    got = await client.get(f"{BASE}/{records[0]['id']}", headers=ALICE)
    assert got.json() == records[0]
    # The raw bytes are UTF-8, not \\u escapes: what a browser shows as is.
    assert "工资已发放".encode() in got.content


async def test_create_with_a_publisher_token_stays_in_its_tenant(
    client: httpx.AsyncClient,
) -> None:
    publisher = bearer(token("app", tenant="acme", publish=True))
    body = {"recipients": ["alice"], "type": "x", "title": "t"}
    response = await client.post(BASE, json=body, headers=publisher)
    assert response.status_code == 201, response.text
    assert response.json()["notifications"][0]["tenant"] == "acme"
    same = await client.post(BASE, json={**body, "tenant": "acme"}, headers=publisher)
    assert same.status_code == 201
    assert_error(
        await client.post(BASE, json={**body, "tenant": "globex"}, headers=publisher),
        403,
        "forbidden",
    )
    assert (await client.get(f"{BASE}/unread-count", headers=ALICE)).json()["unread_count"] == 2


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        (bearer("not-a-jwt"), 401, "unauthorized"),
        (bearer(token("alice", tenant="acme")), 403, "forbidden"),
        (bearer(token("alice", tenant="acme", publish=["news:*"])), 403, "forbidden"),
    ],
)
async def test_create_needs_an_api_key_or_a_publisher(
    client: httpx.AsyncClient, headers: dict[str, str], status: int, code: str
) -> None:
    body = {"tenant": "acme", "recipients": ["alice"], "type": "x", "title": "t"}
    assert_error(await client.post(BASE, json=body, headers=headers), status, code)


VALID = {"tenant": "acme", "recipients": ["alice"], "type": "x", "title": "t"}


@pytest.mark.parametrize(
    "change",
    [
        {"priority": "critical"},
        {"priority": 3},
        {"data": ["not", "an", "object"]},
        {"data": "text"},
        {"title": "x" * 201},
        {"title": ""},
        {"title": None},
        {"content": "x" * 10_001},
        {"content": 5},
        {"type": ""},
        {"type": "t" * 65},
        {"recipients": []},
        {"recipients": [""]},
        {"recipients": [7]},
        {"recipients": {"alice": True}},
        {"recipients": [f"u{i}" for i in range(1001)]},
        {"recipients": ["x" * 129]},
        {"sender": "张三"},
        {"sender": {"username": ["张三"]}},
        {"sender": {"nick": "张三"}},
        {"idempotency_key": ""},
        {"idempotency_key": 7},
        {"tenant": 5},
        # U+0000: PostgreSQL's text cannot hold it; refused alike on SQLite.
        {"title": "工资\x00已发放"},
        {"content": "\x00"},
        {"type": "payroll\x00"},
        {"recipients": ["al\x00ice"]},
        {"tenant": "acme\x00"},
        {"idempotency_key": "k\x00"},
    ],
    ids=lambda change: ",".join(f"{k}={v!r}" for k, v in change.items())[:40],
)
async def test_create_validation(client: httpx.AsyncClient, change: dict[str, Any]) -> None:
    body = {k: v for k, v in {**VALID, **change}.items() if v is not None}
    assert_error(await client.post(BASE, json=body, headers=SERVER), 400, "invalid_request")
    assert (await client.get(f"{BASE}/unread-count", headers=ALICE)).json()["unread_count"] == 0


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[]", b'"text"', b'{"recipients": ["alice"]}', b'{"type": "x", "title": "t"}'],
)
async def test_create_refuses_malformed_bodies(client: httpx.AsyncClient, content: bytes) -> None:
    response = await client.post(BASE, content=content, headers=SERVER)
    assert_error(response, 400, "invalid_request")


async def test_create_limits_are_inclusive_and_the_payload_is_capped(
    client: httpx.AsyncClient,
) -> None:
    [record] = await create(client, ["alice"], title="题" * 200, content="内" * 10_000)
    assert len(record["content"]) == 10_000
    big = {**VALID, "data": {"blob": "x" * 70_000}}  # over TIDINGS_MAX_PAYLOAD (64 KiB)
    assert_error(await client.post(BASE, json=big, headers=SERVER), 413, "payload_too_large")


async def test_idempotent_retry_answers_the_same_records(client: httpx.AsyncClient) -> None:
    first = await create(client, ["alice", "bob"], idempotency_key="order-42-shipped")
    again = await create(client, ["alice", "bob"], idempotency_key="order-42-shipped")
    assert again == first
    listed = (await client.get(BASE, headers=ALICE)).json()
    assert listed["total"] == 1


# -- the caller's inbox ---------------------------------------------------------------------


async def test_list_pages_newest_first_with_total_and_unread_count(
    client: httpx.AsyncClient,
) -> None:
    for i in range(7):
        await create(client, ["alice"], title=f"n{i}", type="like" if i % 2 else "comment")
    await create(client, ["bob"], title="bob's")
    page = (await client.get(BASE, params={"page": 2, "page_size": 3}, headers=ALICE)).json()
    assert set(page) == {"items", "page", "page_size", "total", "unread_count"}
    assert [r["title"] for r in page["items"]] == ["n3", "n2", "n1"]
    assert (page["page"], page["page_size"], page["total"], page["unread_count"]) == (2, 3, 7, 7)
    default = (await client.get(BASE, headers=ALICE)).json()
    assert default["page_size"] == 20 and len(default["items"]) == 7

    first_like = next(r for r in default["items"] if r["type"] == "like")
    await client.put(f"{BASE}/{first_like['id']}/read", headers=ALICE)
    likes = (await client.get(BASE, params={"type": "like"}, headers=ALICE)).json()
    assert likes["total"] == 3 and {r["type"] for r in likes["items"]} == {"like"}
    unread = (await client.get(BASE, params={"unread": "true"}, headers=ALICE)).json()
    assert (unread["total"], unread["unread_count"]) == (6, 6)
    assert first_like["id"] not in {r["id"] for r in unread["items"]}
    read = (await client.get(BASE, params={"unread": "false"}, headers=ALICE)).json()
    assert [r["id"] for r in read["items"]] == [first_like["id"]] and read["unread_count"] == 6
    both = {"unread": "True", "type": "comment"}
    assert (await client.get(BASE, params=both, headers=ALICE)).json()["total"] == 4


@pytest.mark.parametrize(
    "params",
    [
        {"page": "0"},
        {"page": "-1"},
        {"page": "abc"},
        {"page": "1.5"},
        {"page": "9" * 30},
        {"page_size": "0"},
        {"page_size": "101"},
        {"page_size": "x"},
        {"unread": "maybe"},
        {"unread": "1"},
        {"type": "t" * 65},
        {"type": "t\x00"},
    ],
)
async def test_list_validation(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    assert_error(await client.get(BASE, params=params, headers=ALICE), 400, "invalid_request")


async def test_list_bounds_are_inclusive(client: httpx.AsyncClient) -> None:
    for params in ({"page_size": "100"}, {"page_size": "1"}, {"page": "1000000"}):
        assert (await client.get(BASE, params=params, headers=ALICE)).status_code == 200


async def test_get_read_and_delete(client: httpx.AsyncClient) -> None:
    first, second, third = [(await create(client, ["alice"], title=t))[0] for t in "abc"]
    assert (await client.get(f"{BASE}/unread-count", headers=ALICE)).json() == {"unread_count": 3}
    assert (await client.get(f"{BASE}/{first['id']}", headers=ALICE)).json() == first

    read = await client.put(f"{BASE}/{first['id']}/read", json={}, headers=ALICE)
    assert read.status_code == 200
    body = read.json()
    assert body["unread_count"] == 2 and body["notification"]["read_at"] is not None
    assert {k: v for k, v in body["notification"].items() if k != "read_at"} == {
        k: v for k, v in first.items() if k != "read_at"
    }
    again = await client.put(f"{BASE}/{first['id']}/read", headers=ALICE)  # idempotent
    assert again.json() == body

    ids = {"ids": [first["id"], second["id"], "not-a-uuid", str(uuid.uuid4())]}
    marked = await client.put(f"{BASE}/read", json=ids, headers=ALICE)
    assert marked.json() == {"updated": 1, "unread_count": 1}
    every = await client.put(f"{BASE}/read", json={"all": True}, headers=ALICE)
    assert every.json() == {"updated": 1, "unread_count": 0}

    gone = await client.delete(f"{BASE}/{third['id']}", headers=ALICE)
    assert gone.status_code == 204 and gone.content == b""
    assert_error(await client.get(f"{BASE}/{third['id']}", headers=ALICE), 404, "not_found")
    assert_error(await client.delete(f"{BASE}/{third['id']}", headers=ALICE), 404, "not_found")
    assert (await client.get(BASE, headers=ALICE)).json()["total"] == 2


@pytest.mark.parametrize(
    "body",
    [{}, {"ids": []}, {"ids": "x"}, {"ids": [1]}, {"all": False}, {"all": "yes"}, [], "all"],
)
async def test_mark_read_validation(client: httpx.AsyncClient, body: Any) -> None:
    response = await client.put(f"{BASE}/read", content=orjson.dumps(body), headers=ALICE)
    assert_error(response, 400, "invalid_request")
    too_many = {"ids": [str(uuid.uuid4()) for _ in range(1001)]}
    response = await client.put(f"{BASE}/read", json=too_many, headers=ALICE)
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize(
    "intruder",
    [
        token("bob", tenant="acme"),  # another user of the tenant
        token("alice", tenant="globex"),  # the same user id in another tenant
        token("alice"),  # the same user id in the default tenant
    ],
    ids=["other-user", "other-tenant", "default-tenant"],
)
async def test_walls_answer_404_never_403(client: httpx.AsyncClient, intruder: str) -> None:
    [record] = await create(client, ["alice"])
    them = bearer(intruder)
    url = f"{BASE}/{record['id']}"
    assert_error(await client.get(url, headers=them), 404, "not_found")
    assert_error(await client.put(url + "/read", headers=them), 404, "not_found")
    assert_error(await client.delete(url, headers=them), 404, "not_found")
    marked = await client.put(f"{BASE}/read", json={"ids": [record["id"]]}, headers=them)
    assert marked.json() == {"updated": 0, "unread_count": 0}
    await client.put(f"{BASE}/read", json={"all": True}, headers=them)
    assert (await client.get(BASE, headers=them)).json()["total"] == 0
    mine = (await client.get(url, headers=ALICE)).json()
    assert mine == record  # untouched: still there, still unread


@pytest.mark.parametrize(
    "bad_id",
    ["not-a-uuid", "123", "x" * 300, "%00", "null", "01a2-zz", "0" * 36, "ws", "stream-"],
)
@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("DELETE", ""), ("PUT", "/read")])
async def test_bad_ids_are_404(
    client: httpx.AsyncClient, bad_id: str, method: str, suffix: str
) -> None:
    response = await client.request(method, f"{BASE}/{bad_id}{suffix}", headers=ALICE)
    assert_error(response, 404, "not_found")


async def test_the_inbox_needs_a_user(client: httpx.AsyncClient) -> None:
    [record] = await create(client, ["alice"])
    for method, path in [
        ("GET", BASE),
        ("GET", f"{BASE}/unread-count"),
        ("GET", f"{BASE}/{record['id']}"),
        ("PUT", f"{BASE}/{record['id']}/read"),
        ("DELETE", f"{BASE}/{record['id']}"),
    ]:
        assert_error(await client.request(method, path), 401, "unauthorized")
        assert_error(await client.request(method, path, headers=SERVER), 403, "forbidden")
    assert_error(await client.put(f"{BASE}/read", json={"all": True}), 401, "unauthorized")


async def test_fixed_paths_are_not_taken_for_ids(client: httpx.AsyncClient) -> None:
    await create(client, ["alice"])
    assert (await client.get(f"{BASE}/unread-count", headers=ALICE)).json() == {"unread_count": 1}
    response = await client.put(f"{BASE}/read", json={"all": True}, headers=ALICE)
    assert response.json() == {"updated": 1, "unread_count": 0}
    assert (await client.put(f"{BASE}/unread-count", headers=ALICE)).status_code == 405


async def test_a_database_that_does_not_answer_is_503() -> None:
    settings = Settings(
        jwt_secret=SECRET, database_url="postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert_error(await c.get(f"{BASE}/unread-count", headers=ALICE), 503, "unavailable")
        assert_error(await c.get(BASE, headers=ALICE), 503, "unavailable")
    await app.state.tidings.hub.stop()


# -- live, over a real server ---------------------------------------------------------------


def serve(start_server: StartServer, db_url: str) -> TidingsServer:  # noqa: F811
    return start_server(TIDINGS_DATABASE_URL=db_url)


async def post_notification(api: Api, **body: Any) -> list[dict[str, Any]]:
    response = await api.post(BASE, {"tenant": "acme", "type": "system", "title": "hi", **body})
    assert response.status_code == 201, response.text
    records: list[dict[str, Any]] = response.json()["notifications"]
    return records


async def user_put(api: Api, path: str, user_token: str, body: Any = None) -> httpx.Response:
    return await api.http.put(path, json=body, headers=bearer(user_token))


async def test_seed_s4_browser_client_works_unchanged(
    start_server: StartServer,
    db_url: str,  # noqa: F811
) -> None:
    """`new EventSource('/api/v1/notifications/stream?token=…')`; `onmessage` reads
    `data.unread_count`, `data.sender.username`, `data.content` (seed S4)."""
    srv = serve(start_server, db_url)
    alice = srv.token("alice", tenant="acme")
    stream = sse_stream(srv.url, "/api/v1/notifications/stream", params={"token": alice})
    async with Api(srv.url, srv.api_key) as api, stream as es:
        assert es.status == 200
        assert (await es.next_event("welcome")).json()["unread_count"] == 0
        sender = {"id": "u1", "username": "张三", "avatar": "/a/zs.png"}
        [record] = await post_notification(
            api,
            recipients=["alice"],
            type="like",
            title="新的点赞",
            content="点赞了你的作品",
            sender=sender,
        )
        message = await es.next_event()
        assert message.event == "message"  # no `event:` line: onmessage sees it
        assert message.id  # resumable
        data = message.json()
        assert data["type"] == "like" and data["title"] == "新的点赞"
        assert data["content"] == "点赞了你的作品" and data["sender"]["username"] == "张三"
        assert data["unread_count"] == 1
        assert data == {**record, "unread_count": 1}
        assert f"{data['sender']['username']} {data['content']}" == "张三 点赞了你的作品"


async def test_read_sync_reaches_every_connection_of_the_user(
    start_server: StartServer,
    db_url: str,  # noqa: F811
) -> None:
    srv = serve(start_server, db_url)
    alice = srv.token("alice", tenant="acme")
    async with (
        Api(srv.url, srv.api_key) as api,
        sse_stream(srv.url, token=alice) as phone,
        sse_stream(srv.url, "/api/v1/notifications/stream", params={"token": alice}) as laptop,
        sse_stream(srv.url, token=srv.token("bob", tenant="acme")) as bob,
    ):
        for es in (phone, laptop, bob):
            await es.next_event("welcome")
        first = (await post_notification(api, recipients=["alice"], title="a"))[0]
        second = (await post_notification(api, recipients=["alice"], title="b"))[0]
        for es in (phone, laptop):
            assert [e.json()["unread_count"] for e in await es.take(2)] == [1, 2]

        # The phone reads one: both devices (the phone too, as its acknowledgement) hear it.
        response = await user_put(api, f"{BASE}/{first['id']}/read", alice)
        assert response.json()["unread_count"] == 1
        for es in (phone, laptop):
            event = await es.next_event()
            assert event.event == "notification.read"
            assert event.json() == {"ids": [first["id"]], "unread_count": 1}

        await user_put(api, f"{BASE}/read", alice, {"all": True})
        for es in (phone, laptop):
            event = await es.next_event()
            assert (event.event, event.json()) == (
                "notification.read",
                {"ids": [second["id"]], "unread_count": 0},
            )

        await api.http.delete(f"{BASE}/{first['id']}", headers=bearer(alice))
        for es in (phone, laptop):
            event = await es.next_event()
            assert (event.event, event.json()) == (
                "notification.deleted",
                {"ids": [first["id"]], "unread_count": 0},
            )
        await expect_marker(bob, api, tenant="acme", users=["bob"])  # nothing reached bob


async def test_offline_user_sees_the_count_in_welcome_and_resumes_missed_pushes(
    start_server: StartServer,
    db_url: str,  # noqa: F811
) -> None:
    srv = serve(start_server, db_url)
    alice = srv.token("alice", tenant="acme")
    async with Api(srv.url, srv.api_key) as api:
        await post_notification(api, recipients=["alice"], title="while offline 1")
        await post_notification(api, recipients=["alice", "bob"], title="while offline 2")
        async with sse_stream(srv.url, token=alice) as es:
            welcome = await es.next_event("welcome")
            assert welcome.json()["unread_count"] == 2
            await expect_marker(es, api, tenant="acme", users=["alice"])
            last_id = es.last_id
        assert last_id is not None

        # Briefly away: the push goes to the personal stream's history.
        [missed] = await post_notification(api, recipients=["alice"], title="while away")
        async with sse_stream(srv.url, token=alice, last_event_id=last_id) as es:
            assert (await es.next_event("welcome")).json()["unread_count"] == 3
            replayed = await es.next_event()
            assert replayed.event == "message"
            assert replayed.json() == {**missed, "unread_count": 3}


async def test_idempotent_retry_pushes_nothing_new(
    start_server: StartServer,
    db_url: str,  # noqa: F811
) -> None:
    srv = serve(start_server, db_url)
    async with (
        Api(srv.url, srv.api_key) as api,
        sse_stream(srv.url, token=srv.token("alice", tenant="acme")) as es,
    ):
        await es.next_event("welcome")
        body = {"recipients": ["alice"], "title": "shipped", "idempotency_key": "ship-42"}
        first = await post_notification(api, **body)
        assert (await es.next_event()).json()["id"] == first[0]["id"]
        assert await post_notification(api, **body) == first
        await expect_marker(es, api, tenant="acme", users=["alice"])  # no second push


async def test_serve_migrates_sqlite_and_refuses_an_old_postgresql_schema(
    start_server: StartServer,
    empty_db_url: str,  # noqa: F811
) -> None:
    if empty_db_url.startswith("sqlite"):
        start_server(TIDINGS_DATABASE_URL=empty_db_url)
        assert await is_up_to_date(empty_db_url)
        return
    with pytest.raises(RuntimeError, match="tidings migrate"):
        start_server(TIDINGS_DATABASE_URL=empty_db_url)


async def _events(es: SSEClient, count: int) -> list[Any]:
    return [e.json() for e in await es.take(count)]


async def test_many_recipients_in_one_request_each_get_their_own_count(
    start_server: StartServer,
    db_url: str,  # noqa: F811
) -> None:
    srv = serve(start_server, db_url)
    async with Api(srv.url, srv.api_key) as api:
        await post_notification(api, recipients=["bob"], title="bob already has one")
        users = ["alice", "bob"] + [f"user{i}" for i in range(998)]
        async with (
            sse_stream(srv.url, token=srv.token("alice", tenant="acme")) as alice,
            sse_stream(srv.url, token=srv.token("bob", tenant="acme")) as bob,
        ):
            await asyncio.gather(alice.next_event("welcome"), bob.next_event("welcome"))
            records = await post_notification(api, recipients=users, title="to everyone")
            assert len(records) == 1000 and len({r["id"] for r in records}) == 1000
            assert [r["recipient"] for r in records] == users
            [to_alice], [to_bob] = await _events(alice, 1), await _events(bob, 1)
            assert (to_alice["unread_count"], to_bob["unread_count"]) == (1, 2)
