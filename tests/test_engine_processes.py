"""DP releases in child processes (`[server] engine_processes`, dataops.engines.processes).

The real server over mTLS: a release runs in a child (the server's own `DPQuery.release`
is made to fail, and the answer still comes), spends what the estimate said, and a child
that dies fails its request with nothing spent, the next request answered by a new one.
The child's release keeps the check that a calibration cannot buy a cheaper release.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from conftest import write_config
from dataops.client import Client, DataopsClientError, count
from dataops.config import ConfigError, load_config
from dataops.engines import dp
from dataops.server import build_server

CLAIMS = "medical_claims"


def _start(tmp_path, sandbox_dir, pki, protected_tables, processes: int):
    work = tmp_path / f"work-{processes}"
    work.mkdir()
    config = write_config(
        work, sandbox_dir, pki, tables=protected_tables, server=f"engine_processes = {processes}"
    )
    return build_server(config).start()


def _client(server, pki) -> Client:
    return Client.from_directory(
        f"localhost:{server.port}", pki.consumer_dir("harbor-insurance"), "harbor-insurance", witness=False
    )


def _ask(client: Client, epsilon: float):
    return client.query(
        CLAIMS, aggregates=[count()], group_by=["sex"], mode="dp", epsilon=epsilon, timeout=120
    )


def _spent(client: Client) -> float:
    (budget,) = [b for b in client.budgets(CLAIMS) if b.dataset == CLAIMS]
    return budget.spent.epsilon


def test_a_release_runs_in_an_engine_process_and_spends_what_was_estimated(
    tmp_path, sandbox_dir, pki, protected_tables, monkeypatch
):
    in_server = _start(tmp_path, sandbox_dir, pki, protected_tables, 0)
    try:
        with _client(in_server, pki) as client:
            here = _ask(client, 0.05)
    finally:
        in_server.stop(grace=1.0)

    def refused(self, calibration):  # noqa: ARG001 - the server's own release, switched off
        raise AssertionError("released in the server process")

    monkeypatch.setattr(dp.DPQuery, "release", refused)  # the children are spawned: not patched
    server = _start(tmp_path, sandbox_dir, pki, protected_tables, 1)
    try:
        with _client(server, pki) as client:
            before = _spent(client)
            there = _ask(client, 0.05)
            assert pytest.approx(_spent(client) - before, rel=1e-9) == 0.05
            assert there.spend is not None and there.spend.epsilon == pytest.approx(0.05)
            # The same question on the same data: the same groups and the same noise scale.
            assert there.table.column("sex").to_pylist() == here.table.column("sex").to_pylist()
            assert there.accuracy["count"].noise_scale == pytest.approx(here.accuracy["count"].noise_scale)
            # Asked again: the stored release, free, never run again.
            again = _ask(client, 0.05)
            assert again.reused and again.table.equals(there.table)
    finally:
        server.stop(grace=1.0)


def test_a_dead_engine_process_fails_its_release_refunded_and_is_replaced(
    tmp_path, sandbox_dir, pki, protected_tables
):
    server = _start(tmp_path, sandbox_dir, pki, protected_tables, 1)
    try:
        with _client(server, pki) as client:
            _ask(client, 0.03)  # the child is up
            processes = server.sandbox.processes
            children = list(processes._executor()._processes)  # noqa: SLF001 - the pool's own pids
            assert children and all(pid != os.getpid() for pid in children)
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            spent = _spent(client)
            with pytest.raises(DataopsClientError) as refused:
                _ask(client, 0.04)
            assert refused.value.code is grpc.StatusCode.INTERNAL
            assert _spent(client) == pytest.approx(spent)  # refunded: nothing was released
            answered = _ask(client, 0.04)  # a new pool
            assert answered.table.num_rows == 2
            assert _spent(client) == pytest.approx(spent + 0.04)
    finally:
        server.stop(grace=1.0)


def test_an_engine_process_refuses_a_calibration_cheaper_than_its_release(
    tmp_path, sandbox_dir, pki, protected_tables
):
    """The check DPQuery.release makes holds across the process boundary: a calibration
    claiming a smaller cost than its scale costs is refused, not released cheaply."""
    import dataclasses

    from dataops.engines.dp_engine import DPEngine
    from dataops.errors import InternalError
    from dataops.ir import Aggregate, Function, Mode, Privacy, Query
    from dataops.values import PrivacyLoss

    server = _start(tmp_path, sandbox_dir, pki, protected_tables, 1)
    try:
        sandbox = server.sandbox
        query = Query(CLAIMS, (Aggregate(Function.COUNT),), (), ("sex",), Mode.DP, Privacy(epsilon=0.05))
        plan = sandbox.plan("harbor-insurance", query)
        engine = sandbox.engines[Mode.DP]
        assert isinstance(engine, DPEngine) and engine.processes is not None
        estimate = engine.estimate(plan)
        compiled, calibration, source, key = estimate.handle
        released = engine.processes.release(key, plan, source, calibration)
        assert released.table.num_rows == 2
        forged = dataclasses.replace(calibration, cost=PrivacyLoss(calibration.cost.epsilon / 2, 0.0))
        with pytest.raises(InternalError, match="does not belong"):
            engine.processes.release(key, plan, source, forged)
    finally:
        server.stop(grace=1.0)


@pytest.mark.parametrize("value", ["-1", "65", '"two"'])
def test_engine_processes_is_checked(tmp_path, sandbox_dir, pki, value):
    write_config(tmp_path, sandbox_dir, pki, tables=False)
    toml = tmp_path / "dataops.toml"
    toml.write_text(toml.read_text().replace("[server]\n", f"[server]\nengine_processes = {value}\n", 1))
    with pytest.raises(ConfigError, match="engine_processes"):
        load_config(toml)
