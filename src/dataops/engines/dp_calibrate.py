"""Calibration: the noise scale for a budget or an accuracy target, and what it costs and buys.

`dataops.engines.dp` builds the measurements (the proof-bearing part) and maps their
privacy loss through OpenDP; nothing here adds privacy reasoning of its own. The
search for a scale only picks *which* measurement to build: whatever it picks, the
spend is OpenDP's map of that measurement (`Compiled.cost`), and `DPQuery.release`
refuses a measurement that would cost more than calibrated. Accuracy and the bias
notes describe a measurement; the conversion of a zCDP loss to (epsilon, delta) is
OpenDP's (`make_zCDP_to_approxDP`, `make_fix_delta`), applied to a measurement whose
rho is the query's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import opendp.prelude as dp

from dataops.catalog import Dataset
from dataops.engines._base import (
    MECHANISM_DISCRETE_GAUSSIAN,
    MECHANISM_DISCRETE_LAPLACE,
    MECHANISM_EXPONENTIAL,
    AggregateAccuracy,
)
from dataops.engines.dp_post import mean_parts
from dataops.errors import FieldViolation, InternalError, InvalidQuery
from dataops.ir import MAX_EPSILON, Function, Privacy
from dataops.values import PrivacyLoss

if TYPE_CHECKING:
    from dataops.engines.dp import Compiled

ALPHA = 0.05  # accuracy is reported as the half-width of a 95% interval
NO_THRESHOLD = 2**32 - 1  # a threshold no group passes: isolates the epsilon part of the loss


@dataclass(frozen=True)
class Calibration:
    """What a query will spend and how accurate it will be."""

    scale: float  # OpenDP global_scale
    threshold: int | None  # private keys: a group is released if its noisy count exceeds this
    cost: PrivacyLoss  # of the compiled query at this scale: what the ledger debits
    accuracy: tuple[AggregateAccuracy, ...]  # one per aggregate, in query order, 95% half-width
    rho: float | None = None  # zCDP grants: the query's rho, of which cost is OpenDP's conversion
    notes: tuple[str, ...] = ()  # public facts about the terms, e.g. that clipping may bias
    # The measurements this was mapped at, in stage order (`measured`), for the request
    # that calibrated: its release runs them instead of building them again. Never kept
    # across requests (`kept` drops them); not part of what a calibration is.
    measurements: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    def kept(self) -> Calibration:
        """The calibration without its measurements: what may be kept for other requests."""
        return dataclasses.replace(self, measurements=()) if self.measurements else self


def calibrate(c: Compiled, privacy: Privacy) -> Calibration:
    """The scale (and threshold) for a privacy budget or an accuracy target; see `measured`."""
    return measured(c, privacy).kept()


def measured(c: Compiled, privacy: Privacy) -> Calibration:
    """The scale (and threshold) for a privacy budget or an accuracy target, with the
    measurements it was mapped at (`Calibration.measurements`: `DPQuery.release` runs
    them rather than build them again); reads no data.

    With epsilon: the scale that spends exactly epsilon. With target_half_width: the
    least epsilon at which every aggregate's 95% half-width is within the target.
    Private group keys: the smallest threshold (OpenDP keeps a group when its noisy row
    count exceeds it) whose delta fits privacy.delta.
    """
    c.check_delta(privacy)
    notes = bias_notes(c.dataset, c.measures, c.k)
    # The loss at scale 1 (epsilon part; rho on a zCDP grant): every other scale is a
    # division away. It depends on the compiled query alone, so it is mapped once per
    # compiled query, however many epsilons it is calibrated for.
    reference = _unit_scale(c)[0]
    if c.zcdp:
        if privacy.epsilon is None:
            raise InvalidQuery(
                "a zcdp grant takes epsilon, not target_half_width",
                rule="dp.zcdp",
                field_violations=(FieldViolation("query.privacy.target_half_width", "not on a zcdp grant"),),
            )
        scale = scale_for_zcdp(c, privacy.epsilon, privacy.delta, reference)
        measurements = c.build(scale, None)
        return Calibration(
            scale,
            None,
            c.cost(measurements),
            accuracy_at(c, scale),
            c.rho(measurements),
            notes,
            tuple(measurements),
        )
    checked: tuple[list[dp.Measurement], PrivacyLoss] | None = None  # at the scale, no private keys
    if privacy.epsilon is not None:
        scale, checked_measurements, checked_cost = scale_for(c, privacy.epsilon, reference)
        checked = checked_measurements, checked_cost
    elif privacy.target_half_width is not None:
        scale = scale_for_half_width(c, privacy.target_half_width)
        # Loss is reference / scale; checked before any map that could overflow.
        if reference / scale > MAX_EPSILON:
            raise InvalidQuery(
                f"target_half_width={privacy.target_half_width} would need epsilon above "
                f"{MAX_EPSILON:g}; ask for a wider half-width",
                rule="dp.accuracy-target",
            )
    else:
        raise InvalidQuery("a DP query needs epsilon or target_half_width", rule="dp.privacy")
    threshold = threshold_for(c, scale, privacy.delta) if c.private_keys else None
    # Without private keys the measurements scale_for checked (and their loss) are these:
    # not built and mapped twice.
    if checked is not None and threshold is None:
        measurements, cost = checked
    else:
        measurements = c.build(scale, threshold)
        cost = c.cost(measurements)
    return Calibration(
        scale,
        threshold,
        cost,
        accuracy_at(c, scale),
        notes=notes,
        measurements=tuple(measurements),
    )


def scale_for(
    c: Compiled, epsilon: float, reference: float
) -> tuple[float, list[dp.Measurement], PrivacyLoss]:
    """The scale that spends epsilon (loss is reference / scale), the measurements
    checked at it (built without private keys: `_no_keys`) and their loss."""
    scale = reference / epsilon
    # Rounding in OpenDP's map may land a hair above: step up until within budget.
    for _ in range(64):
        measurements = c.build(scale, _no_keys(c))
        cost = c.cost(measurements)
        if cost.epsilon <= epsilon:
            return scale, measurements, cost
        scale = math.nextafter(scale, math.inf) * (1 + 1e-15)
    raise InternalError("could not calibrate the noise scale")


def scale_for_zcdp(c: Compiled, epsilon: float, delta: float, reference: float) -> float:
    """The scale whose rho OpenDP converts to at most epsilon at delta: rho = reference / scale^2."""
    rho = rho_for_epsilon(epsilon, delta)
    scale = math.sqrt(reference / rho)
    for _ in range(64):
        if c.cost(c.build(scale, None)).epsilon <= epsilon:
            return scale
        scale = math.nextafter(scale, math.inf) * (1 + 1e-12)
    raise InternalError("could not calibrate the noise scale")


def _no_keys(c: Compiled) -> int | None:
    """The threshold that releases no private key: isolates the epsilon part of the loss."""
    return NO_THRESHOLD if c.private_keys else None


def scale_for_half_width(c: Compiled, target: float) -> float:
    """The largest scale (least epsilon) at which every half-width is within target."""
    # Each aggregate's noise scale is global_scale times a fixed factor: read the factors once.
    reference = accuracy(c, c.build(1.0, _no_keys(c)))

    def within(scale: float) -> bool:
        pairs = zip(reference, _factors(c))
        return all(_half_width(scale * a.noise_scale * f, f) <= target for a, f in pairs)

    if not within(1e-12):
        raise InvalidQuery(f"target_half_width={target} cannot be reached", rule="dp.accuracy-target")
    # A target looser than the noise at the largest scale is met at (almost) no cost.
    scale = 1e18 if within(1e18) else dp.binary_search(within, bounds=(1e-12, 1e18), T=float)
    # Confirm with OpenDP's own summary at that scale; step down past any rounding.
    while not all(a.half_width_95 <= target for a in accuracy(c, c.build(scale, _no_keys(c)))):
        scale = math.nextafter(scale, 0.0) * (1 - 1e-12)
    return scale


def _factors(c: Compiled) -> list[float]:
    return [c.measures[a.column].factor if a.column else 1.0 for a in c.query.aggregates]


def threshold_for(c: Compiled, scale: float, delta: float) -> int:
    """The smallest key-release threshold whose delta fits the budget."""

    def fits(threshold: int) -> bool:
        return c.cost(c.build(scale, threshold)).delta <= delta

    if not fits(NO_THRESHOLD):
        raise InvalidQuery(
            "delta is too small to release private group keys at this epsilon; raise delta or epsilon",
            rule="dp.delta",
        )
    # Bisection over u32 (opendp's binary_search takes i32 only); fits() is monotone.
    # OpenDP requires a threshold above a unit's rows per group (at most k), so start there.
    failing, passing = c.k, NO_THRESHOLD
    while passing - failing > 1:
        middle = (failing + passing) // 2
        failing, passing = (failing, middle) if fits(middle) else (middle, passing)
    return passing


def accuracy(c: Compiled, measurements: list[dp.Measurement]) -> tuple[AggregateAccuracy, ...]:
    """Per-aggregate noise scale and 95% half-width, in data units, from OpenDP's summary."""
    summaries = []
    for m in measurements:
        # OpenDP's discrete Gaussian accuracy sums over the support (seconds at large
        # scales): read the scales only, and compute it in `gaussian_accuracy`.
        summary = dp.summarize_polars_measurement(m) if c.zcdp else dp.summarize_polars_measurement(m, ALPHA)
        for row in summary.iter_rows(named=True):
            if c.zcdp and row["distribution"] == "Integer Gaussian":
                row["accuracy"] = gaussian_accuracy(row["scale"], ALPHA)
            summaries.append(row)
    return _accuracy(c, summaries)


def accuracy_at(c: Compiled, scale: float) -> tuple[AggregateAccuracy, ...]:
    """`accuracy` of the measurements at `scale`, without summarizing them again.

    Each term's noise scale is the global scale times the term's own unit (`Compiled.build`
    makes it `scale * unit`), so OpenDP's summary at scale 1 (read once per compiled
    query) gives every term's scale at any other; the half-width is OpenDP's own
    `discrete_laplacian_scale_to_accuracy`, which its summary reports (`gaussian_accuracy`
    on a zCDP grant, as above). tests/test_dp_plans.py holds it equal to `accuracy`.
    """
    summaries = []
    for unit in _unit_scale(c)[1]:
        row = {**unit, "scale": scale * unit["scale"]}
        if row["distribution"] == "Integer Laplace":
            row["accuracy"] = dp.discrete_laplacian_scale_to_accuracy(row["scale"], ALPHA)
        elif row["distribution"] == "Integer Gaussian":
            row["accuracy"] = gaussian_accuracy(row["scale"], ALPHA)
        summaries.append(row)
    return _accuracy(c, summaries)


def _unit_scale(c: Compiled) -> tuple[float, tuple[dict[str, Any], ...]]:
    """The loss (epsilon part; rho on a zCDP grant) and OpenDP's summary of the
    measurements at scale 1, without private keys (`_no_keys`; a zCDP grant has none):
    one build, read once per compiled query (`Compiled.unit_scale`)."""
    if c.unit_scale is None:
        measurements = c.build(1.0, _no_keys(c))
        loss = c.rho(measurements) if c.zcdp else c.cost(measurements).epsilon
        summary = tuple(
            row for m in measurements for row in dp.summarize_polars_measurement(m).iter_rows(named=True)
        )
        c.unit_scale = (loss, summary)
    return c.unit_scale


def _accuracy(c: Compiled, summaries: list[dict[str, Any]]) -> tuple[AggregateAccuracy, ...]:
    rows: dict[str, list[dict]] = {}
    for row in summaries:
        rows.setdefault(row["column"], []).append(row)
    mechanism = MECHANISM_DISCRETE_GAUSSIAN if c.zcdp else MECHANISM_DISCRETE_LAPLACE
    distribution = "Integer Gaussian" if c.zcdp else "Integer Laplace"
    out = []
    for a, factor in zip(c.query.aggregates, _factors(c)):
        found = {row["aggregate"]: row for row in rows.get(a.name, [])}
        if a.function is Function.QUANTILE:
            # The exponential mechanism's scale is in rank-score units; its error in data
            # units depends on the data, so there is no half-width to promise.
            (row,) = found.values()
            out.append(AggregateAccuracy(a.name, row["scale"], math.nan, MECHANISM_EXPONENTIAL))
            continue
        if a.function is Function.MEAN:
            (row,) = rows[mean_parts(a.name)[0]]
            scale = row["scale"] / factor  # the numerator's noise, in data units
            out.append(AggregateAccuracy(a.name, scale, math.nan, mechanism))
            continue
        if len(found) != 1 or next(iter(found.values()))["distribution"] != distribution:
            raise InternalError(f"unexpected OpenDP summary for {a.name}: {found}")
        (row,) = found.values()
        scale, half_width = row["scale"] / factor, row["accuracy"] / factor
        out.append(AggregateAccuracy(a.name, scale, half_width, mechanism))
    return tuple(out)


def bias_notes(dataset: Dataset, measures: dict[str, Any], k: int) -> tuple[str, ...]:
    """What can be said about bias from the public terms alone (no data is read)."""
    notes = []
    for name, m in measures.items():
        catalog = dataset.columns[name].bounds  # every measure has them (the compile refuses otherwise)
        if catalog is not None and m.bounds != tuple(catalog):
            notes.append(
                f"{name}: clipped to [{m.bounds[0]:g}, {m.bounds[1]:g}], inside the catalog's "
                f"{list(catalog)}: values outside are moved in (clipping bias possible)"
            )
    if dataset.max_rows_per_unit is not None and k < dataset.max_rows_per_unit:
        notes.append(
            f"each unit is truncated to {k} rows (catalog: {dataset.max_rows_per_unit}): "
            "rows beyond are left out (truncation bias possible)"
        )
    return tuple(notes)


def _half_width(scale: float, factor: float) -> float:
    """95% half-width, in data units, of discrete Laplace noise with this fixed-point scale."""
    return dp.discrete_laplacian_scale_to_accuracy(float(scale), ALPHA) / factor


def zcdp_to_epsilon(rho: float, delta: float) -> float:
    """The epsilon OpenDP gives rho-zCDP at delta (make_zCDP_to_approxDP, make_fix_delta).

    OpenDP converts measurements, not numbers: a Gaussian mechanism of scale 1 is
    rho = d^2 / 2 at distance d, so it is mapped at d with d^2 / 2 >= rho (checked
    through its own map, never below), then converted.
    """
    if rho <= 0:
        return 0.0
    base = dp.m.make_gaussian(dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=1.0)
    d = math.sqrt(2 * rho)
    while base.map(d) < rho:
        d = math.nextafter(d, math.inf)
    return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(base), delta).map(d)[0]


def rho_for_epsilon(epsilon: float, delta: float) -> float:
    """The largest rho (to a relative 1e-9) that OpenDP converts to at most epsilon at delta."""
    low, high = 0.0, max(epsilon, 1.0)
    while zcdp_to_epsilon(high, delta) <= epsilon:
        high *= 2
    while high - low > 1e-9 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if zcdp_to_epsilon(middle, delta) <= epsilon else (low, middle)
    return low


def gaussian_accuracy(scale: float, alpha: float) -> float:
    """The (1 - alpha) half-width of discrete Gaussian noise at this scale (integer units).

    OpenDP's own up to a scale of 1e4; above it, where OpenDP's sums over the support
    and takes ever longer (about 1 s at 1e6), the continuous Gaussian's z * scale plus
    one unit: OpenDP's was within one unit of z * scale at 1e4, 1e5 and 1e6 (0.16).
    """
    if scale <= 1e4:
        return float(dp.discrete_gaussian_scale_to_accuracy(float(scale), alpha, T=float))
    return float(NormalDist().inv_cdf(1 - alpha / 2)) * scale + 1.0
