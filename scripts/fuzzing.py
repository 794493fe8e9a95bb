"""What the fuzz_*.py scripts share: their arguments, and rounds of concurrent tries."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable


def arguments(doc: str | None) -> tuple[argparse.Namespace, random.Random]:
    """--port, --key, --secret, --seconds, --seed; and a random source seeded with --seed."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--key", required=True, help="an API key of the server")
    parser.add_argument("--secret", required=True, help="the server's TIDINGS_JWT_SECRET")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    return args, random.Random(args.seed)


async def rounds(one: Callable[[], Awaitable[None]], seconds: float, width: int = 20) -> None:
    """`width` tries at a time until `seconds` have passed."""
    end = time.time() + seconds
    while time.time() < end:
        await asyncio.gather(*(one() for _ in range(width)))
