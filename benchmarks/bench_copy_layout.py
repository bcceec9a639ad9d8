"""What the serving copy's Parquet layout costs a fresh DP release, against the layout we write.

    PYTHONPATH=src:benchmarks python benchmarks/bench_copy_layout.py [--claims 500000] [--repeats 30] [--rounds 2]

A fresh DP release is most of a mixed load's CPU (docs/scale-out.md), and most of a
release is our polars reading the serving copy. This asks whether another layout of the
same rows would read faster: it prepares bench_load's demo work directory
(`bench_load.prepare_workdir`), builds the claims copy as the server does
(`PreparedStore.source`, in a state directory of its own), rewrites its rows with pyarrow under other compressions, and
releases the same DP questions through the real engine (`DPQuery.release`) over each, the
copy's `parts` pointed at the rewritten files (the same rows in the same order: the same
analysis and the same answers, noise aside). Per question shape it prints the process CPU
per release and its ratio to the copy as built, measured in the same round, and each
layout's size. Rounds alternate the layouts, since these machines drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import MappingProxyType

import pyarrow.parquet as pq

import bench_load as load
from dataops.catalog import load_catalog
from dataops.config import load_config
from dataops.engines._base import Plan
from dataops.engines.build import COPY_ROW_GROUP_ROWS
from dataops.engines.dp import DPQuery, PreparedSource, enable_opendp
from dataops.engines.prepared import PreparedStore
from dataops.ir import Aggregate, Equals, Function, InSet, Mode, Privacy, Query
from dataops.policy import Grant
from dataops.values import PrivacyLoss

COUNT, SUM, MEDIAN = (
    Aggregate(Function.COUNT),
    Aggregate(Function.SUM, "amount"),
    Aggregate(Function.QUANTILE, "amount", 0.5),
)
SHAPES = {  # bench_load's fresh claims questions, one of each shape
    "count+sum by age_band": ((COUNT, SUM), ("age_band",), ()),
    "count+sum by age_band, sex": ((COUNT, SUM), ("age_band", "sex"), ()),
    "count+sum by age_band, visit_type = x": (
        (COUNT, SUM),
        ("age_band",),
        (Equals("visit_type", "inpatient"),),
    ),
    "count by hospital_level, visit_type, district in {..}": (
        (COUNT,),
        ("hospital_level", "visit_type"),
        (InSet("district", ("Nanhu", "Hexi")),),
    ),
    "median by sex": ((MEDIAN,), ("sex",), ()),
}
LAYOUTS = {"as built (lz4)": None, "uncompressed": "none", "zstd": "zstd", "snappy": "snappy"}


def rewrite(source: PreparedSource, directory: Path, compression: str) -> PreparedSource:
    """The same rows, in the same order and row groups, under another compression."""
    directory.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, part in enumerate(source.parts):
        out = directory / f"part-{i:05d}.parquet"
        if not out.exists():
            pq.write_table(
                pq.read_table(part), out, compression=compression, row_group_size=COPY_ROW_GROUP_ROWS
            )
        parts.append(out)
    return dataclasses.replace(source, parts=tuple(parts))


def cpu_per_call(call: Callable[[], object], repeats: int) -> float:
    call()  # warm: the first release maps the plan once
    start = time.process_time()
    for _ in range(repeats):
        call()
    return (time.process_time() - start) / repeats


def release_arguments(doc: str) -> tuple[argparse.Namespace, Path]:
    """The arguments of a benchmark that releases DP questions in process, and bench_load's
    work directory for them (also bench_bins')."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", type=int, default=500_000)
    parser.add_argument("--enterprises", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    workdir = load.prepare_workdir(
        argparse.Namespace(
            claims=args.claims, enterprises=args.enterprises, seed=1, consumers=16, workers=None
        )
    )
    return args, workdir


def benchmark_grant(dataset_id: str) -> Grant:
    """A grant that allows every mode and function, with a budget no benchmark spends."""
    return Grant(
        dataset=dataset_id, purpose="benchmark", expires=dt.date(2099, 12, 31), modes=frozenset(Mode),
        functions=frozenset(Function), budget=PrivacyLoss(1e9, 1e-6), columns=MappingProxyType({}),
    )  # fmt: skip


def main() -> None:
    args, workdir = release_arguments(__doc__)
    config = load_config(workdir / "dataops.toml")
    dataset = load_catalog(config.paths.catalog, config.paths.sandbox).get("medical_claims")
    enable_opendp()
    # A state of its own: the copy built as the server builds it, not the server's state.
    built = PreparedStore(workdir / "layouts" / "state").source(dataset)
    sources = {
        name: built if compression is None else rewrite(built, workdir / "layouts" / compression, compression)
        for name, compression in LAYOUTS.items()
    }
    grant = benchmark_grant(dataset.id)
    print(f"medical_claims, {args.claims} rows; CPU per release (process time), {args.repeats} releases each")
    for name, source in sources.items():
        size = sum(p.stat().st_size for p in source.parts)
        print(f"  layout {name:16} {size / 2**20:7.1f} MiB  ({size / args.claims:.1f} bytes per row)")
    results: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        order = list(sources) if round_ % 2 == 0 else list(reversed(sources))
        for shape, (aggregates, group_by, filters) in SHAPES.items():
            privacy = Privacy(epsilon=0.03)
            plan = Plan(Query(dataset.id, aggregates, filters, group_by, Mode.DP, privacy), dataset, grant)
            for name in order:
                query = DPQuery.compile(plan, source=sources[name])
                calibration = query.calibrate(privacy)
                seconds = cpu_per_call(partial(query.release, calibration), args.repeats)
                results.setdefault((shape, name), []).append(seconds)
        print(f"round {round_ + 1} done", flush=True)
    baseline = next(iter(sources))
    print(f"\n{'question':58}" + "".join(f"{name:>22}" for name in sources))
    for shape in SHAPES:
        base = statistics.median(results[(shape, baseline)])
        cells = []
        for name in sources:
            ms = statistics.median(results[(shape, name)]) * 1e3
            cells.append(f"{ms:8.2f} ms {ms / (base * 1e3):5.2f}x  ")
        print(f"{shape:58}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
