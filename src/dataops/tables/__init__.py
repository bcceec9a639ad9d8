"""Protected tables: a table product's cube with every sub-total, protected once per
data version the way statistical offices protect published tables.

    cube      (cube.py)       one streaming pass: rows, units, sums, top contributions per cell
    primary   (primary.py)    frequency, (n, k) dominance, p%, group attribute; protection levels
    secondary (secondary.py)  suppress more until no suppressed cell can be derived
    audit     (audit.py)      the LP audit (HiGHS) that decides "can be derived"
    store     (store.py)      built once per data version, kept under <state>/tables/

A suppressed cell is released as nulls with status "primary" or "secondary"; an empty
cell is suppressed like a small one (the frequency rule counts zero units), so the
released table never tells an empty cell from a suppressed one. A cell is released or
suppressed whole: MEAN is only ever released beside its SUM and COUNT's cell.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from dataops.catalog import Dataset
from dataops.ir import Function
from dataops.products.table import TableProduct
from dataops.tables.audit import AuditFailure, AuditVerdict, lp_audit
from dataops.tables.cube import Cube, build_cube
from dataops.tables.hypercube import Cubes
from dataops.tables.primary import Requirements, primary_suppression
from dataops.tables.secondary import secondary_suppression

RELEASED, PRIMARY, SECONDARY = "released", "primary", "secondary"

# A table whose finest cells fail the primary rules more often than this is too
# detailed for its data: secondary suppression would end up hiding nearly every cell
# after many slow audit rounds (a five-dimensional claims table over 100k rows: 58% of
# its base cells fail, and the loop had not finished after 15 minutes). It is
# withheld whole at once, and the report says why, so the operator coarsens it.
MAX_PRIMARY_SHARE = 0.5
# Secondary suppression that has not converged in this long fails closed.
SECONDARY_BUDGET_SECONDS = 300.0

__all__ = [
    "AuditFailure",
    "AuditVerdict",
    "ProtectedTable",
    "ProtectionReport",
    "RELEASED",
    "PRIMARY",
    "SECONDARY",
    "audit_table",
    "protect",
    "summary",
    "TableStore",
]


@dataclass(frozen=True)
class ProtectionReport:
    cells: int  # every cell of the cube, sub-totals included
    primary: int
    secondary: int
    primary_by_rule: dict[str, int]  # frequency / dominance / p_percent / group_attribute (overlapping)
    # Information loss: the share of the base (finest) cells suppressed, of the rows in
    # suppressed base cells, and of each magnitude column's total in them.
    information_loss: dict[str, float]
    rows: int  # rows in the table (inside the public key sets)
    rows_outside: int  # rows whose dimension values lie outside the key sets: in no cell
    audit: AuditVerdict
    rounds: int  # secondary-suppression rounds
    seconds: dict[str, float]  # cube, primary, secondary, audit, total
    structural: int = 0  # structural zeros: declared impossible, released as 0
    # Why every cell is withheld without an audit ("" when the audited pattern is
    # released): the table is too detailed for its data, or protection ran out of time.
    withheld: str = ""

    def to_json(self) -> dict:
        return {
            "cells": self.cells,
            "primary": self.primary,
            "secondary": self.secondary,
            "primary_by_rule": dict(self.primary_by_rule),
            "information_loss": dict(self.information_loss),
            "rows": self.rows,
            "rows_outside": self.rows_outside,
            "rounds": self.rounds,
            "seconds": dict(self.seconds),
            "structural": self.structural,
            "withheld": self.withheld,
            "audit": {
                "passed": self.audit.passed,
                "checked": self.audit.checked,
                "variables": self.audit.variables,
                "constraints": self.audit.constraints,
                "lp_solves": self.audit.lp_solves,
                "seconds": self.audit.seconds,
                "failures": [vars(f) for f in self.audit.failures],
            },
        }

    @classmethod
    def from_json(cls, doc: dict) -> ProtectionReport:
        a = doc["audit"]
        audit = AuditVerdict(
            a["passed"],
            a["checked"],
            a["variables"],
            a["constraints"],
            a["lp_solves"],
            tuple(AuditFailure(**f) for f in a["failures"]),
            a["seconds"],
        )
        return cls(
            doc["cells"],
            doc["primary"],
            doc["secondary"],
            doc["primary_by_rule"],
            doc["information_loss"],
            doc["rows"],
            doc["rows_outside"],
            audit,
            doc["rounds"],
            doc["seconds"],
            doc.get("structural", 0),
            doc.get("withheld", ""),
        )


@dataclass(frozen=True)
class Confidential:
    """The true values behind the table, kept inside the sandbox for re-auditing.
    Never part of a release."""

    cube: Cube
    requirements: Requirements
    suppressed: np.ndarray
    cubes: Cubes | None = None  # candidate witnesses for a re-audit (checked, never trusted)


@dataclass(frozen=True)
class ProtectedTable:
    product: TableProduct
    data_version: str
    fingerprint: str  # sha256 over the released content
    cells: pl.DataFrame  # one row per cell: dimensions (null = all), measures (null = suppressed), status
    report: ProtectionReport
    confidential: Confidential | None = field(default=None, repr=False, compare=False)


def protect(
    product: TableProduct,
    dataset: Dataset,
    source: pl.LazyFrame | None = None,
    *,
    data_version: str = "",
    secondary: bool = True,
    group_attribute: bool = True,
    scratch: Path | None = None,
) -> ProtectedTable:
    """Build and protect the table. `secondary=False` and `group_attribute=False` exist
    only so tests can show the attacks those controls stop. `scratch`: where a large
    dataset's rows may be bucketed on disk while the cube is built (inside the sandbox)."""
    started = time.perf_counter()
    # Over its own file, a large dataset is split by unit into buckets on disk under
    # `scratch` (inside the sandbox) in one pass.
    cube = build_cube(product, dataset, source, scratch=scratch)
    t_cube = time.perf_counter()
    prim = primary_suppression(product, dataset, cube, group_attribute=group_attribute)
    t_primary = time.perf_counter()
    relations = cube.relations()
    rounds = 0
    cubes = None
    base = cube.is_base()
    withheld = ""
    share = primary_share(prim.suppressed, prim.structural, base)
    if secondary and share > MAX_PRIMARY_SHARE:
        withheld = (
            f"{100 * share:.0f}% of the finest cells fail the primary rules (more than "
            f"{100 * MAX_PRIMARY_SHARE:.0f}%): the table is too detailed for this data; "
            "drop a dimension or coarsen one"
        )
    if secondary and not withheld:
        sec = secondary_suppression(
            prim.requirements,
            relations,
            prim.suppressed,
            cube.shape,
            fixed=prim.structural,
            budget_seconds=SECONDARY_BUDGET_SECONDS,
        )
        suppressed, rounds, cubes = sec.suppressed, sec.rounds, sec.cubes
        if not sec.converged:
            withheld = f"secondary suppression did not converge in {SECONDARY_BUDGET_SECONDS:g} s"
    else:
        suppressed = prim.suppressed.copy()
    t_secondary = time.perf_counter()
    if withheld:
        # Fail closed at once: every cell but the structural zeros (public) is
        # suppressed, so nothing is released that an audit would have to clear. The
        # table is served that way: every lookup in it is suppressed.
        suppressed = ~prim.structural
        verdict = AuditVerdict(True, 0, 0, 0, 0, (), 0.0)
    else:
        # The final verdict audits every suppressed cell afresh, whatever the loop saw.
        # The hypercubes are offered as candidate witnesses; each is checked against the LP.
        verdict = lp_audit(prim.requirements, relations, suppressed, hints=cubes)
    t_audit = time.perf_counter()
    if secondary and not verdict.passed and not withheld:
        # Fail closed: a pattern the audit could not prove safe releases nothing. The
        # report keeps the failed verdict so the operator sees why the table is empty.
        suppressed = ~prim.structural
        withheld = "the LP audit did not prove the suppression pattern safe"

    status = np.where(prim.suppressed, PRIMARY, np.where(suppressed, SECONDARY, RELEASED))
    cells = _released_cells(product, dataset, cube, suppressed, status)
    total_rows = max(int(cube.rows[base].sum()), 1)
    loss = {
        "base_cells": float(suppressed[base].mean()) if base.any() else 0.0,
        "rows": float(cube.rows[base & suppressed].sum() / total_rows),
    }
    for column, sums in cube.sums.items():
        total = float(sums[base].sum())
        loss[f"sum_{column}"] = float(sums[base & suppressed].sum() / total) if total else 0.0
    report = ProtectionReport(
        cells=cube.n_cells,
        primary=int(prim.suppressed.sum()),
        secondary=int((suppressed & ~prim.suppressed).sum()),
        primary_by_rule={k: int(v.sum()) for k, v in prim.reasons.items()},
        information_loss=loss,
        rows=int(cube.rows[base].sum()),
        rows_outside=cube.rows_outside,
        audit=verdict,
        rounds=rounds,
        seconds={
            "cube": t_cube - started,
            "primary": t_primary - t_cube,
            "secondary": t_secondary - t_primary,
            "audit": t_audit - t_secondary,
            "total": t_audit - started,
        },
        structural=int(prim.structural.sum()),
        withheld=withheld,
    )
    return ProtectedTable(
        product,
        data_version,
        fingerprint(product, data_version, cells),
        cells,
        report,
        Confidential(cube, prim.requirements, suppressed, cubes),
    )


def primary_share(primary: np.ndarray, structural: np.ndarray, base: np.ndarray) -> float:
    """The share of the finest (base) cells, structural zeros aside, that fail a primary rule."""
    cells = base & ~structural
    return float(primary[cells].mean()) if cells.any() else 0.0


def audit_table(table: ProtectedTable) -> AuditVerdict:
    """Re-run the LP audit of a protected table from its confidential side."""
    if table.confidential is None:
        raise ValueError(f"table {table.product.id!r}: no confidential values to audit against")
    c = table.confidential
    return lp_audit(c.requirements, c.cube.relations(), c.suppressed, hints=c.cubes)


def fingerprint(product: TableProduct, data_version: str, cells: pl.DataFrame) -> str:
    h = hashlib.sha256()
    h.update(f"dataops.table/1\0{product.id}\0{product.dataset}\0{data_version}\0".encode())
    h.update(cells.write_csv().encode())
    return h.hexdigest()


def summary(table: ProtectedTable) -> str:
    """A printable protection summary for operators (`dataops tables show`)."""
    r, p = table.report, table.product
    rules = p.rules
    lines = [
        f"table {p.id} ({p.dataset}): {p.title}",
        f"  dimensions: {' x '.join(f'{d}({len(k)})' for d, k in zip(p.dimensions, p.keys))}",
        f"  measures:   {', '.join(m.name for m in p.measures)}",
        f"  rules:      min_units={rules.min_units}, dominance=({rules.dominance_n}, "
        f"{rules.dominance_percent:g}%), p%={rules.p_percent if rules.p_percent is not None else 'off'}"
        + (
            f", group attribute {rules.group_attribute_percent:g}% on {', '.join(rules.sensitive_dimensions)}"
            if rules.sensitive_dimensions
            else ""
        ),
        f"  data version {table.data_version or '-'}; fingerprint {table.fingerprint[:16]}",
        f"  rows {r.rows} (outside the key sets: {r.rows_outside})",
        f"  cells {r.cells}: released {r.cells - r.primary - r.secondary}, "
        f"primary {r.primary}, secondary {r.secondary} ({r.rounds} rounds)"
        + (f", structural zeros {r.structural}" if r.structural else ""),
        "  primary by rule: " + ", ".join(f"{k} {v}" for k, v in r.primary_by_rule.items()),
        "  information loss: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r.information_loss.items()),
        *([f"  withheld whole: {r.withheld}"] if r.withheld else []),
        *([f"  {r.audit.describe()}"] if r.audit.checked or not r.audit.passed or not r.withheld else []),
        f"  built in {r.seconds['total']:.2f}s (cube {r.seconds['cube']:.2f}s, "
        f"secondary {r.seconds['secondary']:.2f}s, audit {r.seconds['audit']:.2f}s)",
    ]
    return "\n".join(lines)


def _released_cells(
    product: TableProduct, dataset: Dataset, cube: Cube, suppressed: np.ndarray, status: np.ndarray
) -> pl.DataFrame:
    codes = cube.codes()
    columns: dict[str, pl.Series] = {}
    for j, (name, keys, edges) in enumerate(zip(product.dimensions, product.keys, product.bins)):
        dtype = pl.String if edges is not None else pl.Series(list(keys)).dtype
        columns[name] = pl.Series(name, [*keys, None], dtype=dtype).gather(codes[:, j])
    keep = ~suppressed
    for m in product.measures:
        if m.function is Function.COUNT:
            values = pl.Series(m.name, cube.rows, pl.Int64)
        elif m.function is Function.COUNT_UNITS:
            if not np.array_equal(cube.units, cube.rows):
                # The loader only allows count_units where a unit has one row; data that
                # breaks the catalog's promise must not publish non-additive counts.
                raise ValueError(
                    f"{dataset.id}: a privacy unit has more rows than the catalog's "
                    f"max_rows = 1; count_units in table {product.id!r} is not additive"
                )
            values = pl.Series(m.name, cube.units, pl.Int64)
        elif m.function is Function.SUM:
            values = pl.Series(m.name, cube.sums[m.measured_column], pl.Float64)
        else:  # MEAN: only over cells with rows (a released cell has at least min_units units)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = cube.sums[m.measured_column] / cube.rows
            values = pl.Series(m.name, mean, pl.Float64)
        columns[m.name] = (
            pl.select(pl.when(pl.Series(keep)).then(values).otherwise(None)).to_series().alias(m.name)
        )
    columns["status"] = pl.Series("status", status, pl.String)
    return pl.DataFrame(columns)


from dataops.tables.store import TableStore  # noqa: E402  (needs the names above)
