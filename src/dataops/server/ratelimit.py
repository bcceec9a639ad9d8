"""Per-consumer rate limits (a token bucket per consumer) and concurrency caps (`Admission`).

A malicious consumer must not starve the others or hammer the budget ledger; the
limits come from `[limits] rate_per_minute` and `rate_burst` in dataops.toml.

Replicas behind one address (`[ledger] url`, docs/scale-out.md) share each consumer's
bucket in the ledger's PostgreSQL database (`SharedRateLimiter`): with a bucket per
replica, N replicas would admit N times the configured rate. Concurrency caps stay per
replica: they protect that replica's threads.
"""

from __future__ import annotations

import threading
import time

from dataops.errors import LimitsUnavailable
from dataops.ledger_store import open_store


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

    def close(self) -> None:
        pass  # nothing held: the buckets are in memory


class SharedRateLimiter:
    """The token buckets of `RateLimiter`, one row per consumer in a PostgreSQL database
    shared by every replica.

    One statement takes a token or refuses: the refill since the row's last update,
    capped at the burst, must leave at least one token. ``INSERT ... ON CONFLICT DO
    UPDATE`` locks the consumer's row, so concurrent requests on any replica take
    tokens one at a time, and the time is the database's clock, which every replica
    reads alike. A store out of reach refuses the request (`LimitsUnavailable`).
    """

    _TAKE = (
        "INSERT INTO rate_buckets AS b (consumer, tokens, updated) "
        "VALUES (?, ?, extract(epoch FROM clock_timestamp())::float8) "
        "ON CONFLICT (consumer) DO UPDATE SET "
        "tokens = LEAST(?, b.tokens + (excluded.updated - b.updated) * ?) - 1, updated = excluded.updated "
        "WHERE LEAST(?, b.tokens + (excluded.updated - b.updated) * ?) >= 1 "
        "RETURNING tokens"
    )

    def __init__(self, url: str, per_minute: int, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.store = open_store(url)
        try:
            self.store.create(
                [
                    "CREATE TABLE IF NOT EXISTS rate_buckets (consumer TEXT PRIMARY KEY, "
                    "tokens DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL)"
                ]
            )
        except BaseException:
            self.store.close()
            raise

    def allow(self, consumer: str) -> bool:
        if self.burst < 1.0:
            return False
        params = (consumer, self.burst - 1.0, self.burst, self.rate, self.burst, self.rate)
        try:
            row = self.store.connection().execute(self._TAKE, params).fetchone()
        except Exception as exc:  # psycopg's errors: the database or the network
            raise LimitsUnavailable(
                "the replicas' shared rate limits cannot be checked; nothing was run, retry soon",
                rule="limits.shared",
            ) from exc
        return row is not None

    def close(self) -> None:
        self.store.close()


def rate_limiter(ledger_url: str | None, per_minute: int, burst: int) -> RateLimiter | SharedRateLimiter:
    """Shared by the replicas when the ledger is PostgreSQL (`[ledger] url`, checked to
    be one when the config is read), else this server's own."""
    if ledger_url is not None:
        return SharedRateLimiter(ledger_url, per_minute, burst)
    return RateLimiter(per_minute, burst)


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
