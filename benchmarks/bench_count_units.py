"""COUNT_UNITS over a serving copy: time and peak RSS of the DP release, against raw polars.

    PYTHONPATH=src python benchmarks/bench_count_units.py [--rows 10000000 30000000] [--repeats 3]

The data and copies are bench_serving's (benchmarks/.data/serving-<rows>/, generated and
built there once; --data elsewhere). The question is "distinct persons by diagnosis group,
visit type and hospital level" (most persons reach several groups, so the per-unit step has
nearly a row per copy row). Each run is a fresh child process, so its VmHWM is its own:

  raw polars   the same question with the streaming engine over the raw Parquet,
               `group_by(dims).agg(n_unique(person_id))`: the baseline;
  DP           DPQuery compile + calibrate + release over the copy (the per-unit step
               deduplicated one range of unit codes at a time, dataops.engines.dp);
  DP one piece the same release with the per-unit step as one in-plan unique (the form
               before the ranges; UNIQUE_ROWS_PER_RANGE set past the copy's rows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_serving  # noqa: E402

DIMS = ("diagnosis_group", "visit_type", "hospital_level")  # --dims: others (comma-separated)


def child(mode: str, rows: int, repeats: int) -> None:
    import polars as pl

    from dataops.engines.build import peak

    dataset = bench_serving.dataset_for(rows)
    if mode == "raw":

        def run(i: int) -> None:
            question = pl.scan_parquet(dataset.path).group_by(DIMS).agg(pl.col("person_id").n_unique())
            assert question.collect(engine="streaming").height > 0

    else:
        import dataclasses

        from dataops.engines import dp
        from dataops.engines.prepared import PreparedStore
        from dataops.ir import Aggregate, Function

        dp.enable_opendp()
        if mode == "dp-one-piece":
            dp.UNIQUE_ROWS_PER_RANGE = 2**62
        source = PreparedStore(bench_serving.workdir_for(rows) / "state").source(dataset)

        def run(i: int) -> None:
            plan = bench_serving.plan_for(dataset, 1.0 + i * 1e-6)
            query = dataclasses.replace(
                plan.query, aggregates=(Aggregate(Function.COUNT_UNITS),), group_by=DIMS
            )
            plan = dataclasses.replace(plan, query=query)
            compiled = dp.DPQuery.compile(plan, source=source)
            assert compiled.release(compiled.calibrate(plan.query.privacy)).table.num_rows > 0

    run(0)
    times = []
    for i in range(1, repeats + 1):
        started = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - started)
    print(json.dumps({"seconds": statistics.median(times), "peak_rss_bytes": peak("VmHWM")}))


def measure(mode: str, rows: int, repeats: int) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--rows", str(rows), "--repeats", str(repeats),
         "--data", str(bench_serving.DATA), "--dims", ",".join(DIMS)],
        check=True, capture_output=True, text=True, env=env,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    global DIMS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000_000, 30_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=bench_serving.DATA)
    parser.add_argument("--dims", default=",".join(DIMS), help="the group-by columns, comma-separated")
    parser.add_argument("--child", choices=["raw", "dp", "dp-one-piece"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    bench_serving.DATA = args.data
    DIMS = tuple(d for d in args.dims.split(",") if d)
    if args.child:
        child(args.child, args.rows[0], args.repeats)
        return
    print(f"load average at start: {os.getloadavg()}; {os.cpu_count()} cores")
    gib = 2**30
    for rows in args.rows:
        bench_serving.generate(rows)
        from dataops.engines.prepared import PreparedStore

        started = time.perf_counter()
        PreparedStore(bench_serving.workdir_for(rows) / "state").source(bench_serving.dataset_for(rows))
        print(f"{rows:,} rows: copy ready in {time.perf_counter() - started:.1f} s")
        raw = measure("raw", rows, args.repeats)
        for mode in ("dp", "dp-one-piece"):
            r = measure(mode, rows, args.repeats)
            print(
                f"  {mode:13s} {r['seconds']:7.2f} s {r['peak_rss_bytes'] / gib:5.2f} GiB"
                f" | raw polars {raw['seconds']:6.2f} s {raw['peak_rss_bytes'] / gib:5.2f} GiB"
                f" | ratio time {r['seconds'] / raw['seconds']:5.2f}x, memory {r['peak_rss_bytes'] / raw['peak_rss_bytes']:4.2f}x"
            )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
