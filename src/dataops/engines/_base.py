from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import polars as pl
import pyarrow as pa

from dataops.bind import bind_filters
from dataops.catalog import Dataset
from dataops.ir import Between, Equals, Filter, InSet, Query
from dataops.policy import Grant
from dataops.values import AggregateAccuracy, PrivacyLoss, Spend  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Plan:
    """An authorized query bound to its dataset: everything an engine needs to run it.

    `filters` are the query's filters bound to the catalog (`dataops.bind`): checked
    against the column types, values in those types. A plan binds them when it is
    made (once; `dataclasses.replace` keeps them), so an engine never sees an
    unchecked value and never checks one again.
    """

    query: Query
    dataset: Dataset
    grant: Grant
    max_output_rows: int = 10_000
    # Aggregate mode: the lookup in a protected table that answers the query
    # (`dataops.engines.table.Coverage`, decided by authorization).
    coverage: Any = None
    filters: tuple[Filter, ...] = ()
    # The dataset's version as `Sandbox.plan` checked it (`dataops.versions`): the engines
    # key on this one rather than stat and resolve the file again. None: look it up.
    data_version: str | None = None

    def __post_init__(self) -> None:
        # Empty while unbound: binding keeps one filter per query filter, so a plan whose
        # query has filters and whose own are empty has not been bound yet.
        if not self.filters and self.query.filters:
            object.__setattr__(self, "filters", bind_filters(self.dataset, self.query.filters))


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


@dataclass(frozen=True)
class EngineEstimate:
    """An engine's answer before it runs: what a release would cost and how accurate it
    would be. Reads no data and spends nothing; `release` takes it back and refuses to
    cost more than it says.

    Internal to the server: the consumer's `dataops.values.Estimate` is made from it
    once the ledger has said what would remain (`Sandbox.estimate`)."""

    cost: PrivacyLoss
    accuracy: tuple[AggregateAccuracy, ...]
    # Public facts about the query's terms (read from no data), e.g. that clipping may bias.
    notes: tuple[str, ...] = ()
    # zCDP grants: the release's rho, which the ledger composes (cost is its conversion).
    rho: float | None = None
    # The data version the release would read: with the query it keys reuse (None: the
    # engine's answers are not stored for reuse, e.g. lookups in published tables).
    data_version: str | None = None
    # The engine's own state between estimate and release (e.g. the compiled, calibrated
    # query), opaque to everyone else.
    handle: Any = None


PlanT = TypeVar("PlanT", contravariant=True)
ResultT = TypeVar("ResultT", covariant=True)


class Engine(Protocol[PlanT, ResultT]):
    """One way an answer leaves the sandbox (as Ibis has backends: adding an engine is
    adding a module). `Sandbox` holds one per query mode (`Engine[Plan, EngineResult]`:
    the exact-table and DP engines); the subject engine takes a consented `SubjectPlan`
    and releases an `Evaluation`.

    `spends` says whether releases cost privacy budget: if so, the release coordinator
    (`dataops.releases`) reserves the estimate's cost before `release` and commits it after.
    """

    spends: bool

    def estimate(self, plan: PlanT) -> EngineEstimate:
        """Cost and accuracy; runs nothing on the data and spends nothing."""
        ...

    def release(self, plan: PlanT, estimate: EngineEstimate, deadline: float | None = None) -> ResultT:
        """The answer, at no more than `estimate.cost` (`deadline`: time.monotonic() the client stops)."""
        ...


def scan(dataset: Dataset) -> pl.LazyFrame:
    # Always lazy: polars reads only the columns and row groups a query needs.
    return pl.scan_parquet(dataset.path)


def filter_exprs(filters: tuple[Filter, ...]) -> list[pl.Expr]:
    """One boolean expression per bound filter (`Plan.filters`); a null never matches.

    The values are already in their columns' types (`dataops.bind`): nothing is checked here.
    """
    exprs: list[pl.Expr] = []
    for f in filters:
        col = pl.col(f.column)
        if isinstance(f, Equals):
            expr = col == pl.lit(f.value)
        elif isinstance(f, InSet):
            expr = col.is_in(list(f.values))
        elif isinstance(f, Between):
            ends = []
            if f.low is not None:
                ends.append(col >= pl.lit(f.low))
            if f.high is not None:
                ends.append(col <= pl.lit(f.high))
            expr = pl.all_horizontal(ends)
        else:  # the IR admits no other kind
            raise TypeError(f"not a filter: {f!r}")
        exprs.append(expr.fill_null(False))
    return exprs


def predicate(filters: tuple[Filter, ...]) -> pl.Expr | None:
    """The AND of the bound filters as a polars expression; a null never matches."""
    exprs = filter_exprs(filters)
    if not exprs:
        return None
    return pl.all_horizontal(exprs)
