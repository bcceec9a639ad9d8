"""The LP audit: what an attacker holding every released cell can derive about each
suppressed one.

The attacker's knowledge, as linear constraints over one variable per suppressed
cell and audited measure (the row count and each magnitude column's sum):

* every additive relation of the cube: a sub-total equals the sum of its cells
  along each dimension, released cells entering as constants;
* non-negativity, and the catalog's per-row bounds (public): lo * rows <= sum <= hi * rows
  of the same cell, which also ties an empty cell's sums to zero.

For every suppressed cell and measure HiGHS (through `highspy`, so the basis is
reused between the many small solves) finds the smallest and largest value the cell
can take. The audit passes when every interval reaches the protection levels of
`dataops.tables.primary` (v - level down, v + level up, never narrower than
`min_width`). Only the relations touching a suppressed cell enter the LP, and it is
solved per connected component.

Speed comes from witnesses, not shortcuts: any feasible point of the LP is a value
set the attacker cannot exclude, so a point where a cell reaches its requirement
proves that side for that cell. A few solves (push all unproven cells up, then down)
settle most cells; the rest get their own exact min and max. A cell passes only on
such a proof; one still unproven when the time budget runs out counts as failing.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import highspy
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from dataops.tables.hypercube import Cubes, moves
from dataops.tables.primary import Requirements

WITNESS_PASSES = 16
FEW_CELLS = 150


@dataclass(frozen=True)
class AuditFailure:
    cell: int  # cell index in the cube
    measure: str  # audited measure: "count" or a magnitude column
    side: str  # "upper", "lower" or "width"
    missing: float  # how far the attacker's interval falls short (measure's units)


@dataclass(frozen=True)
class AuditVerdict:
    passed: bool
    checked: int  # suppressed cells checked
    variables: int  # LP variables (suppressed cells x audited measures)
    constraints: int
    lp_solves: int
    failures: tuple[AuditFailure, ...]
    seconds: float

    def describe(self) -> str:
        word = "passed" if self.passed else f"FAILED for {len(self.failures)} cell-measure sides"
        return (
            f"LP audit {word}: {self.checked} suppressed cells, {self.variables} variables, "
            f"{self.constraints} constraints, {self.lp_solves} HiGHS solves, {self.seconds:.2f}s"
        )


def lp_audit(
    req: Requirements,
    relations: list[tuple[np.ndarray, np.ndarray]],
    suppressed: np.ndarray,
    check: np.ndarray | None = None,
    *,
    budget_seconds: float = 60.0,
    hints: Cubes | None = None,
) -> AuditVerdict:
    """Audit the suppression pattern `suppressed`; only cells in `check` (default: all
    suppressed) are verified, though every suppressed cell is a variable.

    A cell passes only on proof (a feasible point reaching its requirement). Cells
    still unproven when `budget_seconds` of exact solves are spent are failures:
    the caller suppresses more, it never releases on a guess."""
    started = time.perf_counter()
    deadline = started + budget_seconds
    check = suppressed if check is None else (check & suppressed)
    cells = np.flatnonzero(suppressed)
    m, n = req.values.shape
    s = len(cells)
    if s == 0 or not check.any():
        return AuditVerdict(True, 0, 0, 0, 0, (), time.perf_counter() - started)
    position = np.full(n, -1, np.int64)
    position[cells] = np.arange(s)
    # Magnitudes are scaled to "rows at the upper bound", so all variables are of the
    # order of a row count and HiGHS's absolute tolerances mean the same everywhere.
    scale = req.per_row[:, 1].copy()
    scale[0] = 1.0
    values = req.values / scale[:, None]

    rows_i, cols_i, coef_i, rhs_lo, rhs_hi = [], [], [], [], []
    n_rows = 0
    for parents, children in relations:
        members = np.hstack([parents[:, None], children])
        sign = np.concatenate([[-1.0], np.ones(children.shape[1])])
        touched = suppressed[members].any(axis=1)
        members = members[touched]
        if not len(members):
            continue
        unknown = suppressed[members]
        r = len(members)
        rr, cc = np.nonzero(unknown)
        for i in range(m):
            known = np.where(unknown, 0.0, values[i][members] * sign)
            rows_i.append(n_rows + rr)
            cols_i.append(i * s + position[members[rr, cc]])
            coef_i.append(sign[cc])
            rhs = -known.sum(axis=1)
            rhs_lo.append(rhs)
            rhs_hi.append(rhs)
            n_rows += r
    # Per-row bounds tie each magnitude to the same cell's count: lo*count - x <= 0 <= hi*count - x.
    count_var = np.arange(s)
    for i in range(1, m):
        lo = req.per_row[i, 0] / scale[i]
        x = i * s + np.arange(s)
        rows_i += [n_rows + np.arange(s)] * 2
        cols_i += [x, count_var]
        coef_i += [np.full(s, -1.0), np.full(s, 1.0)]  # count - x >= 0 (hi scaled to 1)
        rhs_lo.append(np.zeros(s))
        rhs_hi.append(np.full(s, np.inf))
        n_rows += s
        if lo > 0:
            rows_i += [n_rows + np.arange(s)] * 2
            cols_i += [x, count_var]
            coef_i += [np.full(s, 1.0), np.full(s, -lo)]  # x - lo*count >= 0
            rhs_lo.append(np.zeros(s))
            rhs_hi.append(np.full(s, np.inf))
            n_rows += s
    n_vars = m * s
    A = csr_matrix(
        (np.concatenate(coef_i), (np.concatenate(rows_i), np.concatenate(cols_i))), shape=(n_rows, n_vars)
    )
    A.sum_duplicates()
    row_lo, row_hi = np.concatenate(rhs_lo), np.concatenate(rhs_hi)

    # A stand-in for "unbounded": far above anything a requirement asks (levels are
    # at most a few times the grand total), so reaching it passes.
    cap = 4.0 * max(float(values[0].max()), 1.0) + 1000.0
    truth = values[:, cells].reshape(-1)
    need_hi = truth + (req.up / scale[:, None])[:, cells].reshape(-1)
    need_lo = np.maximum(0.0, truth - (req.down / scale[:, None])[:, cells].reshape(-1))
    width = np.repeat(req.min_width / scale, s)
    tol = 1e-6 * np.maximum(1.0, np.abs(truth)) + 1e-7
    wanted = np.tile(check[cells], m)
    seen_hi = truth.copy()  # the truth is feasible: the attacker can never exclude it
    seen_lo = truth.copy()

    solves = 0
    if hints is not None and len(hints.cells):
        _try_hints(hints, req, scale, position, s, A, row_lo, row_hi, truth, cap, seen_hi, seen_lo)

    n_comp, label = connected_components(_bipartite(A), directed=False)
    var_label = label[n_rows:] if n_rows else label
    row_label = label[:n_rows]

    def satisfied(idx: np.ndarray) -> np.ndarray:
        return (
            (seen_hi[idx] >= need_hi[idx] - tol[idx])
            & (seen_lo[idx] <= need_lo[idx] + tol[idx])
            & (seen_hi[idx] - seen_lo[idx] >= width[idx] - tol[idx])
        )

    def solve(h: highspy.Highs, cols: np.ndarray, cost: np.ndarray, maximise: bool, solver: str) -> None:
        """One LP over a component's model `h` (its variables `cols`); its optimum widens what is seen."""
        nonlocal solves
        solves += 1
        h.setOptionValue("solver", solver)
        h.changeObjectiveSense(highspy.ObjSense.kMaximize if maximise else highspy.ObjSense.kMinimize)
        h.changeColsCost(len(cols), np.arange(len(cols), dtype=np.int32), cost)
        h.run()
        if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return  # no witness; the cell stays unproven (and fails closed)
        x = np.asarray(h.getSolution().col_value)
        np.maximum.at(seen_hi, cols, x)
        np.minimum.at(seen_lo, cols, x)

    for comp in np.unique(var_label[wanted]):
        cols = np.flatnonzero(var_label == comp)
        rws = np.flatnonzero(row_label == comp)
        sub = A[rws][:, cols].tocsr()
        h = _model(sub, row_lo[rws], row_hi[rws], cap)

        # Witness passes: push every unproven cell up (then down) at once, weighted by
        # its requirement so that small cells count as much as large ones. The interior
        # point solver needs no basis, so alternating directions costs no restarts.
        todo = cols[wanted[cols]]
        weight = 1.0 / np.maximum(need_hi[cols], 1.0)
        # A handful of cells (a repair round) is cheaper to settle by exact solves.
        for _ in range(WITNESS_PASSES if len(todo) > FEW_CELLS else 0):
            open_ = ~satisfied(todo)
            if not open_.any() or time.perf_counter() > deadline:
                break
            before = int(open_.sum())
            up = wanted[cols] & (
                seen_hi[cols] < np.maximum(need_hi[cols], seen_lo[cols] + width[cols]) - tol[cols]
            )
            if up.any():
                solve(h, cols, np.where(up, weight, 0.0), True, "ipm")
            down = wanted[cols] & (seen_lo[cols] > need_lo[cols] + tol[cols])
            if down.any():
                solve(h, cols, np.where(down, weight, 0.0), False, "ipm")
            if before - int((~satisfied(todo)).sum()) < max(1, before // 100):
                break  # the witnesses stopped helping; the rest get their own solves
        # Exact solves for what is left: the cell's own minimum and maximum.
        for v in todo[~satisfied(todo)]:
            k = int(np.searchsorted(cols, v))
            for maximise in (True, False):
                if satisfied(np.array([v]))[0] or time.perf_counter() > deadline:
                    break
                cost = np.zeros(len(cols))
                cost[k] = 1.0
                solve(h, cols, cost, maximise, "simplex")

    failures = []
    for v in np.flatnonzero(wanted):
        i, c = divmod(int(v), s)
        for side, gap in (
            ("upper", need_hi[v] - tol[v] - seen_hi[v]),
            ("lower", seen_lo[v] - need_lo[v] - tol[v]),
            ("width", width[v] - tol[v] - (seen_hi[v] - seen_lo[v])),
        ):
            if gap > 0:
                failures.append(AuditFailure(int(cells[c]), req.names[i], side, float(gap * scale[i])))
    return AuditVerdict(
        not failures, int(check.sum()), n_vars, n_rows, solves, tuple(failures), time.perf_counter() - started
    )


def _try_hints(hints, req, scale, position, s, A, row_lo, row_hi, truth, cap, seen_hi, seen_lo) -> None:
    """Candidate witnesses from the hypercubes secondary suppression chose: each cube's
    direction, up by its cell's upper level and down by its lower one, moving all
    measures at once, the count alone, or one magnitude alone. A candidate counts only
    if it satisfies every constraint of the LP (checked here, exactly as HiGHS would:
    bounds and every row), so a wrong hint proves nothing and costs only its check."""
    m = len(req.names)
    cells, signs = hints.cells, hints.signs
    pos = position[cells]  # (h, 2^d); -1 where a corner is released
    usable = (pos >= 0).all(axis=1)
    cells, signs, pos = cells[usable], signs[usable], pos[usable]
    if not len(cells):
        return
    up, down = moves(req, cells[:, 0])
    up, down = up / scale[:, None], down / scale[:, None]
    subsets = [np.ones(m, bool)] + [np.eye(m, dtype=bool)[i] for i in range(m)]
    base = A @ truth
    tol = 1e-7 * np.maximum(1.0, np.abs(np.where(np.isfinite(row_hi), row_hi, row_lo)))
    h, corners = cells.shape
    for step in (up, -down):
        for subset in subsets:
            # One candidate per cube: variables i*s + pos, moved by sign * step[i].
            measures = np.flatnonzero(subset)
            cols = (measures[:, None, None] * s + pos[None]).reshape(len(measures), h * corners)
            cols = np.moveaxis(cols.reshape(len(measures), h, corners), 1, 0).reshape(h, -1)
            delta = (step[measures][:, :, None] * signs[None]).transpose(1, 0, 2).reshape(h, -1)
            for start in range(0, h, 2048):
                part = slice(start, start + 2048)
                k = len(cols[part])
                D = csr_matrix(
                    (delta[part].ravel(), (cols[part].ravel(), np.repeat(np.arange(k), cols.shape[1]))),
                    shape=(A.shape[1], k),
                )
                # Rows the candidate does not touch keep the truth's (feasible) value.
                M = (A @ D).tocoo()
                moved = base[M.row] + M.data
                bad = (moved < row_lo[M.row] - tol[M.row]) | (moved > row_hi[M.row] + tol[M.row])
                ok = np.ones(k, bool)
                ok[M.col[bad]] = False
                point = truth[cols[part]] + delta[part]
                ok &= ((point >= -1e-9) & (point <= cap)).all(axis=1)
                for r in np.flatnonzero(ok):
                    np.maximum.at(seen_hi, cols[part][r], point[r])
                    np.minimum.at(seen_lo, cols[part][r], point[r])


def _bipartite(A: csr_matrix) -> csr_matrix:
    """Rows and columns of A as one graph's nodes (rows first), linked by non-zeros."""
    from scipy.sparse import bmat

    return bmat([[None, A], [A.T, None]]).tocsr()


def _quiet_highs() -> highspy.Highs:
    """A Highs instance, without the banner HiGHS writes to stdout (fd 1) the first
    time one is made in a process, before any option can turn it off: stdout belongs
    to the operator's command (`dataops tables show`)."""
    global _banner_shown
    if _banner_shown:
        return highspy.Highs()
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    _banner_shown = True
    return h


_banner_shown = False


def _model(A: csr_matrix, row_lo: np.ndarray, row_hi: np.ndarray, cap: float) -> highspy.Highs:
    h = _quiet_highs()
    h.setOptionValue("output_flag", False)
    lp = highspy.HighsLp()
    n_rows, n_cols = A.shape
    lp.num_col_ = n_cols
    lp.num_row_ = n_rows
    lp.col_cost_ = np.zeros(n_cols)
    lp.col_lower_ = np.zeros(n_cols)
    lp.col_upper_ = np.full(n_cols, cap)
    lp.row_lower_ = row_lo
    lp.row_upper_ = np.where(np.isinf(row_hi), highspy.kHighsInf, row_hi)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = A.indptr.astype(np.int32)
    lp.a_matrix_.index_ = A.indices.astype(np.int32)
    lp.a_matrix_.value_ = A.data
    lp.a_matrix_.num_col_ = n_cols
    lp.a_matrix_.num_row_ = n_rows
    h.passModel(lp)
    return h
