"""The `tidings` command: serve, token, publish, listen, migrate, inbox, bench (API.md §10).

Every command writes its result to stdout and everything else to stderr;
piped, the result is machine-readable (JSON lines) and progress stays quiet.
Exit codes: 0 done, 1 the server or the network failed us, 2 bad usage or
configuration.

Commands live in server_commands.py (serve, migrate, inbox purge, token) and
client_commands.py (publish, listen); what they share, in common.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .. import bench
from ..errors import ConfigError
from .client_commands import listen_parser, publish_parser
from .common import UsageError, fail, usage
from .server_commands import inbox_parser, migrate_parser, serve_parser, token_parser

__all__ = ["build_parser", "main", "run"]


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
        return fail(str(exc), 2)
    except BrokenPipeError:
        # `tidings listen | head -1`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidings",
        description="Real-time notifications: SSE and WebSocket push, exact resume, an inbox.",
    )
    parser.set_defaults(command=lambda _args: usage(parser))
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    serve_parser(commands)
    token_parser(commands)
    publish_parser(commands)
    listen_parser(commands)
    migrate_parser(commands)
    inbox_parser(commands)
    bench.add_parser(commands)
    return parser
