"""What every route needs: settings, the hub and the authenticator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..auth import Principal, RequestAuthenticator
from ..config import Settings
from ..hub import Hub


async def _no_inbox(principal: Principal) -> int:
    return 0


@dataclass(slots=True)
class State:
    settings: Settings
    hub: Hub
    authenticator: RequestAuthenticator
    unread_count: Callable[[Principal], Awaitable[int]] = field(default=_no_inbox)
