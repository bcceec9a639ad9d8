"""The out-of-core build of a serving copy, run in a child process under a memory cap.

`dataops.engines.prepared.PreparedStore` runs ``python -m dataops.engines.build`` with
the request on stdin (JSON) and reads one line of JSON back. The child caps its own
memory (RLIMIT_DATA, `children.cap_memory`) before it imports polars, so a build that would need more
memory fails inside the child (MemoryError, or polars aborting) and never takes the
server down with it; the server only reads the exit status. The child is handed the
dataset's path and the catalog terms, never the server's secret: the parent hashes
and tags the copy it wrote.

Two passes, each in bounded memory whatever the dataset's size:

1. *Partition.* The dataset is read in batches of its Parquet row groups, only the
   unit and the columns a query can use (an identifier column is never read). Every
   row goes to bucket ``hash(unit, seed) % buckets``, a Parquet file on disk; a
   bucket is a function of the unit alone, so **a unit never spans buckets**, and
   batches are appended in file order, so a unit's rows keep their file order in its
   bucket. At most `flush_rows(buckets)` rows are held before they are written.
2. *Bound and code, bucket by bucket.* A bucket holds whole units, so the per-unit
   row bound can be enforced on it alone: each unit keeps its first k rows in file
   order (the truncation OpenDP's identifier form applies, `int_range(len).over(unit)
   < k`, on the real ids). Its units are then coded to dense integers: within the
   bucket a random permutation of the units' ranks, offset by the units of the
   buckets before it, so the codes are 0..n-1 over the whole copy. The copy is a
   directory of Parquet files, ``part-00000.parquet`` on, written bucket by bucket
   (each bucket its own row groups, sorted by code so one unit's rows are adjacent for
   COUNT_UNITS); a part holds whole buckets, so a unit never spans parts either, and
   the parts' code ranges follow their names.

Parts, not one file, for the readers' memory: polars maps a local Parquet file whole
and the pages a scan reads stay in its RSS until that file is done (page cache, but
counted), so one file read whole costs its size in RSS at the end of a scan. Over
parts of about `PART_ROWS` rows the mapped pages are a few parts' at a time: a DP
query's mapped pages were 0.21 GiB at 100M rows and 0.18 GiB at 1.5 billion (mostly
shared libraries), against 0.51 GiB and 6.64 GiB for raw polars over the one source
file (benchmarks/bench_serving.py prints both parts of RSS).

What a code says about its unit: nothing without the seed. The bucket (the code's
range) is a hash of the id under a seed drawn for this build and then forgotten, as
is the permutation inside it; an unkeyed hash of an enterprise code could be inverted
by hashing the public register. Within a bucket the ranks are of 64-bit hashes of the
ids (ranking hashes is about ten times faster than ranking strings); two ids of one
bucket whose hashes collide (odds about n_b^2 / 2^65) share a code, which only ever
drops rows from COUNT_UNITS' per-unit step (see dataops.engines.prepared).

Peak memory is set by the bucket size (`rows_per_bucket`) and the rows held per flush,
not by the dataset: on the demo claims with 2M-row buckets the child's peak RSS was
1.30 GiB at 10M rows and 1.37 GiB at 100M (benchmarks/bench_serving.py). Time is
linear: one read and one write per pass, and sorts inside buckets of bounded size.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dataops._fs import fsync_dir
from dataops.engines.children import child_main

if TYPE_CHECKING:  # the child imports polars only once its memory is capped
    import polars as pl

FLUSH_ROWS = 2_000_000  # rows the partition pass holds before writing them to their buckets...
FLUSH_ROWS_PER_BUCKET = 10_000  # ...or more, so each bucket's file of a flush is not tiny...
MAX_FLUSH_ROWS = 8_000_000  # ...up to this many (about 0.6 GiB held of the demo claims)
ROWS_PER_BUCKET = 2_000_000  # the bucket size pass 2 holds in memory
MAX_BUCKETS = 4096  # open files in pass 1; past ~8G rows the buckets grow instead
BATCH_ROWS = 1_000_000
PART_ROWS = 4_000_000  # a copy's part closes once it holds this many rows (whole buckets)
PART_NAME = "part-{:05d}.parquet"  # a copy's parts, numbered in code order...
PART_PATTERN = r"part-[0-9]{5}\.parquet"  # ...and what dataops.engines.prepared accepts as one
COPY_ROW_GROUP_ROWS = 256 * 1024  # the demo data's: the streaming engine spreads them over threads
UNIT_CODE = "#unit"  # dataops.engines.dp.UNIT_CODE (not imported: the child imports light)


def bucket_count(rows: int, rows_per_bucket: int = ROWS_PER_BUCKET) -> int:
    return max(1, min(MAX_BUCKETS, -(-rows // max(1, rows_per_bucket))))


def flush_rows(buckets: int) -> int:
    """Rows pass 1 holds before a flush: a flush writes one file per bucket, and a file
    of a few thousand rows costs about twice as much per row to write (and to read back)
    as one of 10,000. At 1.5 billion rows (750 buckets) a flush of 2M rows would write
    562,500 files of 2,700 rows; of 7.5M rows, 150,000 of 10,000."""
    return min(MAX_FLUSH_ROWS, max(FLUSH_ROWS, buckets * FLUSH_ROWS_PER_BUCKET))


def buckets_of(units: pl.Series, seed: int, buckets: int) -> pl.Series:
    """Each row's bucket: a seeded hash of its unit alone, so a unit's rows share one bucket."""
    import polars as pl

    return (units.hash(seed) % buckets).cast(pl.Int64)


def partition(
    source: Path,
    unit: str,
    columns: list[str],
    buckets: int,
    directory: Path,
    seed: int,
    assign: Callable[[pl.Series], pl.Series] | None = None,
) -> list[list[Path]]:
    """Pass 1: the rows of `source` into `buckets` buckets by a seeded hash of the unit
    (or by `assign`, the bucket number of each row's unit: any function of the unit
    alone keeps a unit's rows together).

    A bucket is a directory of Parquet files, one per flush, numbered in file order;
    returned as each bucket's files in that order (buckets with no row left out).
    Files, not one open writer per bucket: a writer keeps every row group's metadata in
    memory until it closes, which at thousands of buckets is gigabytes.
    """
    import polars as pl
    import pyarrow.parquet as pq

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    files: dict[int, list[Path]] = {}
    pending: dict[int, list[pl.DataFrame]] = {}
    held = flushes = 0

    def flush() -> None:
        nonlocal flushes
        for b, parts in pending.items():
            path = directory / f"bucket-{b:05d}" / f"{flushes:07d}.parquet"
            path.parent.mkdir(mode=0o700, exist_ok=True)
            pl.concat(parts, rechunk=False).write_parquet(path, compression="lz4", statistics=False)
            files.setdefault(b, []).append(path)
        pending.clear()
        flushes += 1

    rows = pq.ParquetFile(source).metadata.num_rows
    scan = pl.scan_parquet(source).select(unit, *columns)
    # Slices of the scan, not pyarrow's batch reader: polars reads a slice's row groups
    # alone, in about a third of the time and of the memory.
    for offset in range(0, rows, BATCH_ROWS):
        frame = scan.slice(offset, BATCH_ROWS).collect()
        numbers = buckets_of(frame[unit], seed, buckets) if assign is None else assign(frame[unit])
        bucket = pl.Series("#bucket", numbers)
        # maintain_order: a bucket's rows stay in file order.
        parts = frame.with_columns(bucket).partition_by(
            "#bucket", as_dict=True, maintain_order=True, include_key=False
        )
        for (b,), part in parts.items():
            pending.setdefault(int(b), []).append(part)
        held += frame.height
        del frame, parts
        if held >= flush_rows(buckets):
            flush()
            held = 0
    if held or not files:
        if not pending:  # no rows at all: one empty bucket, so pass 2 knows the columns
            pending[0] = [scan.head(0).collect()]
        flush()
    return [files[b] for b in sorted(files)]


def key_positions(key_sets: dict[str, list[str]]) -> list:
    """Each coded string column's key positions (`dataops.engines.dp.prepared_codes`):
    the catalog's i-th key is i; a value that is no key, or missing, is len(keys)."""
    import polars as pl

    from dataops.engines.dp import code_column

    return [
        pl.col(name)
        .replace_strict(keys, list(range(len(keys))), default=len(keys), return_dtype=pl.UInt32)
        .fill_null(len(keys))
        .alias(code_column(name))
        for name, keys in key_sets.items()
    ]


def bin_positions(bins: dict[str, list[float]]) -> list:
    """Each binned column's bin positions (`dataops.engines.dp.prepared_bins`)."""
    import polars as pl

    from dataops.engines.dp import bin_column, bin_position

    return [bin_position(pl.col(name), edges).alias(bin_column(name)) for name, edges in bins.items()]


def fixed_points(fixed: dict[str, list[float]]) -> list:
    """Each measure in the catalog's fixed point (`dataops.engines.dp.prepared_fixed`)."""
    import polars as pl

    from dataops.engines.dp import fixed_column, fixed_point

    return [
        fixed_point(pl.col(name), lo, hi, factor).alias(fixed_column(name))
        for name, (lo, hi, factor) in fixed.items()
    ]


def bound_and_code(
    buckets: list[list[Path]],
    unit: str,
    columns: list[str],
    k: int,
    output: Path,
    seed: int,
    key_sets: dict[str, list[str]] | None = None,
    part_rows: int = PART_ROWS,
    fixed: dict[str, list[float]] | None = None,
    bins: dict[str, list[float]] | None = None,
) -> dict:
    """Pass 2: per bucket, each unit's first k rows, dense unit codes, key positions and
    fixed-point measures; the copy's parts in the directory `output` (made here), each
    closed past `part_rows` rows."""
    import numpy as np
    import polars as pl
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    positions = key_positions(key_sets or {}) + bin_positions(bins or {}) + fixed_points(fixed or {})
    output.mkdir(mode=0o700, exist_ok=True)
    writer = None
    rows = units = part_rows_written = 0
    parts_written: list[Path] = []

    def close_part() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            writer = None
            with parts_written[-1].open("rb") as f:
                os.fsync(f.fileno())

    try:
        for parts in buckets:
            frame = pl.read_parquet(parts)  # in flush order: the bucket's rows in file order
            for part in parts:
                part.unlink()  # the scratch space shrinks as the copy grows
            # The bound, enforced on whole units (a unit never spans buckets).
            frame = frame.filter(pl.int_range(pl.len()).over(unit) < k)
            hashed = frame.select(pl.col(unit).hash(seed & 0xFFFFFFFFFFFFFFFF).rank("dense"))
            ranks = hashed.to_series().cast(pl.UInt64).to_numpy()
            del hashed  # as soon as it is read: the bucket's peak stays one frame and its codes
            count = int(ranks.max()) if len(ranks) else 0
            codes = rng.permutation(count).astype(np.uint64) + np.uint64(units)
            coded = (
                frame.select(
                    pl.Series(UNIT_CODE, codes[ranks - 1] if count else [], dtype=pl.UInt64),
                    *columns,
                    *positions,
                )
                # One unit's rows adjacent: COUNT_UNITS' per-unit step is several times faster.
                .sort(UNIT_CODE, maintain_order=True)
            )
            del frame, ranks
            table = coded.to_arrow()
            if writer is None:
                parts_written.append(output / PART_NAME.format(len(parts_written)))
                writer = pq.ParquetWriter(parts_written[-1], table.schema, compression="lz4")
                part_rows_written = 0
            writer.write_table(table, row_group_size=COPY_ROW_GROUP_ROWS)
            rows += coded.height
            units += count
            part_rows_written += coded.height
            if part_rows_written >= part_rows:
                close_part()
        close_part()
    finally:
        if writer is not None:
            writer.close()
    fsync_dir(output)  # the parts' names, as durable as their bytes
    return {"rows": rows, "units": units, "buckets": len(buckets), "parts": len(parts_written)}


def build(request: dict) -> dict:
    """Both passes for one request (see `main` for its fields)."""
    import secrets
    import shutil

    started = time.monotonic()
    source, output = Path(request["source"]), Path(request["output"])
    scratch = Path(request["scratch"])
    unit, columns, k = request["unit"], list(request["columns"]), int(request["max_rows_per_unit"])
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(source).metadata.num_rows
    buckets = bucket_count(rows, int(request.get("rows_per_bucket", ROWS_PER_BUCKET)))
    try:
        # Seeds drawn here and never written anywhere: see the module docstring.
        files = partition(source, unit, columns, buckets, scratch, secrets.randbits(63))
        partitioned = time.monotonic()
        stats = bound_and_code(
            files, unit, columns, k, output, secrets.randbits(63), key_sets=request.get("codes"),
            part_rows=int(request.get("part_rows", PART_ROWS)), fixed=request.get("fixed"),
            bins=request.get("bins"),
        )  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        **stats,
        "source_rows": rows,
        "partition_seconds": round(partitioned - started, 3),
        "seconds": round(time.monotonic() - started, 3),
        "peak_rss_bytes": peak("VmHWM"),
        "peak_address_space_bytes": peak("VmPeak"),
    }


def peak(field: str) -> int:
    """VmHWM (peak RSS) or VmPeak (peak address space) of this process.

    From /proc, not getrusage: ru_maxrss carries the RSS of the process it was forked
    from across exec, so a child of a large server would report the server's size.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    """Read the request from stdin, cap memory, build, print the stats as one JSON line.

    Request: source, output (the copy's directory), scratch (paths), unit, columns
    (kept besides the unit), codes (string columns also kept as key positions, with
    their keys), max_rows_per_unit, memory_limit_bytes, rows_per_bucket, part_rows.
    """
    return child_main(build, "build")


if __name__ == "__main__":
    sys.exit(main())
