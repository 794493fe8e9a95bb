"""The commands that run or maintain a server: serve, migrate, inbox purge, token."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from ..config import Settings, parse_duration
from ..wire import split_list
from .common import UsageError, config_flag, mint_token_for, usage

__all__ = ["inbox_parser", "migrate_parser", "serve_parser", "token_parser"]


# -- migrate and inbox purge ----------------------------------------------------------------------


def migrate_parser(commands: Any) -> None:
    p = commands.add_parser(
        "migrate",
        help="apply the inbox's database migrations",
        description="Bring TIDINGS_DATABASE_URL's schema to the newest revision (idempotent).",
    )
    config_flag(p)
    p.add_argument("--database-url", help="SQLAlchemy URL (TIDINGS_DATABASE_URL)")
    p.set_defaults(command=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    from ..inbox.commands import migrate

    result = migrate(Settings.load(args.config, database_url=args.database_url))
    if sys.stdout.isatty():
        done = "already at" if result["from"] == result["to"] else f"{result['from']} ->"
        print(f"{result['database']}: {done} {result['to']}")
    else:
        print(orjson.dumps(result).decode())
    return 0


def inbox_parser(commands: Any) -> None:
    p = commands.add_parser("inbox", help="inbox maintenance")
    actions = p.add_subparsers(title="actions", metavar="ACTION")
    purge = actions.add_parser(
        "purge",
        help="delete notifications older than the retention",
        description="Delete notifications older than TIDINGS_INBOX_RETENTION (or --older-than).",
    )
    config_flag(purge)
    purge.add_argument("--database-url", help="SQLAlchemy URL (TIDINGS_DATABASE_URL)")
    purge.add_argument("--older-than", help="a duration such as 30d (default: the retention)")
    purge.set_defaults(command=_purge)
    p.set_defaults(command=lambda _args: usage(p))


def _purge(args: argparse.Namespace) -> int:
    from ..inbox.commands import purge

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


def serve_parser(commands: Any) -> None:
    p = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the server. Flags win over TIDINGS_* variables, which win over --config.",
    )
    config_flag(p)
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
    from ..server.run import serve  # the server's imports are not needed by other commands

    serve(settings)
    return 0


# -- token --------------------------------------------------------------------------------------


def token_parser(commands: Any) -> None:
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
    config_flag(p)
    p.set_defaults(command=_token)


def _token(args: argparse.Namespace) -> int:
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise UsageError(f"--ttl {exc}") from None
    print(
        mint_token_for(
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
