from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa

from dataops.catalog import ColumnType, Dataset
from dataops.errors import FieldViolation, InvalidQuery
from dataops.ir import Between, Equals, Filter, InSet, Query, Scalar
from dataops.policy import Grant
from dataops.values import AggregateAccuracy, Spend  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Plan:
    """An authorized query with everything an engine needs to run it."""

    query: Query
    dataset: Dataset
    grant: Grant
    max_output_rows: int = 10_000
    # Aggregate mode: the lookup in a protected table that answers the query
    # (`dataops.engines.table.Coverage`, decided by authorization).
    coverage: Any = None


# `AggregateAccuracy.mechanism` values, as the contract (query.proto) documents
# them: stable tokens a client can compare, not prose.
MECHANISM_DISCRETE_LAPLACE = "discrete_laplace"  # counts, sums; a mean's sum and count
MECHANISM_EXPONENTIAL = "exponential"  # quantiles (OpenDP's exponential mechanism)
MECHANISM_DISCRETE_GAUSSIAN = "discrete_gaussian"  # counts, sums, a mean's parts on a zCDP grant


@dataclass(frozen=True)
class EngineResult:
    table: pa.Table
    rows_suppressed: int = 0
    accuracy: tuple[AggregateAccuracy, ...] = field(default_factory=tuple)
    spend: Spend | None = None
    reused: bool = False
    # Exact answers: the protected table looked up, and its fingerprint (for the audit).
    table_id: str | None = None
    table_fingerprint: str | None = None


def scan(dataset: Dataset) -> pl.LazyFrame:
    # Always lazy: polars reads only the columns and row groups a query needs.
    return pl.scan_parquet(dataset.path)


def coerce_value(dataset: Dataset, column: str, value: Scalar, field_path: str) -> Scalar:
    """A filter value in the column's type; a mismatch is the consumer's error."""
    ctype = dataset.columns[column].type
    ok = {
        ColumnType.STRING: isinstance(value, str),
        ColumnType.INT: isinstance(value, int) and not isinstance(value, bool),
        ColumnType.FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool),
        ColumnType.BOOL: isinstance(value, bool),
        ColumnType.DATE: isinstance(value, (str, dt.date)),
    }[ctype]
    if ctype is ColumnType.DATE and isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            ok = False
    if ok and ctype is ColumnType.FLOAT and isinstance(value, (int, float)):
        # One Python type per column: polars refuses a list mixing int and float.
        return float(value)
    if not ok:
        description = f"{value!r} is not a {ctype.value} like column {column!r}"
        raise InvalidQuery(
            f"{field_path}: {description}",
            rule="query.value",
            column=column,
            field_violations=(FieldViolation(field_path, description),),
        )
    return value


def filter_exprs(dataset: Dataset, filters: tuple[Filter, ...]) -> list[pl.Expr]:
    """One boolean expression per filter, values checked against the column types; a null never matches."""
    exprs: list[pl.Expr] = []
    for i, f in enumerate(filters):
        path = f"query.filters[{i}]"
        col = pl.col(f.column)
        if isinstance(f, Equals):
            expr = col == pl.lit(coerce_value(dataset, f.column, f.value, f"{path}.equals"))
        elif isinstance(f, InSet):
            expr = col.is_in([coerce_value(dataset, f.column, v, f"{path}.in_set") for v in f.values])
        elif isinstance(f, Between):
            ends = []
            if f.low is not None:
                ends.append(col >= pl.lit(coerce_value(dataset, f.column, f.low, f"{path}.range.low")))
            if f.high is not None:
                ends.append(col <= pl.lit(coerce_value(dataset, f.column, f.high, f"{path}.range.high")))
            expr = pl.all_horizontal(ends)
        else:  # the IR admits no other kind
            raise TypeError(f"not a filter: {f!r}")
        exprs.append(expr.fill_null(False))
    return exprs


def predicate(dataset: Dataset, filters: tuple[Filter, ...]) -> pl.Expr | None:
    """The AND of the filters as a polars expression; a null never matches."""
    exprs = filter_exprs(dataset, filters)
    if not exprs:
        return None
    return pl.all_horizontal(exprs)
