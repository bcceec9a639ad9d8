"""Per-consumer rate limits (a token bucket per consumer) and concurrency caps (`Admission`).

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


class Admission:
    """Concurrency caps applied in our code, before any work: per consumer and overall.

    gRPC's own `maximum_concurrent_rpcs` sheds requests before any interceptor runs,
    so they would leave no audit record; these caps answer RESOURCE_EXHAUSTED from the
    interceptor instead, which audits them like every other request. The per-consumer
    cap keeps one consumer's flood of slow queries from taking every engine thread
    another consumer needs.
    """

    def __init__(self, overall: int, per_consumer: int) -> None:
        self.overall = overall
        self.per_consumer = per_consumer
        self._lock = threading.Lock()
        self._total = 0
        self._by_consumer: dict[str, int] = {}

    def enter(self, consumer: str) -> str | None:
        """Take a slot for `consumer`; None if admitted, else which cap refused it."""
        with self._lock:
            held = self._by_consumer.get(consumer, 0)
            if held >= self.per_consumer:
                return "consumer"
            if self._total >= self.overall:
                return "server"
            self._by_consumer[consumer] = held + 1
            self._total += 1
            return None

    def leave(self, consumer: str) -> None:
        with self._lock:
            held = self._by_consumer[consumer] - 1
            if held:
                self._by_consumer[consumer] = held
            else:
                del self._by_consumer[consumer]
            self._total -= 1

    def in_flight(self, consumer: str | None = None) -> int:
        with self._lock:
            return self._total if consumer is None else self._by_consumer.get(consumer, 0)
