"""Serving copies at scale: build time and peak RSS, and DP against raw polars streaming.

    PYTHONPATH=src python benchmarks/bench_serving.py [--rows 1000000 10000000 30000000 100000000]
        [--repeats 5] [--billion] [--keep]

For each size it generates claim rows with the demo generator
(`dataops.demo.generate.medical_claims`) in chunks of 5M rows into one Parquet file
under benchmarks/.data/serving-<rows>/ (--data elsewhere; kept for the next run, but
for --billion's), then measures in the same run:

  build         `PreparedStore.source` from no copy to an adopted one: the memory-capped
                child's two passes, then hashing and tagging the copy. Peak RSS is the
                child's VmHWM (/proc; getrusage's ru_maxrss would include the RSS of this
                process at the fork, which the generation made large; RUSAGE_CHILDREN is
                printed too, with that caveat).
  raw polars    the question "count + sum(amount) by age_band" in plain polars with the
                streaming engine over the raw Parquet: the baseline.
  raw, async    the same with polars' other reader (POLARS_FORCE_ASYNC=1), which reads a
                local file in buffers instead of through a mapping of it: the one file
                an operator gives is read whole, and with the mapping its pages stay in
                RSS until the scan ends (about 5 MiB per million rows), so at 1.5 billion
                rows only this reader keeps the exact question under the bound.
  DP            DPQuery compile + calibrate + release of the same question over the copy.

The raw and DP runs each happen in a fresh child process (`--child`), so the peak RSS
printed for each (VmHWM) is that run's alone; times are medians of --repeats after one warm-up.

--billion adds the 1.5 billion claim-row case (about 22 GB of Parquet, generated in
chunks into <data>/serving-1500000000/ and deleted afterwards unless --keep):
the build, a DP question and the exact (raw polars streaming) one under the same memory
bound. It needs about 50 GB free and hours on two cores; it is not part of the default run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import MappingProxyType

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATASET = "medical_claims"
CHUNK_ROWS = 5_000_000
BILLION = 1_500_000_000
GIB = 2**30


DATA = HERE / ".data"  # --data: where the generated sizes live


def workdir_for(rows: int) -> Path:
    return DATA / f"serving-{rows}"


def generate(rows: int) -> Path:
    """The claims file, made chunk by chunk (each chunk its own random stream)."""
    import numpy as np
    import pyarrow.parquet as pq

    from dataops.demo.generate import ROW_GROUP_ROWS, medical_claims

    path = workdir_for(rows) / "insurance" / f"{DATASET}.parquet"
    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    started = time.perf_counter()
    streams = np.random.default_rng(20261202).spawn(math.ceil(rows / CHUNK_ROWS))
    writer = None
    try:
        for index, rng in enumerate(streams):
            n = min(CHUNK_ROWS, rows - index * CHUNK_ROWS)
            table = medical_claims(rng, n).to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(temporary, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            del table
    finally:
        if writer is not None:
            writer.close()
    os.replace(temporary, path)
    print(
        f"  generated {rows:,} rows ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s"
    )
    return path


def dataset_for(rows: int):
    from dataops.catalog import load_entry

    return load_entry(REPO / "catalog" / f"{DATASET}.toml", workdir_for(rows))


def plan_for(dataset, epsilon: float):
    from dataops.engines._base import Plan
    from dataops.ir import Aggregate, Function, Mode, Privacy, Query
    from dataops.policy import Grant
    from dataops.values import PrivacyLoss

    grant = Grant(
        dataset=DATASET, purpose="benchmark", expires=dt.date(2099, 12, 31), modes=frozenset(Mode),
        functions=frozenset(Function), budget=PrivacyLoss(1e9, 1e-6), columns=MappingProxyType({}),
    )  # fmt: skip
    aggregates = (Aggregate(Function.COUNT), Aggregate(Function.SUM, "amount"))
    return Plan(
        Query(DATASET, aggregates, (), ("age_band",), Mode.DP, Privacy(epsilon=epsilon)), dataset, grant
    )


def child(mode: str, rows: int, repeats: int, state: Path) -> None:
    """One measurement in this (fresh) process; prints its times and its peak RSS."""
    import polars as pl

    dataset = dataset_for(rows)
    if mode == "raw":

        def run(i: int) -> None:
            question = (
                pl.scan_parquet(dataset.path).group_by("age_band").agg(pl.len(), pl.col("amount").sum())
            )
            assert question.collect(engine="streaming").height == 6

    else:
        from dataops.engines.dp import DPQuery, enable_opendp
        from dataops.engines.prepared import PreparedStore

        enable_opendp()  # as the server does at start; this child is its own process

        source = PreparedStore(state).source(dataset)  # the copy the parent built: adopted

        def run(i: int) -> None:
            plan = plan_for(dataset, 1.0 + i * 1e-6)
            compiled = DPQuery.compile(plan, source=source)
            assert compiled.release(compiled.calibrate(plan.query.privacy)).table.num_rows == 6

    parts = RssParts()
    run(0)
    times = []
    for i in range(1, repeats + 1):
        started = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - started)
    parts.stop()
    from dataops.engines.build import peak

    print(json.dumps({"times": times, "peak_rss_bytes": peak("VmHWM"), **parts.peaks}))


class RssParts:
    """The peaks of this process's RSS in its two parts, sampled every 10 ms: what it
    allocated (RssAnon) and the pages of files it maps (RssFile: polars maps a Parquet
    file whole and reads it through the mapping; those pages are page cache, which the
    kernel can take back, but VmHWM counts them)."""

    def __init__(self) -> None:
        import threading

        self.peaks = {"peak_anon_bytes": 0, "peak_file_bytes": 0}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        names = {"RssAnon:": "peak_anon_bytes", "RssFile:": "peak_file_bytes"}
        while not self._done.wait(0.01):
            with open("/proc/self/status") as status:
                for line in status:
                    name = names.get(line.split(None, 1)[0])
                    if name:
                        self.peaks[name] = max(self.peaks[name], int(line.split()[1]) * 1024)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def measure(mode: str, rows: int, repeats: int, state: Path, *, force_async: bool = False) -> dict:
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "POLARS_FORCE_ASYNC": "1" if force_async else "0",
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--rows", str(rows), "--repeats", str(repeats),
         "--state", str(state), "--data", str(DATA)],
        check=True, capture_output=True, text=True, env=environment,
    ).stdout  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    return {
        "seconds": statistics.median(result["times"]),
        **{k: v for k, v in result.items() if k != "times"},
    }


def bench(rows: int, repeats: int) -> dict:
    from dataops.engines.prepared import PreparedStore

    generate(rows)
    dataset = dataset_for(rows)
    state = workdir_for(rows) / "state"
    shutil.rmtree(state, ignore_errors=True)
    store = PreparedStore(state)
    started = time.perf_counter()
    store.source(dataset)
    build_seconds = time.perf_counter() - started
    stats = store.last_build
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # max over children so far
    raw = measure("raw", rows, repeats, state)
    raw_async = measure("raw", rows, repeats, state, force_async=True)
    dp = measure("dp", rows, repeats, state)
    copy = store.source(dataset)
    result = {
        "rows": rows,
        "source_gb": dataset.path.stat().st_size / 1e9,
        "copy_gb": sum(part.stat().st_size for part in copy.parts) / 1e9,
        "copy_parts": len(copy.parts),
        "build_seconds": build_seconds,
        "child_seconds": stats["seconds"],
        "build_peak_rss_gib": stats["peak_rss_bytes"] / GIB,
        "children_peak_rss_gib": children_peak / GIB,
        "buckets": stats["buckets"],
        "raw_seconds": raw["seconds"],
        "raw_peak_rss_gib": raw["peak_rss_bytes"] / GIB,
        "raw_peak_anon_gib": raw["peak_anon_bytes"] / GIB,
        "raw_peak_file_gib": raw["peak_file_bytes"] / GIB,
        "raw_async_seconds": raw_async["seconds"],
        "raw_async_peak_rss_gib": raw_async["peak_rss_bytes"] / GIB,
        "dp_seconds": dp["seconds"],
        "dp_peak_rss_gib": dp["peak_rss_bytes"] / GIB,
        "dp_peak_anon_gib": dp["peak_anon_bytes"] / GIB,
        "dp_peak_file_gib": dp["peak_file_bytes"] / GIB,
    }
    print(
        f"\n{rows:,} claim rows ({result['source_gb']:.2f} GB Parquet; copy {result['copy_gb']:.2f} GB in "
        f"{result['copy_parts']} parts, {result['buckets']} buckets), medians of {repeats}:\n"
        f"  build            {build_seconds:8.2f} s  ({stats['seconds']:.2f} s in the child, "
        f"{build_seconds / rows * 1e9:.0f} ns/row)  peak RSS {result['build_peak_rss_gib']:.2f} GiB "
        f"(RUSAGE_CHILDREN {result['children_peak_rss_gib']:.2f} GiB)\n"
        f"  raw polars (streaming) {raw['seconds'] * 1e3:8.1f} ms  peak RSS {result['raw_peak_rss_gib']:.2f} GiB "
        f"(allocated {result['raw_peak_anon_gib']:.2f}, mapped file {result['raw_peak_file_gib']:.2f})\n"
        f"  raw, async reader      {raw_async['seconds'] * 1e3:8.1f} ms  peak RSS "
        f"{result['raw_async_peak_rss_gib']:.2f} GiB\n"
        f"  DP on the copy         {dp['seconds'] * 1e3:8.1f} ms  peak RSS {result['dp_peak_rss_gib']:.2f} GiB "
        f"(allocated {result['dp_peak_anon_gib']:.2f}, mapped file {result['dp_peak_file_gib']:.2f})"
        f"   {dp['seconds'] / raw['seconds']:.2f}x raw"
    )
    return result


def main() -> None:
    global DATA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[1_000_000, 10_000_000, 30_000_000, 100_000_000]
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--billion", action="store_true", help="add the 1.5 billion row case (slow, ~22 GB)")
    parser.add_argument("--keep", action="store_true", help="keep the 1.5 billion row data afterwards")
    parser.add_argument("--data", type=Path, default=DATA, help="where the generated data goes")
    parser.add_argument("--child", choices=["raw", "dp"], help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    DATA = args.data
    if args.child:
        child(args.child, args.rows[0], args.repeats, args.state)
        return
    print(f"load average at start: {os.getloadavg()}; {os.cpu_count()} cores")
    sizes = [*args.rows, *([BILLION] if args.billion else [])]
    summary = []
    for rows in sizes:
        try:
            summary.append(bench(rows, args.repeats if rows < BILLION else 1))
        finally:
            if rows == BILLION and not args.keep:
                shutil.rmtree(workdir_for(rows), ignore_errors=True)
    print(f"\nsummary (load average now {os.getloadavg()})")
    print("  rows          build s  ns/row  build RSS GiB  raw ms  raw RSS  async RSS  DP ms  DP RSS  DP/raw")
    for r in summary:
        print(
            f"  {r['rows']:>12,} {r['build_seconds']:8.1f} {r['build_seconds'] / r['rows'] * 1e9:7.0f} "
            f"{r['build_peak_rss_gib']:13.2f} {r['raw_seconds'] * 1e3:7.0f} {r['raw_peak_rss_gib']:7.2f} "
            f"{r['raw_async_peak_rss_gib']:10.2f} "
            f"{r['dp_seconds'] * 1e3:6.0f} {r['dp_peak_rss_gib']:7.2f} {r['dp_seconds'] / r['raw_seconds']:6.2f}x"
        )


if __name__ == "__main__":
    main()
