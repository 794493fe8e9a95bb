"""What the `tidings` commands share: usage errors, failing with a message, the
--config flag, and minting a token with the configured (or dev) secret."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import Settings

__all__ = ["UsageError", "config_flag", "fail", "mint_token_for", "usage"]


class UsageError(Exception):
    """Ends the command with exit code 2 and ``tidings: <message>``."""


def mint_token_for(config: str | None, user: str, **claims: Any) -> str:
    from ..auth import mint_token

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


def config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="a TOML file of settings")


def usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def fail(message: str, code: int) -> int:
    print(f"tidings: {message}", file=sys.stderr, flush=True)
    return code
