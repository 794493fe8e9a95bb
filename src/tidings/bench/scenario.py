"""What every scenario gets (`Context`) and what the command needs to know of one (`Spec`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .dial import Dial
from .procstat import ProcTree
from .report import BenchError, Headline, Progress
from .target import Target

__all__ = ["Context", "Result", "Servers", "Spec"]

Result = dict[str, Any]
# Starts `count` tidings instances on `broker` with the command's pinning and workers.
Servers = Callable[[int, str], contextlib.AbstractContextManager[Target]]


@dataclass(frozen=True, slots=True)
class Context:
    """One scenario run against one target (a scenario that starts its own has none)."""

    args: argparse.Namespace
    progress: Progress
    dial: Dial
    servers: Servers
    own: Target | None = None

    @property
    def target(self) -> Target:
        if self.own is None:
            raise BenchError("this scenario starts its own servers")
        return self.own

    def on(self, target: Target) -> Context:
        return dataclasses.replace(self, own=target)

    @property
    def tree(self) -> ProcTree:
        return ProcTree(self.target.pids)

    def new_topic(self) -> str:
        """--topic, else a fresh one per run (no history or stray markers of earlier runs)."""
        return str(self.args.topic or f"bench-{os.urandom(4).hex()}")

    @property
    def tenant(self) -> str:
        return str(self.args.tenant)


@dataclass(frozen=True, slots=True)
class Spec:
    """One scenario: how to run it and how to show and judge its result."""

    name: str
    run: Callable[[Context], Awaitable[Result]]
    default_n: int
    headline: Headline
    rows: tuple[tuple[str, str], ...]  # (label, field) for the table
    help: str
    nchan: bool = True  # also runs against Nchan (--compare)
    starts_servers: bool = False  # gets no target; starts what it needs with ctx.servers
