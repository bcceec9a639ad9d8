"""Admission lanes (dataops.server.lanes): cheap calls never wait behind DP scans.

Over the real server and mTLS, DP releases on enterprise_credit are made slow
deterministically: they block at a gate the test opens (no sleeps, no timing
asserts; every wait is for a state, with a generous bound). Each control is also
switched off, and the starvation it prevents is then shown to happen.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import grpc
import pyarrow.parquet as pq
import pytest

from conftest import audit_records, write_config
from dataops.catalog import load_catalog
from dataops.client import Client, DataopsClientError, count
from dataops.config import ConfigError, load_config
from dataops.engines import dp as dp_engine
from dataops.errors import DeadlineExceeded, LimitExceeded
from dataops.server import build_server
from dataops.server.lanes import ScanCosts, ScanLane, is_scan
from dataops.v1 import catalog_pb2, query_pb2

CREDIT = "enterprise_credit"
ON_OFF = pytest.mark.parametrize("control", ["on", "off"])


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def gate(monkeypatch):
    """DP releases on enterprise_credit block until the gate is set: slow scans."""
    release = dp_engine.DPQuery.release
    opened = threading.Event()
    opened.blocked = 0  # releases waiting at the gate now
    lock = threading.Lock()

    def slow_release(self, calibration):
        if self._compiled.dataset.id == CREDIT:
            with lock:
                opened.blocked += 1
            opened.wait(60)
        return release(self, calibration)

    monkeypatch.setattr(dp_engine.DPQuery, "release", slow_release)
    yield opened
    opened.set()


@pytest.fixture
def credit_rows(sandbox_dir) -> int:
    return pq.read_metadata(sandbox_dir / "finance" / "enterprise_credit.parquet").num_rows


def _start(tmp_path, sandbox_dir, pki, protected_tables, server_lines: str, **limits):
    work = tmp_path / "work"
    work.mkdir()
    config = write_config(work, sandbox_dir, pki, tables=protected_tables, server=server_lines, **limits)
    return config, build_server(config).start()


def _client(server, pki, consumer: str = "city-bank") -> Client:
    # witness=False: a witnessing client may fetch a consistency proof (an audited call
    # of its own), which the exact record counts below leave out.
    return Client.from_directory(
        f"localhost:{server.port}", pki.consumer_dir(consumer), consumer, witness=False
    )


def _scan(client: Client, i: int, timeout: float = 60.0):
    """A DP query on enterprise_credit (distinct epsilons: no reuse); the error if refused."""
    try:
        return client.query(
            CREDIT,
            aggregates=[count()],
            group_by=["district"],
            mode="dp",
            epsilon=0.01 + i * 1e-4,
            timeout=timeout,
        )
    except DataopsClientError as exc:
        return exc


def _exact(client: Client, timeout: float = 30.0):
    return client.query(CREDIT, aggregates=[count()], group_by=["size_band"], timeout=timeout)


@ON_OFF
def test_cheap_calls_are_answered_while_dp_scans_fill_their_lane(
    tmp_path, sandbox_dir, pki, protected_tables, gate, credit_rows, control
):
    """Attack (on availability): fill the server with slow DP scans; the same
    consumer's DescribeDataset and exact table lookups then queue behind them."""
    lanes = "scan_slots = 2\nscan_queue = 2\nscan_queue_seconds = 60" if control == "on" else "lanes = false"
    config, server = _start(
        tmp_path, sandbox_dir, pki, protected_tables, lanes, max_in_flight=2, max_in_flight_per_consumer=8
    )
    try:
        city = _client(server, pki)
        _exact(city)  # the table is loaded: the lookups below read it from memory
        with ThreadPoolExecutor(4) as pool:
            scans = [pool.submit(_scan, city, i) for i in range(4)]
            assert _wait_for(lambda: gate.blocked == 2)
            if control == "on":
                # Two scans run (blocked), two wait in the scan lane.
                assert _wait_for(lambda: server.scans.state() == (2, 2 * credit_rows, 2))
            else:
                # One shared lane of max_in_flight = 2: the scans hold it, the other two are shed.
                assert _wait_for(lambda: sum(f.done() for f in scans) == 2)
            try:
                described = city.describe(CREDIT)
                looked_up = _exact(city)
            except DataopsClientError as exc:
                described = looked_up = exc
            # Answered (or refused) while the scans still held their lane.
            held = server.scans.state() if server.scans is not None else None
            pending = sum(not f.done() for f in scans)
            gate.set()
            outcomes = [f.result(timeout=60) for f in scans]
        city.close()
    finally:
        gate.set()
        server.stop(1.0)
    assert pending == (4 if control == "on" else 2)
    records = [r for r in audit_records(config) if r["consumer"] == "city-bank"]
    assert len(records) == 1 + 4 + (2 if control == "on" else 1)  # warm-up, scans, the cheap calls
    if control == "off":
        assert isinstance(described, DataopsClientError)
        assert described.code is grpc.StatusCode.RESOURCE_EXHAUSTED and described.rule == "limits.concurrency"
        assert described.quota_violations[0][0] == "server"
        [record] = [r for r in records if r["method"] == "DescribeDataset"]
        assert (record["code"], record["rule"]) == ("RESOURCE_EXHAUSTED", "limits.concurrency")
        return
    assert held == (2, 2 * credit_rows, 2)
    assert not isinstance(described, DataopsClientError) and described.dataset.id == CREDIT
    assert not isinstance(looked_up, DataopsClientError) and looked_up.frame.height > 0
    assert not any(isinstance(o, DataopsClientError) for o in outcomes)  # the queued scans ran later
    assert [r["code"] for r in records if r["method"] == "DescribeDataset"] == ["OK"]


@ON_OFF
def test_scans_are_admitted_by_their_datasets_rows(
    tmp_path, sandbox_dir, pki, protected_tables, gate, credit_rows, control
):
    """A lane sized by rows: with room for one and a half scans of enterprise_credit
    the second waits; with room for two (the control off) both run at once."""
    room = credit_rows + credit_rows // 2 if control == "on" else 2 * credit_rows
    config, server = _start(
        tmp_path, sandbox_dir, pki, protected_tables, f"scan_slots = 4\nscan_rows_in_flight = {room}"
    )
    try:
        city = _client(server, pki)
        with ThreadPoolExecutor(2) as pool:
            scans = [pool.submit(_scan, city, i) for i in range(2)]
            if control == "on":
                assert _wait_for(lambda: server.scans.state() == (1, credit_rows, 1))
                assert _wait_for(lambda: gate.blocked == 1)
                assert server.scans.state() == (1, credit_rows, 1)  # the second still waits
            else:
                assert _wait_for(lambda: server.scans.state() == (2, 2 * credit_rows, 0))
                assert _wait_for(lambda: gate.blocked == 2)
            gate.set()
            outcomes = [f.result(timeout=60) for f in scans]
        city.close()
    finally:
        gate.set()
        server.stop(1.0)
    assert not any(isinstance(o, DataopsClientError) for o in outcomes)
    assert server.scans.state() == (0, 0, 0)


def test_a_scan_that_cannot_wait_is_refused_audited_and_spends_nothing(
    tmp_path, sandbox_dir, pki, protected_tables, gate, credit_rows
):
    config, server = _start(
        tmp_path,
        sandbox_dir,
        pki,
        protected_tables,
        "scan_slots = 1\nscan_queue = 1\nscan_queue_seconds = 60",
    )
    try:
        city = _client(server, pki)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_scan, city, 0)
            assert _wait_for(lambda: gate.blocked == 1)
            # Its client's deadline passes while it waits for the lane.
            expired = _scan(city, 1, timeout=1.0)
            assert _wait_for(lambda: server.scans.state() == (1, credit_rows, 0))  # it gave its place up
            queued = pool.submit(_scan, city, 2)
            assert _wait_for(lambda: server.scans.state() == (1, credit_rows, 1))
            full = _scan(city, 3)  # the queue is full: refused at once
            gate.set()
            answered = [first.result(timeout=60), queued.result(timeout=60)]
        budget = next(b for b in city.budgets() if b.dataset_id == CREDIT)
        city.close()
    finally:
        gate.set()
        server.stop(1.0)
    assert isinstance(expired, DataopsClientError) and expired.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(full, DataopsClientError)
    assert (full.code, full.reason, full.rule) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "LIMIT_EXCEEDED",
        "limits.scan_lane",
    )
    assert full.quota_violations[0][0] == "server"
    assert not any(isinstance(a, DataopsClientError) for a in answered)
    # Only the two answered releases were debited.
    assert budget.epsilon_spent == pytest.approx(sum(a.spend.epsilon for a in answered))
    records = [r for r in audit_records(config) if r["method"] == "RunQuery"]
    refusal = [(r["code"], r["rule"] if r["code"] != "OK" else None) for r in records]
    assert sorted(refusal) == sorted(
        [
            ("OK", None),
            ("OK", None),
            ("DEADLINE_EXCEEDED", "deadline.scan_lane"),
            ("RESOURCE_EXHAUSTED", "limits.scan_lane"),
        ]
    )
    assert all(r["epsilon_spent"] in (0, 0.0, None) for r in records if r["code"] != "OK")


# -- the lane on its own ----------------------------------------------------------------------


def test_the_scan_lane_admits_by_rows_in_arrival_order():
    lane = ScanLane(slots=4, rows_in_flight=100, queue=4, queue_seconds=30, per_consumer=8)
    lane.enter("a", 60)
    admitted: list[str] = []

    def wait(name: str, rows: int) -> None:
        lane.enter(name, rows)
        admitted.append(name)

    big = threading.Thread(target=wait, args=("big", 60))
    big.start()
    assert _wait_for(lambda: lane.state() == (1, 60, 1))
    small = threading.Thread(target=wait, args=("small", 10))  # would fit, but arrived later
    small.start()
    assert _wait_for(lambda: lane.state() == (1, 60, 2))
    assert admitted == []
    lane.leave("a", 60)
    big.join(10)
    small.join(10)
    assert admitted == ["big", "small"] and lane.state() == (2, 70, 0)
    lane.leave("big", 60)
    lane.leave("small", 10)
    # A scan larger than the whole lane runs alone rather than never.
    lane.enter("huge", 10_000)
    assert lane.state() == (1, 100, 0)
    lane.leave("huge", 10_000)
    assert lane.state() == (0, 0, 0)


def test_the_scan_lane_refuses_what_cannot_wait():
    lane = ScanLane(slots=1, rows_in_flight=100, queue=0, queue_seconds=30, per_consumer=2)
    lane.enter("a", 1)
    with pytest.raises(LimitExceeded) as err:
        lane.enter("b", 1)  # no queue
    assert err.value.rule == "limits.scan_lane"
    lane = ScanLane(slots=1, rows_in_flight=100, queue=4, queue_seconds=0.05, per_consumer=2)
    lane.enter("a", 1)
    with pytest.raises(LimitExceeded) as err:
        lane.enter("b", 1)  # waited queue_seconds
    assert err.value.rule == "limits.scan_lane"
    with pytest.raises(DeadlineExceeded) as err:
        lane.enter("b", 1, deadline=time.monotonic() - 1)
    assert err.value.rule == "deadline.scan_lane"
    with pytest.raises(DeadlineExceeded):
        lane.enter("b", 1, active=lambda: False)  # the client went away
    with pytest.raises(LimitExceeded) as err:
        lane = ScanLane(slots=4, rows_in_flight=100, queue=4, queue_seconds=30, per_consumer=1)
        lane.enter("a", 1)
        lane.enter("a", 1)  # per consumer
    assert err.value.rule == "limits.concurrency"
    assert lane.state() == (1, 1, 0)  # the refused ones left nothing behind


def test_only_dp_run_queries_are_scans():
    dp = query_pb2.RunQueryRequest(query=query_pb2.Query(dataset=CREDIT, mode=query_pb2.QUERY_MODE_DP))
    exact = query_pb2.RunQueryRequest(
        query=query_pb2.Query(dataset=CREDIT, mode=query_pb2.QUERY_MODE_AGGREGATE)
    )
    sql_dp = query_pb2.RunQueryRequest(sql=query_pb2.SqlQuery(text="SELECT 1", mode=query_pb2.QUERY_MODE_DP))
    estimate = query_pb2.EstimateQueryRequest(
        query=query_pb2.Query(dataset=CREDIT, mode=query_pb2.QUERY_MODE_DP)
    )
    assert is_scan("RunQuery", dp) and is_scan("RunQuery", sql_dp)
    assert not is_scan("RunQuery", exact)
    assert not is_scan("EstimateQuery", estimate)  # an estimate reads no data
    assert not is_scan("DescribeDataset", catalog_pb2.DescribeDatasetRequest(dataset_id=CREDIT))


def test_scan_costs_read_the_footer_once_per_version_and_only_of_visible_datasets(
    tmp_path, sandbox_dir, pki, monkeypatch
):
    config = write_config(tmp_path, sandbox_dir, pki, tables=False)
    catalog = load_catalog(config.paths.catalog, config.paths.sandbox)
    credit = catalog.get(CREDIT)
    reads = []
    real = pq.read_metadata
    monkeypatch.setattr(
        "dataops.server.lanes.pq.read_metadata", lambda path: reads.append(path) or real(path)
    )
    costs = ScanCosts(lambda consumer: [credit] if consumer == "city-bank" else [])
    request = query_pb2.RunQueryRequest(query=query_pb2.Query(dataset=CREDIT, mode=query_pb2.QUERY_MODE_DP))
    rows = real(credit.path).num_rows
    assert costs("city-bank", request) == rows
    assert costs("city-bank", request) == rows
    assert len(reads) == 1  # not per request
    # Another zone's dataset weighs as much as one that exists nowhere: admission
    # says nothing of data the consumer cannot see.
    assert costs("harbor-insurance", request) == 1
    sql = query_pb2.RunQueryRequest(sql=query_pb2.SqlQuery(text="SELECT ...", mode=query_pb2.QUERY_MODE_DP))
    assert costs("city-bank", sql) == rows  # the largest dataset it may see


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("lanes", '"yes"', "server.lanes: must be true or false, got 'yes'"),
        ("scan_slots", "0", "server.scan_slots: must be an integer >= 1, got 0"),
        ("scan_slots", "9", "server.scan_slots: must be at most workers (8)"),
        ("scan_rows_in_flight", "0", "server.scan_rows_in_flight: must be an integer >= 1, got 0"),
        ("scan_rows_in_flight", "1.5", "server.scan_rows_in_flight: must be an integer >= 1, got 1.5"),
        ("scan_queue", "-1", "server.scan_queue: must be an integer >= 0, got -1"),
        ("scan_queue_seconds", "-1", "server.scan_queue_seconds: must be >= 0.0, got -1"),
        ("scan_queue_seconds", "nan", "server.scan_queue_seconds: must be a finite number, got nan"),
        ("scan_lane", "1", "server.scan_lane: unknown key, did you mean 'scan_slots'?"),
    ],
)
def test_lane_settings_are_validated(tmp_path, key, value, message):
    path = tmp_path / "dataops.toml"
    path.write_text(f"[server]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)


def test_scan_slots_default_to_at_most_the_workers(tmp_path):
    path = tmp_path / "dataops.toml"
    path.write_text("[server]\nworkers = 2\n")
    assert load_config(path).server.scan_slots == 2
    path.write_text("[server]\n")
    assert load_config(path).server.scan_slots == 4


@ON_OFF
def test_dp_requests_that_run_no_engine_are_answered_while_the_scan_lane_is_full(
    tmp_path, sandbox_dir, pki, protected_tables, gate, credit_rows, monkeypatch, control
):
    """Only an engine run takes a scan-lane slot. With the one slot held by a slow scan
    and no queue, a repeated question (re-served from the release store), a DP query on
    an aggregate-only grant and one over budget are answered at once, while a fresh
    release is still refused by the lane. Switched off (the slot taken for the whole
    request, as before), all of them are refused limits.scan_lane."""
    if control == "off":
        join, part = ScanLane.join, ScanLane.part

        def whole_request(self, consumer):
            join(self, consumer)
            try:
                self.take(1)
            except BaseException:
                part(self, consumer)
                raise

        monkeypatch.setattr(ScanLane, "join", whole_request)
        monkeypatch.setattr(ScanLane, "part", lambda self, consumer: (self.give(1), part(self, consumer)))
        monkeypatch.setattr(ScanLane, "slot", lambda self, rows, deadline=None, active=None: nullcontext())
    config, server = _start(tmp_path, sandbox_dir, pki, protected_tables, "scan_slots = 1\nscan_queue = 0")
    repeated = {"aggregates": [count()], "group_by": ["sex"], "mode": "dp", "epsilon": 0.05}

    def ask(client: Client, dataset: str, **question):
        try:
            return client.query(dataset, timeout=30.0, **question)
        except DataopsClientError as exc:
            return exc

    try:
        city, harbor, river = (
            _client(server, pki, c) for c in ("city-bank", "harbor-insurance", "river-bank")
        )
        first = harbor.query("medical_claims", **repeated)  # released once: later asks are reuses
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(_scan, city, 0)
            assert _wait_for(lambda: gate.blocked == 1)
            full = server.scans.state()
            again = ask(harbor, "medical_claims", **repeated)
            mode = ask(river, CREDIT, aggregates=[count()], group_by=["district"], mode="dp", epsilon=0.1)
            over = ask(harbor, "medical_claims", aggregates=[count()], mode="dp", epsilon=9.0)
            fresh = ask(harbor, "medical_claims", aggregates=[count()], mode="dp", epsilon=0.07)
            still = server.scans.state()
            gate.set()
            scanned = slow.result(timeout=60)
        budget = next(b for b in harbor.budgets() if b.dataset_id == "medical_claims")
        for client in (city, harbor, river):
            client.close()
    finally:
        gate.set()
        server.stop(1.0)
    assert full == still == ((1, credit_rows, 0) if control == "on" else (1, 1, 0))
    assert not isinstance(scanned, DataopsClientError)
    refused = [o for o in (again, mode, over, fresh) if isinstance(o, DataopsClientError)]
    if control == "off":
        assert [(o.code, o.rule) for o in refused] == [
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "limits.scan_lane")
        ] * 4
        return
    assert not isinstance(again, DataopsClientError) and again.reused
    assert again.frame.equals(first.frame)  # the same noisy answer, not a new one
    assert isinstance(mode, DataopsClientError)
    assert (mode.code, mode.rule) == (grpc.StatusCode.PERMISSION_DENIED, "grant.modes")
    assert isinstance(over, DataopsClientError)
    assert (over.code, over.reason, over.rule) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "BUDGET_EXHAUSTED",
        "budget.grant",
    )
    # A release that needs the engine still waits for (here: is refused by) the lane,
    # after its budget was reserved: the reservation is refunded.
    assert isinstance(fresh, DataopsClientError)
    assert (fresh.code, fresh.rule) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "limits.scan_lane")
    assert budget.epsilon_spent == pytest.approx(first.spend.epsilon)
    records = [
        r for r in audit_records(config) if r["consumer"] == "harbor-insurance" and r["method"] == "RunQuery"
    ]
    assert [(r["code"], r.get("rule"), bool(r.get("reused"))) for r in records] == [
        ("OK", "grant", False),
        ("OK", "grant", True),
        ("RESOURCE_EXHAUSTED", "budget.grant", False),
        ("RESOURCE_EXHAUSTED", "limits.scan_lane", False),
    ]
    # The lane's refusal is recorded with what was asked (it was planned first), and spent nothing.
    assert records[-1]["dataset"] == "medical_claims" and records[-1]["query"]
    assert records[-1]["epsilon_spent"] in (0, 0.0, None)
