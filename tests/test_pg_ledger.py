"""The PostgreSQL ledger (issue 12.5): server replicas in separate processes share one
database, and racing on the last of a budget they never overspend it.

Each replica here is a `Ledger` in its own process (spawned: no state shared but the
database), all released at once by a barrier. The behaviour tests of the ledger
(tests/test_ledger.py, tests/test_zcdp_ledger.py) run on PostgreSQL too, through the
`ledger_at` fixture; this file is about what only several replicas can do.

To make the race certain rather than likely, a replica may pause after each read of
what has been spent (`pause`), widening the window between check and debit. The same
pause is used with the budget row lock on and off: only the lock differs.
"""

from __future__ import annotations

import multiprocessing
import time

import pytest

from dataops import ledger as ledger_module
from dataops.audit.merge import merge_logs
from dataops.audit.signing import load_public_key
from dataops.ledger import BudgetExhaustedError, Ledger, State
from dataops.values import PrivacyLoss
from pg_support import pause_after, race_replicas

GRANT = PrivacyLoss(5.0, 1e-6)


def _replica(
    url: str, consumer: str, attempts: int, totals, pause: float, lock: bool, barrier, results
) -> None:
    if pause:
        pause_after(ledger_module, "_sums", pause)  # between the read of the spend and the debit
    ledger = Ledger(url, recover=False, lock_budgets=lock)
    barrier.wait()
    won = 0
    for _ in range(attempts):
        try:
            ledger.reserve(consumer, "credit", 1.0, 1e-9, **totals)
            won += 1
        except BudgetExhaustedError:
            pass
    ledger.close()
    results.put(won)


def race(
    url: str, consumers: list[str], attempts: int, totals, *, pause: float = 0.0, lock: bool = True
) -> int:
    """One replica process per consumer; the reservations they won, in all."""
    Ledger(url).close()  # the schema exists before the race
    return sum(race_replicas(_replica, [(url, c, attempts, totals, pause, lock) for c in consumers]))


def spent_rows(url: str) -> int:
    with Ledger(url, recover=False) as ledger:
        rows = ledger._conn().execute("SELECT status FROM reservations").fetchall()
    return sum(State(status).spent for (status,) in rows)


@pytest.mark.parametrize("pause", [0.0, 0.02])
def test_replicas_racing_on_the_last_of_a_grant_spend_exactly_the_budget(pg_url, pause):
    totals = dict(grant_total=GRANT, dataset_total=PrivacyLoss(100.0, 1e-6))
    won = race(pg_url, ["bank"] * 8, 6, totals, pause=pause)  # 48 attempts at 5 units
    assert won == 5
    with Ledger(pg_url, recover=False) as ledger:
        assert ledger.spent("bank", "credit") == PrivacyLoss(5.0, 5e-9)
        assert ledger.dataset_spent("credit") == PrivacyLoss(5.0, 5e-9)
    assert spent_rows(pg_url) == 5


def test_colluding_consumers_on_different_replicas_share_the_dataset_cap(pg_url):
    # Each consumer's first debit inserts its own grant row: a lock on the grant's row
    # alone would not see the others'. The dataset's budget row serialises them all.
    totals = dict(grant_total=PrivacyLoss(10.0, 1e-6), dataset_total=PrivacyLoss(5.0, 1e-6))
    won = race(pg_url, [f"bank-{i}" for i in range(8)], 3, totals, pause=0.02)
    assert won == 5
    with Ledger(pg_url, recover=False) as ledger:
        assert ledger.dataset_spent("credit") == PrivacyLoss(5.0, 5e-9)
        assert sum(s.spent.epsilon for s in ledger.budgets() if s.consumer is not None) == 5.0


def test_without_the_budget_row_lock_replicas_overspend(pg_url):
    # The control switched off: the same race, the same pause, no FOR UPDATE. Every
    # replica reads "nothing spent" before any has debited, and all are admitted.
    totals = dict(grant_total=GRANT, dataset_total=PrivacyLoss(100.0, 1e-6))
    won = race(pg_url, ["bank"] * 8, 1, totals, pause=0.3, lock=False)
    with Ledger(pg_url, recover=False) as ledger:
        epsilon, _ = ledger.spent("bank", "credit")
    assert won > 5 and epsilon == won > GRANT.epsilon  # overspent


def test_with_the_lock_the_same_pausing_race_spends_exactly_the_budget(pg_url):
    url = pg_url
    totals = dict(grant_total=GRANT, dataset_total=PrivacyLoss(100.0, 1e-6))
    assert race(url, ["bank"] * 8, 1, totals, pause=0.3, lock=True) == 5
    with Ledger(url, recover=False) as ledger:
        assert ledger.spent("bank", "credit").epsilon == 5.0


def _open(url: str, barrier, results) -> None:
    barrier.wait()
    with Ledger(url) as ledger:
        results.put(ledger.spent("bank", "credit"))


def test_replicas_starting_at_once_create_the_schema_once(pg_url):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_open, args=(pg_url, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    assert [results.get(timeout=60) for _ in procs] == [PrivacyLoss.zero()] * 4
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0


def test_a_refund_on_one_replica_is_seen_by_the_other(pg_url):
    totals = dict(grant_total=PrivacyLoss(1.0, 0.0), dataset_total=PrivacyLoss(1.0, 0.0))
    with Ledger(pg_url) as one, Ledger(pg_url, recover=False) as two:
        r = one.reserve("bank", "credit", 1.0, 0.0, **totals)
        with pytest.raises(BudgetExhaustedError):
            two.reserve("bank", "credit", 0.5, 0.0, **totals)
        two.refund(r)  # any replica may settle any reservation
        assert one.spent("bank", "credit") == PrivacyLoss(0.0, 0.0)
        stored = one.commit(
            one.reserve("bank", "credit", 1.0, 0.0, **totals),
            release_key="ef" * 32,
            payload=b"noisy",
            metadata="{}",
        )
        assert two.find_release("ef" * 32) == stored


def test_a_replica_starting_orphans_only_the_open_reservations_of_replicas_that_are_gone(pg_url):
    totals = dict(grant_total=PrivacyLoss(5.0, 0.0), dataset_total=PrivacyLoss(5.0, 0.0))
    running, stopped = Ledger(pg_url), Ledger(pg_url)
    live = running.reserve("bank", "credit", 1.0, 0.0, **totals)
    dead = stopped.reserve("bank", "credit", 1.0, 0.0, **totals)
    stopped.close()  # its session ends: its owner lock is released
    with Ledger(pg_url) as starting:  # recover(): the running replica's stays open
        states = dict(starting._conn().execute("SELECT id, status FROM reservations").fetchall())
        assert states == {live.id: "reserved", dead.id: "orphaned"}
        running.refund(live)  # so its owner can still return it...
        assert starting.spent("bank", "credit") == PrivacyLoss(1.0, 0.0)
        starting.refund(dead)  # ...while the orphan stays spent
        assert starting.spent("bank", "credit") == PrivacyLoss(1.0, 0.0)
    running.close()


def test_a_killed_replicas_open_reservations_are_orphaned(pg_url):
    import os
    import signal
    import subprocess
    import sys

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dataops.ledger import Ledger; from dataops.values import PrivacyLoss;"
            "led = Ledger(sys.argv[1]);"
            "total = PrivacyLoss(5.0, 0.0);"
            "r = led.reserve('bank', 'credit', 1.0, 0.0, grant_total=total, dataset_total=total);"
            "print(r.id, flush=True); time.sleep(600)",
            pg_url,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    reservation_id = int(child.stdout.readline())
    with Ledger(pg_url) as other:  # the child is alive: its reservation is left open
        assert other._conn().execute("SELECT status FROM reservations").fetchall() == [("reserved",)]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 30
    while True:  # the server ends the session once it sees the socket closed
        with Ledger(pg_url) as other:
            rows = other._conn().execute("SELECT id, status FROM reservations").fetchall()
            if rows == [(reservation_id, "orphaned")] or time.monotonic() > deadline:
                break
        time.sleep(0.1)
    assert rows == [(reservation_id, "orphaned")]
    with Ledger(pg_url, recover=False) as other:
        assert other.spent("bank", "credit") == PrivacyLoss(1.0, 0.0)  # spent for ever


def test_the_location_hides_a_password(postgres):
    url = postgres.url().replace("postgres@", "postgres:s3cret@")
    with Ledger(url, recover=False) as ledger:  # trust auth: the password is not checked
        assert "s3cret" not in ledger.location and "postgres:***@" in ledger.location


# -- two real server replicas -------------------------------------------------------

REPLICA = (
    "import sys; from pathlib import Path; from dataops.config import load_config;"
    "from dataops.server import build_server;"
    "s = build_server(load_config(Path(sys.argv[1]))).start();"
    "Path(sys.argv[2]).write_text(str(s.port)); s.serve_until_signal()"
)


def test_two_server_replicas_racing_on_the_last_of_a_budget_never_overspend(
    pg_url, tmp_path, sandbox_dir, pki
):
    """Two `dataops serve` processes, each with its own state and audit log, one
    PostgreSQL ledger: DP requests sent to both at once spend exactly the grant."""
    import json
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from conftest import audit_records, write_config
    from dataops.client import AuditVerificationError, Client, DataopsClientError
    from test_dp_service import dp_query, set_budget

    configs, procs, clients = [], [], []
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        extra = f'[ledger]\nurl = {json.dumps(pg_url)}\n[audit]\norigin = "dataops-{name}"\n'
        config = write_config(root, sandbox_dir, pki, extra=extra)
        set_budget(config, "city-bank", 1.0)
        configs.append(config)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        for config in configs:
            port = config.paths.state.parent / "port"
            toml = config.paths.state.parent / "dataops.toml"
            procs.append(subprocess.Popen([sys.executable, "-c", REPLICA, str(toml), str(port)], env=env))
        for config, proc in zip(configs, procs):
            port = config.paths.state.parent / "port"
            deadline = time.monotonic() + 60
            while not port.exists():
                assert time.monotonic() < deadline and proc.poll() is None, "a replica did not start"
                time.sleep(0.05)
            clients.append(
                Client.from_directory(
                    f"localhost:{port.read_text()}", pki.consumer_dir("city-bank"), "city-bank"
                )
            )

        def attempt(i: int):
            try:  # distinct questions (no reuse), alternating between the replicas
                return dp_query(clients[i % 2], 0.25, year=1960 + i)
            except DataopsClientError as exc:
                return exc

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(attempt, range(16)))

        # A witnessing client follows one log: a checkpoint held from replica a is not
        # one of replica b's log (docs/scale-out.md: clients need connection affinity).
        held = tmp_path / "checkpoint"
        for config in configs:  # a client of replica a, then one of b given a's checkpoint file
            port = (config.paths.state.parent / "port").read_text()
            clients.append(
                Client.from_directory(
                    f"localhost:{port}", pki.consumer_dir("city-bank"), "city-bank", checkpoint_file=held
                )
            )
            if len(clients) == 3:
                clients[2].budgets()
        with pytest.raises(AuditVerificationError, match="but this client witnesses 'dataops-a'"):
            clients[3].budgets()
    finally:
        for client in clients:
            client.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    answered = [o for o in outcomes if not isinstance(o, DataopsClientError)]
    refused = [o for o in outcomes if isinstance(o, DataopsClientError)]
    assert len(answered) == 4 and all(r.reason == "BUDGET_EXHAUSTED" for r in refused)
    with Ledger(pg_url, recover=False) as ledger:
        assert ledger.spent("city-bank", "enterprise_credit").epsilon == pytest.approx(1.0)
    # Each replica's own audit log records what it answered; together, the whole spend.
    audited = [
        r["epsilon_spent"] for config in configs for r in audit_records(config) if r.get("epsilon_spent")
    ]
    assert len(audited) == 4 and sum(audited) == pytest.approx(1.0)
    # The reviewer's merged view: both logs verify, and their spend is the ledger's.
    dirs = [c.paths.state / "audit" for c in configs]
    merged = merge_logs(dirs, [load_public_key(d / "signing.pub") for d in dirs])
    assert merged.ok and [n for n, _ in merged.verifications] == ["dataops-a", "dataops-b"]
    assert merged.spend == {("city-bank", "enterprise_credit"): (10**12, 0)}
