"""Load harness: the real `dataops serve` under many concurrent consumers, then its invariants.

    python benchmarks/bench_load.py [--seconds 20] [--consumers 12] [--claims 1000000]

It prepares a demo work directory under benchmarks/.data/load-<claims>-<enterprises>
with `dataops.demo.session.prepare` (data and certificates are reused, the state
starts fresh), raises the dataset caps in its catalog copy, and starts `dataops serve
-c WORKDIR/dataops.toml` as a subprocess. Then:

1. baselines, measured in this run: a health-check RPC over the same mTLS channel
   (idle) and raw polars group-bys over the same Parquet;
2. a warm-up (`--warmup` seconds) with the full mix, which also measures how fast
   each DP consumer spends; from that it rewrites the workdir's policy copies (reloaded
   on SIGHUP) so that harbor-insurance's DP budget lasts the whole run and
   city-bank's runs out about `--exhaust-at` of the way through it;
3. the measured run: `--consumers` threads, each with its own `dataops.client.Client`
   (city-bank, river-bank and harbor-insurance in turn), for `--seconds`, sending a mix
   of catalog calls, aggregate queries, fresh DP releases with small epsilon, repeated
   DP questions (answered from the release store), estimates, budget reads and requests
   that must be refused (an identifier column, another zone's dataset, more epsilon than
   is left, DP on an aggregate-only grant). Every outcome is checked against what that
   kind of request must get; anything else is an *unexpected error*.

It prints throughput, p50/p99 latency per kind and overall, status counts and the
baselines, stops the server with SIGTERM and checks, printing PASS/FAIL for each:
the server exits 0; nothing is overspent; each consumer's ledger spend equals the
sum of the `spend.epsilon` its answered DP requests reported (exactly, in the ledger's
integer units); no reservation is left open; the audit log verifies, holds exactly one
record per request sent (status codes matching the client's counts) and contains
every receipt received; the server logged no error. Exit status 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import grpc
import polars as pl
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dataops._fs import take_pid_lock
from dataops.audit import find_receipt, load_public_key, verify_log
from dataops.audit.log import ACTIVE, segment_paths
from dataops.catalog import load_catalog
from dataops.client import Client, DataopsClientError, Receipt, count, count_units, mean, median, total
from dataops.config import load_config
from dataops.demo.session import CONSUMERS, prepare
from dataops.ir import MAX_EPSILON, Between, Equals, InSet
from dataops.ledger import Ledger
from dataops.policy import load_policies
from dataops.server.app import audit_path, ledger_path
from dataops.v1 import catalog_pb2, catalog_pb2_grpc, query_pb2, query_pb2_grpc

HERE = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"  # the server certificate names it; nothing leaves the host
DATASET = {
    "city-bank": "enterprise_credit",
    "river-bank": "enterprise_credit",
    "harbor-insurance": "medical_claims",
}
OTHER_ZONE = {
    "city-bank": "medical_claims",
    "river-bank": "medical_claims",
    "harbor-insurance": "enterprise_credit",
}
DP_CONSUMERS = ("city-bank", "harbor-insurance")  # river-bank's grant is aggregate-only
CAP = 1000.0  # the dataset caps for the run: far above the grants, so grants decide exhaustion
WARMUP_BUDGET = 99.0  # below MAX_EPSILON (100), so "more than is left" can always be asked
MAX_BUDGET = 99.0
MAX_REQUESTS_PER_THREAD = 200_000  # a bound besides the clock
TIMEOUT = 60.0  # per request

OK = grpc.StatusCode.OK
# Each kind of request and the outcomes it may have: OK, or (code, reason, rule) of a refusal.
DP_OUTCOMES = {OK, (grpc.StatusCode.RESOURCE_EXHAUSTED, "BUDGET_EXHAUSTED", "budget.grant")}
EXPECTED: dict[str, set] = {
    "catalog.list": {OK},
    "catalog.describe": {OK},
    "aggregate": {OK},
    "dp.fresh": DP_OUTCOMES,
    "dp.prime": {OK},  # the first ask of each repeated question, before the load
    "dp.repeat": {OK},  # answered from the release store, even once the budget is exhausted
    "estimate": {OK},
    "budget": {OK},
    "refused.identifier": {(grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED", "identifier")},
    "refused.zone": {(grpc.StatusCode.NOT_FOUND, "UNKNOWN_DATASET", "dataset.unknown")},
    "refused.over_budget": {(grpc.StatusCode.RESOURCE_EXHAUSTED, "BUDGET_EXHAUSTED", "budget.grant")},
    "refused.mode": {(grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED", "grant.modes")},
}
MIX = {  # relative weights per request
    "catalog.list": 4,
    "catalog.describe": 4,
    "aggregate": 24,
    "dp.fresh": 24,
    "dp.repeat": 6,
    "estimate": 10,
    "budget": 8,
    "refused.identifier": 5,
    "refused.zone": 5,
    "refused.over_budget": 5,
}
# river-bank may not ask DP questions: its DP share becomes aggregates and DP refusals.
RIVER_MIX = {
    **{k: v for k, v in MIX.items() if not k.startswith("dp.") and k != "refused.over_budget"},
    "aggregate": MIX["aggregate"] + MIX["dp.fresh"],
    "refused.mode": MIX["dp.repeat"] + 5,
}

# -- the questions -------------------------------------------------------------------

CREDIT_DIMENSIONS = [
    ("district",),
    ("size_band",),
    ("industry",),
    ("district", "size_band"),
    ("industry", "size_band"),
]
CREDIT_MEASURES = [
    [count_units(), mean("tax_paid")],
    [count(), total("registered_capital")],
    [count_units(), mean("si_headcount"), mean("penalties")],
]
CREDIT_FILTERS = [
    [],
    [InSet("industry", ("Manufacturing", "Construction", "Logistics"))],
    [InSet("size_band", ("micro", "small"))],
    [Equals("district", "Dongcheng")],
    [InSet("industry", ("Wholesale & Retail", "Catering")), InSet("size_band", ("small", "medium"))],
]
CREDIT_DP_DIMENSIONS = [
    ("size_band",),
    ("district",),
    ("industry",),
    ("year_founded",),
    ("district", "size_band"),
]
CREDIT_DP_MEASURES = [
    [count(), total("tax_paid")],
    [count("enterprises")],
    [mean("penalties")],
    [count(), total("penalties")],
    [median("tax_paid")],
]

CLAIM_DIMENSIONS = [
    ("age_band",),
    ("age_band", "sex"),
    ("district",),
    ("diagnosis_group",),
    ("hospital_level", "visit_type"),
]
CLAIM_MEASURES = [
    [count_units(), mean("amount")],
    [count(), total("reimbursed")],
    [count_units(), mean("amount"), mean("reimbursed")],
]
CLAIM_FILTERS = [
    [],
    [Equals("visit_type", "inpatient")],
    [InSet("hospital_level", ("secondary", "tertiary"))],
    [Equals("sex", "F")],
    [InSet("age_band", ("45-59", "60-74", "75+")), Equals("visit_type", "outpatient")],
]
CLAIM_DP_DIMENSIONS = [
    ("age_band",),
    ("sex",),
    ("age_band", "sex"),
    ("diagnosis_group",),
    ("hospital_level", "visit_type"),
]
CLAIM_DP_MEASURES = [
    [count(), total("amount")],
    [mean("amount")],
    [count()],
    [median("amount")],
    [count(), total("reimbursed")],
]

RIVER_DIMENSIONS = [("district",), ("size_band",), ("district", "size_band")]
RIVER_MEASURES = [[count_units(), mean("penalties")], [count()], [count_units()]]
RIVER_FILTERS = [[], [InSet("size_band", ("micro", "small"))], [Equals("size_band", "medium")]]

REPEAT_EPSILON = 0.02
REPEATED = {  # the questions asked again and again: one release each, then reuse
    "city-bank": [
        dict(aggregates=[count(), total("tax_paid")], group_by=["district"]),
        dict(aggregates=[count()], group_by=["size_band"]),
        dict(aggregates=[mean("penalties")], group_by=["industry"]),
        dict(aggregates=[count()], group_by=["year_founded"], filters=[Equals("size_band", "small")]),
    ],
    "harbor-insurance": [
        dict(aggregates=[count(), mean("amount")], group_by=["age_band"]),
        dict(aggregates=[count()], group_by=["diagnosis_group"]),
        dict(aggregates=[total("reimbursed")], group_by=["sex"]),
        dict(aggregates=[count()], group_by=["district"], filters=[Equals("visit_type", "inpatient")]),
    ],
}


def dp_question(consumer: str, rng: random.Random) -> dict[str, Any]:
    """A DP question with fresh parameters (the epsilon alone makes it a new release)."""
    if consumer == "city-bank":
        filters = rng.choice(
            [
                [],
                [Between("year_founded", rng.randint(1960, 2015), None)],
                [InSet("industry", tuple(rng.sample(CREDIT_FILTERS[1][0].values, 2)))],
            ]
        )
        return dict(
            aggregates=rng.choice(CREDIT_DP_MEASURES),
            group_by=list(rng.choice(CREDIT_DP_DIMENSIONS)),
            filters=filters,
        )
    filters = rng.choice(
        [
            [],
            [Equals("visit_type", rng.choice(["inpatient", "outpatient", "emergency"]))],
            [InSet("district", tuple(rng.sample(["Dongcheng", "Nanhu", "Hexi", "Lingang"], 2)))],
        ]
    )
    return dict(
        aggregates=rng.choice(CLAIM_DP_MEASURES),
        group_by=list(rng.choice(CLAIM_DP_DIMENSIONS)),
        filters=filters,
    )


def small_epsilon(rng: random.Random) -> float:
    return round(rng.uniform(0.01, 0.05), 9)


# -- one consumer thread ---------------------------------------------------------------


@dataclass
class Outcome:
    phase: str
    kind: str
    consumer: str
    started: float  # time.perf_counter()
    seconds: float
    code: str  # a gRPC status code name, or EXCEPTION for an error not from the server
    reason: str | None = None
    rule: str | None = None
    receipt: Receipt | None = None
    epsilon: float = 0.0  # spend.epsilon of an answered DP query
    reused: bool = False
    problem: str | None = None  # why the outcome is unexpected, if it is


class Consumer:
    """One load thread: its own client (own channel, own TLS session) and its view of its budget."""

    def __init__(self, target: str, pki: Path, consumer: str, seed: int, budget: float) -> None:
        self.consumer = consumer
        self.dataset = DATASET[consumer]
        self.client = Client.from_directory(target, pki / "consumers" / consumer, consumer, timeout=TIMEOUT)
        # ListDatasets and GetBudget through the generated stubs: `Client.list_datasets()`
        # and `Client.budgets()` return lists and drop the response's receipt.
        self._catalog = catalog_pb2_grpc.CatalogServiceStub(self.client.channel)
        self._query = query_pb2_grpc.QueryServiceStub(self.client.channel)
        self.rng = random.Random(seed)
        self.remaining = budget  # only ever lowered: the real remaining budget is at most this
        self.last_total: float | None = None  # the grant's epsilon total, from the last budget read
        self.mix = RIVER_MIX if consumer == "river-bank" else MIX

    def _rpc(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=TIMEOUT)
        except grpc.RpcError as error:
            raise DataopsClientError.from_rpc_error(error) from None

    def request(self, kind: str, phase: str, question: dict[str, Any] | None = None) -> Outcome:
        action = self._action(kind, question)
        started = time.perf_counter()
        outcome = Outcome(phase, kind, self.consumer, started, 0.0, "OK")
        try:
            result = action()
        except DataopsClientError as err:
            outcome.seconds = time.perf_counter() - started
            outcome.code, outcome.reason, outcome.rule = err.code.name, err.reason, err.rule
            if "receipt_sequence" in err.metadata:
                outcome.receipt = Receipt(int(err.metadata["receipt_sequence"]), err.metadata["receipt_hash"])
        except Exception as exc:  # noqa: BLE001 - anything not from the server is unexpected
            outcome.seconds = time.perf_counter() - started
            outcome.code, outcome.problem = "EXCEPTION", f"{type(exc).__name__}: {exc}"
            return outcome
        else:
            outcome.seconds = time.perf_counter() - started
            outcome.receipt = Receipt(result.receipt.sequence, result.receipt.hash)
            if kind.startswith("dp.") and result.spend is not None:
                outcome.epsilon, outcome.reused = result.spend.epsilon, result.reused
                self.remaining = min(self.remaining, result.spend.remaining_epsilon)
            if kind == "budget":
                for budget in result.budgets:
                    if budget.dataset_id == self.dataset:
                        self.last_total = budget.epsilon_total
                        self.remaining = min(self.remaining, budget.epsilon_total - budget.epsilon_spent)
        outcome.problem = self._problem(outcome)
        return outcome

    def _action(self, kind: str, question: dict[str, Any] | None) -> Callable[[], Any]:
        c, rng, dataset = self.client, self.rng, self.dataset
        if kind == "catalog.list":
            return lambda: self._rpc(self._catalog.ListDatasets, catalog_pb2.ListDatasetsRequest())
        if kind == "catalog.describe":
            return lambda: c.describe(dataset)
        if kind == "budget":
            return lambda: self._rpc(self._query.GetBudget, query_pb2.GetBudgetRequest())
        if kind == "aggregate":
            if self.consumer == "city-bank":
                shape = (CREDIT_DIMENSIONS, CREDIT_MEASURES, CREDIT_FILTERS)
            elif self.consumer == "river-bank":
                shape = (RIVER_DIMENSIONS, RIVER_MEASURES, RIVER_FILTERS)
            else:
                shape = (CLAIM_DIMENSIONS, CLAIM_MEASURES, CLAIM_FILTERS)
            dims, measures, filters = (rng.choice(x) for x in shape)
            return lambda: c.query(dataset, aggregates=measures, group_by=list(dims), filters=filters)
        if kind == "dp.fresh":
            question, epsilon = dp_question(self.consumer, rng), small_epsilon(rng)
            return lambda: c.query(dataset, mode="dp", epsilon=epsilon, **question)
        if kind in ("dp.repeat", "dp.prime"):
            question = question or rng.choice(REPEATED[self.consumer])
            return lambda: c.query(dataset, mode="dp", epsilon=REPEAT_EPSILON, **question)
        if kind == "estimate":
            if self.consumer == "river-bank":
                return lambda: c.estimate(dataset, aggregates=[count_units()], group_by=["district"])
            question, epsilon = dp_question(self.consumer, rng), small_epsilon(rng)
            return lambda: c.estimate(dataset, mode="dp", epsilon=epsilon, **question)
        if kind == "refused.identifier":
            unit = "person_id" if dataset == "medical_claims" else "enterprise_id"
            if rng.random() < 0.5:
                return lambda: c.query(dataset, aggregates=[count()], group_by=[unit])
            return lambda: c.query(dataset, aggregates=[count()], filters=[Equals(unit, "X0000001")])
        if kind == "refused.zone":
            return lambda: c.query(OTHER_ZONE[self.consumer], aggregates=[count()])
        if kind == "refused.over_budget":
            # More than this thread last saw left (which only shrinks), and at most
            # MAX_EPSILON; every grant budget is below MAX_EPSILON, so it is always over.
            epsilon = min(MAX_EPSILON, round(2 * self.remaining + 1 + rng.random() * 1e-3, 9))
            question = dp_question(self.consumer, rng)
            return lambda: c.query(dataset, mode="dp", epsilon=epsilon, **question)
        if kind == "refused.mode":
            return lambda: c.query(
                dataset, aggregates=[count()], group_by=["district"], mode="dp", epsilon=0.1
            )
        raise ValueError(kind)

    def _problem(self, outcome: Outcome) -> str | None:
        got: Any = (
            OK if outcome.code == "OK" else (grpc.StatusCode[outcome.code], outcome.reason, outcome.rule)
        )
        if got not in EXPECTED[outcome.kind]:
            return (
                f"{outcome.code} {outcome.reason} (rule {outcome.rule}) is not what {outcome.kind} should get"
            )
        if outcome.receipt is None or outcome.receipt.sequence <= 0:
            return "no audit receipt"
        if outcome.code != "OK":
            return None
        if outcome.kind in ("dp.fresh", "dp.prime") and (outcome.reused or outcome.epsilon <= 0):
            return "a new DP question was not released and debited"
        if outcome.kind == "dp.repeat" and (not outcome.reused or outcome.epsilon != 0):
            return "a repeated DP question was not answered from the release store for free"
        return None

    def run(self, phase: str, until: float, out: list[Outcome]) -> None:
        kinds, weights = list(self.mix), list(self.mix.values())
        for _ in range(MAX_REQUESTS_PER_THREAD):
            if time.perf_counter() >= until:
                break
            out.append(self.request(self.rng.choices(kinds, weights)[0], phase))

    def close(self) -> None:
        self.client.close()


def run_phase(phase: str, seconds: float, consumers: list[Consumer]) -> tuple[list[Outcome], float, float]:
    """All consumers at once for `seconds`; returns the outcomes, the start and the elapsed time."""
    results: list[list[Outcome]] = [[] for _ in consumers]
    started = time.perf_counter()
    threads = [
        threading.Thread(target=c.run, args=(phase, started + seconds, results[i]), name=f"load-{i}")
        for i, c in enumerate(consumers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + TIMEOUT + 30)
    if any(t.is_alive() for t in threads):
        raise SystemExit("load threads did not finish in time")
    return [o for part in results for o in part], started, time.perf_counter() - started


# -- the server --------------------------------------------------------------------------


class Server:
    """`dataops serve -c TOML` in a subprocess; its stderr goes to a log file."""

    def __init__(self, toml: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        # env: the server's environment (default ours), e.g. PYTHONPATH at another checkout.
        exe = Path(sys.executable).with_name("dataops")
        command = (
            [str(exe)]
            if exe.exists()
            else [sys.executable, "-c", "import sys; from dataops.cli import main; sys.exit(main())"]
        )
        self.log_path = log_path
        with log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [*command, "serve", "-c", str(toml)], stdout=subprocess.PIPE, stderr=log, text=True, env=env
            )
        lines: queue.Queue[str] = queue.Queue()
        # Drain stdout for the process's whole life, so it never blocks on a full pipe.
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        self.port = 0
        deadline = time.monotonic() + 120
        while not self.port and time.monotonic() < deadline and self.proc.poll() is None:
            try:
                found = re.search(r"serving on \S+:(\d+) ", lines.get(timeout=0.5))
            except queue.Empty:
                continue
            self.port = int(found.group(1)) if found else 0
        if not self.port:
            self.kill()
            raise SystemExit(f"dataops serve did not start; see {log_path}")

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM, then wait; returns the exit code (None if it had to be killed) and the time taken."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = None
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


class HealthProber:
    """Health checks over mTLS (carry no data, not audited): idle, then every 50 ms under load."""

    def __init__(self, target: str, pki: Path) -> None:
        self.client = Client.from_directory(target, pki / "consumers" / "river-bank", "river-bank")
        self.stub = health_pb2_grpc.HealthStub(self.client.channel)
        self.samples: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        response = self.stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"health status {response.status}")

    def start(self) -> None:
        def probe() -> None:
            for _ in range(MAX_REQUESTS_PER_THREAD):
                if self._stop.wait(0.05):
                    return
                started = time.perf_counter()
                try:
                    self.check()
                except Exception:  # noqa: BLE001 - counted and reported
                    self.failures += 1
                else:
                    self.samples.append(time.perf_counter() - started)

        self._thread = threading.Thread(target=probe, name="health-prober", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=TIMEOUT + 5)
        self.client.close()


# -- the work directory ----------------------------------------------------------------


def set_budget_line(text: str, table: str, epsilon: float) -> str:
    """`epsilon = …` of the first `[table]` in a TOML text, replaced."""
    pattern = re.compile(rf"(^\[{re.escape(table)}\][^\n]*\n(?:(?!\[)[^\n]*\n)*?)epsilon = [0-9.eE+-]+", re.M)
    text, found = pattern.subn(rf"\g<1>epsilon = {epsilon!r}", text, count=1)
    if found != 1:
        raise SystemExit(f"no epsilon under [{table}]")
    return text


def set_grant_budgets(workdir: Path, budgets: dict[str, float]) -> None:
    for consumer, epsilon in budgets.items():
        path = workdir / "policies" / f"{consumer}.toml"
        text = set_budget_line(path.read_text(), "grants.budget", epsilon)
        temporary = path.with_name(path.name + ".tmp")  # not *.toml: the server never reads it half-written
        temporary.write_text(text)
        os.replace(temporary, path)


_HELD: dict[Path, int] = {}  # work directory -> its lock's descriptor, held until this process exits


def hold_workdir(workdir: Path) -> None:
    """Take the work directory for this run, or exit naming the run that has it.

    `prepare` starts the state afresh and each mode restarts the server: a second
    benchmark on the same directory would delete the first one's audit log and signer
    under its running server (seen: its appends then failed) or take its port and lock.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if workdir.resolve() in _HELD:  # prepared again by this run (a flock on a second descriptor would fail)
        return
    fd, holder = take_pid_lock(workdir / ".bench.lock")
    if fd is None:
        sys.exit(f"{workdir}: another benchmark (pid {holder}) is running on this work directory")
    _HELD[workdir.resolve()] = fd


def prepare_workdir(args: argparse.Namespace) -> Path:
    workdir = HERE / ".data" / f"load-{args.claims}-{args.enterprises}"
    hold_workdir(workdir)
    prepare(workdir, claims=args.claims, enterprises=args.enterprises, out=print)
    for dataset in ("enterprise_credit", "medical_claims"):
        entry = workdir / "catalog" / f"{dataset}.toml"
        entry.write_text(set_budget_line(entry.read_text(), "budget", CAP))
    set_grant_budgets(workdir, {c: WARMUP_BUDGET for c in DP_CONSUMERS})
    toml = workdir / "dataops.toml"
    text = toml.read_text()
    workers = int(re.search(r"^workers = (\d+)", text, re.M).group(1))
    # The server turns away RPCs beyond workers * 4 at once (RESOURCE_EXHAUSTED, not
    # audited): keep every client thread (and the health prober) within it.
    wanted = max(args.workers or workers, math.ceil((args.consumers + 1) / 4))
    toml.write_text(re.sub(r"^workers = \d+", f"workers = {wanted}", text, count=1, flags=re.M))
    return workdir


# -- figures -------------------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f}"


def units(epsilon: float) -> int:
    """The ledger's exact integer units: epsilon in 1e-12, rounded up from the shortest repr."""
    return int(Decimal(repr(float(epsilon))).scaleb(12).to_integral_value(ROUND_CEILING))


def time_it(action: Callable[[], object], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return samples


def read_audit(directory: Path) -> list[dict[str, Any]]:
    records = []
    for segment in segment_paths(directory / ACTIVE):
        records += [json.loads(line) for line in segment.read_bytes().split(b"\n") if line]
    return records


# -- the run -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the measured run (default 20)")
    parser.add_argument("--consumers", type=int, default=12, help="concurrent client threads (default 12)")
    parser.add_argument("--claims", type=int, default=1_000_000, help="medical claim rows (default 1M)")
    parser.add_argument("--enterprises", type=int, default=200_000, help="enterprises (default 200k)")
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="seconds of warm-up, which sizes the budgets"
    )
    parser.add_argument(
        "--exhaust-at",
        type=float,
        default=0.6,
        help="fraction of the run by which city-bank's DP budget should be spent (default 0.6)",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="server worker threads (default: the config's)"
    )
    parser.add_argument("--seed", type=int, default=20261122)
    args = parser.parse_args()
    if (
        args.consumers < 3
        or not 0 < args.seconds <= 3600
        or not 0 < args.warmup <= 600
        or not 0 < args.exhaust_at < 1
    ):
        parser.error(
            "need --consumers >= 3 (one per demo consumer), 0 < --seconds <= 3600, "
            "0 < --warmup <= 600 and 0 < --exhaust-at < 1"
        )

    workdir = prepare_workdir(args)
    config = load_config(workdir / "dataops.toml")
    pki = config.tls.ca_cert.parent
    catalog = load_catalog(config.paths.catalog, config.paths.sandbox)
    server = Server(workdir / "dataops.toml", workdir / "server.log")
    print(
        f"\ndataops serve on {server.target} (pid {server.proc.pid}, {config.server.workers} workers, "
        f"grace {config.server.grace_seconds:g} s); {args.consumers} consumer threads; {os.cpu_count()} CPUs"
    )
    outcomes: list[Outcome] = []
    clients: list[Consumer] = []
    try:
        # Baselines on the idle server and the same Parquet.
        prober = HealthProber(server.target, pki)
        prober.check()
        baseline = {"health": time_it(prober.check, 200)}
        claims_path, credit_path = catalog.get("medical_claims").path, catalog.get("enterprise_credit").path
        baseline["polars claims"] = time_it(
            lambda: (
                pl.scan_parquet(claims_path)
                .filter(pl.col("visit_type") == "inpatient")
                .group_by("age_band", "sex")
                .agg(pl.col("person_id").n_unique(), pl.col("amount").mean())
                .collect()
            ),
            15,
        )
        baseline["polars credit"] = time_it(
            lambda: (
                pl.scan_parquet(credit_path)
                .filter(pl.col("size_band").is_in(["micro", "small"]))
                .group_by("district")
                .agg(pl.col("enterprise_id").n_unique(), pl.col("tax_paid").mean())
                .collect()
            ),
            15,
        )

        # The repeated questions are asked once first: every later ask is a reuse.
        primers = {c: Consumer(server.target, pki, c, args.seed, WARMUP_BUDGET) for c in DP_CONSUMERS}
        clients += primers.values()
        for consumer, primer in primers.items():
            outcomes += [primer.request("dp.prime", "prime", question) for question in REPEATED[consumer]]
        threads = [
            Consumer(server.target, pki, CONSUMERS[i % len(CONSUMERS)], args.seed + i + 1, WARMUP_BUDGET)
            for i in range(args.consumers)
        ]
        clients += threads

        # Warm-up: the full mix, which also shows how fast each DP consumer spends.
        warm, _, warm_seconds = run_phase("warm-up", args.warmup, threads)
        outcomes += warm
        print(f"warm-up: {len(warm)} requests in {warm_seconds:.1f} s")
        budgets = {}
        for consumer in DP_CONSUMERS:
            spent = sum(o.epsilon for o in outcomes if o.consumer == consumer)
            rate = sum(o.epsilon for o in warm if o.consumer == consumer) / warm_seconds
            # city-bank runs out part-way through the run; harbor-insurance has thrice what it needs.
            share = args.exhaust_at if consumer == "city-bank" else 3.0
            budgets[consumer] = round(min(MAX_BUDGET, spent + max(0.05, share * rate * args.seconds)), 6)
            print(
                f"  {consumer}: spent epsilon {spent:.3f} so far, {rate:.3f}/s in warm-up "
                f"-> grant budget {budgets[consumer]:g} (MAX {MAX_BUDGET:g})"
            )
        set_grant_budgets(workdir, budgets)
        server.proc.send_signal(signal.SIGHUP)  # reload the policies now
        for consumer, primer in primers.items():
            for _ in range(150):  # up to 15 s for the reload to show
                outcomes.append(primer.request("budget", "reload"))
                if primer.last_total == budgets[consumer]:
                    break
                time.sleep(0.1)
            else:
                raise SystemExit(f"the server did not pick up {consumer}'s new budget")
        for thread in threads:
            thread.remaining = min(thread.remaining, budgets.get(thread.consumer, thread.remaining))

        # The measured run.
        prober.start()
        run, run_started, run_seconds = run_phase("run", args.seconds, threads)
        prober.stop()
        outcomes += run
    except BaseException:
        server.kill()
        raise
    finally:
        for client in clients:
            client.close()
    stop = server.terminate(timeout=config.server.grace_seconds + 30)
    return report(
        args,
        config,
        catalog,
        budgets,
        outcomes,
        run,
        run_started,
        run_seconds,
        baseline,
        prober,
        stop,
        server.log_path,
    )


def report(
    args, config, catalog, budgets, outcomes, run, run_started, run_seconds, baseline, prober, stop, log_path
) -> int:
    print(
        f"\n== measured run: {len(run)} requests in {run_seconds:.1f} s from {args.consumers} consumer "
        f"threads = {len(run) / run_seconds:.1f} requests/s =="
    )
    print(f"  {'kind':22} {'n':>6} {'p50 ms':>9} {'p99 ms':>9}   statuses")
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for o in run:
        by_kind[o.kind].append(o)
    for kind in [*EXPECTED, *sorted(set(by_kind) - set(EXPECTED))]:
        if kind in by_kind:
            samples = [o.seconds for o in by_kind[kind]]
            statuses = Counter(o.code if o.code == "OK" else f"{o.code}/{o.reason}" for o in by_kind[kind])
            print(
                f"  {kind:22} {len(samples):6} {ms(percentile(samples, 0.5))} {ms(percentile(samples, 0.99))}   "
                + ", ".join(f"{k} {v}" for k, v in statuses.most_common())
            )
    everything = [o.seconds for o in run]
    overall = percentile(everything, 0.5)
    print(f"  {'overall':22} {len(run):6} {ms(overall)} {ms(percentile(everything, 0.99))}")
    print("  status codes: " + ", ".join(f"{k} {v}" for k, v in Counter(o.code for o in run).most_common()))
    print(
        "  all phases (prime, warm-up, reload, run): "
        + ", ".join(f"{k} {v}" for k, v in Counter(o.code for o in outcomes).most_common())
        + f"; {len(outcomes)} requests"
    )
    for consumer in DP_CONSUMERS:
        refused = [
            o
            for o in run
            if o.consumer == consumer and o.kind == "dp.fresh" and o.reason == "BUDGET_EXHAUSTED"
        ]
        answered = sum(1 for o in run if o.consumer == consumer and o.kind == "dp.fresh" and o.code == "OK")
        when = (
            f"first refusal at {min(o.started for o in refused) - run_started:.1f} s" if refused else "never"
        )
        print(
            f"  {consumer}: budget {budgets[consumer]:g}; {answered} fresh DP releases, "
            f"{len(refused)} refused BUDGET_EXHAUSTED ({when})"
        )

    health, under_load = baseline["health"], prober.samples
    print("\n== baselines (same run) ==")
    print(
        f"  health check RPC, idle      p50 {ms(percentile(health, 0.5))} ms  p99 {ms(percentile(health, 0.99))} ms"
    )
    print(
        f"  health check RPC, under load p50 {ms(percentile(under_load, 0.5))} ms  "
        f"p99 {ms(percentile(under_load, 0.99))} ms  ({len(under_load)} probes, {prober.failures} failed)"
    )
    for name in ("polars claims", "polars credit"):
        print(f"  raw {name:24} median {ms(statistics.median(baseline[name]))} ms")
    claims_aggregate = [o.seconds for o in by_kind["aggregate"] if o.consumer == "harbor-insurance"]
    credit_aggregate = [o.seconds for o in by_kind["aggregate"] if o.consumer != "harbor-insurance"]
    print(
        f"  ratios: overall p50 / idle health p50 = {overall / percentile(health, 0.5):.1f}x, "
        f"/ health p50 under load = {overall / percentile(under_load, 0.5):.1f}x; "
        f"aggregate p50 on claims / raw polars = "
        f"{percentile(claims_aggregate, 0.5) / statistics.median(baseline['polars claims']):.1f}x; "
        f"on credit = {percentile(credit_aggregate, 0.5) / statistics.median(baseline['polars credit']):.1f}x"
    )

    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append((name, ok, detail))

    unexpected = [o for o in outcomes if o.problem]
    check(
        "no unexpected errors",
        not unexpected,
        f"{len(unexpected)} unexpected"
        + "".join(
            f"\n      {n} x {o.phase} {o.consumer} {o.kind}: {o.problem}" for o, n in _distinct(unexpected)
        ),
    )
    code, stop_seconds = stop
    check(
        "server exits 0 on SIGTERM",
        code == 0,
        f"exit code {code} after {stop_seconds:.2f} s (grace {config.server.grace_seconds:g} s)",
    )
    errors = [
        line
        for line in log_path.read_text(errors="replace").splitlines()
        if "Traceback" in line or " ERROR " in line or " CRITICAL " in line
    ]
    check(
        "server logged no errors",
        not errors,
        f"{len(errors)} lines in {log_path}" + "".join(f"\n      {line}" for line in errors[:5]),
    )
    ran_out = sorted({o.consumer for o in run if o.kind == "dp.fresh" and o.reason == "BUDGET_EXHAUSTED"})
    check("at least one consumer ran out of budget under load", bool(ran_out), ", ".join(ran_out) or "none")

    # The ledger, opened as a reader after the server stopped.
    from dataops.products import load_products

    policies = load_policies(config.paths.policies, catalog, load_products(config.paths.products, catalog))
    with Ledger(ledger_path(config), recover=False) as ledger:
        spends = ledger.budgets()
        statuses = dict(ledger._conn().execute("SELECT status, COUNT(*) FROM reservations GROUP BY status"))
        exact = {c: units(ledger.spent(c, DATASET[c]).epsilon) for c in DP_CONSUMERS}
    over = []
    for spend in spends:
        dataset = catalog.get(spend.dataset)
        if spend.consumer is None:
            limit = (dataset.budget.epsilon, dataset.budget.delta)
        else:
            grant = policies.get(spend.consumer).grants[spend.dataset].budget
            limit = (grant.epsilon, grant.delta)
        if spend.epsilon_spent > limit[0] or spend.delta_spent > limit[1]:
            over.append(
                f"{spend.consumer or 'dataset cap'}/{spend.dataset}: {spend.epsilon_spent} > {limit[0]}"
            )
    check(
        "no grant or dataset cap overspent",
        not over,
        "; ".join(over)
        or ", ".join(f"{s.consumer or 'cap'}/{s.dataset} {s.epsilon_spent:.6g}" for s in spends),
    )
    answered = {
        c: sum(units(o.epsilon) for o in outcomes if o.consumer == c and o.code == "OK") for c in DP_CONSUMERS
    }
    check(
        "ledger spend == sum of answered spend.epsilon (exact)",
        answered == exact,
        ", ".join(f"{c} ledger {exact[c]} vs answered {answered[c]} (1e-12 units)" for c in DP_CONSUMERS),
    )
    check(
        "no reservation left open",
        not statuses.get("reserved") and not statuses.get("orphaned"),
        ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())),
    )

    # The audit log, with the log's public key.
    directory = audit_path(config).parent
    public_key = load_public_key(directory / "signing.pub")
    receipts = [o.receipt for o in outcomes if o.receipt is not None]
    verification = verify_log(directory, public_key, want={r.sequence for r in receipts})
    check(
        "audit log verifies",
        verification.ok,
        "; ".join(map(str, verification.problems))
        or f"{verification.records} records, signed up to "
        f"{verification.signed_size}, {len(verification.checkpoints)} checkpoints",
    )
    check(
        "one audit record per request sent",
        verification.records == len(outcomes),
        f"{verification.records} records, {len(outcomes)} requests",
    )
    records = read_audit(directory)
    logged = Counter(r["code"] for r in records)
    sent = Counter(o.code for o in outcomes)
    check(
        "audit status codes match the client's", logged == sent, f"log {dict(logged)} vs client {dict(sent)}"
    )
    logged_spend = {
        c: sum(units(r["epsilon_spent"]) for r in records if r["consumer"] == c) for c in DP_CONSUMERS
    }
    check("audit epsilon_spent per consumer == ledger", logged_spend == exact, str(logged_spend))
    missing = [r for r in receipts if verification.found.get(r.sequence, ("",))[0] != r.hash]
    duplicates = len(receipts) - len({r.sequence for r in receipts})
    spot = [find_receipt(directory, r.sequence, r.hash, public_key) for r in (receipts[0], receipts[-1])]
    check(
        "every receipt received is in the log",
        not missing and not duplicates and all(s.ok for s in spot),
        f"{len(receipts)} receipts, {len(missing)} missing, {duplicates} duplicated; find_receipt: "
        + ", ".join(s.status for s in spot),
    )

    print("\n== checks ==")
    for name, ok, detail in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail else ""))
    failed = sum(not ok for _, ok, _ in checks)
    print(f"\n{'ALL PASS' if not failed else f'{failed} CHECK(S) FAILED'}")
    return 1 if failed else 0


def _distinct(outcomes: list[Outcome], limit: int = 10) -> list[tuple[Outcome, int]]:
    groups: dict[tuple, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        groups[(o.phase, o.consumer, o.kind, o.problem)].append(o)
    return [(group[0], len(group)) for group in list(groups.values())[:limit]]


if __name__ == "__main__":
    sys.exit(main())
