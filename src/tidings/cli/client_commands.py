"""The commands that talk to a running server as its client: publish, listen."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from ..errors import TidingsError
from ..wire import SSEEvent, split_list
from .common import UsageError, config_flag, fail, mint_token_for

__all__ = ["listen_parser", "publish_parser"]

DEFAULT_URL = "http://127.0.0.1:8000"
T = TypeVar("T")
CLI_USER = "tidings-cli"  # who `publish` is, with a minted dev token and no API key


# -- publish ------------------------------------------------------------------------------------


def publish_parser(commands: Any) -> None:
    p = commands.add_parser(
        "publish",
        help="publish an event",
        description="Publish one event. DATA is JSON or plain text; `-` (or no DATA with "
        "stdin not a terminal) reads it from stdin. Prints the event id.",
    )
    _url_flag(p)
    creds = p.add_mutually_exclusive_group()
    creds.add_argument(
        "--key",
        default=os.environ.get("TIDINGS_API_KEY"),
        help="API key (env TIDINGS_API_KEY); without --key or --token, a dev token is minted",
    )
    creds.add_argument("--token", help="a user token with the `publish` right")
    p.add_argument("--tenant", help="tenant (default: the default tenant)")
    p.add_argument("--user", dest="users", action="append", default=[], help="repeatable")
    p.add_argument("--topic", dest="topics", action="append", default=[], help="repeatable")
    p.add_argument("--broadcast", action="store_true", help="to everyone in the tenant")
    p.add_argument("--event", default="message", help="event name (default: message)")
    p.add_argument("--idempotency-key")
    p.add_argument("data", nargs="?", metavar="DATA")
    config_flag(p)
    p.set_defaults(command=_publish)


def _publish(args: argparse.Namespace) -> int:
    from ..client import Publisher

    data = _read_data(args.data)
    credential = args.token or args.key
    if not credential:
        credential = mint_token_for(args.config, CLI_USER, tenant=args.tenant or "", publish=True)

    async def go() -> str:
        async with Publisher(args.url, credential) as publisher:
            return await publisher.publish(
                tenant=args.tenant,
                users=args.users,
                topics=args.topics,
                broadcast=args.broadcast,
                event=args.event,
                data=data,
                idempotency_key=args.idempotency_key,
            )

    try:
        event_id = _network(args.url, lambda: asyncio.run(go()))
    except _Failed as exc:
        return exc.code
    if sys.stdout.isatty():
        print(event_id)
    else:
        print(orjson.dumps({"id": event_id}).decode(), flush=True)
    return 0


def _read_data(value: str | None) -> Any:
    """DATA as JSON when it parses, else as text; `-` or absent+piped stdin reads stdin."""
    if value == "-" or (value is None and not sys.stdin.isatty()):
        value = sys.stdin.read().removesuffix("\n")
        if not value:
            return None
    if value is None:
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value


# -- listen -------------------------------------------------------------------------------------


def listen_parser(commands: Any) -> None:
    p = commands.add_parser(
        "listen",
        help="print a user's stream as it arrives",
        description="Tail a stream: reconnects with backoff and resumes from the last id. "
        "One JSON line per event when piped. Ctrl-C stops.",
    )
    _url_flag(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--token", help="the user's token")
    who.add_argument("--user", help="mint a token for this user with the dev secret")
    p.add_argument("--tenant", default="", help="with --user: the user's tenant")
    p.add_argument("--topics", help="topics to subscribe to: a,b")
    p.add_argument("--last-event-id", help="resume after this id")
    p.add_argument(
        "--transport",
        choices=("sse", "ws"),
        default="sse",
        help="read over Server-Sent Events (default) or a WebSocket",
    )
    p.add_argument(
        "--ws", dest="transport", action="store_const", const="ws", help="same as --transport ws"
    )
    config_flag(p)
    p.set_defaults(command=_listen)


def _listen(args: argparse.Namespace) -> int:
    from ..client import Subscriber

    topics = split_list(args.topics)
    tty = sys.stdout.isatty()

    def mint() -> str:
        return mint_token_for(args.config, args.user, tenant=args.tenant, topics=topics)

    async def fresh_token() -> str:
        return mint()

    def on_state(state: str) -> None:
        if tty and state in ("connecting", "reconnecting"):
            print(f"… {state} to {args.url}", file=sys.stderr, flush=True)

    async def go() -> None:
        try:
            subscriber = Subscriber(
                args.url,
                args.token or mint(),
                topics=topics,
                last_event_id=args.last_event_id,
                token_provider=fresh_token if args.user else None,
                on_state=on_state,
                transport=args.transport,
            )
        except ValueError as exc:  # a --url the WebSocket transport cannot use
            raise UsageError(str(exc)) from None
        async with subscriber:
            async for event in subscriber:
                print(_format_event(event, tty), flush=True)

    try:
        _network(args.url, lambda: asyncio.run(go()))
    except _Failed as exc:
        return exc.code
    except KeyboardInterrupt:
        return 0
    return 0


def _format_event(event: SSEEvent, tty: bool) -> str:
    if tty:
        return f"{event.event:<14} {event.id or '-':<28} {event.data}"
    try:
        data: Any = orjson.loads(event.data)
    except orjson.JSONDecodeError:
        data = event.data
    line: dict[str, Any] = {"event": event.event, "id": event.id, "data": data}
    topic = getattr(event, "topic", None)  # a WSEvent names its topic
    if topic is not None:
        line["topic"] = topic
    return orjson.dumps(line).decode()


# -- the network ---------------------------------------------------------------------------


class _Failed(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _network(url: str, call: Callable[[], T]) -> T:
    """Run a client call; the server's and the network's errors become a message and code 1."""
    import httpx

    try:
        return call()
    except TidingsError as exc:
        fail(f"{exc.status} {exc.code}: {exc.message}", 1)
        raise _Failed(1) from None
    except httpx.TransportError as exc:
        fail(f"cannot reach {url}: {exc or type(exc).__name__}", 1)
        raise _Failed(1) from None


def _url_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("TIDINGS_URL", DEFAULT_URL),
        help=f"the server (env TIDINGS_URL, default {DEFAULT_URL})",
    )
