"""Crashes and shutdowns of a real `dataops serve` process under concurrent load.

* SIGKILL mid-load: after a restart the ledger is consistent (nothing overspent,
  every answered DP request debited exactly once, in-flight reservations kept spent),
  the restarted server accepts the audit log and continues its chain, and every
  receipt a consumer received is in the log, which verifies after a clean stop.
* SIGTERM mid-load: requests already in flight are answered (drained within the
  grace period), new ones are refused, and the process exits 0.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

import grpc
import pytest

from conftest import write_config
from dataops.audit import load_public_key, verify_log
from dataops.client import (
    Client,
    DataopsClientError,
    Receipt,
    count,
    count_units,
    mean,
    median,
    quantile,
    total,
)
from dataops.ir import Between, Equals, InSet
from dataops.ledger import Ledger
from dataops.server import build_server
from dataops.server.app import audit_path, ledger_path

LOOPBACK = "127.0.0.1"  # the server certificate names it; all traffic stays on loopback
# The console script next to this interpreter; `python -c` with the same entry point otherwise.
DATAOPS = Path(sys.executable).with_name("dataops")
SERVE = (
    [str(DATAOPS)]
    if DATAOPS.exists()
    else [sys.executable, "-c", "import sys; from dataops.cli import main; sys.exit(main())"]
)
# The transport errors a client may see when the server dies or stops under it: the
# request's fate is unknown to the client, never a refusal by the service.
LOST = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


class Serving:
    """A `dataops serve -c TOML` subprocess and the port it announced."""

    def __init__(self, toml: Path, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen([*SERVE, "serve", "-c", str(toml)], stdout=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()
        # Drain stdout for the process's whole life so it never blocks on a full pipe.
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and self.proc.poll() is None, "dataops serve did not start"
            try:
                found = re.search(r"serving on \S+:(\d+) ", lines.get(timeout=min(remaining, 0.5)))
            except queue.Empty:
                continue
            if found:
                self.port = int(found.group(1))
                return

    def client(self, pki, consumer: str, timeout: float = 10.0) -> Client:
        return Client.from_directory(
            f"{LOOPBACK}:{self.port}", pki.consumer_dir(consumer), consumer, timeout=timeout
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@dataclass
class Outcome:
    index: int
    consumer: str
    dp: bool
    sent: float
    ended: float
    code: grpc.StatusCode
    reason: str | None = None
    receipt: Receipt | None = None
    epsilon: float = 0.0  # what the response says was spent
    reused: bool = False
    asked_epsilon: float = 0.0

    @property
    def answered(self) -> bool:
        return self.code is grpc.StatusCode.OK

    @property
    def lost(self) -> bool:
        return self.code in LOST


def units(epsilon: float) -> int:
    """Epsilon in the ledger's exact integer units (1e-12, rounded up, via its shortest repr)."""
    return int(Decimal(repr(float(epsilon))).scaleb(12).to_integral_value(ROUND_CEILING))


def ask(client: Client, consumer: str, index: int, dp: bool, query) -> Outcome:
    sent = time.monotonic()
    try:
        result = query()
    except DataopsClientError as err:
        receipt = None
        if "receipt_sequence" in err.metadata:
            receipt = Receipt(int(err.metadata["receipt_sequence"]), err.metadata["receipt_hash"])
        return Outcome(index, consumer, dp, sent, time.monotonic(), err.code, err.reason, receipt)
    spent = result.spend.epsilon if result.spend is not None else 0.0
    return Outcome(
        index,
        consumer,
        dp,
        sent,
        time.monotonic(),
        grpc.StatusCode.OK,
        None,
        result.receipt,
        spent,
        result.reused,
    )


def mixed_request(clients: dict[str, Client], index: int) -> Outcome:
    """Request `index` of the load: aggregates and DP releases, every one a distinct question."""
    epsilon = 0.05 + index * 1e-6  # distinct: no DP answer comes from the release store
    year = 1950 + index % 60
    kind = index % 4
    if kind == 0:
        client = clients["river-bank"]
        outcome = ask(
            client,
            "river-bank",
            index,
            False,
            lambda: client.query(
                "enterprise_credit",
                aggregates=[count_units(), mean("penalties")],
                group_by=["district"] if index % 8 else ["size_band"],
                filters=[InSet("size_band", ("micro", "small", "medium"))] if index % 8 else [],
            ),
        )
    elif kind == 1:
        client = clients["city-bank"]
        outcome = ask(
            client,
            "city-bank",
            index,
            True,
            lambda: client.query(
                "enterprise_credit",
                aggregates=[count(), total("tax_paid")],
                group_by=["size_band"],
                filters=[Between("year_founded", year, None)],
                mode="dp",
                epsilon=epsilon,
            ),
        )
    elif kind == 2:
        client = clients["harbor-insurance"]
        outcome = ask(
            client,
            "harbor-insurance",
            index,
            True,
            lambda: client.query(
                "medical_claims",
                aggregates=[count(), mean("amount"), median("amount")],
                group_by=["age_band", "sex"],
                filters=[Equals("visit_type", "outpatient")],
                mode="dp",
                epsilon=epsilon,
            ),
        )
    else:
        client = clients["harbor-insurance"]
        outcome = ask(
            client,
            "harbor-insurance",
            index,
            False,
            lambda: client.query(
                "medical_claims",
                aggregates=[count(), mean("amount")],
                group_by=["age_band", "sex"],
                filters=[Equals("visit_type", "inpatient")],
            ),
        )
    outcome.asked_epsilon = epsilon if outcome.dp else 0.0
    return outcome


def read_log(config) -> dict[int, dict]:
    """Every complete record by seq (a torn last line, left by a kill mid-write, is skipped)."""
    import json

    raw = audit_path(config).read_bytes()
    return {
        r["seq"]: r for r in (json.loads(line) for line in raw[: raw.rfind(b"\n") + 1].split(b"\n") if line)
    }


def reservations(config) -> list[tuple]:
    with Ledger(ledger_path(config), recover=False) as ledger:  # a reader: orphans nothing
        return (
            ledger._conn()
            .execute("SELECT id, consumer, dataset, epsilon, status, request FROM reservations")
            .fetchall()
        )


def test_a_server_killed_mid_load_restarts_with_a_consistent_ledger_and_log(tmp_path, sandbox_dir, pki):
    work = tmp_path / "work"
    work.mkdir()
    config = write_config(work, sandbox_dir, pki)
    serving = Serving(work / "dataops.toml")
    clients = {c: serving.client(pki, c) for c in ("city-bank", "river-bank", "harbor-insurance")}
    killed = threading.Event()
    outcomes: list[Outcome] = []

    def attempt(index: int) -> None:
        if not killed.is_set():  # once the server is dead, start nothing new
            outcomes.append(mixed_request(clients, index))

    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(attempt, i) for i in range(200)]
            deadline = time.monotonic() + 30
            # Kill once both DP consumers have answers and requests are certainly in flight.
            while sum(o.answered and o.dp for o in outcomes) < 10:
                assert time.monotonic() < deadline, "no answers under load"
                time.sleep(0.01)
            killed.set()
            serving.kill()  # SIGKILL: no drain, no checkpoint, no ledger close
            for future in futures:
                future.result(timeout=30)
    finally:
        serving.kill()
        for client in clients.values():
            client.close()

    answered = [o for o in outcomes if o.answered]
    lost = [o for o in outcomes if not o.answered]
    # Before the kill the service answered everything; after it only the transport fails.
    assert all(o.lost for o in lost), {(o.code, o.reason) for o in lost}
    assert len(lost) <= 8  # only the requests in flight at the kill: one per load thread
    assert not any(o.reused for o in answered)
    assert all(o.epsilon == pytest.approx(o.asked_epsilon) for o in answered if o.dp)

    # The killed log: the chain is intact; nothing signs its tail yet (signing happens
    # every 1000 records, every minute or at a clean stop).
    public_key = load_public_key(audit_path(config).parent / "signing.pub")
    killed_log = verify_log(audit_path(config).parent, public_key)
    assert {p.kind for p in killed_log.problems} <= {"unsigned"}, killed_log.problems
    before = read_log(config)
    last_seq = max(before)
    in_flight = [r for r in reservations(config) if r[4] == "reserved"]

    # Restart on the same state: the ledger orphans what was in flight, the log is accepted.
    server = build_server(config).start()
    try:
        with Client.from_directory(
            f"{LOOPBACK}:{server.port}", pki.consumer_dir("city-bank"), "city-bank", timeout=10
        ) as client:
            after = client.query(
                "enterprise_credit",
                aggregates=[count(), total("tax_paid")],
                group_by=["district"],
                mode="dp",
                epsilon=0.1,
            )
            exact = client.query(
                "enterprise_credit", aggregates=[count_units(), mean("tax_paid")], group_by=["size_band"]
            )
            [budget] = client.budgets("enterprise_credit")
    finally:
        server.stop(grace=1.0)
    # The restarted server continues the chain where the killed one stopped.
    assert (after.receipt.sequence, exact.receipt.sequence) == (last_seq + 1, last_seq + 2)
    log = read_log(config)
    assert log[last_seq + 1]["prev"] == before[last_seq]["hash"]
    assert log[last_seq + 1]["hash"] == after.receipt.hash and not after.reused

    # -- the ledger -----------------------------------------------------------------
    with Ledger(ledger_path(config), recover=False) as ledger:
        assert ledger._conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        spent = {(s.consumer, s.dataset): s.spent.epsilon for s in ledger.budgets()}
        spent_units = dict(ledger._conn().execute("SELECT consumer, epsilon FROM grant_spend").fetchall())
        doubled = (
            ledger._conn()
            .execute("SELECT reservation_id FROM releases GROUP BY reservation_id HAVING COUNT(*) > 1")
            .fetchall()
        )
        released = {row[0] for row in ledger._conn().execute("SELECT reservation_id FROM releases")}
    rows = reservations(config)
    statuses = {r[0]: r[4] for r in rows}
    # What was in flight at the kill stays spent for ever (fail closed), as 'orphaned'.
    assert "reserved" not in statuses.values()
    assert sorted(r[0] for r in in_flight) == sorted(i for i, s in statuses.items() if s == "orphaned")
    assert doubled == []
    for consumer, dataset in (("city-bank", "enterprise_credit"), ("harbor-insurance", "medical_claims")):
        assert spent[(consumer, dataset)] <= 5.0  # the grant budget (write_config's copy of policies/)
        assert spent[(None, dataset)] <= 30.0  # the dataset cap
    assert budget.epsilon_spent == pytest.approx(spent[("city-bank", "enterprise_credit")])

    # Every answered DP request is debited, exactly once; at most the requests that were
    # in flight (answered or not, the client cannot tell) add to it.
    new = {"city-bank": units(after.spend.epsilon)}
    for consumer in ("city-bank", "harbor-insurance"):
        answered_units = sum(units(o.epsilon) for o in answered if o.consumer == consumer and o.dp)
        lost_units = sum(units(o.asked_epsilon) for o in lost if o.consumer == consumer and o.dp)
        extra = spent_units[consumer] - new.get(consumer, 0) - answered_units
        assert 0 <= extra <= lost_units, (consumer, extra, lost_units)
    by_request: dict[tuple[str, str], list[tuple]] = {}
    for row in rows:
        by_request.setdefault((row[1], row[5]), []).append(row)
    matched: set[int] = set()
    for o in answered:
        if not o.dp:
            continue
        record = log[o.receipt.sequence]
        assert record["epsilon_spent"] == o.epsilon and not record["reused"]
        # The reservation carries the audit record's request id.
        [reservation] = by_request[(o.consumer, record["request_id"])]
        assert reservation[4] == "released" and reservation[3] == units(o.epsilon)
        assert reservation[0] in released and reservation[0] not in matched
        matched.add(reservation[0])

    # -- the audit log ----------------------------------------------------------------
    receipts = [o.receipt for o in outcomes if o.receipt is not None] + [after.receipt, exact.receipt]
    verification = verify_log(audit_path(config).parent, public_key, want={r.sequence for r in receipts})
    assert verification.ok, verification.problems
    assert verification.records == last_seq + 3 == verification.signed_size  # the clean stop signed it all
    for receipt in receipts:
        assert verification.found[receipt.sequence][0] == receipt.hash
    # One record per request the server saw: the answered and refused ones and, of the
    # lost ones, those whose record was written before the kill.
    # (Clients are witnesses: a GetConsistencyProof they sent when answers crossed is a request too.)
    witness_calls = sum(1 for r in before.values() if r["method"] == "GetConsistencyProof")
    assert len(answered) <= last_seq - witness_calls <= len(outcomes)


def _wait_until_not_serving(channel, timeout: float = 10.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                continue  # a slow answer on a loaded machine says nothing about stopping
            return  # no longer answering at all: stopping
        if status != health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.02)
    raise AssertionError("the server still reports SERVING long after SIGTERM")


@pytest.mark.parametrize("control", ["on", "off"])
def test_a_request_after_the_server_began_to_stop_is_refused_and_audited(
    control, tmp_path, sandbox_dir, pki, monkeypatch
):
    """Between NOT_SERVING and gRPC's own shutdown a stopping server still has an open
    transport: without the interceptor's stop flag a request there would be served."""
    work = tmp_path / "work"
    work.mkdir()
    config = write_config(work, sandbox_dir, pki)
    server = build_server(config).start()
    assert server.evaluator is not None
    if control == "off":
        monkeypatch.setattr(server.interceptor.stopping, "set", lambda: None)
    # Hold stop() where it has said NOT_SERVING but not yet stopped gRPC (it ends the
    # subject watches in between), so the late request falls in that window every time.
    in_window, release = threading.Event(), threading.Event()
    stop_watches = server.evaluator.stop_watches

    def held() -> None:
        in_window.set()
        release.wait(10)
        stop_watches()

    monkeypatch.setattr(server.evaluator, "stop_watches", held)
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 2.0})
    client = Client.from_directory(f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank")
    try:
        client.list_datasets()  # the connection is open before the stop begins
        stopper.start()
        assert in_window.wait(10)
        _wait_until_not_serving(client.channel)
        if control == "off":
            assert client.list_datasets()  # the attack: a stopping server starts new work
            return
        with pytest.raises(DataopsClientError) as refused:
            client.list_datasets()
    finally:
        release.set()
        stopper.join(30)
        client.close()
    assert refused.value.code is grpc.StatusCode.UNAVAILABLE
    assert (refused.value.reason, refused.value.rule) == ("SERVER_STOPPING", "server.stopping")
    assert refused.value.retry_after_seconds == 1
    assert refused.value.receipt is not None  # the refusal was audited before it was answered
    last = list(read_log(config).values())[-1]
    assert (last["method"], last["code"], last["rule"]) == ("ListDatasets", "UNAVAILABLE", "server.stopping")
    assert last["consumer"] == "city-bank"


def test_sigterm_drains_requests_in_flight_and_exits_0(tmp_path, sandbox_dir, pki):
    work = tmp_path / "work"
    work.mkdir()
    config = write_config(work, sandbox_dir, pki)
    # A grace far longer than a loaded machine needs to drain the burst, so that the burst
    # is never cut off by it; the exit-time check below still shows the server exits once
    # drained, not when the grace runs out.
    grace = 30.0
    toml = work / "dataops.toml"
    toml.write_text(toml.read_text().replace("grace_seconds = 2.0", f"grace_seconds = {grace}", 1))
    serving = Serving(toml)
    burst = 12  # below the server's concurrency limit (workers * 4), so none is turned away
    try:
        with serving.client(pki, "harbor-insurance", timeout=grace + 30) as client:
            warm = client.query(
                "medical_claims", aggregates=[count()], group_by=["sex"], mode="dp", epsilon=0.1
            )
            start = threading.Barrier(burst + 1, timeout=10)

            def heavy(index: int) -> Outcome:
                # Many groups and two quantiles: a few hundred ms each when twelve run at once.
                start.wait()
                return ask(
                    client,
                    "harbor-insurance",
                    index,
                    True,
                    lambda: client.query(
                        "medical_claims",
                        aggregates=[count(), total("amount"), median("amount"), quantile("reimbursed", 0.9)],
                        group_by=["district", "diagnosis_group"],
                        mode="dp",
                        epsilon=0.05 + index * 1e-6,
                    ),
                )

            with ThreadPoolExecutor(burst) as pool:
                futures = [pool.submit(heavy, i) for i in range(burst)]
                start.wait()
                time.sleep(0.25)  # every request has reached the server; most are still running
                sigterm_at = time.monotonic()
                serving.proc.send_signal(signal.SIGTERM)
                # A new request after SIGTERM is turned away, not served. Wait until the
                # server has acted on the signal (its health check stops saying SERVING;
                # health checks are not audited) rather than a fixed sleep a loaded
                # machine may outrun.
                with serving.client(pki, "harbor-insurance", timeout=5) as late:
                    _wait_until_not_serving(late.channel)
                    with pytest.raises(DataopsClientError) as refused:
                        late.list_datasets()
                outcomes = [f.result(timeout=grace + 10) for f in futures]
        code = serving.proc.wait(timeout=grace + 10)
        stopped = time.monotonic() - sigterm_at
    finally:
        serving.kill()

    assert refused.value.code is grpc.StatusCode.UNAVAILABLE
    assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * burst
    assert any(o.ended > sigterm_at for o in outcomes), (
        "nothing was in flight at SIGTERM: the burst is too light"
    )
    assert code == 0 and stopped < grace
    # Drained requests were audited like any other, and the stop signed the whole log.
    public_key = load_public_key(audit_path(config).parent / "signing.pub")
    receipts = [warm.receipt] + [o.receipt for o in outcomes]
    verification = verify_log(audit_path(config).parent, public_key, want={r.sequence for r in receipts})
    assert verification.ok, verification.problems
    assert verification.records == verification.signed_size  # the stop signed the whole log
    # The warm-up and the burst, each once. Besides them only what a loaded machine's
    # timing may add: the client witnessing the log (a consistency proof when the signer
    # moved on mid-burst), and the late request as an audited refusal if it reached the
    # interceptor before the transport closed.
    records = list(read_log(config).values())
    witnessing = {"GetCheckpoint", "GetConsistencyProof"}
    queries = [r for r in records if r["method"] not in witnessing]
    late = [r for r in queries if r["method"] == "ListDatasets"]
    assert all(r["code"] == "UNAVAILABLE" for r in late) and len(late) <= 1, late
    assert len(queries) - len(late) == burst + 1, [(r["method"], r["code"]) for r in records]
    assert all(r["code"] == "OK" for r in records if r["method"] in witnessing)
    assert all(verification.found[r.sequence][0] == r.hash for r in receipts)
    with Ledger(ledger_path(config), recover=False) as ledger:
        statuses = [row[0] for row in ledger._conn().execute("SELECT status FROM reservations")]
        assert statuses == ["released"] * (burst + 1)  # nothing left in flight
        assert ledger.spent("harbor-insurance", "medical_claims").epsilon == pytest.approx(
            0.1 + sum(o.epsilon for o in outcomes)
        )
