"""The DP engine, as a specification: calibration, noise, keys, contribution bounds, nulls.

The statistical tests run in both forms: over the dataset with OpenDP truncating
each unit in the plan ("identifier"), and over a prepared copy truncated once
("prepared", dataops.engines.prepared). tests/test_dp_prepared.py has the rest.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from types import MappingProxyType

import numpy as np
import polars as pl
import pytest

from dataops.catalog import Classification, Column, ColumnType, Dataset, load_catalog
from dataops.demo.generate import generate
from dataops.engines._base import Plan
from dataops.engines.dp import DPQuery, PreparedSource
from dataops.engines.prepared import PreparedStore
from dataops.errors import InternalError, InvalidQuery
from dataops.ir import MAX_EPSILON, Aggregate, Equals, Function, InSet, Mode, Privacy, Query
from dataops.policy import Grant
from dataops.values import PrivacyLoss

REPO = Path(__file__).resolve().parent.parent
COUNT = Aggregate(Function.COUNT)
UNITS = Aggregate(Function.COUNT_UNITS)


@pytest.fixture(scope="module")
def claims(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    sandbox = tmp_path_factory.mktemp("dp") / "sandbox"
    generate(sandbox, enterprises=500, claims=5_000)
    return load_catalog(REPO / "catalog", sandbox).get("medical_claims")


FORMS = ("identifier", "prepared")


def plan_for(dataset: Dataset, aggregates, group_by=(), filters=(), **privacy) -> Plan:
    # A query may ask for at most MAX_EPSILON; the engine itself calibrates any epsilon,
    # and `run` asks it for more so that noise cannot hide a contribution bound.
    if privacy.get("epsilon") is not None:
        privacy = {**privacy, "epsilon": min(privacy["epsilon"], MAX_EPSILON)}
    query = Query(dataset.id, tuple(aggregates), tuple(filters), tuple(group_by), Mode.DP, Privacy(**privacy))
    grant = Grant(
        dataset=dataset.id, purpose="test", expires=dt.date(2099, 1, 1), modes=frozenset(Mode),
        functions=frozenset(Function),
        budget=PrivacyLoss(1e9, 0.5), columns=MappingProxyType({}),
    )  # fmt: skip
    return Plan(query, dataset, grant)


def run(dataset: Dataset, aggregates, group_by=(), filters=(), source: PreparedSource | None = None,
        **privacy) -> pl.DataFrame:  # fmt: skip
    plan = plan_for(dataset, aggregates, group_by, filters, **privacy)
    compiled = DPQuery.compile(plan, source=source)
    return pl.from_arrow(compiled.release(compiled.calibrate(Privacy(**privacy))).table)


def source_for(form: str, dataset: Dataset, state: Path) -> PreparedSource | None:
    """None: the identifier form; else the dataset's prepared copy, made under `state`."""
    return PreparedStore(state).source(dataset) if form == "prepared" else None


def crafted(tmp_path: Path, frame: pl.DataFrame, columns: dict[str, Column], max_rows: int) -> Dataset:
    """A hand-made dataset: privacy unit 'uid'."""
    path = tmp_path / "crafted.parquet"
    frame.write_parquet(path)
    columns = {"uid": Column("uid", ColumnType.STRING, Classification.IDENTIFIER), **columns}
    return Dataset(
        id="crafted", zone="test", title="crafted", description="", provider="tests",
        location="crafted.parquet", path=path, unit_column="uid", max_rows_per_unit=max_rows,
        budget=PrivacyLoss(1e9, 0.5), columns=MappingProxyType(columns), source=path,
    )  # fmt: skip


def value(column: str, low: float, high: float, **kw) -> Column:
    return Column(column, ColumnType.FLOAT, Classification.SENSITIVE, bounds=(low, high), **kw)


def discrete_laplace_std(scale: float) -> float:
    p = math.exp(-1.0 / scale)
    return math.sqrt(2 * p) / (1 - p)


# --- calibration ---------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_released_noise_agrees_with_the_reported_scale(claims: Dataset, form: str, tmp_path: Path) -> None:
    where = (Equals("district", "Nanhu"),)
    plan = plan_for(claims, [COUNT], filters=where, epsilon=5.0)
    compiled = DPQuery.compile(plan, source=source_for(form, claims, tmp_path))
    calibration = compiled.calibrate(plan.query.privacy)
    truth = pl.read_parquet(claims.path).filter(pl.col("district") == "Nanhu").height

    errors = np.array([compiled.release(calibration).table["count"][0].as_py() - truth for _ in range(300)])

    (accuracy,) = calibration.accuracy
    assert accuracy.mechanism == "discrete_laplace"
    assert errors.std() == pytest.approx(discrete_laplace_std(accuracy.noise_scale), rel=0.25)
    assert abs(errors.mean()) < 4 * discrete_laplace_std(accuracy.noise_scale) / math.sqrt(300)
    covered = np.mean(np.abs(errors) <= accuracy.half_width_95)
    assert 0.88 <= covered <= 0.99


def test_epsilon_is_spent_exactly_and_scale_is_inverse_to_it(claims: Dataset) -> None:
    aggregates = [COUNT, Aggregate(Function.SUM, "amount")]
    compiled = DPQuery.compile(plan_for(claims, aggregates, ["district"], epsilon=1.0))
    for epsilon in (0.1, 0.7, 3.0):
        assert compiled.calibrate(Privacy(epsilon=epsilon)).cost.epsilon == pytest.approx(epsilon, rel=1e-9)
    one, two = compiled.calibrate(Privacy(epsilon=1.0)), compiled.calibrate(Privacy(epsilon=2.0))
    assert two.scale == pytest.approx(one.scale / 2, rel=1e-9)
    assert one.cost.delta == 0 and one.threshold is None
    # A sum's noise is the count's times the bound: both follow the one global scale.
    count, total = one.accuracy
    assert total.noise_scale == pytest.approx(count.noise_scale * 500_000.0, rel=1e-9)


def test_target_half_width_gets_the_least_epsilon_that_meets_it(claims: Dataset) -> None:
    target = 2_000_000.0
    aggregates = [COUNT, Aggregate(Function.SUM, "amount")]
    compiled = DPQuery.compile(plan_for(claims, aggregates, ["district"], target_half_width=target))
    calibration = compiled.calibrate(Privacy(target_half_width=target))

    assert all(a.half_width_95 <= target for a in calibration.accuracy)
    cheaper = compiled.calibrate(Privacy(epsilon=calibration.cost.epsilon * 0.9))
    assert max(a.half_width_95 for a in cheaper.accuracy) > target


def test_mean_and_quantile_accuracy_cannot_be_targeted(claims: Dataset) -> None:
    with pytest.raises(InvalidQuery) as caught:
        DPQuery.compile(plan_for(claims, [Aggregate(Function.MEAN, "amount")], target_half_width=10.0))
    assert caught.value.rule == "dp.accuracy-target"


def test_compile_and_calibrate_read_no_data(claims: Dataset, tmp_path: Path) -> None:
    import dataclasses

    gone = dataclasses.replace(claims, path=tmp_path / "missing.parquet")
    compiled = DPQuery.compile(plan_for(gone, [COUNT, UNITS], ["sex"], epsilon=1.0))
    assert compiled.calibrate(Privacy(epsilon=1.0)).cost.epsilon == pytest.approx(1.0)


def test_release_refuses_a_calibration_made_for_a_cheaper_query(claims: Dataset) -> None:
    import dataclasses

    # The budget is split by weight, so every query at one scale costs the same: a
    # calibration that claims less than its scale costs (another query's, a forged one)
    # is what release must refuse.
    query = DPQuery.compile(plan_for(claims, [COUNT, Aggregate(Function.SUM, "amount")], epsilon=1.0))
    calibration = query.calibrate(Privacy(epsilon=1.0))
    cheap = dataclasses.replace(calibration, cost=dataclasses.replace(calibration.cost, epsilon=0.5))
    with pytest.raises(InternalError):
        query.release(cheap)


# --- group keys ----------------------------------------------------------------------


def test_public_key_set_is_released_whole_under_pure_dp(claims: Dataset) -> None:
    # The filter empties nine districts; all ten keys still come back, in order.
    aggregates = [COUNT, Aggregate(Function.SUM, "amount")]
    table = run(claims, aggregates, ["district"], [Equals("district", "Nanhu")], epsilon=1.0)
    assert table.columns == ["district", "count", "sum_amount"]
    assert table["district"].to_list() == sorted(claims.columns["district"].keys)


def test_grouping_without_a_key_set_needs_delta(claims: Dataset) -> None:
    with pytest.raises(InvalidQuery) as caught:
        DPQuery.compile(plan_for(claims, [COUNT], ["visit_date"], epsilon=1.0))
    assert caught.value.rule == "dp.private-keys" and caught.value.column == "visit_date"
    assert "visit_date" in caught.value.message and "delta > 0" in caught.value.message

    compiled = DPQuery.compile(plan_for(claims, [COUNT], ["visit_date"], epsilon=1.0, delta=1e-6))
    with pytest.raises(InvalidQuery):
        compiled.calibrate(Privacy(epsilon=1.0, delta=0.0))


def test_private_keys_come_out_only_above_the_noisy_threshold(tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {
            "uid": [f"u{i}" for i in range(600)],
            "city": ["Big"] * 400 + ["Mid"] * 197 + ["Tiny"] * 3,
            "x": [1.0] * 600,
        }
    )
    columns = {"city": Column("city", ColumnType.STRING, Classification.PUBLIC), "x": value("x", 0.0, 1.0)}
    dataset = crafted(tmp_path, frame, columns, max_rows=1)
    plan = plan_for(dataset, [COUNT, Aggregate(Function.SUM, "x")], ["city"], epsilon=1.0, delta=1e-6)
    compiled = DPQuery.compile(plan)
    calibration = compiled.calibrate(plan.query.privacy)
    assert 0 < calibration.cost.delta <= 1e-6 and calibration.cost.epsilon == pytest.approx(1.0)
    assert calibration.threshold is not None and 3 < calibration.threshold < 197

    for _ in range(20):
        table = pl.from_arrow(compiled.release(calibration).table)
        assert "Tiny" not in table["city"].to_list()
        assert set(table["city"]) <= {"Big", "Mid"}
        assert (table["count"] > calibration.threshold).all()
    assert "Big" in table["city"].to_list()
    # However loose delta is, OpenDP's rule holds: a threshold above a unit's rows per group.
    assert compiled.calibrate(Privacy(epsilon=1.0, delta=0.4)).threshold > 1


def test_histogram_over_catalog_bins(claims: Dataset) -> None:
    table = run(claims, [COUNT], ["amount"], epsilon=200.0)
    bins = claims.columns["amount"].bins
    labels = [f"[{int(a)}, {int(b)})" for a, b in zip(bins, bins[1:])]
    assert table["amount"].to_list() == labels  # every bin, in interval order
    truth = (
        pl.scan_parquet(claims.path)
        .select(pl.col("amount").cut(list(bins), left_closed=True).cast(pl.String).value_counts())
        .unnest("amount")
        .collect()
    )
    expected = dict(zip(truth["amount"], truth["count"]))
    for label, count in table.iter_rows():
        assert abs(count - expected.get(label, 0)) <= 5


# --- contribution bounds, quantiles, nulls -------------------------------------------


@pytest.fixture
def whale(tmp_path: Path) -> Dataset:
    """One unit with 1000 rows far above the bounds among 50 ordinary one-row units."""
    frame = pl.DataFrame(
        {
            "uid": ["whale"] * 1000 + [f"u{i}" for i in range(50)],
            "region": ["North"] * 1000 + ["North", "South"] * 25,
            "x": [1e9] * 1000 + [10.0] * 50,
        }
    )
    columns = {
        "region": Column("region", ColumnType.STRING, Classification.PUBLIC, keys=("North", "South")),
        "x": value("x", 0.0, 100.0),
    }
    return crafted(tmp_path, frame, columns, max_rows=2)


@pytest.mark.parametrize("form", FORMS)
def test_contributions_are_truncated_and_clipped(whale: Dataset, form: str, tmp_path: Path) -> None:
    # Truncated by OpenDP in the plan (identifier) or once by our code (prepared);
    # clipped by OpenDP in both.
    source = source_for(form, whale, tmp_path / "state")
    aggregates = [COUNT, UNITS, Aggregate(Function.SUM, "x"), Aggregate(Function.MEAN, "x")]
    table = run(whale, aggregates, source=source, epsilon=1e5)
    count, units, total, mean = table.row(0)
    # The whale keeps 2 rows, each clipped to 100: not 1050 rows summing to 1e12.
    assert count == pytest.approx(52, abs=1)
    assert units == pytest.approx(51, abs=1)
    assert total == pytest.approx(2 * 100 + 50 * 10, abs=1)
    assert mean == pytest.approx(700 / 52, rel=0.01)

    aggregates = [COUNT, UNITS, Aggregate(Function.SUM, "x")]
    by_region = run(whale, aggregates, ["region"], source=source, epsilon=1e5)
    near = lambda v: pytest.approx(v, abs=1)  # noqa: E731
    assert by_region.rows() == [
        ("North", near(27), near(26), near(450)),
        ("South", near(25), near(25), near(250)),
    ]


@pytest.mark.parametrize("form", FORMS)
def test_quantiles_stay_in_bounds_and_near_the_truth(claims: Dataset, form: str, tmp_path: Path) -> None:
    aggregates = [Aggregate(Function.QUANTILE, "amount", 0.5), Aggregate(Function.QUANTILE, "amount", 0.9)]
    table = run(claims, aggregates, source=source_for(form, claims, tmp_path), epsilon=1000.0)
    amounts = pl.scan_parquet(claims.path).select("amount").collect()["amount"]
    for name, q in (("q50_amount", 0.5), ("q90_amount", 0.9)):
        released = table[name][0]
        assert 0.0 <= released <= 500_000.0
        assert released == pytest.approx(amounts.quantile(q), rel=0.05)


def test_grouped_median_with_an_empty_group_stays_in_bounds(claims: Dataset) -> None:
    table = run(claims, [Aggregate(Function.QUANTILE, "amount", 0.5, alias="median")], ["district"],
                [InSet("district", ("Nanhu", "Hexi"))], epsilon=1.0)  # fmt: skip
    assert len(table) == 10
    assert table["median"].is_between(0.0, 500_000.0).all()


@pytest.mark.parametrize("form", FORMS)
def test_missing_values_are_left_out_of_sums_means_and_quantiles(tmp_path: Path, form: str) -> None:
    known = [float(v) for v in range(1, 31)]  # sum 465, mean and median 15.5
    frame = pl.DataFrame({"uid": [f"u{i}" for i in range(40)], "x": known + [None] * 5 + [float("nan")] * 5})
    dataset = crafted(tmp_path, frame, {"x": value("x", 0.0, 100.0)}, max_rows=1)
    aggregates = [COUNT, Aggregate(Function.SUM, "x"), Aggregate(Function.MEAN, "x")]
    aggregates.append(Aggregate(Function.QUANTILE, "x", 0.5))
    source = source_for(form, dataset, tmp_path / "state")
    count, total, mean, median = run(dataset, aggregates, source=source, epsilon=1e5).row(0)
    assert count == pytest.approx(40, abs=1)  # COUNT counts rows, missing values included
    # Imputing the bounds' midpoint (OpenDP's default) would give 965, 24.1 and 20.5.
    assert total == pytest.approx(465, abs=1)
    assert mean == pytest.approx(15.5, rel=0.01)
    assert 15.0 <= median <= 16.0


def test_consumer_mistakes_are_refused_with_a_rule(tmp_path: Path) -> None:
    frame = pl.DataFrame({"uid": ["a"], "x": [1.0], "label": ["l"]})
    columns = {
        "x": Column("x", ColumnType.FLOAT, Classification.SENSITIVE),
        "label": Column("label", ColumnType.STRING, Classification.PUBLIC),
    }
    dataset = crafted(tmp_path, frame, columns, max_rows=1)
    for aggregate, rule in [
        (Aggregate(Function.SUM, "x"), "dp.bounds"),
        (Aggregate(Function.QUANTILE, "x", 0.5), "dp.bounds"),
        (Aggregate(Function.SUM, "label"), "dp.measure"),
    ]:
        with pytest.raises(InvalidQuery) as caught:
            DPQuery.compile(plan_for(dataset, [aggregate], epsilon=1.0))
        assert caught.value.rule == rule and caught.value.column == aggregate.column


# --- OpenDP's features: enabled at server start, asserted in the engine ----------------------


def test_importing_the_engine_enables_no_opendp_feature() -> None:
    import subprocess
    import sys

    code = (
        "import dataops.engines.dp, dataops.engines.dp_engine, dataops.engines.dp_autoclip, "
        "dataops.service, opendp.mod as m; print(sorted(m.GLOBAL_FEATURES))"
    )
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_the_engine_refuses_to_build_a_measurement_unless_the_features_were_enabled(claims: Dataset) -> None:
    import opendp.prelude as dp

    from dataops.engines.dp import OPENDP_FEATURES, enable_opendp

    plan = plan_for(claims, [COUNT], epsilon=1.0)
    dp.disable_features(*OPENDP_FEATURES)
    try:
        with pytest.raises(InternalError, match="not enabled"):
            DPQuery.compile(plan)
    finally:
        enable_opendp()
    compiled = DPQuery.compile(plan)  # the control on: the same query compiles and calibrates
    assert compiled.calibrate(plan.query.privacy).cost.epsilon == pytest.approx(1.0)
