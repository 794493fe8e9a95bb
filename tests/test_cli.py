"""The `tidings` command, run as users run it: a child process (`python -m tidings ...`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from server import StartServer, TidingsServer
from tidings.cli import run
from tidings.client import Publisher, Subscriber
from tidings.wire import SSEEvent

WAIT = 30.0  # bound on one command; never reached when things work


def cli_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(settings)
    return env


def tidings(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidings", *args],
        env=env if env is not None else cli_env(),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=cwd,
    )


async def first_events(url: str, token: str, count: int) -> list[SSEEvent]:
    events: list[SSEEvent] = []
    async with asyncio.timeout(WAIT), Subscriber(url, token) as sub:
        async for event in sub:
            events.append(event)
            if len(events) == count:
                return events
    return events


def test_help_lists_the_commands() -> None:
    result = tidings("--help")
    assert result.returncode == 0
    for command in ("serve", "token", "publish", "listen", "migrate", "inbox", "bench"):
        assert command in result.stdout


def test_no_command_is_a_usage_error() -> None:
    assert tidings().returncode == 2


def test_serve_refuses_an_invalid_setting_naming_the_key(tmp_path: Path) -> None:
    result = tidings("serve", env=cli_env(TIDINGS_HEARTBEAT_INTERVAL="2"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("tidings: ") and "TIDINGS_HEARTBEAT_INTERVAL" in result.stderr


def test_serve_flags_win_over_the_environment(tmp_path: Path) -> None:
    result = tidings("serve", "--port", "70000", env=cli_env(TIDINGS_PORT="8000"), cwd=tmp_path)
    assert result.returncode == 2 and "TIDINGS_PORT" in result.stderr


async def test_token_is_accepted_by_the_server(server: TidingsServer) -> None:
    env = cli_env(TIDINGS_JWT_SECRET=server.secret)
    result = tidings("token", "--user", "alice", "--tenant", "acme", "--ttl", "5m", env=env)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2 and result.stdout == token + "\n"
    [welcome] = await first_events(server.url, token, 1)
    assert (welcome.json()["user_id"], welcome.json()["tenant"]) == ("alice", "acme")


async def test_token_reuses_the_dev_secret_of_serve(start_server: StartServer) -> None:
    dev = start_server(TIDINGS_JWT_SECRET=None)  # serve keeps a secret beside its database
    env = cli_env(TIDINGS_DATABASE_URL=dev.settings["TIDINGS_DATABASE_URL"])
    result = tidings("token", "--user", "alice", env=env)
    assert result.returncode == 0, result.stderr
    [welcome] = await first_events(dev.url, result.stdout.strip(), 1)
    assert welcome.json()["user_id"] == "alice"


def test_token_without_a_secret_off_loopback_is_refused() -> None:
    result = tidings("token", "--user", "alice", env=cli_env(TIDINGS_HOST="0.0.0.0"))
    assert result.returncode == 2 and "TIDINGS_JWT_SECRET" in result.stderr
    assert result.stdout == ""


def test_token_rejects_a_bad_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_JWT_SECRET", "s" * 40)
    assert run(["token", "--user", "alice", "--ttl", "soon"]) == 2


async def test_publish_prints_the_id_and_the_event_arrives(server: TidingsServer) -> None:
    token = server.token("alice")
    async with asyncio.timeout(WAIT), Subscriber(server.url, token) as sub:
        assert (await anext(sub)).event == "welcome"
        args = ["publish", "--url", server.url, "--key", server.api_key, "--user", "alice"]
        result = await asyncio.to_thread(tidings, *args, '{"title": "工资已发放"}')
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["id"]  # piped: one JSON line
        assert (await anext(sub)).json() == {"title": "工资已发放"}
        env = cli_env(TIDINGS_API_KEY=server.api_key)
        piped = await asyncio.to_thread(
            tidings, "publish", "--url", server.url, "--user", "alice", env=env, stdin="纯文本\n"
        )
        assert piped.returncode == 0, piped.stderr
        assert (await anext(sub)).data == "纯文本"


def test_publish_reports_server_errors() -> None:
    # Nothing listens on port 9 (discard) on a test machine: a network error.
    result = tidings("publish", "--url", "http://127.0.0.1:9", "--key", "k", "--user", "a", "x")
    assert result.returncode == 1 and "cannot reach" in result.stderr


def test_publish_without_a_target_is_a_400(server: TidingsServer) -> None:
    result = tidings("publish", "--url", server.url, "--key", server.api_key, "{}")
    assert result.returncode == 1 and "400 invalid_request" in result.stderr


async def test_listen_prints_json_lines_and_exits_0_on_ctrl_c(server: TidingsServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidings",
        "listen",
        "--url",
        server.url,
        "--token",
        server.token("alice"),
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(WAIT):
            welcome = json.loads(await proc.stdout.readline())
            assert welcome["event"] == "welcome" and welcome["data"]["user_id"] == "alice"
            async with Publisher(server.url, server.api_key) as pub:
                await pub.publish(users=["alice"], event="payroll", data={"title": "工资已发放"})
            event = json.loads(await proc.stdout.readline())
            assert event["event"] == "payroll" and event["data"] == {"title": "工资已发放"}
            assert event["id"]
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_bench_fanout_against_its_own_server() -> None:
    result = tidings("bench", "fanout", "-n", "20", "--messages", "3", "--interval", "0")
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout)
    assert line["scenario"] == "fanout" and line["complete"] is True
    assert line["received"] == line["expected"] == 60
    assert line["last_p50_ms"] is not None and line["first_p50_ms"] is not None


def test_migrate_then_purge_on_a_fresh_sqlite_database(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/inbox.db"
    first = tidings("migrate", "--database-url", url)
    assert first.returncode == 0, first.stderr
    applied = json.loads(first.stdout)
    assert applied["from"] is None and applied["to"]
    again = json.loads(tidings("migrate", "--database-url", url).stdout)
    assert again["from"] == again["to"] == applied["to"]
    purged = tidings("inbox", "purge", "--database-url", url, "--older-than", "30d")
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout) == {"deleted": 0}


def test_purge_before_migrate_says_to_migrate(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/empty.db"
    result = tidings("inbox", "purge", "--database-url", url)
    assert result.returncode == 2
    assert "tidings migrate" in result.stderr
