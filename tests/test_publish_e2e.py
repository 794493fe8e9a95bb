"""The publish API end to end (API.md §2, §6): a real `tidings serve`, real sockets.

What a publish did is checked where it matters, on a subscriber's stream; a negative
("nothing was delivered") by a marker published afterwards arriving next.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest

from server import TidingsServer
from sse_client import Api, SSEClient, StreamEnded, expect_marker, open_stream, sse_stream

MAX_PAYLOAD = 65536  # the default TIDINGS_MAX_PAYLOAD


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TidingsServer]:
    with TidingsServer(tmp_path_factory.mktemp("publish")) as server:
        yield server
    assert "Traceback" not in server.log(), server.log()


@pytest.fixture
async def api(srv: TidingsServer) -> AsyncIterator[Api]:
    async with Api(srv.url, srv.api_key) as client:
        yield client


@pytest.fixture
def tenant() -> str:
    return "t-" + secrets.token_hex(4)


@pytest.fixture
async def alice(srv: TidingsServer, tenant: str) -> AsyncIterator[SSEClient]:
    """alice's stream in the test's tenant, reading topics `news:sports` and `weather`."""
    token = srv.token("alice", tenant=tenant, topics=["news:*", "weather"])
    async with sse_stream(srv.url, token=token, params={"topics": "news:sports,weather"}) as s:
        await s.next_event("welcome")
        yield s


def error_code(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/json", response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    code: str = body["error"]["code"]
    return code


# -- accepted -------------------------------------------------------------------------------


async def test_publish_answers_202_with_the_event_id(
    api: Api, tenant: str, alice: SSEClient
) -> None:
    response = await api.post(
        "/api/v1/publish", {"tenant": tenant, "users": ["alice"], "data": {"n": 1}}
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"id"} and isinstance(body["id"], str) and body["id"]
    assert (await alice.next_event()).json() == {"n": 1}
    other = await api.publish(tenant=tenant, users=["alice"], data={"n": 2})
    assert other != body["id"]
    assert (await alice.next_event()).json() == {"n": 2}


async def test_every_field_of_a_publish_is_honoured(
    api: Api, tenant: str, alice: SSEClient
) -> None:
    await api.publish(
        tenant=tenant,
        users=["alice", "bob"],
        topics=["news:sports"],
        broadcast=False,
        event="score",
        data={"home": 2, "away": 1, "list": [1, None, True], "text": "终场"},
    )
    event = await alice.next_event()
    assert event.event == "score"
    assert event.json() == {"home": 2, "away": 1, "list": [1, None, True], "text": "终场"}
    await expect_marker(alice, api, tenant=tenant, users=["alice"])  # once, not per target


async def test_a_batch_of_1000_is_accepted_and_published_in_order(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    messages = [{"tenant": tenant, "users": ["bob"], "data": {"n": n}} for n in range(1000)]
    token = srv.token("bob", tenant=tenant)
    streams = [await open_stream(srv.url, token=token)]
    try:
        await streams[0].next_event("welcome")
        ids = await api.publish_batch(messages)
        assert len(ids) == 1000 and len(set(ids)) == 1000
        received: list[int] = []
        while len(received) < 1000:
            try:
                received.append((await streams[-1].next_event()).json()["n"])
            except StreamEnded:
                # If the reader were dropped as slow, it would resume from its last id.
                last_id = streams[-1].last_id
                streams.append(await open_stream(srv.url, token=token, last_event_id=last_id))
                await streams[-1].next_event("welcome")
        await expect_marker(streams[-1], api, tenant=tenant, users=["bob"])
    finally:
        for s in streams:
            await s.close()
    assert received == list(range(1000))


async def test_a_batch_larger_than_the_buffer_does_not_drop_a_reader_that_keeps_up(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    messages = [{"tenant": tenant, "users": ["bob"], "data": {"n": n}} for n in range(1000)]
    async with sse_stream(srv.url, token=srv.token("bob", tenant=tenant)) as bob:
        await bob.next_event("welcome")
        await api.publish_batch(messages)
        received = [(await bob.next_event()).json()["n"] for _ in range(1000)]
    assert received == list(range(1000))


async def test_a_batch_mixes_targets_and_tenants(
    srv: TidingsServer, api: Api, tenant: str, alice: SSEClient
) -> None:
    other = tenant + "-b"
    async with sse_stream(srv.url, token=srv.token("alice", tenant=other)) as theirs:
        await theirs.next_event("welcome")
        ids = await api.publish_batch(
            [
                {"tenant": tenant, "users": ["alice"], "data": 1},
                {"tenant": other, "users": ["alice"], "data": "other tenant"},
                {"tenant": tenant, "topics": ["weather"], "event": "rain", "data": 2},
                {"tenant": tenant, "broadcast": True, "data": 3},
            ]
        )
        assert len(set(ids)) == 4
        assert [e.data for e in await alice.take(3)] == ["1", "2", "3"]
        assert (await theirs.next_event()).data == "other tenant"
        await expect_marker(theirs, api, tenant=other, users=["alice"])


async def test_a_batch_of_1001_is_400_and_publishes_nothing(
    api: Api, tenant: str, alice: SSEClient
) -> None:
    messages = [{"tenant": tenant, "users": ["alice"], "data": n} for n in range(1001)]
    response = await api.post("/api/v1/publish/batch", {"messages": messages})
    assert response.status_code == 400 and error_code(response) == "invalid_request"
    await expect_marker(alice, api, tenant=tenant, users=["alice"])


async def test_a_batch_with_one_bad_message_names_it_and_publishes_nothing(
    api: Api, tenant: str, alice: SSEClient
) -> None:
    messages: list[dict[str, Any]] = [
        {"tenant": tenant, "users": ["alice"], "data": n} for n in range(5)
    ]
    messages[3] = {"tenant": tenant, "data": "no target"}
    response = await api.post("/api/v1/publish/batch", {"messages": messages})
    assert response.status_code == 400 and error_code(response) == "invalid_request"
    assert "messages[3]" in response.json()["error"]["message"]
    await expect_marker(alice, api, tenant=tenant, users=["alice"])


@pytest.mark.parametrize("body", [{}, {"messages": []}, {"messages": {}}, [], {"messages": "x"}])
async def test_a_batch_without_messages_is_400(api: Api, body: Any) -> None:
    response = await api.post("/api/v1/publish/batch", body)
    assert response.status_code == 400 and error_code(response) == "invalid_request"


# -- idempotency ----------------------------------------------------------------------------


async def test_a_repeated_idempotency_key_answers_the_same_id_and_delivers_once(
    api: Api, tenant: str, alice: SSEClient
) -> None:
    body: dict[str, Any] = {
        "tenant": tenant,
        "users": ["alice"],
        "data": "pay day",
        "idempotency_key": "pay-7",
    }
    first = await api.publish(**body)
    again = await api.publish(**body)
    third = await api.publish(**{**body, "data": "changed, same key"})
    assert first == again == third
    assert (await alice.next_event()).data == "pay day"
    await expect_marker(alice, api, tenant=tenant, users=["alice"])
    fresh = await api.publish(**{**body, "idempotency_key": "pay-8"})
    assert fresh != first
    assert (await alice.next_event()).data == "pay day"


async def test_concurrent_repeats_of_one_idempotency_key_deliver_once(
    api: Api, tenant: str, alice: SSEClient
) -> None:
    body: dict[str, Any] = {
        "tenant": tenant,
        "users": ["alice"],
        "data": "once",
        "idempotency_key": "race",
    }
    ids = await asyncio.gather(*(api.publish(**body) for _ in range(20)))
    assert len(set(ids)) == 1
    assert (await alice.next_event()).data == "once"
    await expect_marker(alice, api, tenant=tenant, users=["alice"])


async def test_idempotency_keys_are_per_tenant(srv: TidingsServer, api: Api, tenant: str) -> None:
    other = tenant + "-b"
    async with (
        sse_stream(srv.url, token=srv.token("alice", tenant=tenant)) as mine,
        sse_stream(srv.url, token=srv.token("alice", tenant=other)) as theirs,
    ):
        await mine.next_event("welcome")
        await theirs.next_event("welcome")
        a = await api.publish(tenant=tenant, users=["alice"], data="a", idempotency_key="k")
        b = await api.publish(tenant=other, users=["alice"], data="b", idempotency_key="k")
        assert a != b
        assert (await mine.next_event()).data == "a"
        assert (await theirs.next_event()).data == "b"


# -- JWT publishers -------------------------------------------------------------------------


async def test_jwt_publisher_publishes_in_its_own_tenant(
    srv: TidingsServer, api: Api, tenant: str, alice: SSEClient
) -> None:
    boss = srv.token("boss", tenant=tenant, publish=True)
    await api.publish(token=boss, users=["alice"], data="implicit tenant")
    await api.publish(token=boss, tenant=tenant, topics=["weather"], data="explicit tenant")
    await api.publish(token=boss, broadcast=True, data="broadcast")
    got = [e.data for e in await alice.take(3)]
    assert got == ["implicit tenant", "explicit tenant", "broadcast"]


async def test_jwt_publisher_is_confined_to_its_tenant(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    other = tenant + "-b"
    boss = srv.token("boss", tenant=tenant, publish=True)
    async with sse_stream(srv.url, token=srv.token("alice", tenant=other)) as theirs:
        await theirs.next_event("welcome")
        for path, body in [
            ("/api/v1/publish", {"tenant": other, "users": ["alice"], "data": "x"}),
            ("/api/v1/publish", {"tenant": "", "broadcast": True, "data": "x"}),
            ("/api/v1/publish/batch", {"messages": [{"tenant": other, "broadcast": True}]}),
        ]:
            response = await api.post(path, body, token=boss)
            assert response.status_code == 403 and error_code(response) == "forbidden", body
        await expect_marker(theirs, api, tenant=other, users=["alice"])


async def test_jwt_publisher_with_topic_patterns_publishes_only_to_matching_topics(
    srv: TidingsServer, api: Api, tenant: str, alice: SSEClient
) -> None:
    editor = srv.token("editor", tenant=tenant, publish=["news:*"])
    await api.publish(token=editor, topics=["news:sports"], event="headline", data="goal")
    event = await alice.next_event()
    assert (event.event, event.data) == ("headline", "goal")
    bodies: list[dict[str, Any]] = [
        {"topics": ["weather"]},
        {"topics": ["news:sports", "weather"]},
        {"topics": ["news:sports:live"]},  # `*` is one segment
        {"users": ["alice"]},
        {"broadcast": True},
    ]
    for body in bodies:
        response = await api.post("/api/v1/publish", {**body, "data": "no"}, token=editor)
        assert response.status_code == 403 and error_code(response) == "forbidden", body
    await expect_marker(alice, api, tenant=tenant, users=["alice"])


async def test_a_token_without_publish_rights_is_403(
    srv: TidingsServer, api: Api, tenant: str, alice: SSEClient
) -> None:
    reader = srv.token("alice", tenant=tenant, topics=["news:*"])
    response = await api.post("/api/v1/publish", {"users": ["alice"], "data": 1}, token=reader)
    assert response.status_code == 403 and error_code(response) == "forbidden"
    await expect_marker(alice, api, tenant=tenant, users=["alice"])


@pytest.mark.parametrize("credential", ["none", "garbage", "expired", "query_api_key"])
async def test_publish_without_a_valid_credential_is_401(
    srv: TidingsServer, credential: str
) -> None:
    headers = {
        "none": {},
        "garbage": {"Authorization": "Bearer nonsense"},
        "expired": {"Authorization": "Bearer " + srv.token("boss", publish=True, ttl_s=-300)},
        "query_api_key": {},
    }[credential]
    params = {"token": srv.api_key} if credential == "query_api_key" else {}
    async with httpx.AsyncClient(base_url=srv.url) as http:
        response = await http.post(
            "/api/v1/publish", json={"users": ["a"]}, headers=headers, params=params
        )
    assert response.status_code == 401 and error_code(response) == "unauthorized"


# -- bad input ------------------------------------------------------------------------------


def _big(size: int) -> bytes:
    return orjson.dumps({"users": ["alice"], "data": "x" * size})


BAD_REQUESTS: dict[str, tuple[bytes, int | tuple[int, ...], str]] = {
    "no_target": (b'{"data": 1}', 400, "invalid_request"),
    "empty_targets": (b'{"users": [], "topics": [], "broadcast": false}', 400, "invalid_request"),
    "malformed_json": (b'{"users": ["alice"', 400, "invalid_request"),
    "empty_body": (b"", 400, "invalid_request"),
    "not_utf8": (b'{"users": ["\xff\xfe"]}', 400, "invalid_request"),
    "array_body": (b'[{"users": ["alice"]}]', 400, "invalid_request"),
    "string_body": (b'"alice"', 400, "invalid_request"),
    "null_body": (b"null", 400, "invalid_request"),
    "users_number": (b'{"users": 5}', 400, "invalid_request"),
    "users_numbers": (b'{"users": [1, 2]}', 400, "invalid_request"),
    "users_empty_id": (b'{"users": [""]}', 400, "invalid_request"),
    "users_object": (b'{"users": {"a": 1}}', 400, "invalid_request"),
    "user_id_too_long": (orjson.dumps({"users": ["u" * 129]}), 400, "invalid_request"),
    "too_many_users": (
        orjson.dumps({"users": [f"u{n}" for n in range(1001)]}),
        400,
        "invalid_request",
    ),
    "bad_topic": (b'{"topics": ["bad topic"]}', 400, "invalid_request"),
    "reserved_topic": (b'{"topics": ["$sys"]}', 400, "invalid_request"),
    "too_many_topics": (
        orjson.dumps({"topics": [f"t{n}" for n in range(101)]}),
        400,
        "invalid_request",
    ),
    "broadcast_string": (b'{"broadcast": "yes"}', 400, "invalid_request"),
    "event_number": (b'{"users": ["alice"], "event": 5}', 400, "invalid_request"),
    "event_empty": (b'{"users": ["alice"], "event": ""}', 400, "invalid_request"),
    "event_bad_chars": (b'{"users": ["alice"], "event": "a b\\nid: x"}', 400, "invalid_request"),
    "event_too_long": (orjson.dumps({"users": ["a"], "event": "e" * 65}), 400, "invalid_request"),
    "tenant_number": (b'{"users": ["alice"], "tenant": 7}', 400, "invalid_request"),
    "idempotency_number": (b'{"users": ["a"], "idempotency_key": 7}', 400, "invalid_request"),
    "idempotency_empty": (b'{"users": ["a"], "idempotency_key": ""}', 400, "invalid_request"),
    "deep_nesting": (b"[" * 30_000 + b"]" * 30_000, 400, "invalid_request"),
    "shallow_nesting": (b'{"users": ["a"], "data": ' + b"[" * 200 + b"]" * 200 + b"}", 202, ""),
    "over_max_payload": (_big(MAX_PAYLOAD), 413, "payload_too_large"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
async def test_bad_publish_is_refused_and_the_next_good_one_is_served(
    srv: TidingsServer, api: Api, tenant: str, alice: SSEClient, case: str
) -> None:
    content, status, code = BAD_REQUESTS[case]
    response = await api.post("/api/v1/publish", content=content)
    assert response.status_code in (status if isinstance(status, tuple) else (status,)), (
        response.text
    )
    if response.status_code >= 400:
        assert error_code(response) == (code or "invalid_request")
    await expect_marker(alice, api, tenant=tenant, users=["alice"])  # served as usual
    assert "Traceback" not in srv.log(), srv.log()


async def test_body_over_max_payload_is_413_without_a_content_length(
    srv: TidingsServer, api: Api, tenant: str, alice: SSEClient
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"users": ["alice"], "data": "'
        for _ in range(MAX_PAYLOAD // 4096 + 1):
            yield b"x" * 4096
        yield b'"}'

    response = await api.http.post(
        "/api/v1/publish",
        content=chunks(),
        headers={"Authorization": f"Bearer {srv.api_key}", "Content-Type": "application/json"},
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and error_code(response) == "payload_too_large"
    await expect_marker(alice, api, tenant=tenant, users=["alice"])


async def test_a_body_just_under_max_payload_is_accepted(
    api: Api, tenant: str, alice: SSEClient
) -> None:
    envelope = orjson.dumps({"tenant": tenant, "users": ["alice"], "data": ""})
    data = "y" * (MAX_PAYLOAD - len(envelope))
    content = orjson.dumps({"tenant": tenant, "users": ["alice"], "data": data})
    assert len(content) == MAX_PAYLOAD
    response = await api.post("/api/v1/publish", content=content)
    assert response.status_code == 202, response.text
    assert (await alice.next_event()).data == data


async def test_a_batch_over_max_payload_is_413(api: Api) -> None:
    messages = [{"users": ["a"], "data": "z" * 1000} for _ in range(MAX_PAYLOAD // 1000 + 1)]
    response = await api.post("/api/v1/publish/batch", {"messages": messages})
    assert response.status_code == 413 and error_code(response) == "payload_too_large"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_wrong_method_on_publish_is_a_json_error(api: Api, method: str) -> None:
    response = await api.http.request(method, "/api/v1/publish")
    assert response.status_code == 405 and error_code(response) == "invalid_request"


async def test_the_server_survives_a_burst_of_bad_requests(
    srv: TidingsServer, api: Api, tenant: str, alice: SSEClient
) -> None:
    for content, _, _ in BAD_REQUESTS.values():
        for path in ("/api/v1/publish", "/api/v1/publish/batch"):
            response = await api.post(path, content=content)
            assert response.status_code < 500, (path, content[:80], response.text)
    assert (await api.http.get("/healthz")).json() == {"status": "ok"}
    await expect_marker(alice, api, tenant=tenant, users=["alice"])
    assert "Traceback" not in srv.log(), srv.log()


def _deep(depth: int, tenant: str) -> bytes:
    head = orjson.dumps({"tenant": tenant, "users": ["alice"]})[:-1]
    return head + b', "data": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("depth", [255, 300, 1000])
async def test_data_too_deep_to_encode_is_400_not_500(
    srv: TidingsServer, api: Api, tenant: str, alice: SSEClient, depth: int
) -> None:
    response = await api.post("/api/v1/publish", content=_deep(depth, tenant))
    assert response.status_code == 400 and error_code(response) == "invalid_request"
    await expect_marker(alice, api, tenant=tenant, users=["alice"])
    assert "Traceback" not in srv.log()


async def test_deep_data_that_encodes_is_delivered(api: Api, tenant: str, alice: SSEClient) -> None:
    response = await api.post("/api/v1/publish", content=_deep(200, tenant))
    assert response.status_code == 202, response.text
    assert (await alice.next_event()).data == "[" * 200 + "]" * 200


async def test_an_unencodable_event_does_not_poison_resume(
    srv: TidingsServer, api: Api, tenant: str
) -> None:
    token = srv.token("alice", tenant=tenant)
    async with sse_stream(srv.url, token=token) as first:
        cursor = (await first.next_event("welcome")).id
    await api.post("/api/v1/publish", content=_deep(300, tenant))  # refused (see above)
    await api.publish(tenant=tenant, users=["alice"], data="after")
    async with sse_stream(srv.url, token=token, last_event_id=cursor) as again:
        await again.next_event("welcome")
        assert (await again.next_event()).data == "after"
    assert "Traceback" not in srv.log()
