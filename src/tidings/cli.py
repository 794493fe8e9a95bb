"""The `tidings` command: serve, token, publish, listen, migrate, inbox, bench (API.md §10).

Every command writes its result to stdout and everything else to stderr;
piped, the result is machine-readable (JSON lines) and progress stays quiet.
Exit codes: 0 done, 1 the server or the network failed us, 2 bad usage or
configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson

from . import bench
from .config import Settings, parse_duration
from .errors import ConfigError, TidingsError
from .wire import SSEEvent, split_list

__all__ = ["build_parser", "main", "run"]

DEFAULT_URL = "http://127.0.0.1:8000"
T = TypeVar("T")
CLI_USER = "tidings-cli"  # who `publish` is, with a minted dev token and no API key


class UsageError(Exception):
    """Ends the command with exit code 2 and ``tidings: <message>``."""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `tidings` script and of ``python -m tidings``."""
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except (UsageError, ConfigError) as exc:
        return _fail(str(exc), 2)
    except BrokenPipeError:
        # `tidings listen | head -1`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidings",
        description="Real-time notifications: SSE and WebSocket push, exact resume, an inbox.",
    )
    parser.set_defaults(command=lambda _args: _usage(parser))
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _serve_parser(commands)
    _token_parser(commands)
    _publish_parser(commands)
    _listen_parser(commands)
    _migrate_parser(commands)
    _inbox_parser(commands)
    bench.add_parser(commands)
    return parser


# -- migrate and inbox purge ----------------------------------------------------------------------


def _migrate_parser(commands: Any) -> None:
    p = commands.add_parser(
        "migrate",
        help="apply the inbox's database migrations",
        description="Bring TIDINGS_DATABASE_URL's schema to the newest revision (idempotent).",
    )
    _config_flag(p)
    p.add_argument("--database-url", help="SQLAlchemy URL (TIDINGS_DATABASE_URL)")
    p.set_defaults(command=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    from .inbox.commands import migrate

    result = migrate(Settings.load(args.config, database_url=args.database_url))
    if sys.stdout.isatty():
        done = "already at" if result["from"] == result["to"] else f"{result['from']} ->"
        print(f"{result['database']}: {done} {result['to']}")
    else:
        print(orjson.dumps(result).decode())
    return 0


def _inbox_parser(commands: Any) -> None:
    p = commands.add_parser("inbox", help="inbox maintenance")
    actions = p.add_subparsers(title="actions", metavar="ACTION")
    purge = actions.add_parser(
        "purge",
        help="delete notifications older than the retention",
        description="Delete notifications older than TIDINGS_INBOX_RETENTION (or --older-than).",
    )
    _config_flag(purge)
    purge.add_argument("--database-url", help="SQLAlchemy URL (TIDINGS_DATABASE_URL)")
    purge.add_argument("--older-than", help="a duration such as 30d (default: the retention)")
    purge.set_defaults(command=_purge)
    p.set_defaults(command=lambda _args: _usage(p))


def _purge(args: argparse.Namespace) -> int:
    from .inbox.commands import purge

    settings = Settings.load(args.config, database_url=args.database_url)
    older = parse_duration(args.older_than) if args.older_than else None
    tty = sys.stderr.isatty()

    def progress(done: int) -> None:
        if tty:
            print(f"\rdeleted {done}…", end="", file=sys.stderr, flush=True)

    deleted = purge(settings, older, progress)
    if tty:
        print(file=sys.stderr)
    if sys.stdout.isatty():
        print(f"deleted {deleted} notifications")
    else:
        print(orjson.dumps({"deleted": deleted}).decode())
    return 0


# -- serve --------------------------------------------------------------------------------------


def _serve_parser(commands: Any) -> None:
    p = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the server. Flags win over TIDINGS_* variables, which win over --config.",
    )
    _config_flag(p)
    p.add_argument("--host", help="interface to listen on (TIDINGS_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (TIDINGS_PORT, default 8000)")
    p.add_argument("--broker-url", help="memory://, redis://... or nats://... (TIDINGS_BROKER_URL)")
    p.add_argument("--database-url", help="SQLAlchemy URL (TIDINGS_DATABASE_URL)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument("--workers", type=int, help="worker processes (TIDINGS_WORKERS)")
    p.set_defaults(command=_serve)


def _serve(args: argparse.Namespace) -> int:
    settings = Settings.load(
        args.config,
        host=args.host,
        port=args.port,
        broker_url=args.broker_url,
        database_url=args.database_url,
        log_level=args.log_level,
        log_format=args.log_format,
        workers=args.workers,
    )
    from .server.run import serve  # the server's imports are not needed by other commands

    serve(settings)
    return 0


# -- token --------------------------------------------------------------------------------------


def _token_parser(commands: Any) -> None:
    p = commands.add_parser(
        "token",
        help="mint a user token with the configured secret",
        description="Print an HS256 token signed with TIDINGS_JWT_SECRET (on loopback without "
        "one: the dev secret that `tidings serve` keeps beside the database).",
    )
    p.add_argument("--user", required=True, help="the user id (`sub`)")
    p.add_argument("--tenant", default="", help="tenant (default: the default tenant)")
    p.add_argument("--topics", help="topic patterns the user may subscribe to: a,b:*,c:**")
    p.add_argument("--publish", action="store_true", help="allow publishing")
    p.add_argument("--admin", action="store_true", help="allow stats and presence of the tenant")
    p.add_argument("--name", help="display name")
    p.add_argument("--ttl", default="24h", help="lifetime: 30s, 15m, 24h... (default 24h)")
    _config_flag(p)
    p.set_defaults(command=_token)


def _token(args: argparse.Namespace) -> int:
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise UsageError(f"--ttl {exc}") from None
    print(
        _mint(
            args.config,
            args.user,
            tenant=args.tenant,
            topics=split_list(args.topics),
            publish=args.publish,
            admin=args.admin,
            name=args.name,
            ttl_s=ttl,
        )
    )
    return 0


def _mint(config: str | None, user: str, **claims: Any) -> str:
    from .auth import mint_token

    settings = Settings.load(config).with_dev_secret()
    if settings.jwt_secret is None:
        raise UsageError(
            "cannot mint a token: TIDINGS_JWT_SECRET is not set. With TIDINGS_JWT_PUBLIC_KEY "
            "or TIDINGS_JWT_JWKS_URL (RS256/ES256) tokens come from whoever holds the private "
            "key; off loopback there is no dev secret"
        )
    try:
        return mint_token(
            settings.jwt_secret.get_secret_value(),
            user,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            **claims,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# -- publish ------------------------------------------------------------------------------------


def _publish_parser(commands: Any) -> None:
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
    _config_flag(p)
    p.set_defaults(command=_publish)


def _publish(args: argparse.Namespace) -> int:
    from .client import Publisher

    data = _read_data(args.data)
    credential = args.token or args.key
    if not credential:
        credential = _mint(args.config, CLI_USER, tenant=args.tenant or "", publish=True)

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


def _listen_parser(commands: Any) -> None:
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
    _config_flag(p)
    p.set_defaults(command=_listen)


def _listen(args: argparse.Namespace) -> int:
    from .client import Subscriber

    topics = split_list(args.topics)
    tty = sys.stdout.isatty()

    def mint() -> str:
        return _mint(args.config, args.user, tenant=args.tenant, topics=topics)

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


# -- shared -------------------------------------------------------------------------------------


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
        _fail(f"{exc.status} {exc.code}: {exc.message}", 1)
        raise _Failed(1) from None
    except httpx.TransportError as exc:
        _fail(f"cannot reach {url}: {exc or type(exc).__name__}", 1)
        raise _Failed(1) from None


def _url_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("TIDINGS_URL", DEFAULT_URL),
        help=f"the server (env TIDINGS_URL, default {DEFAULT_URL})",
    )


def _config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="a TOML file of settings")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _fail(message: str, code: int) -> int:
    print(f"tidings: {message}", file=sys.stderr, flush=True)
    return code
