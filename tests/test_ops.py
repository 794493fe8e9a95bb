"""Operations over HTTP: stats, presence, disconnect, metrics, limits, CORS.

These run the app in memory through httpx.ASGITransport; streams are opened
on the hub directly, because ASGITransport does not stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tidings import Hub, Settings, create_app
from tidings.auth import Principal, mint_token
from tidings.connection import SSEConnection
from tidings.event import CloseReason

SECRET = "s" * 40
KEY = "backend-key"


def token(user: str, **claims: object) -> str:
    return mint_token(SECRET, user, **claims)  # type: ignore[arg-type]


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    settings = Settings(jwt_secret=SECRET, api_keys=[KEY], publish_rate=5, connect_rate=2)
    async with Hub(settings) as h:
        yield h


@pytest.fixture
async def client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(hub.settings, hub=hub)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


async def connect(hub: Hub, user: str, tenant: str = "") -> SSEConnection:
    principal = Principal(user, tenant)
    conn = SSEConnection(principal, hub.streams_for(principal, []), limit=16)
    hub.broker.release(conn, await hub.broker.attach(conn, None))
    return conn


def auth(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


async def test_stats_with_api_key_and_admin_token(hub: Hub, client: httpx.AsyncClient) -> None:
    await connect(hub, "alice", "acme")
    await connect(hub, "bob", "globex")
    await hub.send_to_user("alice", {"title": "你好"}, tenant="acme")
    everything = (await client.get("/api/v1/stats", headers=auth(KEY))).json()
    assert everything["connections"] == 2 and everything["users"] == 2
    assert everything["messages_published"] == 1 and everything["messages_delivered"] == 1
    admin = token("boss", tenant="globex", admin=True)
    mine = (await client.get("/api/v1/stats", headers=auth(admin))).json()
    assert mine["connections"] == 1 and mine["messages_published"] == 0
    response = await client.get("/api/v1/stats", headers=auth(token("alice", tenant="acme")))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"


async def test_presence_is_tenant_scoped(hub: Hub, client: httpx.AsyncClient) -> None:
    await connect(hub, "张三", "acme")
    await connect(hub, "张三", "acme")
    await connect(hub, "bob", "globex")
    admin = auth(token("boss", tenant="acme", admin=True))
    assert (await client.get("/api/v1/presence", headers=admin)).json()["users"] == ["张三"]
    one = (await client.get("/api/v1/presence/张三", headers=admin)).json()
    assert one == {"user_id": "张三", "online": True, "connections": 2}
    other = await client.get("/api/v1/presence?tenant=globex", headers=auth(KEY))
    assert other.json()["users"] == ["bob"]
    assert (await client.get("/api/v1/presence/bob", headers=admin)).json()["online"] is False


async def test_disconnect_closes_the_users_connections(hub: Hub, client: httpx.AsyncClient) -> None:
    conns = [await connect(hub, "alice", "acme") for _ in range(2)]
    bystander = await connect(hub, "alice", "globex")
    answer = await client.post(
        "/api/v1/disconnect", headers=auth(KEY), json={"tenant": "acme", "user": "alice"}
    )
    assert answer.json() == {"disconnected": 2}
    assert all(c.closed is CloseReason.DISCONNECTED for c in conns)
    assert bystander.closed is None
    admin = auth(token("boss", tenant="acme", admin=True))
    refused = await client.post(
        "/api/v1/disconnect", headers=admin, json={"tenant": "globex", "user": "alice"}
    )
    assert refused.status_code == 403


async def test_metrics_move_when_events_flow(hub: Hub, client: httpx.AsyncClient) -> None:
    await connect(hub, "alice")
    before = (await client.get("/metrics")).text
    assert "tidings_messages_delivered_total 0.0" in before
    await client.post("/api/v1/publish", headers=auth(KEY), json={"users": ["alice"], "data": 1})
    await client.get("/api/v1/stats", headers=auth("wrong"))
    after = (await client.get("/metrics")).text
    for line in (
        "tidings_connections 1.0",
        "tidings_messages_published_total 1.0",
        "tidings_messages_delivered_total 1.0",
        'tidings_publish_requests_total{outcome="accepted"} 1.0',
        "tidings_delivery_latency_seconds_count 1.0",
    ):
        assert line in after, line
    assert "tidings_auth_failures_total" in after


async def test_publish_rate_limit_answers_429_with_retry_after(client: httpx.AsyncClient) -> None:
    statuses = []
    for n in range(12):  # rate 5/s, bursts of 10
        r = await client.post(
            "/api/v1/publish", headers=auth(KEY), json={"broadcast": True, "data": n}
        )
        statuses.append(r.status_code)
    assert statuses[:10] == [202] * 10
    assert 429 in statuses[10:]
    limited = await client.post("/api/v1/publish", headers=auth(KEY), json={"broadcast": True})
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    other_tenant = await client.post(
        "/api/v1/publish", headers=auth(KEY), json={"tenant": "acme", "broadcast": True}
    )
    assert other_tenant.status_code == 202


async def test_connection_limits_answer_503_with_retry_after() -> None:
    settings = Settings(jwt_secret=SECRET, max_connections_per_user=1)
    async with Hub(settings) as hub:
        await connect(hub, "alice")
        app = create_app(settings, hub=hub)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            r = await c.get("/api/v1/stream", headers=auth(token("alice")))
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "over_capacity"
    assert r.headers["retry-after"] == "5"


async def test_cors_preflight() -> None:
    settings = Settings(jwt_secret=SECRET, cors_origins=["https://app.example"])
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.options(
            "/api/v1/publish",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = await c.options(
            "/api/v1/publish",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert r.status_code == 400


async def test_payload_limit_and_bad_json(client: httpx.AsyncClient) -> None:
    big = await client.post(
        "/api/v1/publish",
        headers=auth(KEY),
        content=b'{"broadcast": true, "data": "' + b"x" * 70000 + b'"}',
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
    for body in (b"{", b"[]", b'"x"', b'{"users": "", "topics": [1]}', b'{"topics": ["$sys"]}'):
        r = await client.post("/api/v1/publish", headers=auth(KEY), content=body)
        assert r.status_code == 400, body
        assert r.json()["error"]["code"] == "invalid_request"
    ok = await client.post("/api/v1/publish", headers=auth(KEY), json={"broadcast": True})
    assert ok.status_code == 202


@pytest.mark.parametrize("name", ["welcome", "reset", "shutdown", "notification.read"])
async def test_server_event_names_are_reserved(client: httpx.AsyncClient, name: str) -> None:
    r = await client.post(
        "/api/v1/publish", headers=auth(KEY), json={"broadcast": True, "event": name}
    )
    assert r.status_code == 400
    assert "reserved" in r.json()["error"]["message"]


async def test_readyz_checks_broker_and_database(tmp_path: object) -> None:
    settings = Settings(jwt_secret=SECRET, database_url=f"sqlite+aiosqlite:///{tmp_path}/r.db")
    app = create_app(settings)
    hub = app.state.tidings.hub
    async with (
        hub,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        r = await c.get("/readyz")
    assert r.status_code == 200
    assert r.json()["checks"] == {"broker": "ok", "database": "ok"}


async def test_openapi_describes_every_rest_route(client: httpx.AsyncClient) -> None:
    from starlette.routing import Route

    spec = (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.1")
    app = create_app(Settings(jwt_secret=SECRET))
    streams_and_pages = {
        "/api/v1/stream",
        "/api/v1/notifications/stream",
        "/api/sse/events",
        "/sse/stream",
        "/metrics",
        "/tidings.js",
        "/demo",
        "/demo/token",
        "/admin",
        "/openapi.json",
        "/docs",
    }
    for route in app.routes:
        if isinstance(route, Route) and route.path not in streams_and_pages:
            path = route.path.replace(":path}", "}")
            for method in route.methods or ():
                if method != "HEAD":
                    assert method.lower() in spec["paths"][path], (method, path)
    assert "swagger" in (await client.get("/docs")).text.lower()


async def test_connect_rate_limit_answers_429_with_retry_after(client: httpx.AsyncClient) -> None:
    # connect_rate=2/s (bursts of 4) per client address; these requests fail auth
    # after the rate check, so only the limiter's answer can be a 429.
    statuses = [(await client.get("/api/v1/stream")).status_code for _ in range(6)]
    assert statuses[:4] == [401] * 4
    assert statuses[4] == 429
    limited = await client.get("/api/v1/stream")
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1


def test_json_logs_are_one_object_per_line_with_tokens_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    import orjson

    from tidings.logs import configure

    configure("info", "json")
    try:
        logging.getLogger("tidings.test").info("GET /api/v1/stream?token=%s 200", "eyJsecret")
        line = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        logging.getLogger().handlers.clear()
    entry = orjson.loads(line)
    assert entry["level"] == "info" and entry["logger"] == "tidings.test"
    assert "eyJsecret" not in line and "token=***" in entry["message"]
