"""What knowing data by its content costs: data versions and authenticated prepared copies.

    PYTHONPATH=src python benchmarks/bench_versions.py [--rows 1000000 10000000] [--repeats 5]

For each size it generates (once, then reuses) the demo claims under
benchmarks/.data/versions-<rows>, and measures in the same run, against the baseline
"raw polars: count + sum(amount) by age_band over the Parquet" (about what one DP
release costs over the prepared copy):

  of (cached)     DataVersions.of on an unchanged file: realpath + stat, paid per query
  verify          DataVersions.verify: the streamed SHA-256 of the whole file, paid at
                  load, at each adoption of a copy, and every recheck_seconds
  build           PreparedStore: truncate, dense unit codes, write, hash, HMAC tag
  adopt           a new PreparedStore over an existing copy: verify the tag and the
                  copy's SHA-256, and the data's (what a restarted server pays)
  source (warm)   PreparedStore.source once adopted: two stats, paid per DP query
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

from dataops.catalog import load_catalog
from dataops.demo.generate import generate
from dataops.engines.prepared import PreparedStore
from dataops.versions import DataVersions

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATASET = "medical_claims"


def timed(action: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def bench(rows: int, repeats: int) -> None:
    root = HERE / ".data" / f"versions-{rows}"
    sandbox = root / "sandbox"
    if not (sandbox / "insurance" / f"{DATASET}.parquet").exists():
        generate(sandbox, enterprises=20_000, claims=rows)
    dataset = load_catalog(REPO / "catalog", sandbox).get(DATASET)
    size_mb = dataset.path.stat().st_size / 1e6

    def raw() -> None:
        pl.scan_parquet(dataset.path).group_by("age_band").agg(pl.len(), pl.col("amount").sum()).collect()

    versions = DataVersions()
    versions.verify(dataset)
    state = root / "state"
    shutil.rmtree(state, ignore_errors=True)

    def build() -> None:
        shutil.rmtree(state / "prepared", ignore_errors=True)
        PreparedStore(state).source(dataset)

    results = {
        "baseline (raw polars)": timed(raw, repeats),
        "of (cached)": timed(lambda: versions.of(dataset), max(repeats, 100)),
        "verify": timed(lambda: versions.verify(dataset), repeats),
        "build": timed(build, max(1, repeats // 2)),
        "adopt": timed(lambda: PreparedStore(state).source(dataset), repeats),
    }
    warm = PreparedStore(state)
    warm.source(dataset)
    results["source (warm)"] = timed(lambda: warm.source(dataset), max(repeats, 100))
    copy_mb = warm.source(dataset).path.stat().st_size / 1e6
    base = results["baseline (raw polars)"]
    print(f"\n{rows:,} rows: data {size_mb:.0f} MB, prepared copy {copy_mb:.0f} MB")
    for name, seconds in results.items():
        print(f"  {name:24} {seconds * 1e3:10.3f} ms   {seconds / base:8.4f} x baseline")
    shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for rows in args.rows:
        bench(rows, args.repeats)


if __name__ == "__main__":
    main()
