"""The cube: every cell of a table product and every sub-total, from one pass over the data.

Cells are numbered in C order over the shape (K_1 + 1, ..., K_d + 1): code k < K_j is
the j-th dimension's k-th public key, code K_j is "all values" (the margin). Per cell
the cube holds the rows, the distinct privacy units, the sum of every magnitude
column, and each magnitude column's largest per-unit contributions (what dominance
and p% need).

One streaming polars pass reduces the data to one row per (unit, base cell). Every
margin is then grouped from that reduction *with the unit*, because distinct units
are not additive: a person with visits in two cells is one unit of their margin,
not two. (Where no unit spans two cells, margins group the reduction directly.)

Memory and time: the unit is dictionary-encoded to a dense 32-bit code in the pass, and
every grouping is by one 64-bit integer (cell * 2^32 + unit code), not by a string id
and d codes; the margins are grouped one at a time with the streaming engine. On 10M
claim rows by 5 dimensions that took the cube from 97 s and 5.3 GiB peak RSS to 27-37 s
and 2.9 GiB on two loaded cores (benchmarks/bench_cube.py).

Bounded memory at any size: past `ROWS_PER_BUCKET` rows the units are split into
buckets by a seeded hash of the unit (a unit's rows all fall in one bucket), and each
bucket is reduced on its own. Every per-cell figure then merges by addition (rows,
sums, and units, since no unit is in two buckets) or, for the largest contributions,
by keeping the largest of the buckets' largest. Peak memory is one bucket's. Given a
scratch directory (the table store's, inside the sandbox: these are raw rows), the
source file is split into its buckets in one pass by the serving copies' bounded
partitioner (`dataops.engines.build.partition`) and each bucket read back alone; without
one, each bucket is a filtered scan of the whole source (B passes: at 100M rows 25 of
them took 10 minutes). (polars' own `PartitionByKey` sink did the split in one pass too,
but buffered 13 GiB at 100M rows.)
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from dataops.catalog import Dataset, bin_index
from dataops.products.table import TableProduct

_UNIT = "#unit"
_ROWS = "#rows"
_KEY = "#key"  # cell * _UNIT_SPAN + unit code: one integer to group by
_UNIT_SPAN = 2**32  # unit codes are 32-bit (a Categorical's physical codes)
_NULL_UNIT = _UNIT_SPAN - 1  # never a code: a dictionary holds fewer than 2^32 - 1 ids
# Rows reduced at once: 10M claim rows by 5 dimensions peaked at 2.9 GiB in one piece.
ROWS_PER_BUCKET = 4_000_000
_BUCKET_SEED = 0x7AB1E  # any fixed seed: buckets only need a unit's rows together


def _code(j: int) -> str:
    return f"#c{j}"


def _mag(i: int) -> str:
    return f"#m{i}"


@dataclass(frozen=True)
class Cube:
    shape: tuple[int, ...]  # (K_j + 1) per dimension
    rows: np.ndarray  # int64 per cell
    units: np.ndarray  # int64 per cell: distinct privacy units
    sums: dict[str, np.ndarray]  # magnitude column -> float64 per cell
    top: dict[str, np.ndarray]  # magnitude column -> (cells, t) largest per-unit totals, descending
    rows_outside: int  # rows whose dimension value lies outside the public key set or bins

    def merge(self, other: Cube) -> Cube:
        """The cube of two sources with no privacy unit in common."""
        top = {}
        for column, mine in self.top.items():
            both = np.concatenate([mine, other.top[column]], axis=1)
            top[column] = -np.sort(-both, axis=1)[:, : mine.shape[1]]
        return Cube(
            self.shape,
            self.rows + other.rows,
            self.units + other.units,
            {c: v + other.sums[c] for c, v in self.sums.items()},
            top,
            self.rows_outside + other.rows_outside,
        )

    @property
    def n_cells(self) -> int:
        return int(np.prod(self.shape))

    def codes(self) -> np.ndarray:
        """(cells, d) codes; code K_j is the margin."""
        return np.stack(np.unravel_index(np.arange(self.n_cells), self.shape), axis=1)

    def is_base(self) -> np.ndarray:
        """Cells with no margin coordinate (the finest level)."""
        margins = np.array(self.shape) - 1
        return np.asarray((self.codes() < margins).all(axis=1))

    def relations(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per dimension j: (parents, children) with parents[r] = sum of children[r, :].

        Every cell whose j-th code is the margin is the parent of the cells that
        differ from it only in the j-th code. These are all the table's additive
        relations (each sub-total over each dimension).
        """
        grid = np.arange(self.n_cells).reshape(self.shape)
        out = []
        for j, size in enumerate(self.shape):
            k = size - 1
            parents = np.take(grid, k, axis=j).reshape(-1)
            children = np.moveaxis(np.take(grid, np.arange(k), axis=j), j, -1).reshape(-1, k)
            out.append((parents, children))
        return out


def top_k_needed(product: TableProduct) -> int:
    rules = product.rules
    return max(rules.dominance_n, 2 if rules.p_percent is not None else 1)


def code_expressions(product: TableProduct, dataset: Dataset) -> list[pl.Expr]:
    """Each dimension as its cell code (null outside the public keys / bins)."""
    exprs = []
    for j, (name, keys, edges) in enumerate(zip(product.dimensions, product.keys, product.bins)):
        col = pl.col(name)
        if edges is None:
            expr = col.replace_strict(list(keys), list(range(len(keys))), default=None, return_dtype=pl.Int32)
        else:
            # Half-open bins [e_i, e_{i+1}): the code is how many inner edges lie at or below.
            expr = bin_index(col, edges).cast(pl.Int32)
        exprs.append(expr.alias(_code(j)))
    return exprs


def build_cube(
    product: TableProduct,
    dataset: Dataset,
    source: pl.LazyFrame | None = None,
    *,
    rows_per_bucket: int = ROWS_PER_BUCKET,
    scratch: Path | None = None,
) -> Cube:
    """The cube of `source` (default: the dataset's file), in pieces of about
    `rows_per_bucket` rows (by unit). With `scratch` and the dataset's own file, the
    pieces are split out in one pass into a directory made (and removed) under it;
    otherwise each piece is a filtered scan."""
    scan = pl.scan_parquet(dataset.path) if source is None else source
    rows = int(scan.select(pl.len()).collect().item())
    buckets = max(1, -(-rows // max(1, rows_per_bucket)))
    if buckets == 1:
        return _cube_of(product, dataset, scan)
    if source is None and scratch is not None:
        parts = _spilled_buckets(product, dataset, buckets, scratch)
    else:
        bucket = pl.col(dataset.unit_column).hash(_BUCKET_SEED) % buckets
        parts = (scan.filter(bucket == b) for b in range(buckets))
    merged: Cube | None = None
    for part in parts:
        cube = _cube_of(product, dataset, part)
        merged = cube if merged is None else merged.merge(cube)
    assert merged is not None
    return merged


def _spilled_buckets(
    product: TableProduct, dataset: Dataset, buckets: int, scratch: Path
) -> Iterator[pl.LazyFrame]:
    """The dataset's rows split by unit into `buckets` files on disk under `scratch`,
    one bucket at a time (removed when the iteration ends)."""
    from dataops.engines.build import partition

    scratch.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(dir=scratch, prefix=".cube-buckets."))
    try:
        wanted = dict.fromkeys([*product.dimensions, *product.magnitude_columns])
        others = [c for c in wanted if c != dataset.unit_column]
        for files in partition(dataset.path, dataset.unit_column, others, buckets, directory, _BUCKET_SEED):
            yield pl.scan_parquet(files)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _cube_of(product: TableProduct, dataset: Dataset, source: pl.LazyFrame) -> Cube:
    d = len(product.dimensions)
    shape = tuple(len(k) + 1 for k in product.keys)
    n = int(np.prod(shape))
    if n >= _UNIT_SPAN:
        raise ValueError(f"a cube of {n} cells does not fit its 32-bit cell number")
    magnitudes = product.magnitude_columns
    t = top_k_needed(product)
    codes = [_code(j) for j in range(d)]
    mags = [_mag(i) for i in range(len(magnitudes))]
    strides = [int(np.prod(shape[j + 1 :])) for j in range(d)]

    # The unit as a dense 32-bit code (a dictionary of its own, dropped with the plan),
    # so every grouping below hashes one 64-bit integer, cell * 2^32 + unit, instead of
    # a string id and d codes: the groups are the same, in a fraction of the memory.
    unit = (
        pl.col(dataset.unit_column)
        .cast(pl.String)
        .cast(pl.Categorical(pl.Categories.random()))
        .to_physical()
        .cast(pl.UInt64)
        .fill_null(_NULL_UNIT)  # a missing unit is one unit, as a group-by key it always was
    )
    coded = source.select(
        unit.alias(_UNIT),
        *code_expressions(product, dataset),
        *[pl.col(c).cast(pl.Float64).fill_null(0.0).alias(m) for c, m in zip(magnitudes, mags)],
    )
    inside = pl.all_horizontal([pl.col(c).is_not_null() for c in codes])
    base = pl.sum_horizontal([pl.col(c).cast(pl.UInt64) * strides[j] for j, c in enumerate(codes)])
    # The one pass over the data: (unit, base cell) -> rows and sums. The rows that fall
    # in no cell (reported, never released per cell) are the group of the null key, so
    # the data is scanned once.
    key = pl.when(inside).then(base * _UNIT_SPAN + pl.col(_UNIT)).otherwise(None)
    reduced = (
        coded.select(key.alias(_KEY), *mags)
        .group_by(_KEY)
        .agg(pl.len().cast(pl.Int64).alias(_ROWS), *[pl.col(m).sum() for m in mags])
        .collect(engine="streaming")
    )
    per_unit = reduced.filter(pl.col(_KEY).is_not_null())
    rows_outside = int(reduced.filter(pl.col(_KEY).is_null())[_ROWS].sum())
    del reduced
    # Where every unit lies in one base cell (one row per enterprise), a margin's units
    # are the sum of its cells' and the per-unit regrouping below is needless.
    units_span_cells = per_unit.select((pl.col(_KEY) % _UNIT_SPAN).n_unique()).item() != per_unit.height
    per_unit_lazy = per_unit.lazy()
    base_cell = pl.col(_KEY) // _UNIT_SPAN

    frames = []
    for kept in itertools.chain.from_iterable(itertools.combinations(range(d), r) for r in range(d + 1)):
        margin_code = sum(strides[j] * (shape[j] - 1) for j in range(d) if j not in kept)
        cell = pl.sum_horizontal(
            pl.lit(margin_code, pl.UInt64),
            *[(base_cell // strides[j]) % shape[j] * strides[j] for j in kept],
        )
        lf = per_unit_lazy
        if len(kept) < d and units_span_cells:
            lf = (
                lf.select((cell * _UNIT_SPAN + pl.col(_KEY) % _UNIT_SPAN).alias(_KEY), _ROWS, *mags)
                .group_by(_KEY)
                .agg(pl.col(_ROWS).sum(), *[pl.col(m).sum() for m in mags])
            )
            cell = base_cell
        # One margin at a time with the streaming engine: only one grouping's table is
        # ever held, not all 2^d of them.
        frames.append(
            lf.group_by(cell.cast(pl.Int64).alias("#cell"))
            .agg(
                pl.len().cast(pl.Int64).alias("#units"),
                pl.col(_ROWS).sum(),
                *[pl.col(m).sum() for m in mags],
                *[pl.col(m).top_k(t).alias(f"#top{i}") for i, m in enumerate(mags)],
            )
            .collect(engine="streaming")
        )
    cells = pl.concat(frames)

    at = cells["#cell"].to_numpy()  # each row's cell number
    rows = np.zeros(n, np.int64)
    units = np.zeros(n, np.int64)
    rows[at] = cells[_ROWS].to_numpy()
    units[at] = cells["#units"].to_numpy()
    sums, top = {}, {}
    for i, column in enumerate(magnitudes):
        s = np.zeros(n)
        s[at] = cells[mags[i]].to_numpy()
        sums[column] = s
        tops = np.zeros((n, t))
        # Sorted here: polars' top_k picks the t largest but does not always return them in
        # order (1.36, also in a group-by), and primary suppression reads top[:, 0] as the
        # largest contribution (the p% rule's x1).
        descending = pl.col(f"#top{i}").list.sort(descending=True)
        ranked = cells.select(
            [descending.list.get(r, null_on_oob=True).fill_null(0.0).alias(str(r)) for r in range(t)]
        ).to_numpy()
        tops[at] = ranked
        top[column] = tops
    return Cube(shape, rows, units, sums, top, rows_outside)
