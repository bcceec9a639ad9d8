"""Prepared copies: truncation enforced once, and the same privacy loss as truncating per plan."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import polars as pl
import pytest

from dataops.audit.record import CallRecord
from dataops.catalog import Classification, Column, ColumnType, Dataset, load_catalog
from dataops.config import Limits
from dataops.demo.generate import generate
from dataops.engines import prepared as prepared_module
from dataops.engines.dp import UNIT_CODE, DPQuery, PreparedSource
from dataops.engines.prepared import PreparedStore
from dataops.errors import InternalError
from dataops.ir import Aggregate, Equals, Function, Mode, Privacy, Query
from dataops.ledger import Ledger
from dataops.policy import PolicyStore
from dataops.service import Sandbox

from test_dp_engine import COUNT, UNITS, crafted, plan_for, value

REPO = Path(__file__).resolve().parent.parent
SUM = Aggregate(Function.SUM, "amount")
MEAN = Aggregate(Function.MEAN, "amount")
MEDIAN = Aggregate(Function.QUANTILE, "amount", 0.5)


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
    k = claims.max_rows_per_unit
    identifier, prepared = losses(claims, source, [COUNT], ["age_band"], scale=8.0)
    assert identifier.epsilon == prepared.epsilon == pytest.approx(k / 8.0)


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
    cheap = DPQuery.compile(plan_for(claims, [COUNT], epsilon=1.0), source=source)
    cheap = cheap.calibrate(Privacy(epsilon=1.0))
    dear = DPQuery.compile(plan_for(claims, [COUNT, SUM], epsilon=1.0), source=source)
    with pytest.raises(InternalError):
        dear.release(cheap)


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


# --- the store ---------------------------------------------------------------------------


@pytest.fixture
def crowd(tmp_path: Path) -> Dataset:
    """Units with 1 to 5 rows in a known order, an extra column the catalog does not know."""
    uids = [f"u{i}" for i in range(40) for _ in range(1 + i % 5)]
    frame = pl.DataFrame({
        "uid": uids,
        "seq": list(range(len(uids))),
        "x": [float(i % 7) for i in range(len(uids))],
        "secret": ["not in the catalog"] * len(uids),
    }).sample(fraction=1.0, shuffle=True, seed=7)  # fmt: skip
    columns = {"seq": Column("seq", ColumnType.INT, Classification.PUBLIC), "x": value("x", 0.0, 10.0)}
    return crafted(tmp_path, frame, columns, max_rows=3)


def test_the_copy_keeps_each_units_first_k_rows_and_catalog_columns(crowd: Dataset, tmp_path: Path) -> None:
    source = PreparedStore(tmp_path / "state").source(crowd)
    assert source.path == tmp_path / "state" / "prepared" / f"crafted-{source.fingerprint[:16]}.parquet"
    copy = pl.read_parquet(source.path)
    assert set(copy.columns) == {UNIT_CODE, "seq", "x", "#x"}  # no raw unit id, no unknown column
    raw = pl.read_parquet(crowd.path)
    expected = raw.filter(pl.int_range(pl.len()).over("uid") < 3)
    assert sorted(copy["seq"]) == sorted(expected["seq"])
    assert copy.group_by(UNIT_CODE).len()["len"].max() == 3
    assert copy["#x"].to_list() == (copy["x"] * 1e6).round().cast(pl.Int64).to_list()


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
    assert [p.name for p in (tmp_path / "state" / "prepared").iterdir()] == [results[0].path.name]


def test_a_new_data_version_gets_a_new_copy_and_the_old_one_goes(crowd: Dataset, tmp_path: Path) -> None:
    store = PreparedStore(tmp_path / "state")
    first = store.source(crowd)
    pl.read_parquet(crowd.path).head(10).write_parquet(crowd.path)
    second = store.source(crowd)
    assert second.fingerprint != first.fingerprint and second.path.exists()
    assert not first.path.exists()
    assert pl.read_parquet(second.path).height <= 10


def test_a_copy_that_does_not_say_what_it_is_is_rebuilt(crowd: Dataset, tmp_path: Path) -> None:
    source = PreparedStore(tmp_path / "state").source(crowd)
    pl.DataFrame({"forged": [1]}).write_parquet(source.path)  # a foreign file under the right name
    again = PreparedStore(tmp_path / "state").source(crowd)
    assert again == source and UNIT_CODE in pl.read_parquet(again.path).columns


def test_a_failed_build_leaves_no_file(crowd: Dataset, tmp_path: Path, monkeypatch) -> None:
    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken)
    with pytest.raises(OSError):
        PreparedStore(tmp_path / "state").source(crowd)
    assert list((tmp_path / "state" / "prepared").iterdir()) == []


# --- the service reads the copy ------------------------------------------------------------


def test_the_sandbox_releases_from_the_copy_and_reuses_on_its_version(sandbox_dir: Path, tmp_path: Path) -> None:
    catalog = load_catalog(REPO / "catalog", sandbox_dir)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    store = PreparedStore(tmp_path / "state")
    sandbox = Sandbox(catalog, PolicyStore(REPO / "policies", catalog), Limits(), ledger,
                      today=lambda: dt.date(2026, 1, 1), prepared=store)  # fmt: skip
    query = Query("medical_claims", (Aggregate(Function.COUNT), Aggregate(Function.SUM, "amount")), (),
                  ("age_band",), Mode.DP, Privacy(epsilon=0.5))  # fmt: skip
    estimate = sandbox.estimate("harbor-insurance", query, CallRecord("Estimate"))
    first = sandbox.run("harbor-insurance", query, CallRecord("RunQuery"))
    assert first.spend.epsilon == pytest.approx(0.5) == pytest.approx(estimate.spend.epsilon)
    assert first.accuracy == estimate.accuracy
    assert [p.name for p in (tmp_path / "state" / "prepared").iterdir()] == [
        store.source(catalog.get("medical_claims")).path.name]
    again = sandbox.run("harbor-insurance", query, CallRecord("RunQuery"))
    assert again.reused and again.table.equals(first.table)
    ledger.close()


def test_the_server_prepares_copies_in_the_background(server, connect) -> None:
    result = connect("harbor-insurance").query(
        "medical_claims", aggregates=[Aggregate(Function.COUNT)], group_by=["age_band"], mode="dp", epsilon=0.5,
    )
    assert result.frame["age_band"].to_list() == ["0-17", "18-29", "30-44", "45-59", "60-74", "75+"]
    names = sorted(p.name.split("-")[0] for p in (server.config.paths.state / "prepared").glob("*.parquet"))
    assert "medical_claims" in names


def test_the_module_keeps_fingerprints_importable_from_the_service() -> None:
    from dataops import service

    assert service.Fingerprints is prepared_module.Fingerprints
