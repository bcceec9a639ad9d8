"""Group commit (issue 12): concurrent writers share one fsync; nobody returns before theirs.

For the audit log see also tests/test_audit_log.py (concurrent appends share fsyncs).
"""

from __future__ import annotations

import threading
import time

import pytest

from dataops._group import GroupSync
from dataops.ledger import Ledger
from dataops.values import PrivacyLoss


def test_a_lone_write_is_synced_before_it_returns(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    before = ledger._group.syncs
    reservation = ledger.reserve(
        "city-bank",
        "enterprise_credit",
        0.5,
        0.0,
        grant_total=PrivacyLoss(5.0, 0.0),
        dataset_total=PrivacyLoss(30.0, 0.0),
    )
    assert ledger._group.syncs == before + 1  # reserve returned after its own WAL fsync
    ledger.commit(reservation)
    assert ledger._group.syncs == before + 2
    ledger.close()


def test_concurrent_debits_share_fsyncs_and_none_is_lost(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    real = ledger._store.sync_wal

    def slow_disk():
        time.sleep(0.003)
        real()

    monkeypatch.setattr(ledger._group, "_sync", slow_disk)
    before = ledger._group.syncs

    def debit(consumer):
        for _ in range(20):
            ledger.commit(
                ledger.reserve(
                    consumer,
                    "d",
                    0.01,
                    0.0,
                    grant_total=PrivacyLoss(5.0, 0.0),
                    dataset_total=PrivacyLoss(100.0, 0.0),
                )
            )

    threads = [threading.Thread(target=debit, args=(f"c{i}",)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    transactions = 16 * 20 * 2
    assert ledger._group.syncs - before < transactions / 2  # shared
    assert sum(ledger.spent(f"c{i}", "d").epsilon for i in range(16)) == pytest.approx(16 * 20 * 0.01)
    ledger.close()
    reopened = Ledger(tmp_path / "ledger.sqlite3")
    assert reopened.dataset_spent("d").epsilon == pytest.approx(3.2)
    reopened.close()


def test_without_group_commit_sqlite_syncs_in_every_commit_and_we_do_not(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite3", group_commit=False)
    mode = ledger._conn().execute("PRAGMA synchronous").fetchone()[0]
    ledger.reserve("c", "d", 0.1, 0.0, grant_total=PrivacyLoss(1.0, 0.0), dataset_total=PrivacyLoss(1.0, 0.0))
    assert mode == 2 and ledger._group.syncs == 0  # 2 = FULL
    ledger.close()


def test_a_waiter_returns_only_after_a_sync_that_started_after_its_write():
    events: list[str] = []
    lock = threading.Lock()

    def sync():
        with lock:
            events.append("sync-start")
        time.sleep(0.01)
        with lock:
            events.append("sync-end")

    group = GroupSync(sync)
    done = []

    def writer(i):
        with lock:
            events.append(f"write-{i}")
        group.wait()
        with lock:
            events.append(f"return-{i}")
        done.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(done) == list(range(12)) and group.syncs < 12
    for i in range(12):
        written, returned = events.index(f"write-{i}"), events.index(f"return-{i}")
        starts = [k for k, e in enumerate(events) if e == "sync-start" and written < k < returned]
        assert any("sync-end" in events[k:returned] for k in starts), i
