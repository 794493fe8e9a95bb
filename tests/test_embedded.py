"""examples/embedded_fastapi.py, run as its docstring says: under uvicorn, with a secret.

The host app mounts tidings and calls the hub in process; a browser-like client
reads its stream over a real socket.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server import free_port
from sse_client import Api, expect_marker, open_stream, sse_stream
from tidings.auth import mint_token

ROOT = Path(__file__).resolve().parent.parent
TITLE = "计件记录已审批"


@dataclass
class Embedded:
    url: str
    secret: str
    api_key: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def token(self, user: str) -> str:
        return mint_token(self.secret, user)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_example(workdir: Path) -> Embedded:
    """`uvicorn examples.embedded_fastapi:app` from the checkout, with a fresh secret and key."""
    secret, key, port = secrets.token_urlsafe(48), "key-" + secrets.token_hex(8), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(
        TIDINGS_JWT_SECRET=secret,
        TIDINGS_API_KEYS=key,
        TIDINGS_DATABASE_URL=f"sqlite+aiosqlite:///{workdir / 'tidings.db'}",
        PYTHONUNBUFFERED="1",
    )
    log_path = workdir / "uvicorn.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.embedded_fastapi:app", "--port", str(port)],
            cwd=ROOT,  # as the example's docstring runs it: from a checkout
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    app = Embedded(f"http://127.0.0.1:{port}", secret, key, proc, log_path)
    try:
        _wait_healthy(app)
    except BaseException:
        stop_example(app, signal.SIGKILL)
        raise
    return app


def stop_example(app: Embedded, sig: signal.Signals = signal.SIGTERM) -> int:
    """Signal the process and wait (bounded) for it to exit; killed if it does not."""
    if app.proc.poll() is None:
        app.proc.send_signal(sig)
    try:
        return app.proc.wait(15)
    except subprocess.TimeoutExpired:
        app.proc.kill()
        app.proc.wait()
        raise


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    app = start_example(tmp_path_factory.mktemp("embedded"))
    try:
        yield app
    finally:
        code = stop_example(app)
    assert code in (0, -signal.SIGTERM), app.log()
    assert "Traceback" not in app.log(), app.log()


def _wait_healthy(app: Embedded) -> None:
    deadline = time.monotonic() + 20
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            assert app.proc.poll() is None, f"uvicorn exited:\n{app.log()}"
            try:
                if client.get(app.url + "/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling readiness, not synchronising a test
    raise AssertionError(f"the example did not start:\n{app.log()}")


@pytest.fixture
async def api(app: Embedded) -> AsyncIterator[Api]:
    async with Api(app.url, app.api_key) as client:
        yield client


async def test_approving_a_record_notifies_the_user_over_sse(app: Embedded, api: Api) -> None:
    async with (
        sse_stream(app.url, token=app.token("alice")) as alice,
        sse_stream(app.url, token=app.token("bob")) as bob,
    ):
        assert alice.status == 200
        assert (await alice.next_event("welcome")).json()["user_id"] == "alice"
        await bob.next_event("welcome")

        response = await api.http.post("/records/42/approve", params={"user_id": "alice"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["approved"] == 42 and isinstance(body["event_id"], str) and body["event_id"]

        event = await alice.next_event()
        assert event.event == "notification"
        assert event.json() == {"type": "record_approved", "record_id": 42, "title": TITLE}
        assert f'"title":"{TITLE}"'.encode() in bytes(alice.raw)  # UTF-8, not escaped
        await expect_marker(bob, api, users=["bob"])  # alice's approval went to alice only


async def test_every_connection_of_the_user_gets_the_approval(app: Embedded, api: Api) -> None:
    token = app.token("carol")
    async with (
        sse_stream(app.url, token=token) as phone,
        sse_stream(app.url, "/api/v1/notifications/stream", params={"token": token}) as tab,
    ):
        await phone.next_event("welcome")
        await tab.next_event("welcome")
        response = await api.http.post("/records/7/approve", params={"user_id": "carol"})
        assert response.status_code == 200, response.text
        for stream in (phone, tab):
            assert (await stream.next_event("notification")).json()["record_id"] == 7


async def test_the_mounted_tidings_api_is_served_too(app: Embedded, api: Api) -> None:
    async with sse_stream(app.url, token=app.token("dave")) as dave:
        await dave.next_event("welcome")
        await api.publish(users=["dave"], data={"title": "工资已发放"})
        assert (await dave.next_event()).json() == {"title": "工资已发放"}
    async with sse_stream(app.url, token=mint_token("w" * 48, "dave")) as forged:
        assert forged.status == 401
        assert (await forged.json())["error"]["code"] == "unauthorized"
    response = await api.http.post("/records/not-a-number/approve", params={"user_id": "x"})
    assert response.status_code == 422  # FastAPI's own validation for the host app's route


async def test_sigterm_with_an_open_stream_tells_the_client_and_exits(tmp_path: Path) -> None:
    app = start_example(tmp_path)
    stream = await open_stream(app.url, token=app.token("alice"))
    try:
        await stream.next_event("welcome")
        app.proc.send_signal(signal.SIGTERM)
        shutdown = await stream.next_event("shutdown", within=5)  # at once, when it works
        assert shutdown.json()["reason"]
        await stream.wait_end()
    finally:
        await stream.close()
        code = await asyncio.to_thread(stop_example, app)
    assert code in (0, -signal.SIGTERM), app.log()
