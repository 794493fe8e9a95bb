"""A desktop listener: seed S0's Tauri client, in Python.

Shows each notification of the user as a system notification (``notify-send``,
where it exists) and prints it otherwise. `tidings.client.Subscriber` reconnects
by itself with jittered backoff and resumes after the last event id; the id is
also kept in a file, so a restart of this script resumes too. A ``reset`` (the
server could not resume) is reported: a real app would refetch its inbox.

    tidings serve &                       # dev mode
    TOKEN=$(tidings token --user alice)
    python examples/desktop_notifier.py --url http://127.0.0.1:8000 --token "$TOKEN"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tidings.client import Publisher, Subscriber

NOTIFY_SEND = shutil.which("notify-send")
URGENCY = {"low": "low", "normal": "normal", "high": "critical", "urgent": "critical"}


def show(title: str, body: str, priority: str = "normal") -> None:
    if NOTIFY_SEND:
        urgency = URGENCY.get(priority, "normal")
        subprocess.run([NOTIFY_SEND, "-a", "tidings", "-u", urgency, title, body], check=False)
    else:
        print(f"🔔 {title}" + (f" — {body}" if body else ""), flush=True)


def show_notification(n: dict[str, Any], seen: set[str]) -> None:
    if n["id"] in seen:
        return
    seen.add(n["id"])
    sender = (n.get("sender") or {}).get("username")
    title = f"{sender}: {n['title']}" if sender else n["title"]
    show(title, n.get("content", ""), n.get("priority", "normal"))


async def listen(url: str, token: str, state_file: Path, last_id: str | None) -> None:
    seen: set[str] = set()  # notifications shown by this run
    async with (
        Publisher(url, token) as api,
        Subscriber(url, token, last_event_id=last_id, on_state=lambda s: print(f"[{s}]")) as events,
    ):
        async for event in events:
            data = event.json() if event.data.startswith(("{", "[")) else event.data
            if event.event == "welcome":
                print(f"connected as {data['user_id']}, {data['unread_count']} unread")
            elif event.event == "reset":  # what we missed is in the inbox, not the stream
                print(f"could not resume ({data['reason']}): refetching the inbox")
                page = await api.notifications(unread=True)
                for n in reversed(page["items"]):
                    show_notification(n, seen)
            elif event.event == "message" and isinstance(data, dict) and "recipient" in data:
                show_notification(data, seen)
            elif event.event not in ("notification.read", "notification.deleted", "shutdown"):
                show(event.event, json.dumps(data, ensure_ascii=False))
            if event.id:
                await asyncio.to_thread(state_file.write_text, event.id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("TIDINGS_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--token", default=os.environ.get("TIDINGS_TOKEN"), required=False)
    parser.add_argument("--state", type=Path, default=Path(".desktop_notifier.last_id"))
    args = parser.parse_args()
    if not args.token:
        parser.error("--token (or TIDINGS_TOKEN) is required: tidings token --user <you>")
    last_id = args.state.read_text().strip() or None if args.state.exists() else None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(listen(args.url, args.token, args.state, last_id))


if __name__ == "__main__":
    main()
