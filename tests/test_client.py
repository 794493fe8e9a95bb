"""The async SDK: backoff, typed errors, Publisher (in memory) and Subscriber (real server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from server import TidingsServer, free_port
from tidings import Hub, Settings, create_app
from tidings.auth import mint_token
from tidings.client import Publisher, Subscriber, backoff_delay, error_from_response, message
from tidings.errors import (
    BackendUnavailable,
    Forbidden,
    InvalidRequest,
    OverCapacity,
    PayloadTooLarge,
    TidingsError,
    Unauthorized,
)
from tidings.wire import SSEEvent

SECRET = "s" * 40
KEY = "backend-key"
PAYROLL = {"title": "工资已发放", "amount": "¥12,000"}
WAIT = 15.0  # bound on any one wait for the server; never reached when things work


async def next_event(subscriber: Subscriber, name: str | None = None) -> SSEEvent:
    """The next event (named `name`, skipping others), bounded by WAIT."""
    async with asyncio.timeout(WAIT):
        async for event in subscriber:
            if name is None or event.event == name:
                return event
    raise AssertionError("the subscriber ended")


# -- backoff ---------------------------------------------------------------------------------


def test_backoff_is_full_jitter_below_the_exponential_ceiling() -> None:
    top = 1.0 - 1e-12
    assert [backoff_delay(a, 0.5, 30.0, rand=lambda: top) for a in range(8)] == pytest.approx(
        [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    )
    assert backoff_delay(3, 0.5, 30.0, rand=lambda: 0.0) == 0.0
    assert backoff_delay(3, 0.5, 30.0, rand=lambda: 0.5) == pytest.approx(2.0)


def test_backoff_stays_within_bounds_with_real_randomness() -> None:
    for attempt in (0, 1, 5, 10, 100, 10_000):
        delay = backoff_delay(attempt, 0.5, 30.0)
        assert 0.0 <= delay <= min(30.0, 0.5 * 2 ** min(attempt, 64))


def test_backoff_refuses_negative_input() -> None:
    with pytest.raises(ValueError):
        backoff_delay(-1, 0.5, 30.0)
    with pytest.raises(ValueError):
        backoff_delay(0, -0.5, 30.0)


def test_subscriber_refuses_bad_backoff_settings() -> None:
    with pytest.raises(ValueError):
        Subscriber("http://x", "t", backoff_initial=0)
    with pytest.raises(ValueError):
        Subscriber("http://x", "t", backoff_initial=5, backoff_max=1)


# -- error mapping -----------------------------------------------------------------------------


def error(status: int, body: object, **headers: str) -> TidingsError:
    return error_from_response(httpx.Response(status, json=body, headers=headers))


def test_errors_map_by_code_then_status() -> None:
    full = {"error": {"code": "over_capacity", "message": "full"}}
    over = error(503, full, **{"Retry-After": "5"})
    assert isinstance(over, OverCapacity) and over.retry_after == 5 and over.message == "full"
    down = error(503, {"error": {"code": "unavailable", "message": "no broker"}})
    assert isinstance(down, BackendUnavailable)
    assert isinstance(error(403, {"error": {"code": "forbidden", "message": "no"}}), Forbidden)
    assert isinstance(error(401, {"oops": 1}), Unauthorized)  # not our body: the status decides


def test_errors_from_elsewhere_keep_their_status() -> None:
    bad_gateway = error_from_response(httpx.Response(502, text="<html>nginx</html>"))
    assert type(bad_gateway) is TidingsError
    assert bad_gateway.status == 502 and "502" in bad_gateway.message
    teapot = error(418, {"error": {"code": "teapot", "message": "short and stout"}})
    assert (teapot.status, teapot.code, teapot.message) == (418, "teapot", "short and stout")


# -- Publisher in memory -----------------------------------------------------------------------


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    async with Hub(Settings(jwt_secret=SECRET, api_keys=[KEY], max_payload=1024)) as h:
        yield h


@pytest.fixture
async def http(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(hub.settings, hub=hub))
    async with httpx.AsyncClient(transport=transport) as client:
        yield client


async def test_publish_returns_the_event_id(http: httpx.AsyncClient) -> None:
    async with Publisher("http://t/", KEY, client=http) as pub:
        first = await pub.publish(users=["alice"], data=PAYROLL, idempotency_key="pay-1")
        again = await pub.publish(users="alice", data=PAYROLL, idempotency_key="pay-1")
        other = await pub.publish(topics=["news"], tenant="acme", event="headline", data="hi")
    assert first and other and first != other
    assert again  # accepted again (delivered once: the hub's business)
    assert not http.is_closed  # a shared client is the caller's to close


async def test_publish_batch_returns_one_id_per_message(http: httpx.AsyncClient) -> None:
    async with Publisher("http://t", KEY, client=http) as pub:
        ids = await pub.publish_batch(
            [message(users=["alice"], data={"n": 1}), message(broadcast=True, data={"n": 2})]
        )
    assert len(ids) == 2 and len(set(ids)) == 2


async def test_publish_with_a_user_token_that_may_publish(http: httpx.AsyncClient) -> None:
    token = mint_token(SECRET, "app", tenant="acme", publish=True)
    async with Publisher("http://t", token, client=http) as pub:
        assert await pub.publish(users=["bob"], data=PAYROLL)
        with pytest.raises(Forbidden):
            await pub.publish(tenant="globex", users=["bob"], data=PAYROLL)


async def test_publish_errors_are_typed(http: httpx.AsyncClient) -> None:
    async with Publisher("http://t", KEY, client=http) as pub:
        with pytest.raises(InvalidRequest) as no_target:
            await pub.publish(data=PAYROLL)
        assert no_target.value.status == 400 and "target" in no_target.value.message
        with pytest.raises(PayloadTooLarge):
            await pub.publish(users=["alice"], data="x" * 2000)
        with pytest.raises(InvalidRequest):
            await pub.publish_batch([])
    async with Publisher("http://t", "wrong-key", client=http) as pub:
        with pytest.raises(Unauthorized):
            await pub.publish(users=["alice"], data=PAYROLL)


async def test_publisher_closes_its_own_client() -> None:
    pub = Publisher("http://127.0.0.1:9", KEY)
    await pub.aclose()
    with pytest.raises(RuntimeError):  # httpx refuses requests on a closed client
        await pub.publish(users=["alice"])


# -- Subscriber against a real server ----------------------------------------------------------


async def test_subscriber_gets_welcome_then_published_events(server: TidingsServer) -> None:
    states: list[str] = []
    token = server.token("alice", topics=["payroll"])
    async with (
        Subscriber(server.url, token, topics=["payroll"], on_state=states.append) as sub,
        Publisher(server.url, server.api_key) as pub,
    ):
        welcome = await next_event(sub)
        assert welcome.event == "welcome" and welcome.id
        assert welcome.json()["user_id"] == "alice" and welcome.json()["topics"] == ["payroll"]
        sent = await pub.publish(users=["alice"], data=PAYROLL)
        personal = await next_event(sub)
        assert (personal.event, personal.json()) == ("message", PAYROLL)
        await pub.publish(topics=["payroll"], event="paid", data="月薪")
        topical = await next_event(sub)
        assert (topical.event, topical.data) == ("paid", "月薪")
        assert sub.last_event_id == topical.id
    assert sent and states[:2] == ["connecting", "open"] and states[-1] == "closed"


async def test_subscriber_resumes_from_last_event_id(server: TidingsServer) -> None:
    token = server.token("alice")
    async with Publisher(server.url, server.api_key) as pub:
        async with Subscriber(server.url, token) as first:
            await next_event(first, "welcome")
            await pub.publish(users=["alice"], data={"n": 1})
            assert (await next_event(first)).json() == {"n": 1}
            cursor = first.last_event_id
        await pub.publish(users=["alice"], data={"n": 2})  # while nobody listens
        async with Subscriber(server.url, token, last_event_id=cursor) as second:
            assert (await next_event(second)).event == "welcome"
            missed = await next_event(second)
            assert (missed.event, missed.json()) == ("message", {"n": 2})


async def test_subscriber_reconnects_after_a_restart_and_hears_reset(
    server: TidingsServer,
) -> None:
    token = server.token("alice")
    states: list[str] = []
    async with (
        Subscriber(server.url, token, backoff_initial=0.05, on_state=states.append) as sub,
        Publisher(server.url, server.api_key) as pub,
    ):
        await next_event(sub, "welcome")
        await pub.publish(users=["alice"], data=PAYROLL)
        assert (await next_event(sub)).json() == PAYROLL
        await asyncio.to_thread(server.restart)  # the memory history is gone
        reset = await next_event(sub, "reset")
        assert reset.json()["reason"]
        await pub.publish(users=["alice"], data={"title": "新消息"})
        assert (await next_event(sub, "message")).json() == {"title": "新消息"}
    assert "reconnecting" in states and states.count("open") >= 2


async def test_subscriber_asks_token_provider_after_401(server: TidingsServer) -> None:
    calls: list[int] = []

    async def fresh_token() -> str:
        calls.append(1)
        return server.token("alice")

    expired = server.token("alice", ttl_s=-3600)
    async with Subscriber(server.url, expired, token_provider=fresh_token) as sub:
        welcome = await next_event(sub)
    assert welcome.event == "welcome" and welcome.json()["user_id"] == "alice"
    assert calls == [1]


async def test_subscriber_without_token_provider_raises_unauthorized(
    server: TidingsServer,
) -> None:
    sub = Subscriber(server.url, "not-a-jwt")
    with pytest.raises(Unauthorized):
        await next_event(sub)
    with pytest.raises(StopAsyncIteration):  # closed after the error
        await anext(sub)


async def test_subscriber_raises_forbidden_for_a_topic_it_may_not_read(
    server: TidingsServer,
) -> None:
    async with Subscriber(server.url, server.token("alice"), topics=["secret"]) as sub:
        with pytest.raises(Forbidden):
            await next_event(sub)


async def test_close_ends_a_pending_iteration(server: TidingsServer) -> None:
    sub = Subscriber(server.url, server.token("alice"))
    await next_event(sub, "welcome")
    waiting = asyncio.ensure_future(anext(sub))
    await sub.close()
    with pytest.raises(StopAsyncIteration):
        async with asyncio.timeout(WAIT):
            await waiting
    assert sub.state == "closed"


async def test_subscriber_keeps_retrying_a_server_that_is_not_there() -> None:
    retried = asyncio.Event()
    states: list[str] = []

    def on_state(state: str) -> None:
        states.append(state)
        if states.count("reconnecting") >= 3:
            retried.set()

    nowhere = f"http://127.0.0.1:{free_port()}"
    sub = Subscriber(nowhere, "t", backoff_initial=0.01, on_state=on_state)
    waiting = asyncio.ensure_future(anext(sub))
    async with asyncio.timeout(WAIT):
        await retried.wait()
    assert not waiting.done()
    await sub.close()
    with pytest.raises(StopAsyncIteration):
        await waiting


async def test_subscriber_gives_up_on_an_unsupported_url() -> None:
    with pytest.raises(httpx.UnsupportedProtocol):
        await next_event(Subscriber("ftp://127.0.0.1", "t"))
