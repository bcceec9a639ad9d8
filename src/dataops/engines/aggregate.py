"""The exact-aggregate engine and its output controls.

Exact answers are only as safe as the controls on them, so all three live here,
next to the computation they guard, and each is a few lines:

* minimum group size — every output row must cover at least k distinct privacy
  units (k = the grant's `min_group_size`), else the row is suppressed;
* (n, k) dominance — for SUM and MEAN cells, the n largest units' (absolute)
  contributions may not exceed `percent`% of the cell, else the row is suppressed:
  a cell dominated by one enterprise discloses that enterprise's value;
* tracker defence — filters must leave at least k units in the query set and in
  its complement, and every part of a filter must account for at least k units,
  else the whole query is refused (see `check_tracker`): this blocks isolating a
  unit with a filter and its negation, by differencing two queries that differ in
  one filter (N vs N-1), or by padding a small set with a large one.

The response reports how many rows were suppressed, never which, and no message
carries a count or value from the data.

Everything is computed from one per-unit table (one row per group × privacy unit),
so the distinct-unit counts and the dominance shares come out of the same pass
as the aggregates themselves.
"""

from __future__ import annotations

import polars as pl

from dataops.catalog import Dataset
from dataops.engines._base import EngineResult, Plan, filter_exprs, scan
from dataops.errors import LimitExceeded, OutputControlDenied
from dataops.ir import Between, Filter, Function, InSet
from dataops.policy import Dominance

_UNITS = "__units"
_ROWS = "__rows"


def run(plan: Plan) -> EngineResult:
    query, dataset, grant = plan.query, plan.dataset, plan.grant
    k = grant.min_group_size
    unit = dataset.unit_column
    frame = scan(dataset)
    if query.filters:
        check_tracker(frame, dataset, query.filters, k)
        frame = frame.filter(pl.all_horizontal(filter_exprs(dataset, query.filters)))

    dims = list(query.group_by)
    measures = sorted({a.column for a in query.aggregates if a.column})
    dominated = sorted({a.column for a in query.aggregates if a.function in (Function.SUM, Function.MEAN)})

    per_unit = frame.group_by([*dims, unit]).agg(
        pl.len().alias(_ROWS),
        *[pl.col(m).sum().alias(f"__sum_{m}") for m in measures],
        *[pl.col(m).count().alias(f"__n_{m}") for m in measures],
        *[pl.col(m).abs().sum().alias(f"__abs_{m}") for m in dominated],
    )

    outputs = [pl.len().alias(_UNITS)]
    for aggregate in query.aggregates:
        outputs.append(_output(aggregate.function, aggregate.column).alias(aggregate.name))
    n = grant.dominance.n
    shares = [
        (pl.col(f"__abs_{m}").top_k(n).sum() / pl.col(f"__abs_{m}").sum()).alias(f"__share_{m}")
        for m in dominated
    ]
    grouped = per_unit.group_by(dims) if dims else per_unit
    table = (grouped.agg(*outputs, *shares) if dims else grouped.select(*outputs, *shares)).collect()

    if len(table) > plan.max_output_rows:
        raise LimitExceeded(
            f"the result has more than max_output_rows={plan.max_output_rows} rows; group by fewer columns",
            rule="limits.max_output_rows",
        )
    released = table.filter(min_group_size(k) & undominated(dominated, grant.dominance))
    suppressed = len(table) - len(released)
    if dims:
        released = released.sort(dims, nulls_last=True)
    return EngineResult(
        table=released.select(*dims, *[a.name for a in query.aggregates]).to_arrow(),
        rows_suppressed=suppressed,
    )


def _output(function: Function, column: str | None) -> pl.Expr:
    """An aggregate computed from the per-unit table."""
    if function is Function.COUNT:
        return pl.col(_ROWS).sum().cast(pl.Int64)
    if function is Function.COUNT_UNITS:
        return pl.len().cast(pl.Int64)
    if function is Function.SUM:
        return pl.col(f"__sum_{column}").sum()
    if function is Function.MEAN:
        return pl.col(f"__sum_{column}").sum() / pl.col(f"__n_{column}").sum()
    raise OutputControlDenied(f"{function.value} has no exact release", rule="aggregate-mode.quantile")


def min_group_size(k: int) -> pl.Expr:
    """The rows that may be released: those covering at least k distinct units."""
    return pl.col(_UNITS) >= k


def undominated(measures: list[str], rule: Dominance) -> pl.Expr:
    """The rows whose SUM/MEAN cells the n largest units do not dominate."""
    keep = pl.lit(True)
    for m in measures:
        # 0/0 (every contribution zero) is NaN: nothing dominates an all-zero cell.
        keep = keep & (pl.col(f"__share_{m}").fill_nan(0.0) <= rule.percent / 100.0)
    return keep


def check_tracker(frame: pl.LazyFrame, dataset: Dataset, filters: tuple[Filter, ...], k: int) -> None:
    """Refuse filters that isolate fewer than k units, alone or by difference with another query.

    Counted in distinct privacy units, all in one pass over the data:

    * the query set, and its complement, hold at least k units (a filter and its
      negation cannot isolate a unit);
    * each filter removes at least k units from what the other filters select: two
      queries that differ in one filter (N vs N-1) differ by at least k units;
    * each value of an in_set selects at least k units with the other filters: a small
      set cannot hide in a union with a large one (padding) and be subtracted again;
    * the lowest and the highest value a range admits are each held by at least k
      units: moving an end of a range adds or removes at least k units or none.

    A value that selects nothing is refused like a small one, so a refusal cannot tell
    an empty group from a small one. What is not stopped: combining several queries
    that each pass, by inclusion-exclusion over different columns (a general tracker);
    no per-query rule can stop that, which is what DP mode is for.
    """
    unit = dataset.unit_column
    parts = filter_exprs(dataset, filters)
    where = pl.all_horizontal(parts)

    def units(mask: pl.Expr) -> pl.Expr:
        return pl.col(unit).filter(mask).n_unique()

    counts = [units(where), units(~where)]
    for i, (f, part) in enumerate(zip(filters, parts)):
        others = pl.all_horizontal(parts[:i] + parts[i + 1:]) if len(parts) > 1 else pl.lit(True)
        counts.append(units(others & ~part))
        column = pl.col(f.column)
        if isinstance(f, InSet):
            one_of = filter_exprs(dataset, tuple(InSet(f.column, (v,)) for v in f.values))
            counts.extend(units(others & value) for value in one_of)
        elif isinstance(f, Between):
            selected = others & part
            for end in (column.filter(selected).min(), column.filter(selected).max()):
                counts.append(units(selected & (column == end).fill_null(False)))
    sizes = frame.select(*[c.alias(f"c{i}") for i, c in enumerate(counts)]).collect().row(0)
    if min(sizes) < k:
        raise OutputControlDenied(
            f"the filters must leave at least {k} privacy units in the query set and in its "
            f"complement, and each filter, each value of an in_set and each end of a range must "
            f"account for at least {k} of them; widen or drop a filter",
            rule="tracker",
        )
