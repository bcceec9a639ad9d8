"""Protection time and peak memory of the demo's table products, against a raw polars
group-by on the same Parquet measured in the same run.

    PYTHONPATH=src python benchmarks/bench_protect.py            # 1M rows
    PYTHONPATH=src python benchmarks/bench_protect.py 1m 10m 30m # and 10M, 30M (also 100k, 100m)

Per size N: the demo generator writes N enterprises and N claims into
benchmarks/.data/<N>/ (once; reused after). Each measurement runs in a fresh
process so peak RSS (ru_maxrss) is that measurement's own:

* baseline: `scan_parquet(...).group_by(<the table's dimensions>).agg(len, sum)`,
  collected with the streaming engine (the finest cells only: no margins, no units);
* protect:  `dataops.tables.protect` (cube with every margin and distinct units,
  primary and secondary suppression, the final LP audit).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SIZES = {"100k": 100_000, "1m": 1_000_000, "10m": 10_000_000, "30m": 30_000_000, "100m": 100_000_000}

TABLES = {
    "enterprise_credit": (["district", "industry", "size_band"], "tax_paid"),
    "medical_claims": (["age_band", "sex", "district", "diagnosis_group", "visit_type"], "amount"),
}

PRODUCT = """
kind = "table"
id = "{id}"
dataset = "{dataset}"
title = "benchmark"
dimensions = {dims}
[[measures]]
function = "count"
[[measures]]
function = "sum"
column = "{measure}"
[[measures]]
function = "mean"
column = "{measure}"
[rules]
min_units = 5
dominance_n = 2
dominance_percent = 85.0
p_percent = 10.0
{extra}
"""


def data_dir(rows: int) -> Path:
    target = HERE / ".data" / str(rows)
    if not (target / "insurance" / "medical_claims.parquet").exists():
        from dataops.demo.generate import generate

        generate(target, enterprises=rows, claims=rows)
    return target


def run_one(kind: str, dataset_id: str, sandbox: Path) -> dict:
    """In a child process: one measurement, its seconds and peak RSS."""
    import polars as pl

    from dataops._toml import read_toml
    from dataops.catalog import load_catalog
    from dataops.engines.build import peak
    from dataops.errors import ProductError
    from dataops.products.table import load_table_product

    catalog = load_catalog(REPO / "catalog", sandbox)
    dataset = catalog.get(dataset_id)
    dims, measure = TABLES[dataset_id]
    started = time.perf_counter()
    out: dict = {}
    if kind == "baseline":
        pl.scan_parquet(dataset.path).group_by(dims).agg(pl.len(), pl.col(measure).sum()).collect(
            engine="streaming"
        )
    else:
        from dataops.tables import protect

        extra = 'sensitive_dimensions = ["diagnosis_group"]' if dataset_id == "medical_claims" else ""
        path = sandbox / f"bench_{dataset_id}.toml"
        path.write_text(
            PRODUCT.format(
                id=path.stem, dataset=dataset_id, dims=json.dumps(dims), measure=measure, extra=extra
            )
        )
        product = load_table_product(read_toml(path, ProductError), path, catalog)
        table = protect(product, dataset)
        r = table.report
        out = {
            "cells": r.cells,
            "primary": r.primary,
            "secondary": r.secondary,
            "audit": r.audit.passed,
            "phases": {k: round(v, 2) for k, v in r.seconds.items()},
        }
    out["seconds"] = time.perf_counter() - started
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over execve, so a child
    # started by a parent that generated the data reported the parent's peak.
    out["peak_rss_mb"] = peak("VmHWM") / 2**20
    return out


def measure(kind: str, dataset_id: str, sandbox: Path) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(REPO / 'src')!r}); sys.path.insert(0, {str(HERE)!r}); "
        "from bench_protect import run_one; from pathlib import Path; "
        f"print(json.dumps(run_one({kind!r}, {dataset_id!r}, Path({str(sandbox)!r}))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} {dataset_id} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(args: list[str]) -> None:
    for size in args or ["1m"]:
        rows = SIZES[size]
        sandbox = data_dir(rows)
        print(f"== {rows:,} rows per dataset ({sandbox})")
        for dataset_id in TABLES:
            base = measure("baseline", dataset_id, sandbox)
            prot = measure("protect", dataset_id, sandbox)
            print(
                f"{dataset_id:18s} baseline group-by {base['seconds']:7.2f}s {base['peak_rss_mb']:7.0f} MB | "
                f"protect {prot['seconds']:7.2f}s {prot['peak_rss_mb']:7.0f} MB | "
                f"ratio time {prot['seconds'] / base['seconds']:6.1f}x, "
                f"memory {prot['peak_rss_mb'] / base['peak_rss_mb']:5.1f}x"
            )
            print(
                f"{'':18s} cells {prot['cells']}, primary {prot['primary']}, secondary {prot['secondary']}, "
                f"audit {'passed' if prot['audit'] else 'FAILED'}; phases {prot['phases']}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
