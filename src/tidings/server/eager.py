"""Run a coroutine at once, up to its first suspension; a task only for the rest.

A publish on the memory backend never suspends: run as a task it costs a task and a
turn of the event loop before its answer leaves. `start` steps the coroutine right
away (as Python 3.12's eager tasks do); one that does suspend goes on in a task, which
hands it what it awaits and its cancellation. Unlike a 3.12 eager task, the first
steps run outside any task (`asyncio.current_task()` is None there), so only code
that asks for no task before it first suspends may start here (`asyncio.timeout` and
anyio's cancel scopes ask): `fastpublish.may_start_eagerly` says when a publish is such.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


def start(
    coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop
) -> asyncio.Task[None] | None:
    """Step `coro` now; None if it finished, else the task that goes on with it.

    An exception from the first steps propagates to the caller.
    """
    try:
        awaited = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_go_on(coro, awaited))


async def _go_on(coro: Coroutine[Any, Any, None], awaited: Any) -> None:
    await _Resumed(coro, awaited)


class _Resumed:
    """Awaiting this continues `coro`, which already yielded `awaited` to the loop."""

    __slots__ = ("awaited", "coro")

    def __init__(self, coro: Coroutine[Any, Any, None], awaited: Any) -> None:
        self.coro, self.awaited = coro, awaited

    def __await__(self) -> Generator[Any, Any, None]:
        coro, awaited = self.coro, self.awaited
        while True:
            try:
                sent = yield awaited  # the task waits for it as `coro` asked
            except BaseException as exc:  # cancellation, or the task being closed
                try:
                    awaited = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    awaited = coro.send(sent)
                except StopIteration:
                    return
