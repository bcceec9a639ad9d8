"""The exact-aggregate engine and its output controls.

Exact answers are only as safe as the controls on them, so all three live here,
next to the computation they guard, and each is a few lines:

* minimum group size — every output row must cover at least k distinct privacy
  units (k = the grant's `min_group_size`), else the row is suppressed;
* (n, k) dominance — for SUM and MEAN cells, the n largest units' (absolute)
  contributions may not exceed `percent`% of the cell, else the row is suppressed:
  a cell dominated by one enterprise discloses that enterprise's value;
* tracker defence — filters must leave at least k units in the query set and in
  its complement, else the whole query is refused: this blocks isolating a unit
  with a filter and its negation (differencing).

The response reports how many rows were suppressed, never which, and no message
carries a count or value from the data.

Everything is computed from one per-unit table (one row per group × privacy unit),
so the distinct-unit counts and the dominance shares come out of the same pass
as the aggregates themselves.
"""

from __future__ import annotations

import polars as pl

from dataops.engines._base import EngineResult, Plan, predicate, scan
from dataops.errors import LimitExceeded, OutputControlDenied
from dataops.ir import Function

_UNITS = "__units"
_ROWS = "__rows"


def run(plan: Plan) -> EngineResult:
    query, dataset, grant = plan.query, plan.dataset, plan.grant
    k = grant.min_group_size
    unit = dataset.unit_column
    where = predicate(dataset, query.filters)
    frame = scan(dataset)
    if where is not None:
        check_tracker(frame, unit, where, k)
        frame = frame.filter(where)

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
    share_limit = grant.dominance.percent / 100.0
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
    keep = pl.col(_UNITS) >= k
    for m in dominated:
        # 0/0 (every contribution zero) is NaN: nothing dominates an all-zero cell.
        keep = keep & (pl.col(f"__share_{m}").fill_nan(0.0) <= share_limit)
    released = table.filter(keep)
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


def check_tracker(frame: pl.LazyFrame, unit: str, where: pl.Expr, k: int) -> None:
    """Refuse filters that leave fewer than k units inside, or fewer than k outside."""
    sizes = frame.select(
        pl.col(unit).filter(where).n_unique().alias("inside"),
        pl.col(unit).filter(~where).n_unique().alias("outside"),
    ).collect()
    if sizes["inside"][0] < k or sizes["outside"][0] < k:
        raise OutputControlDenied(
            f"the filters must leave at least {k} privacy units in the query set and in its "
            "complement; widen or drop a filter",
            rule="tracker",
        )
