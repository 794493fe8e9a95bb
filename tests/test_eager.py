"""`server/eager.py`: a coroutine runs at once up to its first suspension, a task after."""

from __future__ import annotations

import asyncio

import pytest

from tidings.server import eager


async def test_a_coroutine_that_never_suspends_is_done_before_start_returns() -> None:
    done: list[str] = []

    async def work() -> None:
        done.append("ran")

    assert eager.start(work(), asyncio.get_running_loop()) is None
    assert done == ["ran"]


async def test_a_coroutine_that_suspends_goes_on_in_a_task_with_what_it_awaited() -> None:
    loop = asyncio.get_running_loop()
    first: asyncio.Future[str] = loop.create_future()
    seen: list[object] = []

    async def work() -> None:
        seen.append(asyncio.current_task())  # the caller's: the first steps ran in its call
        seen.append(await first)
        await asyncio.sleep(0)  # a bare yield, too
        seen.append(asyncio.current_task())

    caller = asyncio.current_task()
    task = eager.start(work(), loop)
    assert task is not None and seen == [caller]
    first.set_result("value")
    await task
    assert seen == [caller, "value", task]


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    loop = asyncio.get_running_loop()
    never: asyncio.Future[None] = loop.create_future()
    events: list[str] = []

    async def work() -> None:
        try:
            await never
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    task = eager.start(work(), loop)
    assert task is not None
    await asyncio.sleep(0)  # let the task take over the wait
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events == ["cancelled"] and never.cancelled()


async def test_errors_propagate_from_the_first_steps_and_from_the_task() -> None:
    loop = asyncio.get_running_loop()

    async def fails_at_once() -> None:
        raise ValueError("now")

    with pytest.raises(ValueError, match="now"):
        eager.start(fails_at_once(), loop)

    later: asyncio.Future[None] = loop.create_future()

    async def fails_later() -> None:
        await later
        raise ValueError("later")

    task = eager.start(fails_later(), loop)
    assert task is not None
    later.set_result(None)
    with pytest.raises(ValueError, match="later"):
        await task
