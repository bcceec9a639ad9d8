"""The protected-table cube alone (`dataops.tables.cube.build_cube`): time and peak RSS,
against a raw polars streaming group-by on the same Parquet measured in the same run.

    PYTHONPATH=src python benchmarks/bench_cube.py [1m|10m|100k ...] [--data DIR]

The data is bench_protect's (benchmarks/.data/<N>/, generated once by the demo
generator; --data points at another sandbox of the same layout). The products are
bench_protect's: enterprise_credit by 3 dimensions (one row per enterprise) and
medical_claims by 5 (a person's claims span cells, so every margin regroups by unit).
Each measurement runs in a fresh child process; peak RSS is its VmHWM (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_protect import PRODUCT, SIZES, TABLES, data_dir  # noqa: E402


def run_one(kind: str, dataset_id: str, sandbox: Path) -> dict:
    """In a child process: one measurement, its seconds and peak RSS."""
    import polars as pl

    from dataops._toml import read_toml
    from dataops.catalog import load_catalog
    from dataops.engines.build import peak
    from dataops.errors import ProductError
    from dataops.products.table import load_table_product
    from dataops.tables.cube import build_cube

    catalog = load_catalog(REPO / "catalog", sandbox)
    dataset = catalog.get(dataset_id)
    dims, measure = TABLES[dataset_id]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_cube_{os.getpid()}.toml"
    path.write_text(
        PRODUCT.format(id=path.stem, dataset=dataset_id, dims=json.dumps(dims), measure=measure, extra="")
    )
    product = load_table_product(read_toml(path, ProductError), path, catalog)
    path.unlink()
    started = time.perf_counter()
    if kind == "baseline":  # the finest cells only: no margins, no distinct units
        pl.scan_parquet(dataset.path).group_by(dims).agg(pl.len(), pl.col(measure).sum()).collect(
            engine="streaming"
        )
        cells = 0
    else:
        cells = build_cube(product, dataset, pl.scan_parquet(dataset.path)).n_cells
    return {"seconds": time.perf_counter() - started, "peak_rss_bytes": peak("VmHWM"), "cells": cells}


def measure(kind: str, dataset_id: str, sandbox: Path) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(REPO / 'src')!r}); sys.path.insert(0, {str(HERE)!r}); "
        "from bench_cube import run_one; from pathlib import Path; "
        f"print(json.dumps(run_one({kind!r}, {dataset_id!r}, Path({str(sandbox)!r}))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} {dataset_id} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", default=["1m"], choices=sorted(SIZES))
    parser.add_argument("--data", type=Path, help="a sandbox with insurance/ and finance/ Parquet files")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}; {os.cpu_count()} cores")
    for size in args.sizes:
        sandbox = args.data or data_dir(SIZES[size])
        print(f"== {size} ({sandbox})")
        for dataset_id in TABLES:
            base = measure("baseline", dataset_id, sandbox)
            cube = measure("cube", dataset_id, sandbox)
            gib = 2**30
            print(
                f"{dataset_id:18s} baseline group-by {base['seconds']:7.2f} s {base['peak_rss_bytes'] / gib:5.2f} GiB"
                f" | cube ({cube['cells']} cells) {cube['seconds']:7.2f} s {cube['peak_rss_bytes'] / gib:5.2f} GiB"
                f" | ratio time {cube['seconds'] / base['seconds']:5.1f}x,"
                f" memory {cube['peak_rss_bytes'] / base['peak_rss_bytes']:4.1f}x"
            )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
