"""Secondary suppression across the whole cube, checked by the LP audit until it holds.

A heuristic in the spirit of sdcTable's SIMPLEHEURISTIC, with the audit as judge:

1. *No lonely cell.* A relation (a sub-total and its cells along one dimension)
   with exactly one suppressed cell gives that cell away by subtraction. Each such
   relation gets a partner suppressed: the released cell of least information loss
   (fewest rows) that is large enough to cover the lonely cell's count protection.
   Repeat until no relation has exactly one suppressed cell.
2. *Audit.* The LP audit (`dataops.tables.audit`) computes what an attacker can
   derive about every suppressed cell from everything released.
3. *Repair.* For every cell whose interval falls short, one more cell is
   suppressed in its relations (or, where those are suppressed whole, in the next
   ring of relations out): the cheapest large enough to cover the shortfall, where
   one exists. Back to 1.

Suppressing more only widens every interval (a released value becoming unknown
removes a constraint), so a cell that passed stays passed and only the failing and
newly suppressed cells are re-audited. After `WHOLE_RELATION_AFTER` rounds, a still
failing cell has the nearest relations that still release anything suppressed
whole, which ends the loop (at worst the whole table is suppressed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from dataops.tables.audit import AuditVerdict, lp_audit
from dataops.tables.hypercube import Cubes, hypercube_suppression
from dataops.tables.primary import Requirements

WHOLE_RELATION_AFTER = 8
MAX_ROUNDS = 30
# Exact solves per round: a cell not proven safe in time gets more suppression
# around it rather than a longer search (the final audit has its own budget).
ROUND_BUDGET_SECONDS = 3.0
# Cubes through one-dimensional margins for what lower cubes leave open. Off: on the
# tables we publish the relation-by-relation repair protects those cells without
# suppressing a one-dimensional margin (a district's total), which cubes cannot avoid.
# On, a sparse five-dimensional table converges in a few rounds instead of many.
THROUGH_MARGINS = False


@dataclass(frozen=True)
class Membership:
    """For each dimension j and cell: the relation it is a child of, and the one it
    is the parent of (-1: none)."""

    as_child: list[np.ndarray]
    as_parent: list[np.ndarray]

    @classmethod
    def of(cls, relations, n_cells: int) -> Membership:
        as_child, as_parent = [], []
        for parents, children in relations:
            c = np.full(n_cells, -1, np.int64)
            c[children.reshape(-1)] = np.repeat(np.arange(len(parents)), children.shape[1])
            p = np.full(n_cells, -1, np.int64)
            p[parents] = np.arange(len(parents))
            as_child.append(c)
            as_parent.append(p)
        return cls(as_child, as_parent)

    def relations_of(self, cell: int) -> list[tuple[int, int]]:
        out = []
        for j in range(len(self.as_child)):
            for table in (self.as_child[j], self.as_parent[j]):
                if table[cell] >= 0:
                    out.append((j, int(table[cell])))
        return out


@dataclass(frozen=True)
class Secondary:
    suppressed: np.ndarray
    rounds: int
    audit: AuditVerdict  # the last round's audit (of the cells it had to check)
    cubes: Cubes | None  # the hypercubes chosen: candidate witnesses for every later audit
    converged: bool = True  # False: out of time with cells still failing (the pattern is unsafe)


def secondary_suppression(
    req: Requirements,
    relations,
    primary: np.ndarray,
    shape: tuple[int, ...] | None = None,
    fixed: np.ndarray | None = None,
    budget_seconds: float = float("inf"),
) -> Secondary:
    """`shape` (the cube's) enables the hypercube pass that does most of the work in one
    sweep; without it only the relation-by-relation loop runs (slow on large cubes).
    `fixed`: cells never to suppress (structural zeros: everyone knows they are 0).
    `budget_seconds`: no new round starts after this long (the result is unconverged)."""
    deadline = time.perf_counter() + budget_seconds
    n = len(primary)
    fixed = np.zeros(n, bool) if fixed is None else fixed
    members = [np.hstack([p[:, None], c]) for p, c in relations]
    membership = Membership.of(relations, n)
    # Information loss of suppressing a cell: its rows (and a little for empty cells,
    # which are suppressed anyway). Margins are large, so they are picked last.
    cost = np.where(fixed, np.inf, req.values[0] + 1.0)
    suppressed = primary.copy()
    cubes = None
    if shape is not None:
        suppressed, left, cubes = hypercube_suppression(req, shape, primary, fixed=fixed)
        if len(left) and THROUGH_MARGINS:
            # Cells no cube below the one-dimensional margins protects (structural
            # zeros all around): cubes through those margins, never the grand total.
            targets = np.zeros(n, bool)
            targets[left] = True
            suppressed, _, more = hypercube_suppression(
                req, shape, suppressed, targets=targets, forbid_level=len(shape), fixed=fixed
            )
            cubes = cubes.extend(more)
    pending = suppressed.copy()  # cells whose audit has not passed yet
    cubed: set[int] = set()  # failing cells already given a cube of their own
    verdict = None
    for round_ in range(1, MAX_ROUNDS + 1):
        if time.perf_counter() > deadline:
            return Secondary(suppressed, round_ - 1, verdict, cubes, converged=False)  # type: ignore[arg-type]
        before = suppressed.copy()
        _close_singletons(suppressed, members, req, cost)
        pending |= suppressed & ~before
        verdict = lp_audit(
            req, relations, suppressed, pending, budget_seconds=ROUND_BUDGET_SECONDS, hints=cubes
        )
        if verdict.passed:
            return Secondary(suppressed, round_, verdict, cubes)
        failing = {f.cell for f in verdict.failures}
        pending[:] = False
        pending[list(failing)] = True
        unsolved = failing
        if shape is not None and THROUGH_MARGINS and round_ < WHOLE_RELATION_AFTER:
            # What one cube per primary cell left open: cubes around the failing cells,
            # now also through one-dimensional margins (never the grand total).
            targets = np.zeros(n, bool)
            targets[list(failing)] = True
            suppressed, left, more = hypercube_suppression(
                req, shape, suppressed, targets=targets, forbid_level=len(shape), fixed=fixed
            )
            cubes = more if cubes is None else cubes.extend(more)
            # A cell whose cube the audit did not accept, or that has none, gets
            # the relation-by-relation repair; one that just got its cube waits a round.
            unsolved = set(left.tolist()) | (failing & cubed)
            cubed |= failing
        for f in verdict.failures:
            if f.cell not in unsolved:
                continue
            row = _nearest_released(suppressed | fixed, f.cell, membership, members)
            if row is None:
                continue  # nothing left to suppress: the whole connected table is hidden
            if round_ >= WHOLE_RELATION_AFTER:
                suppressed[row[~fixed[row]]] = True
            else:
                _add_partner(suppressed, row, req.values[req.names.index(f.measure)], f.missing, cost)
        pending |= suppressed & ~before
    # Out of rounds: the last repairs may have been enough; the caller's final audit decides.
    return Secondary(suppressed, MAX_ROUNDS, verdict, cubes)  # type: ignore[arg-type]


def _close_singletons(suppressed: np.ndarray, members, req: Requirements, cost: np.ndarray) -> None:
    need = np.maximum(req.up[0], 1.0)
    count = req.values[0]
    changed = True
    while changed:
        changed = False
        for rel in members:
            unknown = suppressed[rel]
            lonely = unknown.sum(axis=1) == 1
            if not lonely.any():
                continue
            rows = rel[lonely]
            alone = rows[unknown[lonely]]  # the one suppressed cell of each lonely relation
            # Cheapest released cell with enough rows to hide the lonely one; cells too
            # small to cover it only if there is nothing else.
            small = count[rows] < need[alone][:, None]
            penalty = np.where(suppressed[rows], np.inf, cost[rows] + np.where(small, 1e15, 0.0))
            best = penalty.argmin(axis=1)
            # A relation whose other cells are all fixed (structural zeros) has no
            # partner to offer: the audit decides, and the repair looks further out.
            coverable = np.isfinite(penalty[np.arange(len(rows)), best])
            pick = rows[np.arange(len(rows)), best][coverable]
            if len(pick):
                suppressed[pick] = True
                changed = True


def _nearest_released(suppressed, cell, membership, members, depth: int = 6):
    """The cells of the relations around `cell` that hold a released cell: its own
    relations first; where those are suppressed whole, the relations of the cells in
    them, and so on outward (a cell boxed in by suppressed relations is pinned by
    what is released further out)."""
    frontier = {cell}
    seen: set[tuple[int, int]] = set()  # (relation kind, relation) already walked
    for _ in range(depth):
        rows = [members[j][r] for c in frontier for j, r in membership.relations_of(c) if (j, r) not in seen]
        seen.update((j, r) for c in frontier for j, r in membership.relations_of(c))
        if not rows:
            return None
        cells = np.unique(np.concatenate(rows))
        if (~suppressed[cells]).any():
            return cells
        frontier = set(cells.tolist())
    return None


def _add_partner(
    suppressed: np.ndarray, row: np.ndarray, value: np.ndarray, missing: float, cost: np.ndarray
) -> None:
    """One more suppressed cell near the failing one: the cheapest released cell whose
    value covers the shortfall, else the largest there is (never a fixed cell: those
    cost infinitely much)."""
    released = row[~suppressed[row] & np.isfinite(cost[row])]
    if not len(released):
        return
    big = released[value[released] >= missing]
    if len(big):
        suppressed[big[np.argmin(cost[big])]] = True
    else:
        suppressed[released[np.argmax(value[released])]] = True
