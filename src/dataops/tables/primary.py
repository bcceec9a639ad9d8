"""Primary suppression: which cells may not be released on their own, and how far an
attacker's knowledge of each must stay from its true value (its protection levels).

The rules, as τ-Argus and sdcTable define them (x = the cell's total of a magnitude
column, x1 >= x2 >= ... the per-unit totals in the cell):

* frequency: fewer than `min_units` distinct privacy units, *including none*. An
  empty cell is suppressed like a small one, so a suppressed cell never says
  "empty". Protection: the count of a small cell must be able to reach L and go down
  to max(0, v - L), L = `frequency_protection` (default `min_units`), that of an empty
  cell to reach one row: an empty cell cannot be told from a non-empty one, nor a small
  one from an empty one; every
  magnitude must be uncertain by `protection_percent`% of its value.
* (n, k) dominance: x1 + ... + xn > k% of x. Protection level (sdcTable's):
  (100 / k) * (x1 + ... + xn) - x, the amount the total must be uncertain by for the
  largest n not to be seen to dominate it.
* p%: x - x1 - x2 < p% of x1 (the second-largest unit, knowing its own value,
  would estimate the largest within p%). Protection level: p% * x1 - (x - x1 - x2).
* group attribute: along a sensitive dimension, a child cell holding
  >= `group_attribute_percent`% of its parent's units. Released, it says nearly
  everyone in the group has that category. Protection: the count must be able to
  fall below that share of the parent's rows.

Structural zeros (`TableProduct.structural_zeros`, combinations impossible by
definition) are public knowledge: they are released as 0 and never suppressed, so
they need no protection and, fixed, can never hide another cell. A sub-total all of
whose cells along some dimension are structural zeros is one too.

Magnitude levels are symmetric; a lower end below zero means the attacker must not
be able to exclude zero. Every suppressed cell, secondary ones too, must moreover not
be pinned: its interval is at least a row (counts) or a unit of currency wide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataops.catalog import Dataset
from dataops.products.table import TableProduct
from dataops.tables.cube import Cube

COUNT = "count"  # the audited row count (released as COUNT, and behind every MEAN)


@dataclass(frozen=True)
class Requirements:
    """What the audit checks, per audited measure (rows: the count, then each
    magnitude column's sum) and per cell."""

    names: tuple[str, ...]
    values: np.ndarray  # (m, cells) true values
    per_row: np.ndarray  # (m, 2) bounds of one row's value known to the attacker
    up: np.ndarray  # (m, cells) upper protection level: the interval must reach v + up
    down: np.ndarray  # (m, cells) lower protection level: ... and down to max(0, v - down)
    min_width: np.ndarray  # (m,) an interval narrower than this counts as exact disclosure


@dataclass(frozen=True)
class Primary:
    suppressed: np.ndarray  # bool per cell
    reasons: dict[str, np.ndarray]  # rule -> bool per cell
    requirements: Requirements
    structural: np.ndarray  # bool per cell: a structural zero, released as 0, never suppressed


class StructuralZeroViolated(ValueError):
    """The data has rows in a cell the product declares impossible. Publishing 0 there
    would be false, and suppressing it would tell everyone it is not empty: the table
    is not published until the operator fixes the declaration or the data."""


def structural_zeros(product: TableProduct, cube: Cube) -> np.ndarray:
    """The cells the product's [[structural_zeros]] cover, closed under the relations:
    a sub-total whose cells along one dimension are all structural is structural."""
    codes = cube.codes()
    mask = np.zeros(cube.n_cells, bool)
    for entry in product.structural_zeros:
        hit = np.ones(cube.n_cells, bool)
        for j, positions in entry:
            hit &= np.isin(codes[:, j], list(positions))
        mask |= hit
    relations = cube.relations()
    while True:
        grown = mask.copy()
        for parents, children in relations:
            grown[parents[mask[children].all(axis=1)]] = True
        if (grown == mask).all():
            return mask
        mask = grown


def primary_suppression(
    product: TableProduct, dataset: Dataset, cube: Cube, *, group_attribute: bool = True
) -> Primary:
    rules = product.rules
    n = cube.n_cells
    names = (COUNT, *product.magnitude_columns)
    values = np.stack([cube.rows.astype(float), *[cube.sums[c] for c in names[1:]]])
    per_row = np.array([(1.0, 1.0)] + [dataset.columns[c].bounds for c in names[1:]], float)
    up = np.zeros_like(values)
    down = np.zeros_like(values)
    # Exact means "to within a row" for counts, to within a unit of currency (or 1e-6
    # of the bound, for small-valued columns) for magnitudes.
    min_width = np.array([1.0] + [min(1.0, 1e-6 * b[1]) for b in per_row[1:]])

    frequency = cube.units < rules.min_units
    L = rules.count_protection
    v = values[0, frequency]
    # Up: a small cell to at least L rows; an empty one to at least one row (it cannot be
    # told from a non-empty one; asking L of it would force suppression all around the
    # structural zeros of a sparse table, e.g. a diagnosis no child has). Down: to
    # v - L, i.e. to zero for a small cell (a small cell cannot be told from an empty one).
    up[0, frequency] = np.where(v == 0, 1.0, np.maximum(1.0, L - v))
    down[0, frequency] = L
    pct = rules.protection_percent / 100 * values[1:, frequency]
    up[1:, frequency] = np.maximum(up[1:, frequency], pct)
    down[1:, frequency] = np.maximum(down[1:, frequency], pct)

    dominance = np.zeros(n, bool)
    p_rule = np.zeros(n, bool)
    for i, column in enumerate(names[1:], start=1):
        x = values[i]
        top = cube.top[column]
        positive = x > 0
        tn = top[:, : rules.dominance_n].sum(axis=1)
        dom = positive & (tn > rules.dominance_percent / 100 * x)
        need = 100 / rules.dominance_percent * tn[dom] - x[dom]
        up[i, dom] = np.maximum(up[i, dom], need)
        down[i, dom] = np.maximum(down[i, dom], need)
        dominance |= dom
        if rules.p_percent is not None:
            x1, x2 = top[:, 0], top[:, 1]
            rest = x - x1 - x2
            pr = positive & (rest < rules.p_percent / 100 * x1)
            need = rules.p_percent / 100 * x1[pr] - rest[pr]
            up[i, pr] = np.maximum(up[i, pr], need)
            down[i, pr] = np.maximum(down[i, pr], need)
            p_rule |= pr

    group = np.zeros(n, bool)
    if group_attribute and rules.sensitive_dimensions:
        share = rules.group_attribute_percent / 100
        relations = cube.relations()
        for name in rules.sensitive_dimensions:
            parents, children = relations[product.dimensions.index(name)]
            pu = cube.units[parents][:, None]
            homogeneous = (pu > 0) & (cube.units[children] >= share * pu)
            cells = children[homogeneous]
            parent_rows = np.broadcast_to(cube.rows[parents][:, None], children.shape)[homogeneous]
            # The count must be able to drop below share * parent rows.
            need = cube.rows[cells] - np.ceil(share * parent_rows) + 1
            down[0, cells] = np.maximum(down[0, cells], np.maximum(need, 1))
            up[0, cells] = np.maximum(up[0, cells], 1.0)
            group[cells] = True

    structural = structural_zeros(product, cube)
    if (cube.rows[structural] > 0).any():
        # Which cell, and how many rows, is for the operator's own check of the data:
        # the message names only the declaration.
        raise StructuralZeroViolated(
            f"{product.source}: structural_zeros: the data has rows in a combination declared "
            f"impossible; table {product.id!r} is not published until the declaration or the data is fixed"
        )
    reasons = {"frequency": frequency, "dominance": dominance, "p_percent": p_rule, "group_attribute": group}
    for rule in reasons.values():
        rule &= ~structural
    up[:, structural] = 0.0
    down[:, structural] = 0.0
    suppressed = frequency | dominance | p_rule | group
    return Primary(suppressed, reasons, Requirements(names, values, per_row, up, down, min_width), structural)
