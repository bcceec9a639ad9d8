"""Consent use counts shared by server replicas (issue 12.5, docs/scale-out.md).

With `[ledger] url` set, every replica counts a consent's uses in the ledger's
PostgreSQL database (`dataops.consent.consent_location`), so a consent given for one
use is used once across all replicas, not once on each. The count is checked and
raised in one transaction that locks the count's row first.

The race tests follow tests/test_pg_ledger.py: each replica is a `ConsentStore` in its
own process (spawned: nothing shared but the database), released at once by a
barrier, and may pause after reading the count (`pause`), widening the window between
check and increment. The same pause runs with the row lock on and off: only the lock
differs. The behaviour tests run on both stores (`ledger_at`: a SQLite file, or a
database on the session's PostgreSQL).
"""

from __future__ import annotations

import datetime as dt
import shutil
import threading

import pytest

from dataops import consent as consent_module
from dataops.consent import Consent, ConsentRefused, ConsentStore, Fetch
from pg_support import pause_after, race_replicas

NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)


def consent(consent_id: str, fetch: Fetch) -> Consent:
    """Only the id and the fetch terms matter to the store."""
    return Consent(
        id=consent_id,
        issuer="city-consent-service",
        subject="91310000TESTSUBJ01",
        consumer="city-bank",
        products=("pre_loan_review",),
        purpose="pre-loan review",
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=30),
        fetch=fetch,
        issued_at=NOW - dt.timedelta(days=1),
        digest="0" * 64,
    )


# -- the same behaviour on both stores ------------------------------------------------


def test_a_once_consent_is_used_once_and_then_refused(ledger_at):
    store = ConsentStore(ledger_at)
    once = consent("c-once", Fetch("once"))
    assert store.use(once, NOW) == ("once", 1)
    with pytest.raises(ConsentRefused) as refused:
        store.use(once, NOW + dt.timedelta(days=3))
    assert refused.value.rule == "consent.uses"
    assert store.uses() == {"c-once": {"once": 1}}
    assert store.uses_left(once, NOW) == 0
    store.close()


def test_a_periodic_consent_allows_max_uses_in_each_period(ledger_at):
    store = ConsentStore(ledger_at)
    daily = consent("c-daily", Fetch("periodic", "day", 2))
    assert [store.use(daily, NOW)[1] for _ in range(2)] == [1, 2]
    with pytest.raises(ConsentRefused, match="allows 2 uses per day"):
        store.use(daily, NOW)
    assert store.use(daily, NOW + dt.timedelta(days=1)) == ("2026-12-05", 1)
    store.use(consent("c-other", Fetch("once")), NOW)
    assert store.uses() == {"c-daily": {"2026-12-04": 2, "2026-12-05": 1}, "c-other": {"once": 1}}
    store.close()


def test_a_revoked_consent_is_refused_and_revoking_is_idempotent(ledger_at):
    store = ConsentStore(ledger_at)
    assert store.revoke("c-revoked", "withdrawn") is True
    assert store.revoke("c-revoked") is False
    assert store.is_revoked("c-revoked") and not store.is_revoked("c-other")
    with pytest.raises(ConsentRefused) as refused:
        store.use(consent("c-revoked", Fetch("periodic", "day", 5)), NOW)
    assert refused.value.rule == "consent.revoked"
    assert set(store.revocations()) == {"c-revoked"} and store.uses() == {}
    # The refused use left nothing behind, not even the count's row it made to lock.
    assert store.store.connection().execute("SELECT COUNT(*) FROM uses").fetchone()[0] == 0
    store.close()


def test_reconcile_raises_counts_to_the_audit_log_and_never_lowers_them(ledger_at):
    store = ConsentStore(ledger_at)
    daily = consent("c-daily", Fetch("periodic", "day", 3))
    store.use(daily, NOW)
    store.use(daily, NOW)
    # The log shows 1 use today (lower: kept at 2) and 3 yesterday (the store lost them).
    raised = store.reconcile({("c-daily", "2026-12-04"): 1, ("c-daily", "2026-12-03"): 3})
    assert raised == 1
    assert store.uses() == {"c-daily": {"2026-12-04": 2, "2026-12-03": 3}}
    with pytest.raises(ConsentRefused):
        store.use(daily, NOW - dt.timedelta(days=1))
    store.close()


def test_the_store_outlives_the_opener_and_a_second_opener_sees_its_counts(ledger_at):
    first = ConsentStore(ledger_at)
    first.use(consent("c-once", Fetch("once")), NOW)
    first.close()
    with pytest.raises(ValueError, match="closed"):
        first.use(consent("c-x", Fetch("once")), NOW)
    second = ConsentStore(ledger_at)  # the tables exist: created if absent, never twice
    with pytest.raises(ConsentRefused):
        second.use(consent("c-once", Fetch("once")), NOW)
    second.close()


# -- replicas racing on one database -------------------------------------------------


def _replica(url: str, fetch: Fetch, pause: float, lock: bool, barrier, results) -> None:
    if pause:
        pause_after(consent_module, "_read_uses", pause)  # between the read of the count and the increment
    store = ConsentStore(url, lock_uses=lock)
    barrier.wait()
    try:
        store.use(consent("c-raced", fetch), NOW)
        results.put("used")
    except ConsentRefused as exc:
        results.put(exc.rule)
    finally:
        store.close()


def race(url: str, replicas: int, fetch: Fetch, *, pause: float = 0.0, lock: bool = True) -> list[str]:
    """One use attempt per replica process, all at once; what each got."""
    ConsentStore(url).close()  # the tables exist before the race
    return race_replicas(_replica, [(url, fetch, pause, lock)] * replicas)


def stored_uses(url: str) -> dict:
    store = ConsentStore(url)
    try:
        return store.uses()
    finally:
        store.close()


@pytest.mark.parametrize("pause", [0.0, 0.05])
def test_replicas_racing_on_a_once_consent_admit_exactly_one_use(pg_url, pause):
    got = race(pg_url, 8, Fetch("once"), pause=pause)
    assert sorted(got) == ["consent.uses"] * 7 + ["used"]
    assert stored_uses(pg_url) == {"c-raced": {"once": 1}}


def _one_use_left(url: str) -> Fetch:
    """A consent for two uses a day, used once already: one use is left to race for."""
    fetch = Fetch("periodic", "day", 2)
    store = ConsentStore(url)
    store.use(consent("c-raced", fetch), NOW)
    store.close()
    return fetch


def test_without_the_row_lock_replicas_overuse_a_consent(pg_url):
    # The control switched off: the same race, the same pause, no FOR UPDATE. Every
    # replica reads "one use so far" before any has counted its own, and all are let in.
    got = race(pg_url, 6, _one_use_left(pg_url), pause=0.3, lock=False)
    assert got.count("used") > 1
    assert stored_uses(pg_url)["c-raced"]["2026-12-04"] == 1 + got.count("used") > 2  # overused


def test_with_the_row_lock_the_same_pausing_race_admits_exactly_the_use_left(pg_url):
    got = race(pg_url, 6, _one_use_left(pg_url), pause=0.3, lock=True)
    assert sorted(got) == ["consent.uses"] * 5 + ["used"]
    assert stored_uses(pg_url) == {"c-raced": {"2026-12-04": 2}}


def test_a_revocation_on_one_replica_refuses_the_consent_on_another(pg_url):
    a, b = ConsentStore(pg_url), ConsentStore(pg_url)
    daily = consent("c-daily", Fetch("periodic", "day", 5))
    a.use(daily, NOW)
    assert b.revoke("c-daily")
    with pytest.raises(ConsentRefused) as refused:
        a.use(daily, NOW)
    assert refused.value.rule == "consent.revoked" and "c-daily" in a.revocations()
    a.close()
    b.close()


# -- two real server replicas -----------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False], ids=["postgresql", "per-replica-sqlite"])
def test_two_server_replicas_let_a_once_consent_through_once(pg_url, tmp_path, sandbox_dir, pki, shared):
    """Two servers, each with its own state and audit log, one PostgreSQL ledger: a
    "once" consent presented to both at once is evaluated once. Switched off (each
    replica counting in its own SQLite store, as before the store moved), it is
    evaluated once on each replica: the replay the shared count prevents."""
    import json

    from conftest import REPO, write_config
    from dataops.client import Client, DataopsClientError, SubjectEvaluation
    from dataops.consent_service import ConsentService
    from dataops.server import build_server

    servers, clients, configs = [], [], []
    try:
        for name in ("a", "b"):
            work = tmp_path / name
            work.mkdir()
            shutil.copytree(REPO / "products", work / "products")
            extra = f'[audit]\norigin = "dataops-{name}"\n'
            if shared:
                extra = f"[ledger]\nurl = {json.dumps(pg_url)}\n" + extra
            config = write_config(work, sandbox_dir, pki, extra=extra)
            if name == "a":
                service = ConsentService(config.paths.state / "consent-service", config.paths.consents)
                service.init()
                trusted = config.paths.consents
            else:  # the same trusted issuer on both replicas
                shutil.copytree(trusted, config.paths.consents, dirs_exist_ok=True)
            configs.append(config)
            servers.append(build_server(config).start())
        for running in servers:
            clients.append(
                Client.from_directory(f"localhost:{running.port}", pki.consumer_dir("city-bank"), "city-bank")
            )
        import polars as pl

        subject = pl.read_parquet(sandbox_dir / "finance/enterprise_credit.parquet")["enterprise_id"][3]
        artefact = service.issue(
            subject=subject, consumer="city-bank", products=["pre_loan_review"], purpose="pre-loan review"
        )
        outcomes: list = []

        def attempt(i: int) -> None:
            try:
                outcomes.append(clients[i % 2].evaluate("pre_loan_review", subject, artefact))
            except DataopsClientError as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for client in clients:
            client.close()
        for running in servers:
            running.stop(grace=1.0)
    allowed = [o for o in outcomes if isinstance(o, SubjectEvaluation)]
    refused = [o for o in outcomes if not isinstance(o, SubjectEvaluation)]
    assert len(outcomes) == 6
    assert {o.metadata["rule"] for o in refused} == {"consent.uses"}
    assert len(allowed) == (1 if shared else 2)  # switched off: once on each replica
    if shared:
        reviewed_against_the_shared_revocations(pg_url, configs, service.issued()[-1]["id"])


def reviewed_against_the_shared_revocations(url: str, configs: list, consent_id: str) -> None:
    """`dataops audit consents -c` checks a replica's log against the revocations in the
    shared database: one recorded (as if) before the use makes that use a problem."""
    import contextlib
    import io

    from dataops.cli import main

    store = ConsentStore(url)
    store.store.connection().execute(
        "INSERT INTO revoked (consent_id, time, reason) VALUES (?, ?, ?)",
        (consent_id, "2000-01-01T00:00:00+00:00", "withdrawn"),
    )
    store.close()
    codes, printed = [], io.StringIO()
    for config in configs:
        with contextlib.redirect_stdout(printed):
            codes.append(main(["audit", "consents", "-c", str(config.paths.state.parent / "dataops.toml")]))
    assert sorted(codes) == [0, 1]  # the replica that released the evaluation, and the other
    assert f"consent {consent_id} was revoked at 2000-01-01" in printed.getvalue()


def test_the_consent_cli_revokes_in_the_shared_database(pg_url, tmp_path, sandbox_dir, pki, capsys):
    """`dataops consent revoke` follows `[ledger] url`: a revocation an operator makes
    beside any replica reaches them all."""
    import json

    from conftest import write_config
    from dataops.cli import main

    config = write_config(tmp_path, sandbox_dir, pki, extra=f"[ledger]\nurl = {json.dumps(pg_url)}\n")
    toml = config.paths.state.parent / "dataops.toml"
    assert main(["consent", "revoke", "cst-withdrawn", "-c", str(toml)]) == 0
    assert "revoked" in capsys.readouterr().out
    store = ConsentStore(pg_url)
    assert store.is_revoked("cst-withdrawn")
    store.close()
    assert not consent_module.store_path(config.paths.state).exists()  # nothing written locally
