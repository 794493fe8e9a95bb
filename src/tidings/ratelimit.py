"""Token-bucket rate limits, per key (client IP, API key, tenant), in this process."""

from __future__ import annotations

import math
import time


class RateLimiter:
    """`rate` tokens per second, bursts up to `burst`; rate 0 turns it off.

    Buckets idle long enough to be full again are forgotten, so memory stays
    bounded by the number of recently active keys.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate * 2)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)
        self._last_sweep = time.monotonic()

    def acquire(self, key: str) -> float:
        """0 if allowed now, else the seconds to wait before trying again."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            self._sweep(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate

    def retry_after(self, key: str) -> int | None:
        """None if allowed now, else whole seconds for a `Retry-After` header."""
        wait = self.acquire(key)
        return None if wait == 0 else max(1, math.ceil(wait))

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        refill = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill}
