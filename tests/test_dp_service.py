"""Differential privacy through the real server: budgets, estimates, reuse, races, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from conftest import audit_records
from dataops.client import Client, DataopsClientError, count, total
from dataops.ir import Between
from dataops.ledger import Ledger
from dataops.server import build_server
from dataops.server.app import ledger_path
from dataops.values import PrivacyLoss


def set_budget(config, consumer: str, epsilon: float, delta: float | None = None) -> None:
    path = config.paths.policies / f"{consumer}.toml"
    text = path.read_text()
    start = text.index("[grants.budget]")
    end = text.index("\n[", start + 1) if "\n[" in text[start + 1 :] else len(text)
    block = f"[grants.budget]\nepsilon = {epsilon}\n"
    old_delta = [line for line in text[start:end].splitlines() if line.startswith("delta")]
    block += f"delta = {delta}\n" if delta is not None else (old_delta[0] + "\n" if old_delta else "")
    path.write_text(text[:start] + block + text[end:])


def dp_query(client: Client, epsilon: float, year: int = 1990, **kwargs):
    return client.query(
        "enterprise_credit",
        aggregates=[count(), total("tax_paid")],
        group_by=["size_band"],
        filters=[Between("year_founded", year, None)],
        mode="dp",
        epsilon=epsilon,
        **kwargs,
    )


def test_a_dp_answer_carries_its_cost_accuracy_and_is_debited(connect, server):
    client = connect("city-bank")
    result = dp_query(client, 0.5)
    assert sorted(result.frame["size_band"].to_list()) == [
        "large",
        "medium",
        "micro",
        "small",
    ]  # the public key set
    assert result.spend.epsilon == pytest.approx(0.5)
    assert result.spend.remaining_epsilon == pytest.approx(4.5)
    assert result.accuracy["count"].noise_scale > 0 and result.accuracy["count"].half_width_95 > 0
    assert server.ledger.spent("city-bank", "enterprise_credit").epsilon == pytest.approx(0.5)
    [budget] = client.budgets("enterprise_credit")
    assert (budget.epsilon_total, budget.epsilon_spent) == (pytest.approx(5.0), pytest.approx(0.5))


def test_an_estimate_spends_nothing(connect, server):
    client = connect("city-bank")
    estimate = client.estimate(
        "enterprise_credit", aggregates=[count()], group_by=["size_band"], mode="dp", epsilon=0.7
    )
    assert estimate.spend.epsilon == pytest.approx(0.7)
    assert estimate.accuracy[0].half_width_95 > 0
    assert server.ledger.spent("city-bank", "enterprise_credit") == PrivacyLoss(0.0, 0.0)


def test_a_target_accuracy_spends_the_epsilon_it_reports_and_meets_it(connect, server):
    client = connect("city-bank")
    estimate = client.estimate(
        "enterprise_credit", aggregates=[count()], group_by=["size_band"], mode="dp", target_half_width=50.0
    )
    result = client.query(
        "enterprise_credit", aggregates=[count()], group_by=["size_band"], mode="dp", target_half_width=50.0
    )
    assert result.accuracy["count"].half_width_95 <= 50.0
    assert result.spend.epsilon == pytest.approx(estimate.spend.epsilon)
    assert server.ledger.spent("city-bank", "enterprise_credit").epsilon == pytest.approx(
        result.spend.epsilon
    )


def test_an_identical_question_gets_the_identical_answer_for_free(connect, server, config):
    first = dp_query(connect("city-bank"), 0.5)
    again = dp_query(connect("city-bank"), 0.5)
    assert again.reused and not first.reused
    assert again.frame.equals(first.frame)
    assert server.ledger.spent("city-bank", "enterprise_credit").epsilon == pytest.approx(0.5)
    reuse = audit_records(config)[-1]
    assert reuse["reused"] is True and reuse["epsilon_spent"] == 0.0


def test_exhaustion_is_resource_exhausted_with_a_quota_failure(connect):
    client = connect("city-bank")
    dp_query(client, 4.0)
    with pytest.raises(DataopsClientError) as err:
        dp_query(client, 2.0, year=2000)
    assert err.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.reason == "BUDGET_EXHAUSTED"
    assert (
        err.value.quota_violations and "grant:city-bank/enterprise_credit" in err.value.quota_violations[0][0]
    )


def test_grouping_without_public_keys_under_pure_dp_is_refused(connect):
    with pytest.raises(DataopsClientError) as err:
        connect("city-bank").query(
            "enterprise_credit", aggregates=[count()], group_by=["arrears_months"], mode="dp", epsilon=1.0
        )
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.rule == "dp.private-keys" and err.value.column == "arrears_months"


def test_many_requests_racing_on_the_last_of_a_budget_never_overspend(config, pki):
    set_budget(config, "city-bank", 1.0)
    server = build_server(config).start()
    try:
        client = Client.from_directory(f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank")

        def attempt(i: int):
            try:
                return dp_query(client, 0.25, year=1960 + i)  # distinct questions: no reuse
            except DataopsClientError as exc:
                return exc

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(attempt, range(16)))
        client.close()
        succeeded = [o for o in outcomes if not isinstance(o, DataopsClientError)]
        refused = [o for o in outcomes if isinstance(o, DataopsClientError)]
        assert len(succeeded) == 4
        assert all(r.reason == "BUDGET_EXHAUSTED" for r in refused)
        assert server.ledger.spent("city-bank", "enterprise_credit").epsilon == pytest.approx(1.0)
    finally:
        server.stop(1.0)


def test_the_ledger_survives_a_restart(config, pki):
    server = build_server(config).start()
    client = Client.from_directory(f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank")
    first = dp_query(client, 1.5)
    client.close()
    server.stop(1.0)

    server = build_server(config).start()
    try:
        client = Client.from_directory(f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank")
        [budget] = client.budgets()
        assert budget.epsilon_spent == pytest.approx(1.5)
        assert dp_query(client, 1.5).frame.equals(first.frame)  # the stored release survives too
        client.close()
    finally:
        server.stop(1.0)


def test_the_ledger_survives_kill_9_mid_load(config, pki, tmp_path):
    """A real `dataops serve` process is SIGKILLed while DP requests are in flight."""
    set_budget(config, "city-bank", 5.0)
    toml = config.paths.catalog.parent / "dataops.toml"
    toml.write_text(toml.read_text().replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0"', 1))
    port_file = tmp_path / "port"
    code = (
        "import sys; from pathlib import Path; from dataops.config import load_config;"
        "from dataops.server import build_server;"
        f"s = build_server(load_config(Path({str(toml)!r}))).start();"
        f"Path({str(port_file)!r}).write_text(str(s.port)); s.serve_until_signal()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        client = Client.from_directory(
            f"localhost:{port_file.read_text()}", pki.consumer_dir("city-bank"), "city-bank", timeout=10
        )
        answered: list[float] = []

        def attempt(i: int):
            try:
                answered.append(dp_query(client, 0.1, year=1950 + i).spend.epsilon)
            except DataopsClientError:
                pass

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(attempt, i) for i in range(40)]
            while len(answered) < 5:
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            for f in futures:
                f.result()
        client.close()
    finally:
        proc.kill()
        proc.wait()
    with Ledger(ledger_path(config)) as ledger:
        spent = ledger.spent("city-bank", "enterprise_credit").epsilon
        assert ledger._conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # Every answered request is debited; in-flight ones may count as spent (fail closed); never more.
    assert sum(answered) - 1e-9 <= spent <= 5.0 + 1e-9


def test_a_repeated_question_is_answered_even_when_the_budget_is_spent(connect, server):
    """Reuse is looked up before any reservation: repeating a released question needs no budget."""
    client = connect("city-bank")
    first = dp_query(client, 1.0)
    dp_query(client, 4.0, year=2000)  # the rest of the grant's budget
    with pytest.raises(DataopsClientError):
        dp_query(client, 0.5, year=2010)
    again = dp_query(client, 1.0)
    assert again.reused and again.frame.equals(first.frame)
    assert server.ledger.spent("city-bank", "enterprise_credit").epsilon == pytest.approx(5.0)
