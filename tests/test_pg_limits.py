"""Rate limits shared by server replicas (docs/scale-out.md).

With `[ledger] url` set, each consumer's token bucket is one row in the ledger's
PostgreSQL database (`dataops.server.ratelimit.SharedRateLimiter`), so N replicas
admit the configured rate once, not N times. Switched off (a bucket per replica, as
before), two replicas admit twice the burst: the tests show both.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from dataops.errors import LimitsUnavailable
from dataops.server.ratelimit import RateLimiter, SharedRateLimiter, rate_limiter
from pg_support import race_replicas

SLOW = 1  # one token a minute: within a test the burst is all there is


def test_two_replicas_share_one_burst(pg_url):
    a, b = SharedRateLimiter(pg_url, SLOW, 5), SharedRateLimiter(pg_url, SLOW, 5)
    admitted = [(a if i % 2 else b).allow("city-bank") for i in range(12)]
    assert admitted == [True] * 5 + [False] * 7
    assert a.allow("river-bank") and b.allow("river-bank")  # each consumer its own bucket
    a.close()
    b.close()


def test_switched_off_a_bucket_per_replica_admits_the_burst_on_each():
    # The control off: each replica's own in-memory bucket, as before the buckets moved.
    a, b = RateLimiter(SLOW, 5), RateLimiter(SLOW, 5)
    admitted = [(a if i % 2 else b).allow("city-bank") for i in range(12)]
    assert admitted.count(True) == 10  # twice the burst


def test_the_bucket_refills_at_the_configured_rate(pg_url):
    limiter = SharedRateLimiter(pg_url, 6_000, 1)  # 100 tokens a second, one at a time
    assert limiter.allow("city-bank") and not limiter.allow("city-bank")
    time.sleep(0.05)  # five tokens' worth, capped at the burst of one
    assert limiter.allow("city-bank") and not limiter.allow("city-bank")
    limiter.close()


def _replica(url: str, attempts: int, barrier, results) -> None:
    limiter = SharedRateLimiter(url, SLOW, 5)
    barrier.wait()
    results.put(sum(limiter.allow("city-bank") for _ in range(attempts)))
    limiter.close()


def test_replica_processes_racing_on_one_bucket_admit_exactly_the_burst(pg_url):
    SharedRateLimiter(pg_url, SLOW, 5).close()  # the table exists before the race
    assert sum(race_replicas(_replica, [(pg_url, 4)] * 8)) == 5


def test_a_store_out_of_reach_refuses_rather_than_admits(pg_url):
    limiter = SharedRateLimiter(pg_url, SLOW, 5)
    assert limiter.allow("city-bank")
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("DROP TABLE rate_buckets")
    with pytest.raises(LimitsUnavailable) as refused:
        limiter.allow("city-bank")
    assert refused.value.rule == "limits.shared" and refused.value.retry_after_seconds >= 1
    limiter.close()


def test_the_server_shares_its_buckets_only_with_a_postgresql_ledger(pg_url):
    shared = rate_limiter(pg_url, SLOW, 5)
    assert isinstance(shared, SharedRateLimiter)
    shared.close()
    assert isinstance(rate_limiter(None, SLOW, 5), RateLimiter)


@pytest.mark.parametrize("shared", [True, False], ids=["postgresql", "per-replica"])
def test_two_server_replicas_admit_one_burst(pg_url, tmp_path, sandbox_dir, pki, shared):
    """Two servers with a burst of 3: ListDatasets sent to both in turn is answered 3
    times with the ledger in PostgreSQL, 6 times with a bucket per replica."""
    import json

    from conftest import write_config
    from dataops.client import Client, DataopsClientError
    from dataops.server import build_server

    servers, clients, outcomes = [], [], []
    try:
        for name in ("a", "b"):
            root = tmp_path / name
            root.mkdir()
            extra = f'[audit]\norigin = "dataops-{name}"\n'
            if shared:
                extra = f"[ledger]\nurl = {json.dumps(pg_url)}\n" + extra
            config = write_config(root, sandbox_dir, pki, extra=extra, rate_per_minute=SLOW, rate_burst=3)
            servers.append(build_server(config).start())
        for running in servers:
            clients.append(
                Client.from_directory(f"localhost:{running.port}", pki.consumer_dir("city-bank"), "city-bank")
            )
        for i in range(8):
            try:
                clients[i % 2].list_datasets()
                outcomes.append("OK")
            except DataopsClientError as exc:
                outcomes.append(f"{exc.code.name} {exc.rule}")
    finally:
        for client in clients:
            client.close()
        for running in servers:
            running.stop(grace=1.0)
    answered = 3 if shared else 6
    assert outcomes == ["OK"] * answered + ["RESOURCE_EXHAUSTED limits.rate"] * (8 - answered)
