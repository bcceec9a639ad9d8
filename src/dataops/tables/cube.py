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
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import polars as pl

from dataops.catalog import Dataset
from dataops.products.table import TableProduct

_UNIT = "#unit"
_ROWS = "#rows"


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
            inside = (col >= edges[0]) & (col < edges[-1])
            index = (
                pl.sum_horizontal([(col >= e).cast(pl.Int32) for e in edges[1:-1]])
                if len(edges) > 2
                else pl.lit(0, pl.Int32)
            )
            expr = pl.when(inside).then(index).otherwise(None).cast(pl.Int32)
        exprs.append(expr.alias(_code(j)))
    return exprs


def build_cube(product: TableProduct, dataset: Dataset, source: pl.LazyFrame) -> Cube:
    d = len(product.dimensions)
    shape = tuple(len(k) + 1 for k in product.keys)
    magnitudes = product.magnitude_columns
    t = top_k_needed(product)
    codes = [_code(j) for j in range(d)]
    mags = [_mag(i) for i in range(len(magnitudes))]

    coded = source.select(
        pl.col(dataset.unit_column).alias(_UNIT),
        *code_expressions(product, dataset),
        *[pl.col(c).cast(pl.Float64).fill_null(0.0).alias(m) for c, m in zip(magnitudes, mags)],
    )
    inside = pl.all_horizontal([pl.col(c).is_not_null() for c in codes])
    # The one pass over the data: (unit, base cell) -> rows and sums, plus the rows
    # that fall in no cell (reported, never released per cell).
    per_unit, outside = pl.collect_all(
        [
            coded.filter(inside)
            .group_by([_UNIT, *codes])
            .agg(pl.len().alias(_ROWS), *[pl.col(m).sum() for m in mags]),
            coded.filter(~inside).select(pl.len()),
        ],
        engine="streaming",
    )
    # Where every unit lies in one base cell (one row per enterprise), a margin's units
    # are the sum of its cells' and the per-unit regrouping below is needless.
    units_span_cells = per_unit[_UNIT].n_unique() != per_unit.height
    per_unit_lazy = per_unit.lazy()

    strides = np.array([int(np.prod(shape[j + 1 :])) for j in range(d)], dtype=np.int64)
    frames = []
    for kept in itertools.chain.from_iterable(itertools.combinations(range(d), r) for r in range(d + 1)):
        keys = [codes[j] for j in kept]
        lf = per_unit_lazy
        if len(kept) < d and units_span_cells:
            lf = lf.group_by([*keys, _UNIT]).agg(pl.col(_ROWS).sum(), *[pl.col(m).sum() for m in mags])
        aggs = [
            pl.len().alias("#units"),
            pl.col(_ROWS).sum(),
            *[pl.col(m).sum() for m in mags],
            *[pl.col(m).top_k(t).alias(f"#top{i}") for i, m in enumerate(mags)],
        ]
        if keys:
            lf = lf.group_by(keys).agg(aggs)
        else:  # the grand total: one row, the top contributions as a list like the others
            lf = lf.select(aggs[: 2 + len(mags)] + [a.implode() for a in aggs[2 + len(mags) :]])
        margin_code = sum(int(strides[j] * (shape[j] - 1)) for j in range(d) if j not in kept)
        index = pl.lit(margin_code, pl.Int64)
        for j in kept:
            index = index + pl.col(codes[j]).cast(pl.Int64) * int(strides[j])
        frames.append(
            lf.select(index.alias("#cell"), "#units", _ROWS, *mags, *[f"#top{i}" for i in range(len(mags))])
        )
    cells = pl.concat(pl.collect_all(frames))

    n = int(np.prod(shape))
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
        ranked = cells.select(
            [pl.col(f"#top{i}").list.get(r, null_on_oob=True).fill_null(0.0).alias(str(r)) for r in range(t)]
        ).to_numpy()
        tops[at] = ranked
        top[column] = tops
    return Cube(shape, rows, units, sums, top, int(outside.item()))
