"""The browser side over HTTP: /tidings.js, /demo (+ /demo/token) and /admin."""

from __future__ import annotations

import httpx
import jwt

from server import StartServer, TidingsServer


def test_tidings_js_is_served_as_a_cacheable_module(server: TidingsServer) -> None:
    r = httpx.get(server.url + "/tidings.js")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/javascript")
    assert "max-age" in r.headers["cache-control"]
    assert "export class Tidings" in r.text
    assert "export class TidingsInbox" in r.text


def test_admin_page_is_served(server: TidingsServer) -> None:
    r = httpx.get(server.url + "/admin")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "/api/v1/stats" in r.text
    assert "sessionStorage" in r.text


def test_demo_is_off_when_a_jwt_secret_is_configured(server: TidingsServer) -> None:
    r = httpx.get(server.url + "/demo")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = httpx.post(server.url + "/demo/token", json={"user": "alice"})
    assert r.status_code == 404


def test_demo_is_on_in_dev_mode_and_mints_usable_tokens(start_server: StartServer) -> None:
    dev = start_server(TIDINGS_JWT_SECRET=None)
    r = httpx.get(dev.url + "/demo")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert 'from "/tidings.js"' in r.text

    r = httpx.post(dev.url + "/demo/token", json={"user": "alice"})
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    claims = jwt.decode(token, dev.secret, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["publish"] is True
    auth = {"Authorization": f"Bearer {token}"}
    r = httpx.get(dev.url + "/api/v1/notifications/unread-count", headers=auth)
    assert r.status_code == 200
    assert r.json() == {"unread_count": 0}


def test_demo_token_refuses_bad_bodies(start_server: StartServer) -> None:
    dev = start_server(TIDINGS_JWT_SECRET=None)
    for body in ({}, {"user": ""}, {"user": "x" * 200}, {"user": 3}, {"user": "a", "tenant": 1}):
        r = httpx.post(dev.url + "/demo/token", json=body)
        assert r.status_code == 400, body
        assert r.json()["error"]["code"] == "invalid_request"


def test_demo_forced_on_serves_the_page_but_never_mints_outside_dev_mode(
    start_server: StartServer,
) -> None:
    srv = start_server(TIDINGS_DEMO="true")
    assert httpx.get(srv.url + "/demo").status_code == 200
    r = httpx.post(srv.url + "/demo/token", json={"user": "alice"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"


def test_demo_forced_off_in_dev_mode(start_server: StartServer) -> None:
    dev = start_server(TIDINGS_JWT_SECRET=None, TIDINGS_DEMO="false")
    assert httpx.get(dev.url + "/demo").status_code == 404
    assert httpx.post(dev.url + "/demo/token", json={"user": "alice"}).status_code == 404
