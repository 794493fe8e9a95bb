"""What `tidings migrate` and `tidings inbox purge` do; the CLI prints the results.

Both are plain functions (they run their own event loop), so the CLI calls them
as they are and owns all terminal output.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from ..config import Settings
from ..errors import BackendUnavailable, ConfigError
from .migrations import schema_revisions, upgrade_to_head
from .store import Inbox

__all__ = ["migrate", "purge"]


def migrate(settings: Settings) -> dict[str, Any]:
    """Bring TIDINGS_DATABASE_URL's inbox schema to head.

    Returns ``{"database": <url, password hidden>, "from": <revision or None>,
    "to": <head revision>}``; ``from == to`` means there was nothing to do.
    Raises BackendUnavailable when the database does not answer.
    """
    return asyncio.run(_migrate(settings.database_url))


async def _migrate(url: str) -> dict[str, Any]:
    where = make_url(url).render_as_string(hide_password=True)
    try:
        before, head = await schema_revisions(url)
        if before != head:
            await upgrade_to_head(url)
    except (OSError, sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
        raise BackendUnavailable(f"cannot reach the inbox database {where}: {exc}") from exc
    return {"database": where, "from": before, "to": head}


def purge(
    settings: Settings,
    older_than: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete notifications older than TIDINGS_INBOX_RETENTION (or `older_than` seconds).

    Returns how many were deleted; a retention of 0 keeps everything (returns 0).
    `progress(deleted_so_far)` is called after each batch of 5,000 (for a terminal).
    Raises ConfigError when the schema is not at head (run `migrate` first).
    """
    seconds = settings.inbox_retention if older_than is None else older_than
    if seconds <= 0:
        return 0
    return asyncio.run(_purge(settings.database_url, seconds, progress))


async def _purge(url: str, seconds: float, progress: Callable[[int], None] | None) -> int:
    inbox = Inbox(url)
    try:
        current, head = await schema_revisions(inbox.engine)
        if current != head:
            raise ConfigError("the inbox schema is not up to date: run `tidings migrate` first")
        return await inbox.purge(timedelta(seconds=seconds), progress)
    finally:
        await inbox.close()
