"""zCDP accounting in the ledger (issue 13.4): a zCDP grant composes rho across its
releases and is charged OpenDP's conversion of the total, never less.

The reference conversion here is OpenDP's own (`make_zCDP_to_approxDP`, `make_fix_delta`
on a Gaussian measurement), built in this file, not the ledger's helper.
"""

from __future__ import annotations

import math
import random
import sqlite3
import threading
from pathlib import Path

import opendp.prelude as dp
import pytest

from dataops import ledger as ledger_module
from dataops.engines.dp_calibrate import rho_for_epsilon, zcdp_to_epsilon
from dataops.errors import InternalError
from dataops.ledger import BudgetExhaustedError, Ledger
from dataops.values import PrivacyLoss
from test_dp_terms import set_accounting

dp.enable_features("contrib")

DELTA = 1e-6  # the grant's delta: the total rho is converted at it
GRANT = PrivacyLoss(100.0, DELTA)
CAP = PrivacyLoss(1000.0, 1e-5)
KEY = "cd" * 32


@pytest.fixture
def ledger(ledger_at):
    with Ledger(ledger_at) as led:
        yield led


def opendp_epsilon(rho: float, delta: float = DELTA) -> float:
    """OpenDP's conversion of rho-zCDP at delta: a Gaussian measurement of that rho at d_in 1."""
    scale = 1.0 / math.sqrt(2 * rho)
    gaussian = dp.m.make_gaussian(
        dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=scale
    )
    return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(gaussian), delta).map(1.0)[0]


def reserve(ledger: Ledger, rho: float, consumer: str = "bank", grant=GRANT, **kwargs):
    return ledger.reserve_zcdp(consumer, "claims", rho, grant_total=grant, dataset_total=CAP, **kwargs)


def assert_charged_covers_rho(ledger: Ledger, rhos: list[float], consumer: str = "bank") -> None:
    """What the grant was charged is never below OpenDP's conversion of its summed rho
    (exactly, against the conversion the ledger uses; within float noise against the
    independently built measurement), and exceeds it by rounding only."""
    epsilon, delta = ledger.spent(consumer, "claims")
    total_rho = math.fsum(rhos)
    if not rhos:
        assert (epsilon, delta, ledger.rho_spent(consumer, "claims")) == (0.0, 0.0, 0.0)
        return
    assert ledger.rho_spent(consumer, "claims") >= total_rho
    assert epsilon >= zcdp_to_epsilon(total_rho, DELTA)
    assert epsilon >= zcdp_to_epsilon(ledger.rho_spent(consumer, "claims"), DELTA)  # to the last unit
    assert epsilon >= opendp_epsilon(total_rho) * (1 - 1e-12)
    assert epsilon - opendp_epsilon(total_rho) < 1e-9
    assert delta == DELTA


# -- composition --------------------------------------------------------------------


def test_twenty_releases_compose_far_better_than_twenty_conversions(ledger) -> None:
    rho = rho_for_epsilon(0.1, DELTA)  # one release alone converts to 0.1
    charges = [reserve(ledger, rho).epsilon for _ in range(20)]
    composed = ledger.spent("bank", "claims").epsilon
    separately = 20 * zcdp_to_epsilon(rho, DELTA)
    print(f"20 zCDP releases of epsilon 0.1 each: composed {composed:.4f}, separately {separately:.4f}")
    assert charges[0] == pytest.approx(0.1, abs=1e-9)
    assert all(later < earlier for earlier, later in zip(charges, charges[1:]))  # concave in rho
    assert composed == pytest.approx(math.fsum(charges), abs=1e-9)
    assert composed < separately / 3  # 0.49 against 2.0
    assert_charged_covers_rho(ledger, [rho] * 20)


def test_the_total_charged_is_opendps_conversion_of_the_summed_rho(ledger) -> None:
    rng = random.Random(13)
    rhos = []
    for _ in range(30):
        rhos.append(rng.uniform(1e-5, 2e-2))
        reserve(ledger, rhos[-1])
        assert_charged_covers_rho(ledger, rhos)


def test_the_grants_delta_is_charged_once_and_the_cap_sums_the_grants(ledger) -> None:
    first, second = reserve(ledger, 0.01), reserve(ledger, 0.01)
    assert (first.delta, second.delta) == (DELTA, 0.0)
    reserve(ledger, 0.02, consumer="insurer")
    ledger.reserve("bank", "claims", 0.3, 0.0, grant_total=GRANT, dataset_total=CAP)  # pure beside it
    grants = [ledger.spent(c, "claims") for c in ("bank", "insurer")]
    assert grants[0].epsilon == pytest.approx(zcdp_to_epsilon(0.02, DELTA) + 0.3, abs=1e-9)
    assert grants[1].epsilon == pytest.approx(zcdp_to_epsilon(0.02, DELTA), abs=1e-9)
    assert tuple(ledger.dataset_spent("claims")) == pytest.approx(
        (grants[0].epsilon + grants[1].epsilon, 2 * DELTA)
    )


def test_pure_dp_grants_are_unchanged(ledger) -> None:
    for _ in range(3):
        assert (
            ledger.reserve(
                "bank", "claims", 0.1, 1e-7, grant_total=PrivacyLoss(0.3, 1e-6), dataset_total=CAP
            ).epsilon
            == 0.1
        )
    with pytest.raises(BudgetExhaustedError):
        ledger.reserve("bank", "claims", 0.1, 0.0, grant_total=PrivacyLoss(0.3, 1e-6), dataset_total=CAP)
    assert tuple(ledger.spent("bank", "claims")) == pytest.approx((0.3, 3e-7))
    assert ledger.rho_spent("bank", "claims") == 0.0


def test_a_zcdp_grant_is_refused_at_its_budget_and_nothing_is_recorded(ledger) -> None:
    rho = rho_for_epsilon(0.1, DELTA)
    grant = PrivacyLoss(0.3, DELTA)
    admitted = 0
    while True:
        try:
            reserve(ledger, rho, grant=grant)
        except BudgetExhaustedError as err:
            assert err.which == "grant"
            break
        admitted += 1
    assert admitted > 3  # pure-DP arithmetic would have stopped at 3
    assert ledger.rho_spent("bank", "claims") == pytest.approx(admitted * rho)
    assert ledger.spent("bank", "claims").epsilon <= 0.3
    assert_charged_covers_rho(ledger, [rho] * admitted)


# -- concurrency, refunds, restarts -------------------------------------------------


def test_racing_reservations_on_the_last_of_a_zcdp_budget_never_overspend(ledger_at) -> None:
    rho = 0.004
    fits = 5
    # A budget between the conversions of 5 and 6 releases' rho: exactly 5 fit.
    grant = PrivacyLoss(
        (zcdp_to_epsilon(fits * rho, DELTA) + zcdp_to_epsilon((fits + 1) * rho, DELTA)) / 2, DELTA
    )
    path = ledger_at
    ledgers = [Ledger(path), Ledger(path, recover=False)]  # two openers of one store, as two replicas
    reserve(ledgers[0], rho, grant=grant)  # the grant is already partly spent
    barrier = threading.Barrier(24)
    won, lost = [], []

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            won.append(reserve(ledgers[i % 2], rho, grant=grant))
        except BudgetExhaustedError as exc:
            lost.append(exc)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert (len(won), len(lost)) == (fits - 1, 24 - fits + 1)
        assert ledgers[1].spent("bank", "claims").epsilon <= grant.epsilon
        assert ledgers[1].rho_spent("bank", "claims") == pytest.approx(fits * rho)
        assert_charged_covers_rho(ledgers[1], [rho] * fits)
        # The charges, in whatever order the writers got the lock, add up to the total.
        assert math.fsum(r.epsilon for r in won) + zcdp_to_epsilon(rho, DELTA) == pytest.approx(
            ledgers[1].spent("bank", "claims").epsilon, abs=1e-10
        )
    finally:
        for led in ledgers:
            led.close()


def test_a_refund_takes_its_rho_out_again(ledger) -> None:
    first, middle, last = reserve(ledger, 0.01), reserve(ledger, 0.03), reserve(ledger, 0.02)
    ledger.refund(middle)  # others composed on top of it: the conversion of the rest remains
    assert ledger.rho_spent("bank", "claims") == pytest.approx(0.03)
    assert_charged_covers_rho(ledger, [0.01, 0.02])
    assert ledger.spent("bank", "claims").epsilon == pytest.approx(zcdp_to_epsilon(0.03, DELTA), abs=1e-9)
    ledger.refund(middle)  # idempotent
    assert ledger.rho_spent("bank", "claims") == pytest.approx(0.03)
    ledger.commit(first)
    ledger.refund(last)
    assert ledger.rho_spent("bank", "claims") == pytest.approx(0.01)
    # A superseded commit (an identical release won) returns its rho too.
    winner, loser = reserve(ledger, 0.05), reserve(ledger, 0.05)
    ledger.commit(winner, release_key=KEY, payload=b"x", metadata="[]")
    assert ledger.commit(loser, release_key=KEY, payload=b"y", metadata="[]").reservation_id == winner.id
    assert_charged_covers_rho(ledger, [0.01, 0.05])
    assert ledger.rho_spent("bank", "claims") == pytest.approx(0.06)


def test_refunding_everything_returns_the_delta_too(ledger) -> None:
    reservations = [reserve(ledger, 0.01) for _ in range(3)]
    for r in reservations:
        ledger.refund(r)
    assert ledger.spent("bank", "claims") == PrivacyLoss(0.0, 0.0)
    assert ledger.rho_spent("bank", "claims") == 0.0
    assert reserve(ledger, 0.01).delta == DELTA


def test_a_restart_keeps_the_rho_and_composes_on_top_of_it(ledger_at) -> None:
    path = ledger_at
    with Ledger(path) as led:
        for _ in range(4):
            led.commit(reserve(led, 0.01))
        open_one = reserve(led, 0.01)  # the process dies before commit or refund
        before = led.spent("bank", "claims")
    with Ledger(path) as led:  # recover(): the open one is orphaned and stays spent
        assert led.spent("bank", "claims") == before
        assert led.rho_spent("bank", "claims") == pytest.approx(0.05)
        led.refund(open_one)  # orphaned: stays spent
        assert led.rho_spent("bank", "claims") == pytest.approx(0.05)
        assert reserve(led, 0.01).epsilon == pytest.approx(
            zcdp_to_epsilon(0.06, DELTA) - zcdp_to_epsilon(0.05, DELTA), abs=1e-9
        )


def test_a_tampered_zcdp_total_is_caught_at_startup(ledger_at) -> None:
    path = ledger_at
    with Ledger(path) as led:
        led.commit(reserve(led, 0.04))

    def tamper(*statements: str) -> None:
        with Ledger(path, recover=False) as led:  # its connection commits each statement
            for statement in statements:
                led._conn().execute(statement)

    # charge less than the conversion of the rho
    tamper(
        "UPDATE zcdp_spend SET epsilon = epsilon - 1000", "UPDATE grant_spend SET epsilon = epsilon - 1000"
    )
    with pytest.raises(InternalError, match="disagree"):
        Ledger(path)
    # or forget rho
    tamper(
        "UPDATE zcdp_spend SET epsilon = epsilon + 1000, rho = rho - 1",
        "UPDATE grant_spend SET epsilon = epsilon + 1000",
    )
    with pytest.raises(InternalError, match="disagree"):
        Ledger(path)
    # or the reservations' own charges
    tamper("UPDATE zcdp_spend SET rho = rho + 1, charged = charged - 1")
    with pytest.raises(InternalError, match="disagree"):
        Ledger(path)


# The schema of version 1, as ledgers written before zCDP accounting have it.
V1_SCHEMA = """
CREATE TABLE reservations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, consumer TEXT NOT NULL, dataset TEXT NOT NULL,
    epsilon INTEGER NOT NULL CHECK (epsilon >= 0), delta INTEGER NOT NULL CHECK (delta >= 0),
    status TEXT NOT NULL CHECK (status IN ('reserved', 'released', 'orphaned', 'refunded', 'superseded')),
    request TEXT NOT NULL, created TEXT NOT NULL, settled TEXT);
CREATE TABLE grant_spend (consumer TEXT NOT NULL, dataset TEXT NOT NULL,
    epsilon INTEGER NOT NULL CHECK (epsilon >= 0), delta INTEGER NOT NULL CHECK (delta >= 0),
    PRIMARY KEY (consumer, dataset));
CREATE TABLE releases (key TEXT PRIMARY KEY, payload BLOB NOT NULL, metadata TEXT NOT NULL,
    consumer TEXT NOT NULL, dataset TEXT NOT NULL, reservation_id INTEGER NOT NULL REFERENCES reservations (id),
    created TEXT NOT NULL);
INSERT INTO reservations (consumer, dataset, epsilon, delta, status, request, created)
    VALUES ('bank', 'claims', 700000000000, 0, 'released', 'r1', '2026-01-01');
INSERT INTO grant_spend VALUES ('bank', 'claims', 700000000000, 0);
PRAGMA user_version = 1;
"""


def test_an_existing_ledger_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_SCHEMA)
    with Ledger(path) as led:
        assert tuple(led.spent("bank", "claims")) == pytest.approx((0.7, 0.0))  # nothing lost
        reserve(led, 0.01)
        assert led.spent("bank", "claims").epsilon == pytest.approx(
            0.7 + zcdp_to_epsilon(0.01, DELTA), abs=1e-9
        )
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        # The reservation from before owners were recorded has none; the new one has.
        assert [owner is None for (owner,) in conn.execute("SELECT owner FROM reservations ORDER BY id")] == [
            True,
            False,
        ]
    with Ledger(path) as led:  # and reopens, its totals checked
        assert led.rho_spent("bank", "claims") == pytest.approx(0.01)


# -- controls switched off ----------------------------------------------------------


def naive_charge(before, rho_u, grant_delta_u):
    """Control off: each release converted on its own and the epsilons added."""
    rho_before, delta_before, eps_before = before
    delta_u = delta_before if rho_before > 0 else grant_delta_u
    eps_u = ledger_module._zcdp_epsilon_units(rho_u, delta_u)
    return eps_u, delta_u - delta_before, (rho_before + rho_u, delta_u, eps_before + eps_u)


def test_without_rho_composition_the_same_budget_answers_far_fewer_releases(ledger, monkeypatch) -> None:
    rho, grant = rho_for_epsilon(0.1, DELTA), PrivacyLoss(1.0, DELTA)

    def admitted(consumer: str) -> int:
        count = 0
        while True:
            try:
                reserve(ledger, rho, consumer=consumer, grant=grant)
            except BudgetExhaustedError:
                return count
            count += 1

    composed = admitted("bank")
    monkeypatch.setattr(ledger_module, "_zcdp_charge", naive_charge)
    naive = admitted("insurer")
    print(f"releases of epsilon 0.1 within epsilon 1.0: composed {composed}, converted one by one {naive}")
    assert naive <= 10 and composed > 5 * naive


def forgets_history(before, rho_u, grant_delta_u):
    """A bug: the total charged becomes eps(rho of the new release) only."""
    rho_before, delta_before, eps_before = before
    delta_u = delta_before if rho_before > 0 else grant_delta_u
    eps_after = ledger_module._zcdp_epsilon_units(rho_u, delta_u)
    return max(0, eps_after - eps_before), delta_u - delta_before, (rho_before + rho_u, delta_u, eps_after)


def test_composing_epsilons_instead_of_rho_under_counts_and_is_caught(ledger, monkeypatch) -> None:
    monkeypatch.setattr(ledger_module, "_zcdp_charge", forgets_history)
    rhos = [0.01, 0.02, 0.005, 0.03]
    for rho in rhos:
        reserve(ledger, rho)
    with pytest.raises(AssertionError):
        assert_charged_covers_rho(ledger, rhos)


# -- over the real server -----------------------------------------------------------


def test_the_estimate_is_what_the_run_debits_on_a_zcdp_grant(config, pki) -> None:
    from dataops.client import Client, count, total
    from dataops.server import build_server

    set_accounting(config, "harbor-insurance", "zcdp", 5.0)
    server = build_server(config).start()
    client = Client.from_directory(f"localhost:{server.port}", pki.consumer_dir("harbor-insurance"),
                                   "harbor-insurance")  # fmt: skip
    try:
        charges = []
        for i in range(4):
            terms = dict(aggregates=[count(), total("amount")], group_by=["age_band"], mode="dp",
                         epsilon=0.5 + i * 1e-6, delta=1e-7)  # fmt: skip
            estimate = client.estimate("medical_claims", **terms)
            result = client.query("medical_claims", **terms)
            assert result.spend.epsilon == pytest.approx(estimate.spend.epsilon, rel=1e-12)
            assert result.spend.delta == estimate.spend.delta == (DELTA if i == 0 else 0.0)
            charges.append(result.spend.epsilon)
        epsilon, delta = server.ledger.spent("harbor-insurance", "medical_claims")
        rho = server.ledger.rho_spent("harbor-insurance", "medical_claims")
    finally:
        client.close()
        server.stop(grace=1.0)
    assert epsilon == pytest.approx(math.fsum(charges), abs=1e-10) and delta == DELTA
    assert epsilon >= zcdp_to_epsilon(rho, DELTA) and epsilon < 4 * 0.5 / 2  # composed: under half of 2.0
    assert all(later < earlier for earlier, later in zip(charges, charges[1:]))


def test_a_grant_switched_from_pure_converts_at_the_delta_it_has_left(ledger) -> None:
    ledger.reserve("bank", "claims", 0.5, 4e-7, grant_total=GRANT, dataset_total=CAP)  # while it was pure
    quote = ledger.quote_zcdp("bank", "claims", 0.01, DELTA)
    charge = reserve(ledger, 0.01)
    assert quote == PrivacyLoss(charge.epsilon, charge.delta) and charge.delta == 6e-7
    assert charge.epsilon == pytest.approx(zcdp_to_epsilon(0.01, 6e-7), abs=1e-9)
    assert tuple(ledger.spent("bank", "claims")) == pytest.approx((0.5 + charge.epsilon, DELTA))
    ledger.reserve("insurer", "claims", 0.5, DELTA, grant_total=GRANT, dataset_total=CAP)
    with pytest.raises(BudgetExhaustedError):  # no delta left to convert at
        reserve(ledger, 0.01, consumer="insurer")


def test_random_reserves_and_refunds_keep_the_ledger_above_every_record(ledger_at) -> None:
    # The audit log records each released reservation's own charge; the server refuses
    # to start if the ledger is below it. Refunds in the middle must keep that so.
    rng = random.Random(4)
    path = ledger_at
    with Ledger(path) as led:
        open_, kept, asked = [], [], {}
        for _ in range(40):
            if open_ and rng.random() < 0.5:
                r = open_.pop(rng.randrange(len(open_)))
                (led.refund if rng.random() < 0.5 else led.commit)(r)
                if r.id not in {k.id for k in kept} and statuses(led)[r.id] == "released":
                    kept.append(r)
            else:
                rho = rng.uniform(1e-4, 5e-3)
                open_.append(reserve(led, rho))
                asked[open_[-1].id] = rho
            spent = kept + open_
            epsilon = led.spent("bank", "claims").epsilon
            assert epsilon >= math.fsum(r.epsilon for r in spent) - 1e-15
            assert_charged_covers_rho(led, [asked[r.id] for r in spent])
    with Ledger(path) as led:  # its totals agree with its reservations
        assert led.rho_spent("bank", "claims") == pytest.approx(math.fsum(asked[r.id] for r in kept + open_))


def statuses(ledger: Ledger) -> dict[int, str]:
    return dict(ledger._conn().execute("SELECT id, status FROM reservations").fetchall())
