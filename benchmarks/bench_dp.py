"""DP query latency against raw polars: in-process and end to end over gRPC with mTLS.

    PYTHONPATH=src python benchmarks/bench_dp.py [--rows 1000000 10000000] [--repeats 7]

For each size it generates (once, then reuses) a demo work directory under
benchmarks/.data/claims-<rows> with `dataops.demo.session.prepare`, gives the
harbor-insurance grant and the medical_claims cap a benchmark-sized budget there,
and measures in the same run, for "count + sum(amount) by age_band":

  raw polars    the exact group-by over the same Parquet
  engine        DPQuery compile + calibrate + release over the prepared copy
  sandbox       Sandbox.run in process: plan, authorize, ledger debit, release
  end to end    the real server over loopback mTLS, through dataops.client
  reuse         end to end, the same question again: answered from the release store
  identifier    (reference) a release that truncates in the plan, as before prepared copies

Each real release asks for a slightly different epsilon (1 + i * 1e-6), since an
identical question would be answered from the release store for free. The one-off
cost of building the prepared copy is measured separately, into a scratch directory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re
import shutil
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import MappingProxyType

import polars as pl

from dataops.client import Client, count, total
from dataops.config import load_config
from dataops.demo.session import prepare
from dataops.engines._base import Plan
from dataops.engines.dp import DPQuery, enable_opendp
from dataops.engines.prepared import PreparedStore
from dataops.ir import Aggregate, Function, Mode, Privacy, Query
from dataops.policy import Grant
from dataops.server import build_server
from dataops.values import PrivacyLoss

HERE = Path(__file__).resolve().parent
CONSUMER, DATASET = "harbor-insurance", "medical_claims"
BUDGET = 100_000.0  # epsilon for the benchmark grant and dataset cap: room for every repeat

BENCH_POLICY = f"""\
# Written by benchmarks/bench_dp.py: a benchmark-only grant with a large budget.
consumer = "{CONSUMER}"
zone = "insurance"
description = "benchmark"
revoked = false

[[grants]]
dataset = "{DATASET}"
purpose = "benchmark"
expires = 2099-12-31
modes = ["dp"]
functions = ["count", "count_units", "sum", "mean", "quantile"]

[grants.budget]
epsilon = {BUDGET}
delta = 1e-6

[grants.columns]
age_band = ["dimension", "filter"]
amount = ["measure"]
"""


def workdir_for(rows: int) -> Path:
    workdir = HERE / ".data" / f"claims-{rows}"
    prepare(workdir, claims=rows, enterprises=20_000, out=print)
    # prepare() rewrites catalog and policies from the demo defaults: raise the budgets again.
    entry = workdir / "catalog" / f"{DATASET}.toml"
    cap = re.compile(r"(\[budget\][^\n]*\n)epsilon = [0-9.eE+-]+")
    text, found = cap.subn(rf"\g<1>epsilon = {BUDGET}", entry.read_text())
    if found != 1:
        raise SystemExit(f"could not raise the dataset cap in {entry}")
    entry.write_text(text)
    (workdir / "policies" / f"{CONSUMER}.toml").write_text(BENCH_POLICY)
    return workdir


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def bench(rows: int, repeats: int, identifier_repeats: int) -> dict[str, float]:
    workdir = workdir_for(rows)
    config = load_config(workdir / "dataops.toml")
    server = build_server(config).start()
    dataset = server.sandbox.catalog.get(DATASET)
    path = dataset.path
    results: dict[str, list[float]] = {}
    try:
        started = time.perf_counter()
        source = server.sandbox.prepared.source(dataset, wait=math.inf)  # the server's background build
        print(f"  the server's prepared copy was ready {time.perf_counter() - started:.2f} s after start")
        # The one-off build, timed alone into a scratch state directory.
        scratch = workdir / "bench-state"
        shutil.rmtree(scratch, ignore_errors=True)
        prepare_seconds = timed(lambda: PreparedStore(scratch).source(dataset))
        shutil.rmtree(scratch, ignore_errors=True)

        aggregates = (Aggregate(Function.COUNT), Aggregate(Function.SUM, "amount"))
        grant = Grant(
            dataset=DATASET, purpose="benchmark", expires=dt.date(2099, 12, 31), modes=frozenset(Mode),
            functions=frozenset(Function),
            budget=PrivacyLoss(BUDGET, 1e-6), columns=MappingProxyType({}),
        )  # fmt: skip

        def query(epsilon: float) -> Query:
            return Query(DATASET, aggregates, (), ("age_band",), Mode.DP, Privacy(epsilon=epsilon))

        def raw() -> None:
            pl.scan_parquet(path).group_by("age_band").agg(pl.len(), pl.col("amount").sum()).collect()

        def engine(epsilon: float, with_source: bool = True) -> None:
            plan = Plan(query(epsilon), dataset, grant)
            compiled = DPQuery.compile(plan, source=source if with_source else None)
            compiled.release(compiled.calibrate(plan.query.privacy))

        def sandbox(epsilon: float) -> None:
            result = server.sandbox.run(CONSUMER, query(epsilon)).result
            assert not result.reused

        keys = config.tls.ca_cert.parent / "consumers" / CONSUMER
        client = Client.from_directory(f"localhost:{server.port}", keys, CONSUMER)

        def end_to_end(epsilon: float, reused: bool = False) -> None:
            result = client.query(DATASET, aggregates=[count(), total("amount")], group_by=["age_band"],
                                  mode="dp", epsilon=epsilon)  # fmt: skip
            assert result.reused is reused and result.frame.height == 6

        end_to_end(1.0)  # warm-up; its release is the one the reuse path answers again
        raw(), engine(1.0), sandbox(0.9)
        for i in range(1, repeats + 1):
            epsilon = 1.0 + i * 1e-6  # a new question each time: a real release
            for name, action in (
                ("raw polars", raw),
                ("engine (in-process DP)", partial(engine, epsilon)),
                ("sandbox (in-process, ledger)", partial(sandbox, epsilon)),
                ("end to end (gRPC, mTLS)", partial(end_to_end, epsilon + 0.5)),
                ("end to end, reused release", partial(end_to_end, 1.0, reused=True)),
            ):
                results.setdefault(name, []).append(timed(action))
        for i in range(identifier_repeats):
            results.setdefault("identifier form (before)", []).append(timed(partial(engine, 2.0 + i, False)))
        client.close()
    finally:
        server.stop(grace=1.0)

    medians = {name: statistics.median(samples) for name, samples in results.items()}
    raw_median = medians["raw polars"]
    print(f"\n{rows:,} claim rows ({path.stat().st_size / 1e6:.0f} MB Parquet), median of {repeats}:")
    for name, median in medians.items():
        n = len(results[name])
        note = f"  (n={n})" if n != repeats else ""
        print(f"  {name:32s} {median * 1e3:9.1f} ms   {median / raw_median:6.2f}x raw{note}")
    print(f"  {'prepare (one-off per data version)':32s} {prepare_seconds * 1e3:9.1f} ms")
    return {**medians, "prepare": prepare_seconds}


def main() -> None:
    enable_opendp()  # as the server does at start
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--identifier-repeats",
        type=int,
        default=3,
        help="releases in the old in-plan truncation form, for reference (0: skip)",
    )
    args = parser.parse_args()
    summary = {rows: bench(rows, args.repeats, args.identifier_repeats) for rows in args.rows}
    print("\nsummary (median ms; ratio to raw polars)")
    for rows, medians in summary.items():
        raw = medians["raw polars"]
        engine, e2e = medians["engine (in-process DP)"], medians["end to end (gRPC, mTLS)"]
        reuse = medians["end to end, reused release"]
        print(
            f"  {rows:>12,} rows: raw {raw * 1e3:.1f}, engine {engine * 1e3:.1f} ({engine / raw:.2f}x), "
            f"end to end {e2e * 1e3:.1f} ({e2e / raw:.2f}x), reuse {reuse * 1e3:.1f}, "
            f"prepare {medians['prepare']:.2f} s"
        )


if __name__ == "__main__":
    main()
