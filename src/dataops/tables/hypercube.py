"""The hypercube method (Repsilber; τ-Argus's GHMITER, sdcTable's HYPERCUBE): protect
each primary cell by suppressing the corners of a hypercube around it.

For a cell x of a d-dimensional cube with margins, pick per dimension j another code
y_j of the same relation (another key, or the margin). The 2^d cells with each code
either x_j or y_j are the corners. Suppressing all of them leaves the attacker a
direction no released value pins: add +t at x and ±t at the other corners, the sign
flipping with each dimension in which the corner moved between two keys (key + key =
same margin) and kept where it moved between a key and its margin (the margin moves
with its key). Every relation through a corner then sees the change cancel, so x can
move by as much as the corners that must shrink can give:

* up by `up`:   corners of sign -1 must hold at least `up`;
* down by `down`: corners of sign +1 must hold at least `down` (capped at x's value).

A cube is feasible when that holds for every audited measure (the row count and each
magnitude's sum). Of the feasible cubes, the one whose not yet suppressed corners lose
the least is taken, where a corner's loss grows steeply with how aggregated it is:
a district's total is worth more than any number of its cells. Cubes that would need a
one-dimensional margin or the grand total are left alone (`None`): what is left is the
caller's (the relation-by-relation repair of `dataops.tables.secondary`).

This is a heuristic. It never decides safety: the LP audit (`dataops.tables.audit`)
does, over the whole pattern, and the caller repairs what it finds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from dataops.tables.primary import Requirements

# Candidate codes kept per dimension before combining them into cubes: 4^5 cubes per
# cell at five dimensions instead of every combination.
CANDIDATES = 4
# Loss multiplier per margin coordinate: one level up costs more than the rows of any
# table we protect (the rows are at most ~10^9).
LEVEL_WEIGHT = 1e9


@dataclass(frozen=True)
class Cubes:
    """The chosen hypercubes: row r's corners `cells[r]` (the protected cell first) and
    each corner's sign in the cube's direction. The LP audit tries each direction as a
    witness; it proves nothing until the audit has checked it is feasible."""

    cells: np.ndarray  # (cubes, 2^d) int64
    signs: np.ndarray  # (cubes, 2^d) float64, +1 or -1

    def extend(self, other: Cubes) -> Cubes:
        return Cubes(np.vstack([self.cells, other.cells]), np.vstack([self.signs, other.signs]))


def hypercube_suppression(
    req: Requirements,
    shape: tuple[int, ...],
    primary: np.ndarray,
    *,
    forbid_level: int | None = None,
    targets: np.ndarray | None = None,
    fixed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, Cubes]:
    """Suppress the corners of a cheap feasible hypercube around every primary cell.

    Returns (suppressed, unprotected, cubes): the new pattern (primary included), the
    primary cells for which no acceptable cube was found, and the cubes chosen.
    `forbid_level`: cells with at least that many margin coordinates are never added
    (default: d - 1, i.e. no one-dimensional margin and not the grand total).
    `targets`: the cells to protect, if not all of `primary` (the pattern to extend).
    `fixed`: cells that are never suppressed (structural zeros, known to everyone)."""
    d = len(shape)
    n = int(np.prod(shape))
    margin = np.array(shape) - 1
    strides = np.array([int(np.prod(shape[j + 1 :])) for j in range(d)], np.int64)
    codes = np.stack(np.unravel_index(np.arange(n), shape), axis=1)
    level = (codes == margin).sum(axis=1)
    limit = d - 1 if forbid_level is None else forbid_level
    # Rows lost, weighted by aggregation; a forbidden cell costs infinitely much.
    loss = (req.values[0] + 1.0) * np.power(LEVEL_WEIGHT, level)
    loss[level >= limit] = np.inf
    if fixed is not None:
        loss[fixed] = np.inf
    values = req.values  # (m, n)
    suppressed = primary.copy()
    unprotected = []
    chosen_cells, chosen_signs = [], []
    corners = np.array(list(itertools.product((0, 1), repeat=d)), np.int64)  # (2^d, d): 1 = moved

    # Hardest first: aggregated cells (their cubes reach into other margins), then large
    # requirements; later cubes then reuse the corners earlier ones suppressed.
    need = (req.up / np.maximum(values, 1.0)).max(axis=0)
    todo = primary if targets is None else targets
    order = np.lexsort((-need[todo], -level[todo]))
    for x in np.flatnonzero(todo)[order]:
        cx = codes[x]
        up, down = (a[:, 0] for a in moves(req, np.array([x])))
        options = []
        for j in range(d):
            others = np.delete(np.arange(shape[j]), cx[j])
            cells = x + (others - cx[j]) * strides[j]
            # Two keys: the corner moves against x; a key and its margin: with it.
            against = (cx[j] != margin[j]) & (others != margin[j])
            ok = _fits(against, values[:, cells], req.per_row, up, down)
            ok &= np.isfinite(loss[cells])
            cost = np.where(suppressed[cells], 0.0, loss[cells])
            rank = np.lexsort((cost, ~ok))
            options.append(others[rank[:CANDIDATES]])
        best = _best_cube(
            x, cx, options, corners, strides, margin, values, req.per_row, up, down, loss, suppressed
        )
        if best is None:
            unprotected.append(x)
        else:
            cells, signs = best
            suppressed[cells] = True
            chosen_cells.append(cells)
            chosen_signs.append(signs)
    width = len(corners)
    cubes = Cubes(
        np.array(chosen_cells, np.int64).reshape(-1, width), np.array(chosen_signs, float).reshape(-1, width)
    )
    return suppressed, np.array(unprotected, np.int64), cubes


def moves(req: Requirements, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How far a cube moves each of `cells` (its protected cell) up and down, every
    measure at once: (m, k) each. Each measure moves by its protection level, and by at
    least `min_width` (no suppressed cell may be pinned). Sums move with the rows so the
    cell stays within the per-row bounds: rows removed take at least the cell's mean
    with them, rows added bring at least the lower bound."""
    v = req.values[:, cells]
    width = req.min_width[:, None]
    up = np.maximum(req.up[:, cells], width)
    down = np.minimum(np.maximum(req.down[:, cells], width), v)
    rows = np.maximum(v[0], 1e-300)
    for i in range(1, len(req.names)):
        up[i] = np.maximum(up[i], req.per_row[i, 0] * up[0])
        down[i] = np.minimum(np.maximum(down[i], down[0] * v[i] / rows), v[i])
    return up, down


def _fits(against, values, per_row, up, down) -> np.ndarray:
    """Can each corner follow the cube's moves, within what the attacker knows
    (non-negativity, lo * rows <= sum <= hi * rows)? Moving x up by `up` (every measure at
    once), corners against x shrink by it and the others grow; moving x down by `down`,
    the reverse. `values` is (m, ...) per corner; the result has the corners' shape."""
    extra = (slice(None),) + (None,) * (values.ndim - 1)
    u, d = up[extra], down[extra]
    sign = np.where(against, -1.0, 1.0)[None]
    return _holds(values + sign * u, per_row) & _holds(values - sign * d, per_row)


def _holds(v: np.ndarray, per_row: np.ndarray) -> np.ndarray:
    tol = 1e-9
    ok: np.ndarray = np.asarray((v >= -tol).all(axis=0))
    for i in range(1, len(per_row)):
        lo, hi = per_row[i]
        ok &= (v[i] >= lo * v[0] - tol) & (v[i] <= hi * v[0] + tol)
    return ok


def _best_cube(x, cx, options, corners, strides, margin, values, per_row, up, down, loss, suppressed):
    """The feasible cube of least loss from the candidate codes: its corner cells and signs."""
    choice = np.array(list(itertools.product(*options)), np.int64)  # (k, d): y per dimension
    delta = (choice - cx) * strides  # (k, d) index offset of moving along j
    cells = x + corners @ delta.T  # (2^d, k)
    # A corner's sign: -1 per dimension moved between two keys.
    between_keys = (cx != margin)[None, :] & (choice != margin)  # (k, d)
    flips = corners @ between_keys.T.astype(np.int64)  # (2^d, k)
    against = (flips % 2) == 1
    feasible = _fits(against, values[:, cells], per_row, up, down).all(axis=0)
    cost = np.where(suppressed[cells], 0.0, loss[cells]).sum(axis=0)
    cost[~feasible] = np.inf
    k = int(np.argmin(cost))
    if not np.isfinite(cost[k]):
        return None
    return cells[:, k], np.where(against[:, k], -1.0, 1.0)
