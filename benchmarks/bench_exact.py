"""Exact-answer latency: lookups in the protected table against a raw polars group-by.

    PYTHONPATH=src python benchmarks/bench_exact.py [--rows 1000000 10000000] [--repeats 500]

For each size it generates (once, then reuses) a demo work directory under
benchmarks/.data/exact-<rows> with `dataops.demo.session.prepare` (claims = rows), starts
the real server, waits for it to protect the claims table for that data version, and
measures in the same run, for "visits and mean claim by age band and sex, inpatient":

  raw polars   the same group-by over the same Parquet (the baseline: what a scan costs)
  sandbox      Sandbox.run in process: plan, authorize, table coverage, lookup (server time)
  end to end   the real server over loopback mTLS, through dataops.client

and prints p50/p99 per size, the ratios to raw polars, and how each latency moves
from the smallest size to the largest (flat: the answer never reads the data).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

from dataops.client import Client, count, mean
from dataops.config import load_config
from dataops.demo.session import prepare
from dataops.ir import Equals
from dataops.server import build_server

HERE = Path(__file__).resolve().parent
DATASET, CONSUMER, TABLE = "medical_claims", "harbor-insurance", "claims_by_demography_diagnosis"
GROUP_BY = ["age_band", "sex"]
FILTERS = [Equals("visit_type", "inpatient")]


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return statistics.median(ordered), p99


def sample(action: Callable[[], object], repeats: int) -> list[float]:
    action()  # warm
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        out.append(time.perf_counter() - started)
    return out


def bench(rows: int, repeats: int) -> dict[str, tuple[float, float]]:
    workdir = HERE / ".data" / f"exact-{rows}"
    prepare(workdir, claims=rows, enterprises=20_000, out=print)
    config = load_config(workdir / "dataops.toml")
    server = build_server(config).start()
    try:
        started = time.perf_counter()
        if not server.tables.wait_ready(timeout=3600):  # protected (or read back) once per data version
            raise SystemExit(f"the tables were not protected: {server.tables._failed}")
        print(
            f"  table {TABLE} ready {time.perf_counter() - started:.1f} s after start "
            f"(state/tables keeps it for this data version)"
        )
        path = server.sandbox.catalog.get(DATASET).path

        def raw() -> pl.DataFrame:
            return (
                pl.scan_parquet(path)
                .filter(pl.col("visit_type") == "inpatient")
                .group_by(GROUP_BY)
                .agg(pl.len().alias("visits"), pl.col("amount").mean())
                .collect()
            )

        query = Client.build(
            DATASET, aggregates=[count("visits"), mean("amount")], group_by=GROUP_BY, filters=FILTERS
        )

        def in_process() -> object:
            return server.sandbox.run(CONSUMER, query).result

        pki = config.tls.ca_cert.parent / "consumers" / CONSUMER
        with Client.from_directory(f"localhost:{server.port}", pki, CONSUMER) as client:
            answer = client.run(query)
            print(f"  {answer.frame.height} rows returned, {answer.rows_suppressed} suppressed")
            results = {
                "raw polars": percentiles(sample(raw, max(20, repeats // 20))),
                "sandbox": percentiles(sample(in_process, repeats)),
                "end to end": percentiles(sample(lambda: client.run(query), repeats)),
            }
    finally:
        server.stop(1.0)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()
    by_size = {}
    for rows in args.rows:
        print(f"\n{rows:,} claim rows")
        by_size[rows] = results = bench(rows, args.repeats)
        base = results["raw polars"][0]
        for name, (p50, p99) in results.items():
            ratio = "" if name == "raw polars" else f"   {p50 / base:6.3f}x raw polars (p50)"
            print(f"  {name:11} p50 {p50 * 1000:8.3f} ms   p99 {p99 * 1000:8.3f} ms{ratio}")
    if len(by_size) > 1:
        small, large = min(by_size), max(by_size)
        print(f"\nfrom {small:,} to {large:,} rows (p50, large / small):")
        for name in by_size[small]:
            print(f"  {name:11} {by_size[large][name][0] / by_size[small][name][0]:6.2f}x")


if __name__ == "__main__":
    main()
