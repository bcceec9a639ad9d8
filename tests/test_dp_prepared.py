"""Prepared copies: truncation enforced once, and the same privacy loss as truncating per plan."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import stat
import threading
from pathlib import Path
from types import MappingProxyType

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataops.catalog import Classification, Column, ColumnType, Dataset, load_catalog
from dataops.config import Limits
from dataops.demo.generate import generate
from dataops.engines import prepared
from dataops.engines.dp import (
    UNIT_CODE,
    DPQuery,
    PreparedSource,
    bin_column,
    code_column,
    fixed_column,
    prepared_bins,
    prepared_codes,
    prepared_column_names,
)
from dataops.engines.prepared import PreparedStore
from dataops.errors import BudgetExhausted, ConfigError, InternalError
from dataops.ir import MAX_EPSILON, Aggregate, Between, Equals, Function, MeasureTerms, Mode, Privacy, Query
from dataops.ledger import Ledger
from dataops.policy import PolicyStore
from dataops.service import Sandbox
from dataops.values import PrivacyLoss
from dataops.versions import DataVersions, stat_signature
from test_dp_engine import COUNT, UNITS, crafted, plan_for, run, value

REPO = Path(__file__).resolve().parent.parent
SUM = Aggregate(Function.SUM, "amount")
MEAN = Aggregate(Function.MEAN, "amount")
MEDIAN = Aggregate(Function.QUANTILE, "amount", 0.5)
ON_OFF = pytest.mark.parametrize("control", ["on", "off"])


@pytest.fixture(scope="module")
def claims(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    sandbox = tmp_path_factory.mktemp("prepared") / "sandbox"
    generate(sandbox, enterprises=500, claims=5_000)
    return load_catalog(REPO / "catalog", sandbox).get("medical_claims")


@pytest.fixture(scope="module")
def source(claims: Dataset, tmp_path_factory: pytest.TempPathFactory) -> PreparedSource:
    return PreparedStore(tmp_path_factory.mktemp("state")).source(claims)


def losses(dataset: Dataset, source: PreparedSource, aggregates, group_by=(), scale=1.0, threshold=None,
           **privacy):  # fmt: skip
    """OpenDP's privacy maps of both forms of one query, at the same scale (and threshold)."""
    plan = plan_for(dataset, aggregates, group_by, **(privacy or {"epsilon": 1.0}))
    out = []
    for form in (DPQuery.compile(plan), DPQuery.compile(plan, source=source)):
        compiled = form._compiled
        out.append(compiled.cost(compiled.build(scale, threshold)))
    return out


# --- the privacy loss is the identifier form's ----------------------------------------


@pytest.mark.parametrize("aggregates, group_by", [
    ([COUNT], []),
    ([SUM], []),
    ([COUNT], ["age_band"]),
    ([COUNT, SUM], ["age_band"]),
    ([MEAN], ["sex", "district"]),
    ([MEDIAN], ["sex"]),
    ([COUNT], ["amount"]),  # a histogram over the catalog bins
    ([UNITS], []),
    ([UNITS], ["age_band"]),  # fewer groups (6) than k (40)
    ([COUNT, UNITS, SUM], ["district", "diagnosis_group"]),
], ids=lambda v: "+".join(getattr(a, "name", a) for a in v) or "ungrouped")  # fmt: skip
def test_both_forms_lose_the_same_epsilon_at_any_scale(claims, source, aggregates, group_by) -> None:
    for scale in (0.5, 1.0, 37.0):
        identifier, prepared = losses(claims, source, aggregates, group_by, scale)
        assert prepared == identifier, (scale, identifier, prepared)
        assert prepared.delta == 0


def test_a_grouped_count_costs_k_over_the_scale_in_both_forms(claims, source) -> None:
    # Noise scales are global_scale times each term's unit, and the unit makes the whole
    # query cost 1 / global_scale; for a grouped count the unit is k (its sensitivity).
    k = claims.max_rows_per_unit
    identifier, prepared = losses(claims, source, [COUNT], ["age_band"], scale=8.0)
    assert identifier.epsilon == prepared.epsilon == pytest.approx(1 / 8.0)
    plan = plan_for(claims, [COUNT], ["age_band"], epsilon=1.0)
    for form in (DPQuery.compile(plan), DPQuery.compile(plan, source=source)):
        assert form._compiled.stages[0].scales == (pytest.approx(k),)


def test_private_keys_lose_the_same_epsilon_and_delta(claims, source) -> None:
    for aggregates in ([COUNT], [SUM], [COUNT, UNITS]):
        privacy = dict(epsilon=1.0, delta=1e-6)
        identifier, prepared = losses(claims, source, aggregates, ["visit_date"], 2.0, 500, **privacy)
        assert prepared == identifier and prepared.delta > 0


def test_calibrations_agree_so_estimates_and_releases_agree(claims, source) -> None:
    plan = plan_for(claims, [COUNT, UNITS, SUM], ["age_band"], epsilon=0.7)
    identifier = DPQuery.compile(plan).calibrate(plan.query.privacy)
    prepared = DPQuery.compile(plan, source=source).calibrate(plan.query.privacy)
    assert prepared == identifier


# --- release over the copy -------------------------------------------------------------


def test_release_refuses_a_calibration_made_for_a_cheaper_query(claims, source) -> None:
    import dataclasses

    query = DPQuery.compile(plan_for(claims, [COUNT, SUM], epsilon=1.0), source=source)
    calibration = query.calibrate(Privacy(epsilon=1.0))
    cheap = dataclasses.replace(calibration, cost=dataclasses.replace(calibration.cost, epsilon=0.5))
    with pytest.raises(InternalError):
        query.release(cheap)


def test_a_copy_made_under_another_cap_is_refused(claims, source) -> None:
    import dataclasses

    plan = plan_for(claims, [COUNT], epsilon=1.0)
    for change in ({"max_rows_per_unit": 1}, {"dataset_id": "other"}):
        wrong = dataclasses.replace(source, **change)
        with pytest.raises(InternalError):
            DPQuery.compile(plan, source=wrong)


def test_filters_apply_to_the_copy(claims, source) -> None:
    plan = plan_for(claims, [COUNT, UNITS], ["sex"], [Equals("district", "Nanhu")], epsilon=100.0)
    compiled = DPQuery.compile(plan, source=source)
    table = pl.from_arrow(compiled.release(compiled.calibrate(Privacy(epsilon=1e4))).table)
    # Truncation keeps every row here (no demo person has more than k visits).
    truth = (
        pl.read_parquet(claims.path).filter(pl.col("district") == "Nanhu")
        .group_by("sex").agg(pl.len().alias("n"), pl.col("person_id").n_unique().alias("u")).sort("sex")
    )  # fmt: skip
    assert table["sex"].to_list() == ["F", "M"]
    for (_, count, units), (_, n, u) in zip(table.iter_rows(), truth.iter_rows()):
        assert count == pytest.approx(n, abs=1) and units == pytest.approx(u, abs=1)


def test_count_units_deduplicates_range_by_range_as_one_unique(claims, source, tmp_path, monkeypatch) -> None:
    """COUNT_UNITS' per-unit step over a copy is written one range of unit codes at a time
    (bounded memory); its rows are exactly the whole copy's unique (unit code, group), and
    a release over many small ranges counts the same units as the truth."""
    from dataops.engines import dp as dp_module

    monkeypatch.setattr(dp_module, "UNIQUE_ROWS_PER_RANGE", 97)  # many ranges, none aligned
    pairs = source.scan().select(UNIT_CODE, "sex", "district")
    ranged = dp_module._unique_by_code_range(pairs, source.parts, tmp_path / "units.parquet").collect()
    whole = pairs.unique().collect()
    assert source.scan().collect().height // 97 > 10  # the ranges really are many
    assert ranged.height == whole.height > 0
    assert ranged.sort(ranged.columns).equals(whole.sort(whole.columns))
    plan = plan_for(claims, [UNITS], ["sex"], epsilon=100.0)
    compiled = DPQuery.compile(plan, source=source)
    table = pl.from_arrow(compiled.release(compiled.calibrate(Privacy(epsilon=1e4))).table)
    truth = pl.read_parquet(claims.path).group_by("sex").agg(pl.col("person_id").n_unique()).sort("sex")
    for (_, units), (_, u) in zip(table.iter_rows(), truth.iter_rows(), strict=True):
        assert units == pytest.approx(u, abs=1)
    assert not list(source.path.parent.glob(".*-units-*.tmp"))  # the scratch rows are gone


# --- the store ---------------------------------------------------------------------------


@pytest.fixture
def crowd(tmp_path: Path) -> Dataset:
    """Units with 1 to 5 rows in a known order, an extra column the catalog does not know,
    a second identifier column and an unclassified one."""
    uids = [f"u{i}" for i in range(40) for _ in range(1 + i % 5)]
    frame = pl.DataFrame({
        "uid": uids,
        "name": [f"Firm {u}" for u in uids],
        "note": ["unreviewed"] * len(uids),
        "seq": list(range(len(uids))),
        "x": [float(i % 7) for i in range(len(uids))],
        "secret": ["not in the catalog"] * len(uids),
    }).sample(fraction=1.0, shuffle=True, seed=7)  # fmt: skip
    columns = {
        "name": Column("name", ColumnType.STRING, Classification.IDENTIFIER),
        "note": Column("note", ColumnType.STRING, Classification.UNCLASSIFIED),
        "seq": Column("seq", ColumnType.INT, Classification.PUBLIC),
        "x": value("x", 0.0, 10.0),
    }
    return crafted(tmp_path, frame, columns, max_rows=3)


def copy_files(state: Path) -> list[str]:
    return sorted(p.name for p in (state / "prepared").iterdir())


def test_the_copy_keeps_each_units_first_k_rows_and_only_usable_columns(
    crowd: Dataset, tmp_path: Path
) -> None:
    source = PreparedStore(tmp_path / "state").source(crowd)
    assert source.path == tmp_path / "state" / "prepared" / f"crafted-{source.fingerprint[:16]}.copy"
    assert [p.name for p in source.parts] == ["part-00000.parquet"]
    copy = source.scan().collect()
    # No unit id, no other identifier, no unclassified column, no column the catalog lacks;
    # each column once, and the bounded measure x also in its fixed point (micro-units).
    assert set(copy.columns) == {UNIT_CODE, "seq", "x", fixed_column("x")}
    assert copy[fixed_column("x")].to_list() == [round(v * 1e6) for v in copy["x"]]
    raw = pl.read_parquet(crowd.path)
    expected = raw.filter(pl.int_range(pl.len()).over("uid") < 3)
    assert sorted(copy["seq"]) == sorted(expected["seq"])
    assert copy.group_by(UNIT_CODE).len()["len"].max() == 3
    # The unit is a dense code, one per unit (0..n), not a function of its id.
    assert copy[UNIT_CODE].n_unique() == raw["uid"].n_unique() == 40
    assert set(copy[UNIT_CODE]) <= set(range(41))
    by_unit = (
        expected.join(copy.select("seq", UNIT_CODE), on="seq")
        .group_by("uid")
        .agg(pl.col(UNIT_CODE).n_unique().alias("codes"))
    )
    assert (by_unit["codes"] == 1).all()


def test_the_copys_fixed_point_is_the_plans_conversion_at_every_bound(tmp_path: Path) -> None:
    """A DP plan over a copy reads each measure's `#fixed:` column (clipped again to a
    query's tighter bounds) instead of converting the raw value: the values OpenDP sees
    must be exactly the conversion of the raw ones, for values that are missing, NaN,
    infinite, outside the bounds, on them, and halfway between two fixed-point units."""
    xs = [
        None,
        math.nan,
        math.inf,
        -math.inf,
        -1e9,
        1e9,
        -50.0,
        1000.0,
        0.0,
        5e-7,
        -5e-7,
        2.5e-6,
        1.5e-6,
        999.9999995,
        12.3456785,
        10.5,
        20.25,
        20.2500005,
        0.1 + 0.2,
        333.3333333335,
    ]
    xs += [(i * 7919 % 10007) / 9.7 - 40.0 for i in range(400)]
    ns = [None, -5, 0, 1, 50, 99, 100, 101, 10**6] + [i % 120 for i in range(411)]
    frame = pl.DataFrame({"uid": [f"u{i}" for i in range(len(xs))], "x": xs, "n": ns[: len(xs)]})
    dataset = crafted(
        tmp_path, frame,
        {"x": value("x", -50.0, 1000.0), "n": Column("n", ColumnType.INT, Classification.SENSITIVE, bounds=(0, 100))},
        max_rows=1,
    )  # fmt: skip
    copy = PreparedStore(tmp_path / "state").source(dataset).scan().collect()
    assert copy.height == len(xs)
    terms = [
        (),  # the catalog's bounds: the fixed column as it is
        (MeasureTerms("x", lower=1.5e-6, upper=999.9999985), MeasureTerms("n", lower=1, upper=99)),
        (MeasureTerms("x", lower=10.5, upper=20.25), MeasureTerms("n", lower=50, upper=50)),
        (MeasureTerms("x", lower=-50.0, upper=12.3456785),),
    ]
    for measures in terms:
        plan = plan_for(dataset, [Aggregate(Function.SUM, "x"), Aggregate(Function.SUM, "n")], epsilon=1.0,
                        measures=measures)  # fmt: skip
        compiled = DPQuery.compile(plan, source=None)._compiled
        for m in compiled.measures.values():
            expected = copy.select(m.prepare()).to_series()
            got = copy.select(m.prepare_copy()).to_series()
            assert got.dtype == expected.dtype == pl.Int64
            assert got.to_list() == expected.to_list(), (m.column, measures)
    # The same sum released from the copy and in the identifier form, noise aside.
    exact = run(dataset, [Aggregate(Function.SUM, "x")], epsilon=1e6)["sum_x"][0]
    prepared_sum = run(dataset, [Aggregate(Function.SUM, "x")], epsilon=1e6,
                       source=PreparedStore(tmp_path / "state").source(dataset))["sum_x"][0]  # fmt: skip
    assert abs(exact - prepared_sum) < 1.0


@pytest.fixture
def kinds(tmp_path: Path) -> Dataset:
    """A string column with public keys (listed out of order) and values outside them,
    missing values, and a string column whose keys are private."""
    values = ["a"] * 7 + ["b"] * 5 + ["z"] * 4 + [None] * 3  # no "c": a key with no rows
    frame = pl.DataFrame({
        "uid": [f"u{i}" for i in range(len(values))],
        "kind": values,
        "tag": ["t1", "t2"] * 9 + ["t1"],
    })  # fmt: skip
    columns = {
        "kind": Column("kind", ColumnType.STRING, Classification.PUBLIC, keys=("b", "a", "c")),
        "tag": Column("tag", ColumnType.STRING, Classification.PUBLIC),
    }
    return crafted(tmp_path, frame, columns, max_rows=1)


def test_a_copy_holds_public_keys_as_their_positions_in_the_catalog(kinds: Dataset, tmp_path: Path) -> None:
    """Positions are the catalog's order, never the data's; a value outside the keys and a
    missing value share the position past the last key; keys the data chooses stay strings."""
    assert prepared_codes(kinds) == {"kind": ["b", "a", "c"]}
    copy = pl.read_parquet(PreparedStore(tmp_path / "state").source(kinds).path)
    assert set(copy.columns) == {UNIT_CODE, "kind", "tag", code_column("kind")}
    pairs = dict(copy.select("kind", code_column("kind")).unique().iter_rows())
    assert pairs == {"b": 0, "a": 1, "z": 3, None: 3}


@pytest.mark.parametrize("filters", [(), (Equals("kind", "a"),)], ids=["all", "filtered"])
def test_a_release_by_key_positions_is_the_string_forms(kinds: Dataset, tmp_path: Path, filters) -> None:
    """Over the copy the plan groups positions; the release names the keys, in the string
    form's order, and rows outside the keys are in no group, exactly as by strings."""
    source = PreparedStore(tmp_path / "state").source(kinds)
    released = {}
    for form, copy in (("identifier", None), ("prepared", source)):
        released[form] = run(kinds, [COUNT], ["kind"], filters, source=copy, epsilon=1e4)
    plan = plan_for(kinds, [COUNT], ["kind"], filters, epsilon=1e4)
    assert [d.coded for d in DPQuery.compile(plan, source=source)._compiled.dims] == [True]
    assert [d.coded for d in DPQuery.compile(plan)._compiled.dims] == [False]
    expected = {"a": 7, "b": 0 if filters else 5, "c": 0}
    for form, table in released.items():
        assert table["kind"].to_list() == ["a", "b", "c"], form  # sorted by key, as strings sort
        assert table["kind"].dtype == pl.String, form
        for key, count in zip(table["kind"], table["count"]):
            assert count == pytest.approx(expected[key], abs=1), (form, key)


@pytest.fixture
def binned(tmp_path: Path) -> Dataset:
    """A binned float column: values on every edge, inside, below, above, missing and NaN."""
    values = [0.0, 9.99, 10.0, 10.0, 19.5, 20.0, 29.999, -1.0, 30.0, 1e9, None, float("nan")]
    frame = pl.DataFrame({"uid": [f"u{i}" for i in range(len(values))], "x": values}, strict=False)
    columns = {"x": value("x", -10.0, 2e9, bins=(0.0, 10.0, 20.0, 30.0))}
    return crafted(tmp_path, frame, columns, max_rows=1)


def test_a_copy_holds_bins_as_positions_and_they_are_the_labels(binned: Dataset, tmp_path: Path) -> None:
    """Half-open bins by position: an edge starts its bin; below, above, missing and NaN
    share the position past the last bin, as the string form puts them in no bin."""
    assert prepared_bins(binned) == {"x": [0.0, 10.0, 20.0, 30.0]}
    copy = pl.read_parquet(PreparedStore(tmp_path / "state").source(binned).path)
    assert copy.schema[bin_column("x")] == pl.UInt32
    assert copy.height == 12
    pairs = sorted(copy.select(pl.col("x").cast(pl.String), bin_column("x")).unique().rows(), key=str)
    expected = {"0.0": 0, "9.99": 0, "10.0": 1, "19.5": 1, "20.0": 2, "29.999": 2,
                "-1.0": 3, "30.0": 3, "1000000000.0": 3, None: 3, "NaN": 3}  # fmt: skip
    assert dict(pairs) == expected
    # The plan's string form (the identifier form's bucketing) names the same bin per row.
    plan = plan_for(binned, [COUNT], ["x"], epsilon=1e4)
    (by_label,) = DPQuery.compile(plan)._compiled.dims
    (by_position,) = DPQuery.compile(
        plan, source=PreparedStore(tmp_path / "state").source(binned)
    )._compiled.dims
    assert (by_label.coded, by_position.coded) == (False, True)
    rows = copy.select(by_label.prepare(), by_position.prepare().alias("position"))
    assert (
        rows.filter(pl.col("position") == 3)["x"].null_count() == rows.filter(pl.col("position") == 3).height
    )
    inside = rows.filter(pl.col("position") < 3)
    labels = by_position.label(inside.lazy().select(pl.col("position").alias("x"))).collect()["x"]
    assert labels.to_list() == inside["x"].to_list() and inside["x"].null_count() == 0


@pytest.mark.parametrize("filters", [(), (Between("x", 10.0, None),)], ids=["all", "filtered"])
def test_a_release_by_bin_positions_is_the_labelled_one(binned: Dataset, tmp_path: Path, filters) -> None:
    """Over the copy the plan groups bin positions; the release names the bins' labels in
    their order, and values in no bin are in no group, exactly as in the identifier form."""
    source = PreparedStore(tmp_path / "state").source(binned)
    expected = {"[0, 10)": 0 if filters else 2, "[10, 20)": 3, "[20, 30)": 2}
    for copy in (None, source):
        table = run(binned, [COUNT], ["x"], filters, source=copy, epsilon=1e4)
        assert table["x"].to_list() == list(expected), copy
        for key, count in zip(table["x"], table["count"]):
            assert count == pytest.approx(expected[key], abs=1), (copy, key)


def test_new_or_reordered_keys_are_a_new_copy(kinds: Dataset, tmp_path: Path) -> None:
    """Positions are the keys' order: an operator who reorders or adds keys gets a copy
    coded by the new keys, and the release still names each count's own key."""
    store = PreparedStore(tmp_path / "state")
    first = store.source(kinds)
    column = dataclasses.replace(kinds.columns["kind"], keys=("c", "a", "b", "d"))
    edited = dataclasses.replace(kinds, columns=MappingProxyType({**kinds.columns, "kind": column}))
    second = store.source(edited)
    assert second.fingerprint != first.fingerprint
    table = run(edited, [COUNT], ["kind"], source=second, epsilon=1e4)
    counts = dict(zip(table["kind"], table["count"]))
    assert counts.keys() == {"a", "b", "c", "d"}
    for key, expected in {"a": 7, "b": 5, "c": 0, "d": 0}.items():
        assert counts[key] == pytest.approx(expected, abs=1), key


def test_private_keys_beside_public_ones_release_the_datas_own_values(tmp_path: Path) -> None:
    """With a private key set in the query no dimension is grouped by position: the groups
    OpenDP releases above its threshold carry the data's values, outside the keys too."""
    values = ["a"] * 30 + ["z"] * 30 + [None] * 30
    frame = pl.DataFrame({"uid": [f"u{i}" for i in range(90)], "kind": values, "tag": ["t"] * 90})
    columns = {
        "kind": Column("kind", ColumnType.STRING, Classification.PUBLIC, keys=("b", "a")),
        "tag": Column("tag", ColumnType.STRING, Classification.PUBLIC),
    }
    kinds = crafted(tmp_path, frame, columns, max_rows=1)
    source = PreparedStore(tmp_path / "state").source(kinds)
    plan = plan_for(kinds, [COUNT], ["kind", "tag"], epsilon=50.0, delta=1e-6)
    assert not any(d.coded for d in DPQuery.compile(plan, source=source)._compiled.dims)
    groups = {}
    for form, copy in (("identifier", None), ("prepared", source)):
        table = run(kinds, [COUNT], ["kind", "tag"], source=copy, epsilon=50.0, delta=1e-6)
        groups[form] = set(zip(table["kind"], table["tag"]))
    # Outside the public keys and missing: the data's own values, apart, as by strings.
    assert groups["prepared"] == groups["identifier"] == {("a", "t"), ("z", "t"), (None, "t")}


def test_each_build_draws_new_unit_codes(crowd: Dataset, tmp_path: Path) -> None:
    """The codes follow a permutation nobody keeps: two builds of one version disagree."""

    def codes(state: Path) -> list[int]:
        copy = pl.read_parquet(PreparedStore(state).source(crowd).path)
        return copy.sort("seq")[UNIT_CODE].to_list()

    assert codes(tmp_path / "one") != codes(tmp_path / "two")


def test_concurrent_first_queries_build_the_copy_once(crowd: Dataset, tmp_path: Path, monkeypatch) -> None:
    store = PreparedStore(tmp_path / "state")
    builds = []
    original = PreparedStore._build

    def counting(self, *args):
        builds.append(args)
        return original(self, *args)

    monkeypatch.setattr(PreparedStore, "_build", counting)
    results: list[PreparedSource] = []
    threads = [threading.Thread(target=lambda: results.append(store.source(crowd))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(set(results)) == 1
    # A new store over the same state directory adopts the copy instead of building again.
    assert PreparedStore(tmp_path / "state").source(crowd) == results[0]
    assert len(builds) == 1
    assert copy_files(tmp_path / "state") == [results[0].path.name, results[0].path.name + ".tag"]


def test_a_new_data_version_gets_a_new_copy_and_the_old_one_goes(crowd: Dataset, tmp_path: Path) -> None:
    store = PreparedStore(tmp_path / "state")
    first = store.source(crowd)
    pl.read_parquet(crowd.path).head(10).write_parquet(crowd.path)
    second = store.source(crowd)
    assert second.fingerprint != first.fingerprint and second.path.exists()
    assert not first.path.exists() and not PreparedStore.tag_path(first.path).exists()
    assert second.scan().collect().height <= 10


def test_a_copy_of_the_single_file_layout_is_removed_once_its_successor_is_built(
    crowd: Dataset, tmp_path: Path
) -> None:
    prepared_dir = tmp_path / "state" / "prepared"
    prepared_dir.mkdir(parents=True)
    old = prepared_dir / "crafted-0123456789abcdef.parquet"  # layout 4: one file and its tag
    pl.read_parquet(crowd.path).write_parquet(old)
    PreparedStore.tag_path(old).write_text("{}")
    other = prepared_dir / "crafted_twin-0123456789abcdef.parquet"  # another dataset's: kept
    other.write_bytes(b"x")
    source = PreparedStore(tmp_path / "state").source(crowd)
    assert copy_files(tmp_path / "state") == sorted(
        [source.path.name, PreparedStore.tag_path(source.path).name, other.name]
    )


def test_a_copy_that_does_not_say_what_it_is_is_rebuilt(crowd: Dataset, tmp_path: Path) -> None:
    source = PreparedStore(tmp_path / "state").source(crowd)
    pl.DataFrame({"forged": [1]}).write_parquet(source.parts[0])  # a foreign file under the right name
    again = PreparedStore(tmp_path / "state").source(crowd)
    assert again == source and UNIT_CODE in again.scan().collect().columns
    (again.path / "notes.txt").write_text("not a part")  # anything else in the directory
    assert PreparedStore(tmp_path / "state").source(crowd).parts == again.parts
    assert sorted(p.name for p in again.path.iterdir()) == ["part-00000.parquet"]


def test_a_failed_build_leaves_no_file(crowd: Dataset, tmp_path: Path, monkeypatch) -> None:
    """The child built the copy, then tagging it fails: neither the copy nor its scratch
    stays behind (a child that fails is tests/test_serving_copy.py's)."""

    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr("dataops.engines.prepared.hash_file", broken)
    with pytest.raises(OSError):
        PreparedStore(tmp_path / "state").source(crowd)
    assert list((tmp_path / "state" / "prepared").iterdir()) == []


# --- the service reads the copy ------------------------------------------------------------


def test_the_sandbox_releases_from_the_copy_and_reuses_on_its_version(
    sandbox_dir: Path, tmp_path: Path
) -> None:
    catalog = load_catalog(REPO / "catalog", sandbox_dir)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    store = PreparedStore(tmp_path / "state")
    from dataops.products import load_products

    policies = PolicyStore(REPO / "policies", catalog, products=load_products(REPO / "products", catalog))
    sandbox = Sandbox(catalog, policies, Limits(), ledger,
                      today=lambda: dt.date(2026, 1, 1), prepared=store)  # fmt: skip
    query = Query("medical_claims", (Aggregate(Function.COUNT), Aggregate(Function.SUM, "amount")), (),
                  ("age_band",), Mode.DP, Privacy(epsilon=0.5))  # fmt: skip
    estimate = sandbox.estimate("harbor-insurance", query).result
    first = sandbox.run("harbor-insurance", query).result
    assert first.spend.epsilon == pytest.approx(0.5) == pytest.approx(estimate.spend.epsilon)
    assert first.accuracy == estimate.accuracy
    assert copy_files(tmp_path / "state") == [
        store.source(catalog.get("medical_claims")).path.name,
        store.source(catalog.get("medical_claims")).path.name + ".tag",
    ]
    again = sandbox.run("harbor-insurance", query)
    assert again.result.reused and again.result.table.equals(first.table)
    # The outcome the audit record is written from: what was asked, spent and returned.
    assert (again.dataset, again.mode, again.query, again.reused) == (
        "medical_claims",
        "dp",
        query.canonical(),
        True,
    )
    assert again.spent == PrivacyLoss.zero() and again.rows_returned == first.table.num_rows
    # Refused: the outcome as far as the flow got rides on the error, nothing spent.
    greedy = dataclasses.replace(query, privacy=Privacy(epsilon=MAX_EPSILON))  # above the grant's 5
    with pytest.raises(BudgetExhausted) as refused:
        sandbox.run("harbor-insurance", greedy)
    outcome = refused.value.outcome
    assert (outcome.dataset, outcome.query, outcome.spent, outcome.result) == (
        "medical_claims",
        greedy.canonical(),
        PrivacyLoss.zero(),
        None,
    )
    assert outcome.purpose == policies.current.consumers["harbor-insurance"].grants["medical_claims"].purpose
    ledger.close()


def test_the_server_prepares_copies_in_the_background(server, connect) -> None:
    result = connect("harbor-insurance").query(
        "medical_claims",
        aggregates=[Aggregate(Function.COUNT)],
        group_by=["age_band"],
        mode="dp",
        epsilon=0.5,
    )
    assert result.frame["age_band"].to_list() == ["0-17", "18-29", "30-44", "45-59", "60-74", "75+"]
    names = sorted(p.name.split("-")[0] for p in (server.config.paths.state / "prepared").glob("*.copy"))
    assert "medical_claims" in names


def test_the_service_and_the_store_share_one_data_version_per_dataset(
    sandbox_dir: Path, tmp_path: Path
) -> None:
    catalog = load_catalog(REPO / "catalog", sandbox_dir)
    store = PreparedStore(tmp_path / "state")
    from dataops.products import load_products

    products = load_products(REPO / "products", catalog)
    sandbox = Sandbox(catalog, PolicyStore(REPO / "policies", catalog, products=products),
                      Limits(), Ledger(tmp_path / "l.sqlite3"),
                      prepared=store)  # fmt: skip
    dataset = catalog.get("medical_claims")
    assert sandbox.versions is store.versions
    assert (
        store.source(dataset).data_version
        == sandbox.versions.of(dataset)
        == hashlib.sha256(dataset.path.read_bytes()).hexdigest()
    )
    sandbox.ledger.close()
    sandbox.close()


# --- authenticated copies ------------------------------------------------------------------


def plant_untruncated(store: PreparedStore, dataset: Dataset) -> Path:
    """The attack: overwrite the copy with every row of every unit (no truncation), and
    give it a tag that names exactly the right dataset, version, key, cap and layout."""
    source = store.source(dataset)
    raw = pl.read_parquet(dataset.path)
    codes = raw["uid"].rank("dense").cast(pl.UInt64)
    planted = (
        raw.select(pl.lit(0).alias("drop"), *prepared_column_names(dataset))
        .drop("drop")
        .with_columns(codes.alias(UNIT_CODE))
    )
    for part in source.parts:
        part.unlink()
    planted.write_parquet(source.path / "part-00000.parquet")
    tag_path = PreparedStore.tag_path(source.path)
    tag = json.loads(tag_path.read_text())
    tag["sha256"] = prepared.hash_copy(source.path)[0]  # the attacker cannot redo the MAC
    tag_path.write_text(json.dumps(tag))
    return source.path


@ON_OFF
def test_a_planted_untruncated_copy_is_refused(crowd: Dataset, tmp_path: Path, control: str) -> None:
    """Attack: with write access to state/prepared, replace a copy by an untruncated one
    carrying the right metadata; every unit then counts with all its rows (up to 5 with
    k = 3) and the DP guarantee, proved for k rows per unit, is void. Control: the copy's
    tag is an HMAC under the server secret over its claims and the copy's SHA-256."""
    state = tmp_path / "state"
    plant_untruncated(PreparedStore(state), crowd)
    store = PreparedStore(state, authenticate=(control == "on"))  # a restarted server
    copy = store.source(crowd).scan().collect()
    heaviest = copy.group_by(UNIT_CODE).len()["len"].max()
    plan = plan_for(crowd, [COUNT], epsilon=1e4)
    compiled = DPQuery.compile(plan, source=store.source(crowd))
    released = pl.from_arrow(compiled.release(compiled.calibrate(Privacy(epsilon=1e4))).table)["count"][0]
    truncated = pl.read_parquet(crowd.path).filter(pl.int_range(pl.len()).over("uid") < 3).height
    if control == "on":  # the planted copy was rebuilt: at most k rows per unit
        assert heaviest == 3 and released == pytest.approx(truncated, abs=2)
    else:  # the planted copy was read: units contribute beyond the cap the loss was proved for
        assert heaviest == 5 and released == pytest.approx(pl.read_parquet(crowd.path).height, abs=2)
        assert released > truncated + 10


def test_a_copy_swapped_after_it_was_adopted_is_checked_again(crowd: Dataset, tmp_path: Path) -> None:
    store = PreparedStore(tmp_path / "state")
    first = store.source(crowd)
    plant_untruncated(PreparedStore(tmp_path / "state"), crowd)  # while `store` is serving
    again = store.source(crowd)
    assert again.path == first.path
    assert again.scan().collect().group_by(UNIT_CODE).len()["len"].max() == 3


@ON_OFF
def test_a_part_added_beside_the_tagged_ones_is_refused(
    crowd: Dataset, tmp_path: Path, monkeypatch, control: str
) -> None:
    """Attack: leave the tagged part alone and add a second one holding more rows of the
    same units (no tag to forge at all); every unit then counts up to k more rows.
    Control: the copy's hash covers its parts' names as well as their bytes, so a part
    added, removed or renamed is a copy that does not verify. Off: a hash of the first
    part alone, as if a copy were one file."""
    if control == "off":
        real = prepared.hash_copy

        def first_part_only(path: Path):
            _, parts, signature = real(path)
            return hashlib.sha256(parts[0].read_bytes()).hexdigest(), parts, signature

        monkeypatch.setattr(prepared, "hash_copy", first_part_only)
    state = tmp_path / "state"
    source = PreparedStore(state).source(crowd)
    tagged = source.scan().collect()
    tagged.write_parquet(source.path / "part-00001.parquet")  # each unit's k rows again
    served = PreparedStore(state).source(crowd)  # a restarted server
    heaviest = served.scan().collect().group_by(UNIT_CODE).len()["len"].max()
    if control == "on":  # rebuilt: one part, k rows per unit
        assert heaviest == 3 and [p.name for p in served.parts] == ["part-00000.parquet"]
    else:  # the added part is read: twice the cap the loss was proved for
        assert heaviest == 6 and len(served.parts) == 2


def test_a_tag_made_with_another_secret_is_refused(crowd: Dataset, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = PreparedStore(state).source(crowd)
    built = first.parts[0].read_bytes()
    (state / "prepared.key").unlink()  # a new secret: the old tag no longer verifies
    assert PreparedStore(state).source(crowd).parts[0].read_bytes() != built  # rebuilt (new codes)


def test_the_secret_and_the_copies_are_private_to_the_server(crowd: Dataset, tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "prepared").mkdir(parents=True, mode=0o777)
    (state / "prepared").chmod(0o777)
    PreparedStore(state)
    assert stat.S_IMODE((state / "prepared").stat().st_mode) == 0o700  # nobody else can plant a copy
    key = state / "prepared.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"prepared\.key: mode 644.*readable by the server's user only"):
        PreparedStore(state)


# --- data versions ---------------------------------------------------------------------------


def same_size_rewrite(path: Path, values: list[int]) -> None:
    """Write `values` with a fixed-width layout, so different values give the same file size."""
    table = pa.table({"uid": [f"u{i:03d}" for i in range(len(values))], "seq": pa.array(values, pa.int64())})
    pq.write_table(table, path, compression="none", use_dictionary=False, write_statistics=False)


@pytest.fixture
def fixed(tmp_path: Path) -> Dataset:
    seq = Column("seq", ColumnType.INT, Classification.PUBLIC, bounds=(0, 10_000))
    dataset = crafted(tmp_path, pl.DataFrame({"uid": ["u"], "seq": [0]}), {"seq": seq}, max_rows=1)
    same_size_rewrite(dataset.path, list(range(100)))
    return dataset


def size_and_mtime(st) -> tuple:
    return (st.st_size, st.st_mtime_ns)


@ON_OFF
def test_a_file_replaced_with_the_same_size_and_mtime_is_a_new_version(fixed: Dataset, tmp_path: Path,
                                                                          control: str) -> None:  # fmt: skip
    """Attack: replace the data with a file of the same size and mtime; a store keyed by
    (size, mtime) keeps serving the stale copy (and reusing stale releases). Control: the
    stat signature includes inode and ctime, which no unprivileged writer can keep."""
    signature = stat_signature if control == "on" else size_and_mtime
    store = PreparedStore(tmp_path / "state", DataVersions(recheck_seconds=math.inf, signature=signature))
    first = store.source(fixed)
    before = os.stat(fixed.path)
    replacement = tmp_path / "replacement.parquet"
    same_size_rewrite(replacement, [v + 1000 for v in range(100)])
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, fixed.path)
    after = os.stat(fixed.path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = store.source(fixed)
    served = second.scan().collect()["seq"].min()
    if control == "on":
        assert second.data_version != first.data_version and served == 1000
    else:
        assert second == first and served == 0  # stale


def test_the_content_is_hashed_again_periodically_whatever_stat_says(fixed: Dataset) -> None:
    """On a filesystem whose stat says nothing (here: a signature that never changes), the
    periodic re-hash still finds the new content."""
    now = [0.0]
    versions = DataVersions(recheck_seconds=60.0, signature=lambda st: (), clock=lambda: now[0])
    first = versions.of(fixed)
    same_size_rewrite(fixed.path, [7] * 100)
    assert versions.of(fixed) == first  # within the period: the cached hash
    assert versions.verify(fixed) != first  # an explicit check always hashes
    versions = DataVersions(recheck_seconds=60.0, signature=lambda st: (), clock=lambda: now[0])
    versions.of(fixed)
    same_size_rewrite(fixed.path, [8] * 100)
    now[0] = 61.0
    assert versions.of(fixed) == hashlib.sha256(fixed.path.read_bytes()).hexdigest()
