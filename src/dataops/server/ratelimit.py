"""Per-consumer rate limits: a token bucket per consumer identity.

A malicious consumer must not starve the others or hammer the budget ledger; the
limits come from `[limits] rate_per_minute` and `rate_burst` in dataops.toml.
"""

from __future__ import annotations

import threading
import time


class RateLimiter:
    def __init__(self, per_minute: int, burst: int, clock=time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # consumer -> (tokens, last refill)

    def allow(self, consumer: str) -> bool:
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(consumer, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[consumer] = (tokens - 1.0 if allowed else tokens, now)
            return allowed
