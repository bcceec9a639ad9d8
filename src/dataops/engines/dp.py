"""The DP engine's proof-bearing core: contribution bounding, noise, OpenDP measurements.

This file is what a privacy reviewer reads: how each unit's contribution is bounded,
which OpenDP measurement releases each aggregate, and how its loss is mapped. The
rest of the DP engine carries no proof of its own and lives apart: the noise-scale
search, accuracy and bias notes (`dp_calibrate`), the released table's assembly and
consistency (`dp_post`, post-processing), automatic clipping (`dp_autoclip`, two
ordinary measurements composed), and the `Engine` adapter the service calls
(`dp_engine`). OpenDP's features are enabled once at server start (`enable_opendp`)
and asserted before any measurement is built.

OpenDP's `Context` searches for the noise scale on every query (seconds). Here a
query is compiled once into OpenDP polars plans over an *empty* frame, and the
scale for any epsilon follows from one privacy map at a reference scale: under
Laplace-type noise the loss is inversely proportional to the scale. Only
`release` touches data, by applying the measurements to a lazy Parquet scan.

What is released, and why it is private:

* One privacy unit is the catalog's unit column. In the identifier form the input
  metric is OpenDP's identifier distance (`symmetric_id_distance(unit)`) with d_in
  "one unit added or removed", so OpenDP itself must bound each unit's rows: every
  plan starts with OpenDP's truncation pattern `int_range(len).over(unit) < k`
  (see `LazyFrameQuery.truncate_per_group` in opendp/extras/polars and
  `match_truncations` in the Rust crate). Nothing about contributions is assumed.
  It is the reference form, and three things reach it: a query's tighter row bound
  over a prepared copy (below: the same stages on the copy's unit code), `dataops
  policy explain` (`DPQuery.compile(plan)` with no source calibrates it: the same cost
  with no copy to build), and the tests, which hold the fast path to it (equal privacy
  maps, and releases of the same accuracy). The server releases only over prepared
  copies (`dp_engine.DPEngine`); the no-source form's release over the raw dataset
  (`Compiled.input`) is the reference the tests run.
* Values are clipped by OpenDP to the catalog bounds (`.dp.sum(bounds)` etc.).
* Group keys from a public key set (catalog `keys`, or the `bins` of a numeric
  column for a histogram) are joined to the aggregate, the form OpenDP releases
  under pure DP: every key appears, whether or not the data has it. Other group
  keys need delta > 0; OpenDP then releases a group only if its noisy row count
  passes a threshold, and the threshold is chosen here to keep delta in budget.
* COUNT_UNITS runs in a second plan that keeps one row per unit and group
  (after the same row truncation), so the unit count has sensitivity 1 per group.
  The two plans compose sequentially: their losses add (basic composition).

The fast path: a prepared source. Truncating inside every plan is a window over the
unit column, most of a release's time. `DPQuery.compile(plan, source=PreparedSource)`
instead reads a copy of the dataset that `dataops.engines.prepared` truncated once,
by our own code, to at most k = max_rows_per_unit rows per unit (see that module
for why the OpenDP guarantee on the copy is a unit-level guarantee for the data):

* row aggregates (COUNT, SUM, MEAN, QUANTILE) use `symmetric_distance()` with
  d_in = k rows and no truncation filter. Their loss is the identifier form's at
  the same scale (tests/test_dp_prepared.py checks it through OpenDP's maps).
* COUNT_UNITS: our code keeps one row per unit and group (`unique` over the copy's
  unit code and the group columns, after the filters). That is again a per-unit
  step: one unit added or removed changes at most n = min(k, groups) rows, at most
  one per group, so OpenDP gets `frame_distance(symmetric_distance())` with d_in
  "n rows in all, 1 per group in at most n groups". The loss equals the identifier
  form's (OpenDP bounds the groups a unit reaches by the key set there too). It
  still hashes every (unit, group) pair per query: at 10M rows on two cores about
  0.7 s ungrouped and 1-2 s grouped, against 5 s and more in the identifier form
  and about 0.3 s for a grouped count + sum. In bounded memory: one range of unit
  codes at a time, written to a scratch file OpenDP's plan then scans
  (`_unique_by_code_range`; the same rows, so the same analysis). Grouped by three
  columns: 1.6 GiB peak at 10M rows and 1.8 GiB at 30M, where one unique held 3.0
  and 8.3 GiB (benchmarks/bench_count_units.py).
* the copy holds each usable column once, in its own type (`prepared_column_names`),
  and each bounded measure also in the catalog's fixed point (`prepared_fixed`: a plan
  reads that Int64, clipped again to a query's tighter bounds, `_Measure.prepare_copy`,
  instead of converting the raw value per query); filters read the raw columns and run after
  the truncation rather than before it: equally sound (a filter is row-by-row), only
  a unit above the cap may keep fewer matching rows.
* a string column with a public key set is also held as its key's position in that set
  (`prepared_codes`; the catalog's keys, never the data's: a value outside the keys, or
  missing, gets the position one past the last). A group-by over a prepared copy groups
  those small integers, 2-3 times cheaper than hashing the strings, and `dp_post.finish`
  puts each released position's key back: a row-by-row step before OpenDP and a
  relabelling of public keys after it, so the groups and the analysis are the string
  form's. Filters still read the strings.

A query's own terms (issue 13), all public and all in `Query.canonical()` (so in
release keys), never wider than the catalog's (refused naming the field otherwise):

* a smaller row bound k' (`Privacy.max_rows_per_unit`): the identifier form truncates
  to k' instead of the cap; over a prepared copy (truncated to the cap) every plan uses
  the identifier form again on the copy's unit code (one code per unit), so OpenDP
  truncates to k' and derives d_in from that truncation. Nothing assumes k'.
  (`enforce_row_bound=False` switches that off for the test showing why it matters.)
* tighter clipping bounds per measure: OpenDP clips to them; the fixed point stays
  the catalog's, so only the bounds OpenDP sees change.
* budget weights: every noisy term gets its own noise scale, global_scale times a
  unit that makes its loss its weight's share (`Compiled._units`). That is a budget
  allocation only: the spend is always OpenDP's map of the whole measurement. A MEAN is
  released as its sum and count of known values (`finish` divides them), so each
  part gets its own share.
* zCDP grants (`Grant.accounting == "zcdp"`): Gaussian noise, OpenDP's
  `zero_concentrated_divergence()`; the stages' rhos add (zCDP composition) and
  OpenDP converts the total to (epsilon, delta) at the query's delta
  (`zcdp_to_epsilon`): the query's terms, by which its scale is chosen. The ledger
  composes the calibration's rho across the grant's releases and debits the growth
  of OpenDP's conversion of the grant's total rho (`Ledger.reserve_zcdp`).

The calibration is the only thing deciding the spend: `compile` fixes the form
(identifier, or prepared), `calibrate` maps it, and `release` rebuilds the same
measurements and refuses if they would cost more than calibrated.

Measurements are collected with `OnceFrame.lazy().collect()` (OpenDP's
"honest-but-curious" API) rather than `OnceFrame.collect()`: the plan and OpenDP's
noise plugin are the same, but the query runs on the polars we ship, 2-3 times
faster at 10M rows than the polars compiled into OpenDP. The conditions that API
states hold here: each plan is collected exactly once, nothing is added to it, and
row order is never observed (`dp_post.finish` sorts by the group columns; an ungrouped
release is one row). Plans with a quantile use `collect()`: OpenDP's quantile
scorer cannot be handed back to Python polars.

Before OpenDP sees the data, `Compiled.prepare` applies row-by-row steps to the
scan. Each output row depends on one input row only and the unit column is kept
unchanged, so the neighbouring relation (one unit's rows) is preserved and the
guarantee OpenDP proves for the prepared frame holds for the raw data:

* the query's filters (`predicate`);
* histogram bucketing: a value lands in the half-open bin "[a, b)" holding it;
  values outside every bin, and nulls, are in no bin and are not counted (over a
  prepared copy, by the bin's position, computed once when the copy is built:
  `prepared_bins`; the release names the bins by their labels);
* measures to fixed point: round(clip(value, bounds) * 10^d) as Int64. OpenDP's
  float sums pay for rounding error with a slack that grows with the square of
  the dataset length, which would have to be a tight (data-dependent) bound;
  integer sums are exact, so the length bound can be the data-independent
  2^32 - 1 (polars' own row limit). d is chosen so |bound| * 10^d <= 2^31 - 1, the
  most OpenDP accepts without overflow at that length (at most 6 decimals; 0 for
  INT columns). The clip here only keeps the cast from overflowing; OpenDP clips
  again to the same bounds and its clip is the one the proof relies on.

Nulls (and NaN) in a measure are *missing*, as in SQL: COUNT counts rows, while
SUM, MEAN and QUANTILE drop missing values (`.drop_nulls()`) before OpenDP
aggregates. So MEAN is the mean of the known values, not biased toward any fill
value, and OpenDP's default midpoint imputation never applies.

Post-processing (free under DP, `dp_post`): MEAN is clamped to the bounds (the ratio of two
noisy values can leave them, or be undefined for an empty group, then null);
outputs are sorted by the group columns. Counts are released signed and unclamped
so they stay unbiased.
"""

from __future__ import annotations

import contextlib
import functools
import math
import tempfile
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import opendp.prelude as dp
import polars as pl
from opendp.mod import OpenDPException

from dataops.catalog import Column, ColumnType, Dataset, bin_index, bin_label
from dataops.engines import dp_calibrate, dp_post
from dataops.engines._base import (
    EngineResult,
    Plan,
    predicate,
    scan,
)
from dataops.engines.dp_calibrate import Calibration, zcdp_to_epsilon
from dataops.engines.dp_post import mean_parts
from dataops.errors import FieldViolation, InternalError, InvalidQuery, LimitExceeded, PolicyDenied
from dataops.ir import Aggregate, Function, Mode, Privacy, Query
from dataops.values import PrivacyLoss

# The OpenDP features the measurements need ("honest-but-curious": OnceFrame.lazy(), see
# the module docstring). Enabled once at server start (`enable_opendp`), never as a side
# effect of importing this module, and asserted before any measurement is built.
OPENDP_FEATURES = ("contrib", "honest-but-curious")


def enable_opendp() -> None:
    """Enable OpenDP's features for this process: the server at start, and the command-line
    tools that compile DP queries."""
    dp.enable_features(*OPENDP_FEATURES)


def require_opendp() -> None:
    """Refuse to build a measurement unless the process enabled OpenDP's features on purpose."""
    try:
        dp.assert_features(*OPENDP_FEATURES)
    except OpenDPException:
        raise InternalError(
            f"OpenDP features {OPENDP_FEATURES} are not enabled; the server enables them at start "
            "(dataops.engines.dp.enable_opendp)"
        ) from None


MAX_ROWS = 2**32 - 1  # dataset length bound given to OpenDP: polars (u32 index) holds no more
_FIXED_POINT_LIMIT = 2**31 - 1  # |bound| * 10^d; times MAX_ROWS this still fits an i64 sum
_MAX_DECIMALS = 6
_QUANTILE_STEPS = 1000  # candidates: this many linear steps, plus as many geometric ones
_ONE_UNIT = [dp.polars.Bound(per_group=1)]  # d_in: one privacy unit added or removed
_HIDDEN_LEN = "#len"  # '#' cannot start a catalog column name: prepared columns never clash
UNIT_CODE = "#unit"  # a prepared copy's unit column: a dense code, not derived from the unit id
# Of a prepared copy (prepared_column_names, prepared_codes, prepared_bins, prepared_fixed);
# bump on change.
PREPARED_LAYOUT = 7

_DTYPES = {
    ColumnType.STRING: pl.String,
    ColumnType.INT: pl.Int64,
    ColumnType.FLOAT: pl.Float64,
    ColumnType.BOOL: pl.Boolean,
    ColumnType.DATE: pl.Date,
}
_ATOMS = {
    pl.String: "String", pl.Int64: "i64", pl.Float64: "f64", pl.Boolean: "bool", pl.Date: "NaiveDate",
    pl.UInt64: "u64", pl.UInt32: "u32",
}  # fmt: skip


# Default budget weights by kind (Aggregate.weight overrides). A quantile's error falls
# slowly with epsilon (the exponential mechanism only has to pick a good rank), so it
# gets less; a mean is a sum and a count of known values, whose ratio's error is
# dominated by the sum's noise, so its share goes 3:1 to the sum.
DEFAULT_WEIGHTS = {
    Function.COUNT: 1.0,
    Function.COUNT_UNITS: 1.0,
    Function.SUM: 1.0,
    Function.MEAN: 1.5,
    Function.QUANTILE: 0.5,
}
MEAN_SUM_SHARE = 0.75
_THRESHOLD_WEIGHT = 0.5  # the hidden row count private keys are thresholded on


def default_weight(aggregate: Aggregate) -> float:
    return aggregate.weight if aggregate.weight is not None else DEFAULT_WEIGHTS[aggregate.function]


@dataclass(frozen=True)
class PreparedSource:
    """A dataset's prepared copy: at most max_rows_per_unit rows per unit, enforced.

    Made by `dataops.engines.prepared.PreparedStore`; its layout is `prepared_column_names`.
    """

    dataset_id: str
    fingerprint: str  # the copy's key: the data version and the catalog terms it was made under
    path: Path  # the copy's directory
    parts: tuple[Path, ...]  # its Parquet files in code order (dataops.engines.build), as verified
    max_rows_per_unit: int
    data_version: str = ""  # the content hash of the dataset file it was made from (DataVersions)

    def scan(self) -> pl.LazyFrame:
        """The copy's rows: its parts, the ones the store verified (not a fresh listing)."""
        return pl.scan_parquet(list(self.parts))


def prepared_column_names(dataset: Dataset) -> list[str]:
    """The columns of a prepared copy besides `UNIT_CODE`, as the dataset has them.

    Only what a query can use: every usable catalog column (never an identifier or an
    unclassified column; the unit itself is replaced by `UNIT_CODE`, a dense integer
    code the store assigns, see dataops.engines.prepared), each once, in its own type.
    A measure's fixed point is computed in the plan (`_Compiled.input`), a row-by-row
    step as cheap as reading a second column and half the copy's size.
    """
    return [
        c.name for c in dataset.columns.values() if c.classification.usable and c.name != dataset.unit_column
    ]


def code_column(name: str) -> str:
    """The prepared copy's column of a string column's key positions ('#' names never clash)."""
    return "#code:" + name


def bin_column(name: str) -> str:
    """The prepared copy's column of a binned column's bin positions ('#' names never clash)."""
    return "#bin:" + name


def bin_position(value: pl.Expr, edges: tuple[float, ...] | list[float]) -> pl.Expr:
    """The half-open bin [e_i, e_i+1) holding each value, as its position i (UInt32).

    A value outside every bin, missing or NaN (polars orders NaN above every number) is
    len(edges) - 1, a position no bin holds, so no released group has it: as a value
    outside the bins is in no bin of the labels (`_Dimension.prepare`). The copy's
    `bin_column` goes through it, once per build (the bins' arithmetic: `catalog.bin_index`).
    Per release, polars' `cut` with string labels took 12 of a grouped count's 19 ms
    over 100k rows; the same count by position takes 6.4.
    """
    return bin_index(value, edges).fill_null(len(edges) - 1).cast(pl.UInt32)


def prepared_bins(dataset: Dataset) -> dict[str, list[float]]:
    """The binned columns a prepared copy also holds as bin positions (`bin_position`),
    with their catalog edges: a release groups by the position and labels it after."""
    kept = set(prepared_column_names(dataset))
    return {
        c.name: [float(e) for e in c.bins]
        for c in dataset.columns.values()
        if c.name in kept and c.bins is not None
    }


def fixed_column(name: str) -> str:
    """The prepared copy's column of a measure in the catalog's fixed point ('#' names never clash)."""
    return "#fixed:" + name


def fixed_point(value: pl.Expr, lo: float, hi: float, factor: float) -> pl.Expr:
    """A measure as OpenDP sees it: clipped to [lo, hi], in units of 1/factor, an Int64.

    Missing and NaN values stay missing. The one place this arithmetic is written: the
    copy's `fixed_column` (at the catalog's bounds) and a query's own bounds both go through it.
    """
    clipped = value.cast(pl.Float64).fill_nan(None).clip(lo, hi)
    return (clipped * factor).round().cast(pl.Int64)


def prepared_fixed(dataset: Dataset) -> dict[str, list[float]]:
    """The measures a prepared copy also holds in the catalog's fixed point: name ->
    [lower bound, upper bound, factor], every kept numeric column with catalog bounds.

    A DP release over the copy then reads that Int64 column instead of casting, clipping,
    scaling and rounding the raw one in every plan (a third of the CPU of a count and sum
    over the copy). A query's tighter bounds clip the fixed value (`_Measure.prepare_copy`).
    """
    kept = set(prepared_column_names(dataset))
    fixed = {}
    for c in dataset.columns.values():
        if c.name in kept and c.type.numeric and c.bounds is not None:
            point = _fixed_point(c)
            fixed[c.name] = [float(c.bounds[0]), float(c.bounds[1]), point.factor]
    return fixed


def prepared_codes(dataset: Dataset) -> dict[str, list[str]]:
    """The string columns a prepared copy also holds as key positions, with their public keys.

    Position i is the catalog's i-th key; a value that is no key, or missing, is
    `len(keys)`, a position no key set holds, so no released group has it (as a string
    outside the keys is in none). Only public keys: private keys are released from the
    data's own values, which stay strings.
    """
    kept = set(prepared_column_names(dataset))
    return {
        c.name: [str(k) for k in c.keys]
        for c in dataset.columns.values()
        if c.name in kept and c.type is ColumnType.STRING and c.keys is not None and c.bins is None
    }


@dataclass(frozen=True)
class _Measure:
    """A measure column as OpenDP sees it: integers in units of 10^-decimals."""

    column: str
    bounds: tuple[float, float]
    decimals: int
    integer: bool  # an INT column kept at whole units: results stay integers
    catalog_bounds: tuple[float, float] | None = None  # the copy's fixed column is clipped to these

    @property
    def name(self) -> str:
        return "#" + self.column

    @property
    def factor(self) -> float:
        return 10.0**self.decimals

    @property
    def fixed_bounds(self) -> tuple[int, int]:
        return round(self.bounds[0] * self.factor), round(self.bounds[1] * self.factor)

    def prepare(self) -> pl.Expr:
        lo, hi = self.bounds
        return fixed_point(pl.col(self.column), lo, hi, self.factor).alias(self.name)

    def prepare_copy(self) -> pl.Expr:
        """`prepare` over a prepared copy, from its fixed column (`prepared_fixed`).

        The same values: the copy holds round(clip(x, L, H) * f) at the catalog's bounds
        [L, H]; the query's [lo, hi] lie inside them, and clipping, scaling by f > 0 and
        rounding are all monotone, so round(clip(x, lo, hi) * f) is that value clipped to
        round(lo * f) and round(hi * f), each computed by the same arithmetic
        (tests/test_dp_prepared.py holds the two equal).
        """
        value = pl.col(fixed_column(self.column))
        if self.bounds != self.catalog_bounds:
            lo, hi = (
                fixed_point(pl.lit(b, dtype=pl.Float64), -math.inf, math.inf, self.factor)
                for b in self.bounds
            )
            value = value.clip(lo, hi)
        return value.alias(self.name)

    def candidates(self) -> list[int]:
        """Quantile candidates: a linear grid, refined geometrically for skewed non-negative data."""
        lo, hi = self.fixed_bounds
        if hi - lo <= 2 * _QUANTILE_STEPS:
            return list(range(lo, hi + 1))
        grid = np.linspace(lo, hi, _QUANTILE_STEPS + 1)
        if lo >= 0:  # money is heavy-tailed: most values sit far below the upper bound
            grid = np.concatenate([grid, np.geomspace(max(lo, 1, hi * 1e-6), hi, _QUANTILE_STEPS + 1)])
        return sorted({int(v) for v in np.round(grid)})


@dataclass(frozen=True)
class _Dimension:
    """A group-by column and its public key set (None: the keys are private)."""

    column: str
    dtype: type[pl.DataType]
    keys: tuple | None
    bins: tuple[float, ...] | None
    coded: bool = False  # read as its key positions (`prepared_codes`): a prepared copy's

    @property
    def key_set(self) -> tuple:
        """The public key set (binned: the bins' labels); only for a dimension that has one."""
        if self.keys is None:
            raise InternalError(f"{self.column!r} has no public key set")
        return self.keys

    @property
    def plan_dtype(self) -> type[pl.DataType]:
        """Its type in the plans OpenDP sees."""
        return pl.UInt32 if self.coded else self.dtype

    @property
    def plan_keys(self) -> tuple:
        """Its public key set as the plans hold it: the positions when coded."""
        return tuple(range(len(self.key_set))) if self.coded else self.key_set

    def label(self, frame: pl.LazyFrame) -> pl.LazyFrame:
        """A released frame with this column's positions back as their keys (public)."""
        if not self.coded:
            return frame
        return frame.with_columns(
            pl.col(self.column).replace_strict(
                list(self.plan_keys), list(self.key_set), return_dtype=self.dtype
            )
        )

    def prepare(self) -> pl.Expr:
        col = pl.col(self.column)
        if self.coded:
            # A binned column's positions are its bins' (`bin_position`), a keyed one's its keys'.
            coded = bin_column(self.column) if self.bins is not None else code_column(self.column)
            return pl.col(coded).alias(self.column)
        if self.bins is None:
            return col.cast(self.dtype)
        inside = (col >= self.bins[0]) & (col < self.bins[-1])
        buckets = col.cut(list(self.bins), labels=["#below", *self.key_set, "#above"], left_closed=True)
        return pl.when(inside).then(buckets.cast(pl.String)).otherwise(None).alias(self.column)

    def sort_key(self) -> pl.Expr:
        if self.bins is None:
            return pl.col(self.column)
        return pl.col(self.column).replace_strict(
            list(self.key_set), list(range(len(self.key_set))), default=None
        )


class DPQuery:
    """A DP query compiled to OpenDP measurements, under its filters; see the module docstring.

    The measurements never see the filters: they are a row-by-row step on the data
    before OpenDP (`Compiled.input`). So one `Compiled` serves every question that
    differs from it in filter values alone (`under`; `dataops.engines.dp_engine` keeps
    it across requests), each DPQuery carrying its own filter.
    """

    def __init__(self, compiled: Compiled, where: pl.Expr | None) -> None:
        self._compiled = compiled
        self._where = where

    @classmethod
    def compile(
        cls,
        plan: Plan,
        source: PreparedSource | None = None,
        *,
        clip_uppers: dict[str, float] | None = None,
        enforce_row_bound: bool = True,
    ) -> DPQuery:
        """Build the measurement structure; reads no data.

        With a prepared source, release reads that copy, whose contribution bounds are
        already enforced (the fast path, which the server always takes); without one
        it is the identifier form over the dataset, where every plan truncates each unit
        itself: calibrated by `dataops policy explain`, released only by the tests as the
        reference (see the module docstring). clip_uppers: upper clips chosen by automatic
        clipping (dataops.engines.dp_autoclip), inside the query's terms.
        enforce_row_bound=False is the control switched off, for the test that shows
        what it stops: a query's smaller row bound is then assumed, not enforced.
        """
        return cls(Compiled(plan, source, clip_uppers or {}, enforce_row_bound), predicate(plan.filters))

    def under(self, plan: Plan) -> DPQuery:
        """The same measurements under this plan's filters (bound when it was made).

        For a plan that differs from the compiled one in filter values only: the caller
        keys the compiled query by everything else (`DPEngine.keys`).
        """
        return DPQuery(self._compiled, predicate(plan.filters))

    @property
    def terms(self) -> dict[str, tuple[float, float]]:
        """The clipping bounds each measure is released under (data units)."""
        return {name: m.bounds for name, m in self._compiled.measures.items()}

    def calibrate(self, privacy: Privacy) -> Calibration:
        """The scale (and threshold) for a privacy budget or an accuracy target; reads no
        data (`dataops.engines.dp_calibrate`)."""
        return dp_calibrate.calibrate(self._compiled, privacy)

    def calibrate_measured(self, privacy: Privacy) -> Calibration:
        """calibrate, with the measurements it mapped (`Calibration.measurements`):
        release runs those. For the one request that calibrated; see `Calibration.kept`."""
        return dp_calibrate.measured(self._compiled, privacy)

    def release(self, calibration: Calibration) -> EngineResult:
        """Run the measurements on the data: the only step that reads it.

        They are the calibration's own (`calibrate_measured`), or built again at its
        scale. Either way their loss is mapped here and checked against what was
        calibrated, and OpenDP draws the noise each time they run.
        """
        c = self._compiled
        measurements = list(calibration.measurements)
        if not measurements:
            measurements = c.build(calibration.scale, calibration.threshold)
        elif len(measurements) != len(c.stages):
            raise InternalError("the calibration does not belong to this query")
        # The ledger debited calibration.cost: never release at a higher loss than that.
        cost = c.cost(measurements)
        if not cost <= calibration.cost:
            raise InternalError("the calibration does not belong to this query")
        # On a zCDP grant the ledger composed calibration.rho: never release above it.
        if calibration.rho is not None and c.rho(measurements) > calibration.rho:
            raise InternalError("the calibration does not belong to this query")
        try:
            # COUNT_UNITS' per-unit rows are written here, next to the copy (a directory only
            # the server's user may read), and removed once released; named as a build's
            # temporaries, so one a crash left is removed with them (PreparedStore._remove_old).
            with contextlib.ExitStack() as stack:
                scratch = None
                if c.source is not None and any(stage.units for stage in c.stages):
                    directory = tempfile.TemporaryDirectory(
                        suffix=".tmp", prefix=f".{c.dataset.id}-units-", dir=c.source.path.parent
                    )
                    scratch = Path(stack.enter_context(directory))
                frames = [
                    _collect(m(c.input(stage, self._where, scratch)), c.quantiles)
                    for m, stage in zip(measurements, c.stages)
                ]
        except (OpenDPException, pl.exceptions.PolarsError, OSError) as exc:
            raise InternalError(f"OpenDP failed to release: {exc}") from None
        return EngineResult(table=dp_post.finish(c, frames), rows_suppressed=0, accuracy=calibration.accuracy)


@dataclass(frozen=True)
class _Term:
    """One noisy output column: how to make it at a noise scale, and its budget weight."""

    name: str
    make: Any  # Callable[[float], pl.Expr]: the OpenDP expression at this noise scale
    weight: float


@dataclass(frozen=True)
class _Stage:
    """One measurement: its input plan on an empty frame, noisy terms, domain, metric, d_in.

    Each term's noise scale is global_scale * unit: `unit` makes the term's share of the
    loss its weight's share (see `Compiled._units`), so every loss is still
    reference / global_scale (pure) or reference / global_scale^2 (zCDP).
    """

    frame: pl.LazyFrame  # the truncated (or per-unit) input, before the aggregation
    terms: tuple[_Term, ...]
    domain: Any
    metric: Any
    d_in: Any  # one privacy unit added or removed, in the metric's terms
    units: bool  # the input is one row per unit and group (COUNT_UNITS), not the rows
    unit_column: str | None = None  # the input keeps this unit column (identifier form)
    scales: tuple[float, ...] = ()  # per term, set by Compiled._units


class Compiled:
    """The OpenDP side of a query: plans over an empty frame, and their privacy maps."""

    def __init__(
        self,
        plan: Plan,
        source: PreparedSource | None = None,
        clip_uppers: dict[str, float] | None = None,
        enforce_row_bound: bool = True,
    ) -> None:
        require_opendp()
        query, dataset = plan.query, plan.dataset
        if query.mode is not Mode.DP or query.privacy is None:
            raise InternalError("the DP engine got a query that is not in DP mode")
        self.max_rows = require_max_rows(dataset)
        if source is not None and (
            source.dataset_id != dataset.id or source.max_rows_per_unit != dataset.max_rows_per_unit
        ):
            # d_in is the copy's bound: a copy made under another cap proves nothing.
            raise InternalError(f"the prepared copy {source.path.name} does not belong to {dataset.id}")
        self.source = source
        _check_columns(query, dataset)
        self.query = query
        self.dataset = dataset
        self.k = _row_bound(query.privacy, dataset)  # the rows per unit this query is bounded to
        self.enforce_row_bound = enforce_row_bound
        self.zcdp = plan.grant.accounting == "zcdp"
        self.dims = tuple(_dimension(dataset, name) for name in query.group_by)
        self.private_keys = any(d.keys is None for d in self.dims)
        if source is not None and not self.private_keys:
            # Over a copy, public key sets are grouped by position. Not with private keys:
            # those release the data's own values, which a position past the keys (any
            # value outside them, and missing ones alike) could not name.
            self.dims = tuple(_dimension(dataset, name, prepared=True) for name in query.group_by)
        self.check_delta(query.privacy)
        if self.zcdp and self.private_keys:
            name = next(d.column for d in self.dims if d.keys is None)
            raise InvalidQuery(
                f"grouping by {name!r} has no public key set: a zcdp grant releases public key sets only",
                rule="dp.zcdp",
                column=name,
            )
        if self.zcdp and query.privacy.delta <= 0:
            raise InvalidQuery(
                "a zcdp grant converts each release to (epsilon, delta): pass delta > 0",
                rule="dp.zcdp",
                field_violations=(FieldViolation("query.privacy.delta", "must be > 0 on a zcdp grant"),),
            )
        if self.dims and not self.private_keys:
            groups = math.prod(len(d.key_set) for d in self.dims)
            if groups > plan.max_output_rows:
                raise LimitExceeded(
                    f"the public key sets make more than max_output_rows={plan.max_output_rows} groups; "
                    "group by fewer columns",
                    rule="limits.max_output_rows",
                )
        if query.privacy.target_half_width is not None:
            for a in query.aggregates:
                if a.function in (Function.MEAN, Function.QUANTILE):
                    raise InvalidQuery(
                        f"{a.name}: the accuracy of a {a.function.value} depends on the data, so it "
                        "cannot be targeted; pass epsilon instead",
                        rule="dp.accuracy-target",
                        column=a.column,
                    )
        self.measures = {
            a.column: _measure(dataset, a, query.privacy, (clip_uppers or {}).get(a.column))
            for a in query.aggregates
            if a.column
        }
        self.quantiles = any(a.function is Function.QUANTILE for a in query.aggregates)

        self.unit_dtype = _DTYPES[dataset.columns[dataset.unit_column].type]
        if self.zcdp:
            self.measure = dp.zero_concentrated_divergence()  # Gaussian noise
        else:
            self.measure = dp.approximate(dp.max_divergence()) if self.private_keys else dp.max_divergence()
        stages = self._stages()
        total_weight = sum(t.weight for stage in stages for t in stage.terms)
        self.stages = [self._units(stage, total_weight) for stage in stages]
        # The loss and OpenDP's summary at scale 1, read by the first calibration
        # (dataops.engines.dp_calibrate._unit_scale): every other scale follows from them.
        self.unit_scale: tuple[float, tuple[dict[str, Any], ...]] | None = None

    def check_delta(self, privacy: Privacy) -> None:
        """Private group keys can only be released with delta > 0."""
        if self.private_keys and privacy.delta == 0:
            name = next(d.column for d in self.dims if d.keys is None)
            raise InvalidQuery(
                f"grouping by {name!r} has no public key set; pass delta > 0 to release keys "
                "above a noisy threshold",
                rule="dp.private-keys",
                column=name,
            )

    # --- plans ------------------------------------------------------------------

    def _stages(self) -> list[_Stage]:
        """One measurement for the rows and one for COUNT_UNITS, as the query needs."""
        row_terms = [
            t for a in self.query.aggregates if a.function is not Function.COUNT_UNITS for t in self._terms(a)
        ]
        unit_terms = [
            t for a in self.query.aggregates if a.function is Function.COUNT_UNITS for t in self._terms(a)
        ]
        if row_terms:
            if self.private_keys and not any(a.function is Function.COUNT for a in self.query.aggregates):
                # OpenDP thresholds on a noisy row count; add one (it is paid for, not shown).
                hidden = _HIDDEN_LEN
                while hidden in {a.name for a in self.query.aggregates}:
                    hidden += "_"
                row_terms.append(_Term(hidden, _len_term(hidden), _THRESHOLD_WEIGHT))
        if self.source is None:
            return self._identifier_stages(row_terms, unit_terms, self.dataset.unit_column, self.unit_dtype)
        if self.k < self.max_rows:
            if self.enforce_row_bound:
                # A tighter row bound than the copy's: OpenDP truncates each unit again, by
                # its (dense, one per unit) code, and derives d_in from that truncation.
                return self._identifier_stages(row_terms, unit_terms, UNIT_CODE, pl.UInt64)
            # The control switched off (tests only): the bound is assumed, not enforced.
        return self._prepared_stages(row_terms, unit_terms)

    def _identifier_stages(
        self, row_terms: list[_Term], unit_terms: list[_Term], unit: str, unit_dtype: type[pl.DataType]
    ) -> list[_Stage]:
        """Every plan truncates each unit itself (OpenDP's identifier form)."""
        k = self.k
        dims = [d.column for d in self.dims]
        schema = {unit: unit_dtype, **self._row_schema()}
        domain, metric = _domain(schema), dp.frame_distance(dp.symmetric_id_distance(unit))
        empty = pl.LazyFrame(schema=schema)
        # OpenDP's truncation: at most k rows per unit (its first k in file order; which
        # rows are kept matters for bias above the cap, not for privacy).
        rows = empty.filter(pl.int_range(pl.len()).over(unit) < k)
        stages = []
        if row_terms:
            stages.append(
                _Stage(rows, tuple(row_terms), domain, metric, _ONE_UNIT, units=False, unit_column=unit)
            )
        if unit_terms:
            # One row per unit and group: each unit adds at most 1 to a group's count and,
            # kept to k rows first, reaches at most k groups (OpenDP derives both bounds).
            first = pl.int_range(pl.len()).over(unit, *dims) < 1
            units = rows.filter(first) if dims else empty.filter(first)
            stages.append(
                _Stage(units, tuple(unit_terms), domain, metric, _ONE_UNIT, units=True, unit_column=unit)
            )
        return stages

    def _prepared_stages(self, row_terms: list[_Term], unit_terms: list[_Term]) -> list[_Stage]:
        """Over a prepared copy: one unit is at most k rows of it (dataops.engines.prepared)."""
        k = self.k
        stages = []
        if row_terms:
            # No column at all (an ungrouped COUNT): scan the unit code, the narrowest one.
            schema = self._row_schema() or {UNIT_CODE: pl.UInt64}
            stages.append(
                _Stage(
                    pl.LazyFrame(schema=schema),
                    tuple(row_terms),
                    _domain(schema),
                    dp.symmetric_distance(),
                    k,
                    units=False,
                )
            )
        if unit_terms:
            # `input` keeps one row per unit and group: a unit is then at most n rows,
            # at most one in each of at most n groups.
            schema = {UNIT_CODE: pl.UInt64, **{d.column: d.plan_dtype for d in self.dims}}
            n = self._groups_per_unit()
            d_in = [dp.polars.Bound(per_group=n)]
            if self.dims:
                d_in.append(dp.polars.Bound(by=[d.column for d in self.dims], per_group=1, num_groups=n))
            metric = dp.frame_distance(dp.symmetric_distance())
            stages.append(
                _Stage(
                    pl.LazyFrame(schema=schema), tuple(unit_terms), _domain(schema), metric, d_in, units=True
                )
            )
        return stages

    def _row_schema(self) -> dict[str, type[pl.DataType]]:
        schema = {d.column: d.plan_dtype for d in self.dims}
        schema.update({m.name: pl.Int64 for m in self.measures.values()})
        return schema

    def _groups_per_unit(self) -> int:
        """How many groups one unit can reach: k rows, and no more groups than there are."""
        k = self.k
        if not self.dims:
            return 1
        if self.private_keys:
            return k
        return min(k, math.prod(len(d.key_set) for d in self.dims))

    def _aggregate(self, frame: pl.LazyFrame, aggs: list[pl.Expr]) -> pl.LazyFrame:
        if not self.dims:
            return frame.select(aggs)
        dims = [d.column for d in self.dims]
        grouped = frame.group_by(dims).agg(aggs)
        if self.private_keys:
            return grouped  # OpenDP adds the threshold filter
        keys = pl.DataFrame(
            [tuple(row) for row in product(*(d.plan_keys for d in self.dims))],
            schema={d.column: d.plan_dtype for d in self.dims},
            orient="row",
        )
        return keys.lazy().join(grouped, on=dims, how="left", nulls_equal=True)

    def _terms(self, a: Aggregate) -> list[_Term]:
        """The noisy columns of one aggregate; a mean is its sum and count of known values."""
        weight = default_weight(a)
        if a.function in (Function.COUNT, Function.COUNT_UNITS):
            return [_Term(a.name, _len_term(a.name), weight)]
        m = self.measures[a.measured_column]
        # Missing values are left out, as in SQL. Any: OpenDP registers the `.dp` namespace.
        known: Any = pl.col(m.name).drop_nulls()
        bounds = m.fixed_bounds
        # The same sum of the known values without drop_nulls, whose length change makes
        # polars' streaming engine fall back to holding the whole column (3.5 times the
        # memory at 10M rows, growing with the data): a missing value filled with 0 adds
        # nothing, and OpenDP's clip leaves 0 alone when the bounds hold it. Elementwise
        # and row by row, so OpenDP's analysis (and the loss) is unchanged.
        summed: Any = pl.col(m.name).fill_null(0) if bounds[0] <= 0 <= bounds[1] else known
        if a.function is Function.SUM:
            return [_Term(a.name, lambda s: summed.dp.sum(bounds, scale=s).alias(a.name), weight)]
        if a.function is Function.MEAN:
            # Released apart so each gets its own share; finish divides them. Polars'
            # count, under OpenDP's, counts the known values only: no drop_nulls needed.
            total, count = mean_parts(a.name)
            column: Any = pl.col(m.name)
            return [
                _Term(total, lambda s: summed.dp.sum(bounds, scale=s).alias(total), weight * MEAN_SUM_SHARE),
                _Term(
                    count,
                    lambda s: column.dp.count(scale=s, signed=True).alias(count),
                    weight * (1 - MEAN_SUM_SHARE),
                ),
            ]
        if a.function is Function.QUANTILE:
            candidates = m.candidates()
            return [
                _Term(
                    a.name, lambda s: known.dp.quantile(a.quantile, candidates, scale=s).alias(a.name), weight
                )
            ]
        raise InternalError(f"no DP form for {a.function}")

    def _units(self, stage: _Stage, total: float) -> _Stage:
        """Per-term noise units that split the loss by weight (a budget allocation only).

        A term's loss at noise scale s is l/s (Laplace, exponential) or r/s^2 (zCDP);
        l and r are read from OpenDP's map of the term alone at scale 1. Scale
        global_scale * l / w (or * sqrt(r / w)) then gives it w / global_scale
        (or w / global_scale^2). Privacy never rests on this: every spend is OpenDP's
        map of the whole measurement at the chosen scale.
        """
        scales = []
        for term in stage.terms:
            if self.private_keys:  # no threshold alone: ungrouped, the same ratio between terms
                plan = stage.frame.select(term.make(1.0))
            else:
                plan = self._aggregate(stage.frame, [term.make(1.0)])
            measure = dp.zero_concentrated_divergence() if self.zcdp else dp.max_divergence()
            try:
                loss = dp.m.make_private_lazyframe(stage.domain, stage.metric, measure, plan).map(stage.d_in)
            except OpenDPException as exc:
                raise InternalError(f"OpenDP could not bound a term's loss: {exc}") from None
            share = term.weight / total
            scales.append(math.sqrt(loss / share) if self.zcdp else loss / share)
        return _Stage(**{**stage.__dict__, "scales": tuple(scales)})

    def prepare(self, frame: pl.LazyFrame, where: pl.Expr | None) -> pl.LazyFrame:
        """Row-by-row steps before OpenDP, the filter first; see the module docstring for why they are safe."""
        if where is not None:
            frame = frame.filter(where)
        unit = self.dataset.unit_column
        return frame.select(
            pl.col(unit).cast(self.unit_dtype),
            *[d.prepare() for d in self.dims],
            *[m.prepare() for m in self.measures.values()],
        )

    def input(self, stage: _Stage, where: pl.Expr | None, scratch: Path | None = None) -> pl.LazyFrame:
        """The lazy frame a stage's measurement is applied to: the data under the filter
        `where` (scratch: where COUNT_UNITS' per-unit rows over a prepared copy are
        written; a temporary directory)."""
        if self.source is None:
            return self.prepare(scan(self.dataset), where)
        frame = self.source.scan()
        if where is not None:
            frame = frame.filter(where)
        dims = [d.prepare() for d in self.dims]
        measures = [m.prepare_copy() for m in self.measures.values()]  # the copy's fixed point
        if stage.unit_column == UNIT_CODE:
            # The copy, truncated again by OpenDP inside the plan (a tighter row bound).
            return frame.select(pl.col(UNIT_CODE), *dims, *measures)
        if stage.units:
            # Our per-unit step for COUNT_UNITS: one row per unit code and group. Two units
            # whose codes collide only lose rows: a unit still adds or removes at most one
            # row per group it has rows in (see dataops.engines.prepared).
            pairs = frame.select(pl.col(UNIT_CODE), *dims)
            if scratch is None:
                return pairs.unique()
            return _unique_by_code_range(pairs, self.source.parts, scratch / "units.parquet")
        return frame.select([*dims, *measures] or [pl.col(UNIT_CODE)])

    # --- measurements and their privacy maps -------------------------------------

    def build(self, scale: float, threshold: int | None) -> list[dp.Measurement]:
        """One measurement per stage, in stage order; each term's scale is scale * its unit."""
        try:
            return [
                dp.m.make_private_lazyframe(
                    s.domain,
                    s.metric,
                    self.measure,
                    self._aggregate(
                        s.frame, [t.make(scale * u) for t, u in zip(s.terms, s.scales, strict=True)]
                    ),
                    threshold=threshold,
                )
                for s in self.stages
            ]
        except OpenDPException as exc:
            raise InternalError(f"OpenDP refused the compiled plan: {exc}") from None

    def _losses(self, measurements: list[dp.Measurement]) -> list[Any]:
        out = []
        for m, stage in zip(measurements, self.stages, strict=True):
            try:
                out.append(m.map(stage.d_in))
            except OpenDPException as exc:
                raise InternalError(f"OpenDP could not bound the privacy loss: {exc}") from None
        return out

    def rho(self, measurements: list[dp.Measurement]) -> float:
        """zCDP: the plans' rhos add up (zCDP composes additively)."""
        return math.fsum(self._losses(measurements))

    def cost(self, measurements: list[dp.Measurement]) -> PrivacyLoss:
        """Basic sequential composition: the losses of the plans add up.

        On a zCDP grant the plans compose in rho, and OpenDP converts the total to
        (epsilon, delta) at the query's delta (`zcdp_to_epsilon`); the ledger debits by
        the rho (`Ledger.reserve_zcdp`), and this pair bounds what it may release.
        """
        if self.zcdp:
            delta = self.query.dp_privacy.delta
            return PrivacyLoss(zcdp_to_epsilon(self.rho(measurements), delta), delta)
        total = PrivacyLoss.zero()
        for loss in self._losses(measurements):
            total += PrivacyLoss(*loss) if self.private_keys else PrivacyLoss(loss, 0.0)
        return total


UNIQUE_ROWS_PER_RANGE = 4_000_000  # copy rows deduplicated at once by COUNT_UNITS' per-unit step


def _unique_by_code_range(pairs: pl.LazyFrame, parts: tuple[Path, ...], output: Path) -> pl.LazyFrame:
    """`pairs.unique()` (one row per unit code and group) in bounded memory, as a scan.

    A row of one code is never a duplicate of a row of another, so deduplicating each
    range of codes apart and concatenating gives exactly `pairs.unique()` as a multiset
    (row order is never observed, see `_collect`). One range is held at a time and
    written to `output`: a unique over the whole copy holds every distinct pair (3.8 GiB
    at 100M rows), and polars' streaming engine runs the ranges of a lazy concat
    concurrently (4.0 GiB at 30M rows). The copy is sorted by code (dataops.engines.build),
    so each range's scan skips the other row groups by their statistics. Our step, before
    OpenDP, exactly as the in-plan unique: what OpenDP sees and proves is unchanged.
    """
    import pyarrow.parquet as pq

    top = rows = 0
    for part in parts:
        metadata = pq.ParquetFile(part).metadata
        index = metadata.schema.to_arrow_schema().get_field_index(UNIT_CODE)
        rows += metadata.num_rows
        for g in range(metadata.num_row_groups):
            stats = metadata.row_group(g).column(index).statistics
            if metadata.row_group(g).num_rows and (stats is None or not stats.has_min_max):
                return pairs.unique()  # no statistics to range by (not a copy we built): in one piece
            if metadata.row_group(g).num_rows:
                top = max(top, int(stats.max) + 1)
    ranges = max(1, -(-rows // UNIQUE_ROWS_PER_RANGE))
    if ranges == 1:
        return pairs.unique()  # it fits one range: held at once anyway, no scratch file to write
    step = max(1, -(-top // ranges))
    writer = None
    try:
        for low in range(0, max(top, 1), step):
            part = (
                pairs.filter(pl.col(UNIT_CODE).is_between(low, low + step, closed="left"))
                .unique()
                .collect(engine="streaming")
                .to_arrow()
            )
            if writer is None:
                writer = pq.ParquetWriter(output, part.schema, compression="lz4")
            writer.write_table(part)
    finally:
        if writer is not None:
            writer.close()
    return pl.scan_parquet(output)


def require_max_rows(dataset: Dataset) -> int:
    """The contribution bound. DP is off until the operator has set it; it is never taken from the data."""
    if dataset.max_rows_per_unit is None:
        raise PolicyDenied(
            f"DP mode is off for {dataset.id}: the operator has not set privacy_unit.max_rows "
            "(the most rows one privacy unit may contribute) in its catalog entry",
            rule="catalog.privacy_unit.max_rows",
        )
    return dataset.max_rows_per_unit


def _check_columns(query: Query, dataset: Dataset) -> None:
    """Defence in depth: authorization has checked these already."""
    for name in sorted(query.columns):
        if name not in dataset.columns:
            raise InvalidQuery(f"{name!r} is not a column of {dataset.id}", rule="query.column", column=name)
        if name == dataset.unit_column:
            raise InvalidQuery(
                f"{name!r} identifies privacy units and cannot be used", rule="dp.identifier", column=name
            )


def _dimension(dataset: Dataset, name: str, prepared: bool = False) -> _Dimension:
    """A group-by column; prepared: read from a prepared copy, by key position where it has them."""
    column: Column = dataset.columns[name]
    if column.bins is not None:
        # A histogram: the bins are the public key set.
        labels = tuple(bin_label(a, b) for a, b in zip(column.bins, column.bins[1:]))
        return _Dimension(name, pl.String, labels, column.bins, prepared and name in prepared_bins(dataset))
    coded = prepared and name in prepared_codes(dataset)
    return _Dimension(name, _DTYPES[column.type], column.keys, None, coded)


def _collect(release: Any, quantiles: bool) -> pl.DataFrame:
    """Run a measurement's output (an OpenDP OnceFrame) exactly once.

    On our polars (`lazy()`, see the module docstring) unless the plan has a quantile:
    OpenDP's quantile scorer is a function its plan cannot hand back to Python.
    """
    if quantiles:
        return release.collect()
    # Collected once, unchanged, and `finish` hides the row order. The streaming engine:
    # the scan of the serving copy is read in morsels, in bounded memory at any size.
    return release.lazy().collect(engine="streaming")


def _domain(schema: dict[str, type[pl.DataType]]) -> Any:
    """A lazy frame of these columns, all nullable: the domain claims nothing beyond types."""
    return _domain_of(tuple(schema.items()))


@functools.lru_cache(maxsize=256)
def _domain_of(schema: tuple[tuple[str, type[pl.DataType]], ...]) -> Any:
    # Kept by schema: a fifth of compiling a query went to building the same few domains
    # again. An OpenDP domain is immutable; measurements copy what they need of it.
    nullable = {name: dp.option_domain(dp.atom_domain(T=_ATOMS[t])) for name, t in schema}
    domain = dp.lazyframe_domain([dp.series_domain(name, atoms) for name, atoms in nullable.items()])
    return dp.with_margin(domain, dp.polars.Margin(by=[], max_length=MAX_ROWS))


def _measure(dataset: Dataset, aggregate: Aggregate, privacy: Privacy, clip_upper: float | None) -> _Measure:
    """The measure at this query's clipping terms, held in the catalog's fixed point."""
    name = aggregate.measured_column
    column = dataset.columns[name]
    what = aggregate.function.value
    if not column.type.numeric:
        raise InvalidQuery(
            f"{what} needs a numeric column; {name!r} is {column.type.value}", rule="dp.measure", column=name
        )
    if column.bounds is None:
        raise InvalidQuery(
            f"{name!r} has no catalog bounds; a DP {what} needs them to clip each value",
            rule="dp.bounds",
            column=name,
        )
    catalog = _fixed_point(column)
    lo, hi = column.bounds
    index = next((i for i, m in enumerate(privacy.measures) if m.column == name), None)
    if index is not None:
        terms = privacy.measures[index]
        for end, value in (("lower", terms.lower), ("upper", terms.upper)):
            if value is not None and not lo <= value <= hi:
                path = f"query.privacy.measures[{index}].{end}"
                description = f"{value:g} is outside the catalog bounds [{lo:g}, {hi:g}] of {name!r}"
                raise InvalidQuery(
                    f"{path}: {description}",
                    rule="dp.bounds",
                    column=name,
                    field_violations=(FieldViolation(path, description),),
                )
        lo = terms.lower if terms.lower is not None else lo
        hi = terms.upper if terms.upper is not None else hi
    if clip_upper is not None:
        if not lo <= clip_upper <= column.bounds[1]:
            raise InternalError(f"an automatic clip of {name!r} left its terms")
        hi = clip_upper
    if lo > hi:
        raise InvalidQuery(
            f"the lower bound of {name!r} exceeds its upper bound",
            rule="dp.bounds",
            column=name,
            field_violations=(FieldViolation("query.privacy.measures", "lower must not exceed upper"),),
        )
    # Same decimals as the catalog's, whatever the query's bounds; OpenDP clips the values
    # to these tighter bounds.
    return _Measure(name, (lo, hi), catalog.decimals, catalog.integer, (column.bounds[0], column.bounds[1]))


def _row_bound(privacy: Privacy, dataset: Dataset) -> int:
    """The query's rows per unit: the catalog's cap, or a smaller one the query states."""
    cap = require_max_rows(dataset)
    k = privacy.max_rows_per_unit
    if k is None:
        return cap
    if k > cap:
        path = "query.privacy.max_rows_per_unit"
        description = f"{k} is above the catalog's max_rows of {cap} for {dataset.id}"
        raise InvalidQuery(
            f"{path}: {description}",
            rule="dp.max-rows",
            field_violations=(FieldViolation(path, description),),
        )
    return k


def _len_term(name: str) -> Any:
    return lambda s: dp.len(scale=s, signed=True).alias(name)


def _fixed_point(column: Column) -> _Measure:
    """How a bounded numeric column is held as integers; depends on the catalog only."""
    if column.bounds is None:
        raise InternalError(f"{column.name!r} has no catalog bounds to hold in fixed point")
    biggest = max(abs(b) for b in column.bounds)
    decimals = 0 if column.type is ColumnType.INT else _MAX_DECIMALS
    while biggest * 10.0**decimals > _FIXED_POINT_LIMIT:
        decimals -= 1
    return _Measure(column.name, column.bounds, decimals, column.type is ColumnType.INT and decimals == 0)
