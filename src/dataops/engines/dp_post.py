"""Post-processing of DP tables: consistent, non-negative integer cells (no privacy role).

Everything here reads only released (noisy) values, so under DP it is free: it cannot
add privacy loss whatever it does. What it gives a finance reader is a table that adds
up: every count or non-negative sum cell is a non-negative integer, and the cells of a
column add up to the column's released total.

The total is the rounded sum of the released cells (itself a DP value: a function of
released values), clamped at zero. The cells are then the closest point, in the least
squares sense, of the non-negative vectors with that sum (a projection onto the scaled
simplex), rounded to integers by largest remainder so the sum is kept exactly.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl


def project_to_total(cells: np.ndarray, total: float) -> np.ndarray:
    """The least-squares closest x >= 0 with sum(x) == total (Held, Wolfe, Crowder 1974)."""
    if len(cells) == 0 or total <= 0:
        return np.zeros_like(cells, dtype=float)
    ordered = np.sort(cells)[::-1]
    cumulative = np.cumsum(ordered) - total
    ranks = np.arange(1, len(cells) + 1)
    keep = ordered - cumulative / ranks > 0
    rho = ranks[keep][-1]
    shift = cumulative[keep][-1] / rho
    return np.maximum(cells - shift, 0.0)


def round_to_total(values: np.ndarray, total: int) -> np.ndarray:
    """Integers, each the floor or ceiling of its value, summing to total (largest remainder)."""
    floors = np.floor(values).astype(np.int64)
    short = int(total - floors.sum())
    if short > 0:
        order = np.argsort(-(values - floors), kind="stable")
        floors[order[:short]] += 1
    return floors


def consistent_column(cells: np.ndarray) -> tuple[np.ndarray, int]:
    """Non-negative integer cells adding up to their released total; missing cells count as 0."""
    cells = np.nan_to_num(np.asarray(cells, dtype=float), nan=0.0)
    total = max(0, int(round(math.fsum(cells))))
    return round_to_total(project_to_total(cells, float(total)), total), total


def consistent_table(table: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """The table with each named column made consistent (see the module docstring)."""
    replaced = []
    for name in columns:
        values, _ = consistent_column(table[name].cast(pl.Float64).to_numpy())
        replaced.append(pl.Series(name, values, dtype=pl.Int64))
    return table.with_columns(replaced) if replaced else table
