"""What every route needs: settings, the hub and the authenticator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..auth import Principal, RequestAuthenticator
from ..config import Settings
from ..hub import Hub
from ..metrics import Metrics
from ..ratelimit import RateLimiter


async def _no_inbox(principal: Principal) -> int:
    return 0


@dataclass(slots=True)
class State:
    settings: Settings
    hub: Hub
    authenticator: RequestAuthenticator
    metrics: Metrics
    unread_count: Callable[[Principal], Awaitable[int]] = field(default=_no_inbox)
    connect_limit: RateLimiter = field(default_factory=lambda: RateLimiter(0))
    publish_limit: RateLimiter = field(default_factory=lambda: RateLimiter(0))
