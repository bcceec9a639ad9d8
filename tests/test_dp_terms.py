"""A DP query's own terms (issue 13): row bound, clipping bounds, automatic clipping,
budget weights, zCDP grants and consistent tables, as a specification.

Engine tests run in both forms (OpenDP truncating in the plan, and the prepared copy);
the budget and reuse tests run over the real server.
"""

from __future__ import annotations

import dataclasses
import math
import sqlite3
from pathlib import Path

import grpc
import numpy as np
import opendp.prelude as dp
import polars as pl
import pytest

from dataops.catalog import Dataset, load_catalog
from dataops.client import DataopsClientError, count, total
from dataops.demo.generate import generate
from dataops.engines.dp import DPQuery
from dataops.engines.dp_autoclip import AutoClippedQuery, compile_query
from dataops.engines.dp_calibrate import rho_for_epsilon, zcdp_to_epsilon
from dataops.engines.dp_post import consistent_column, project_to_total
from dataops.errors import InvalidQuery
from dataops.ir import Aggregate, Function, MeasureTerms, Mode, Privacy, Query
from dataops.server.app import ledger_path
from dataops.values import PrivacyLoss
from test_dp_engine import COUNT, FORMS, REPO, crafted, plan_for, source_for, value

SUM = Aggregate(Function.SUM, "amount")
MEAN = Aggregate(Function.MEAN, "amount")
MEDIAN = Aggregate(Function.QUANTILE, "amount", 0.5)


@pytest.fixture(scope="module")
def claims(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    sandbox = tmp_path_factory.mktemp("terms") / "sandbox"
    generate(sandbox, enterprises=300, claims=5_000)
    return load_catalog(REPO / "catalog", sandbox).get("medical_claims")


def zcdp(plan):
    return dataclasses.replace(plan, grant=dataclasses.replace(plan.grant, accounting="zcdp"))


def scales(compiled: DPQuery, calibration) -> dict[str, float]:
    """OpenDP's own summary of the noise scale of every released column (fixed point)."""
    out = {}
    for m in compiled._compiled.build(calibration.scale, calibration.threshold):
        for row in dp.summarize_polars_measurement(m).iter_rows(named=True):
            out[row["column"]] = row["scale"]
    return out


# --- terms inside the catalog's, or refused naming the field ---------------------------


@pytest.mark.parametrize("privacy, field", [
    (dict(measures=(MeasureTerms("amount", upper=600_000.0),)), "query.privacy.measures[0].upper"),
    (dict(measures=(MeasureTerms("amount", lower=-1.0, upper=10.0),)), "query.privacy.measures[0].lower"),
    (dict(max_rows_per_unit=41), "query.privacy.max_rows_per_unit"),
])  # fmt: skip
def test_terms_outside_the_catalogs_are_refused_naming_the_field(claims, privacy, field) -> None:
    with pytest.raises(InvalidQuery) as err:
        DPQuery.compile(plan_for(claims, [SUM], epsilon=1.0, **privacy))
    assert [v.field for v in err.value.field_violations] == [field]


def test_terms_are_refused_over_the_wire_as_invalid_argument(connect, server) -> None:
    client = connect("harbor-insurance")
    query = Query("medical_claims", (SUM,), mode=Mode.DP,
                  privacy=Privacy(epsilon=0.5, measures=(MeasureTerms("amount", upper=1e9),)))  # fmt: skip
    with pytest.raises(DataopsClientError) as err:
        client.run(query)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and err.value.reason == "INVALID_QUERY"
    assert [f for f, _ in err.value.field_violations] == ["query.privacy.measures[0].upper"]
    assert server.ledger.spent("harbor-insurance", "medical_claims") == PrivacyLoss(0.0, 0.0)


def test_the_spend_is_opendps_map_for_the_terms_used(claims, tmp_path) -> None:
    for source in (None, source_for("prepared", claims, tmp_path)):
        plan = plan_for(claims, [COUNT, SUM], ["age_band"], epsilon=0.7, max_rows_per_unit=5,
                        measures=(MeasureTerms("amount", 0.0, 50_000.0),))  # fmt: skip
        compiled = DPQuery.compile(plan, source=source)
        calibration = compiled.calibrate(plan.query.privacy)
        c = compiled._compiled
        losses = [m.map(s.d_in) for m, s in zip(c.build(calibration.scale, None), c.stages)]
        assert calibration.cost.epsilon == math.fsum(losses) <= 0.7
        assert calibration.cost.epsilon == pytest.approx(0.7)
        # The terms really are the ones noised for: a unit moves a group's count by at most
        # 5 and its sum by 5 * 50 000 (fixed point: 3 decimals), each at half the budget.
        noise = scales(compiled, calibration)
        assert noise["count"] == pytest.approx(5 / 0.35)
        assert noise["sum_amount"] == pytest.approx(5 * 50_000 * 1000 / 0.35)


def test_the_clients_estimate_carries_the_notes_and_its_receipt(connect, server) -> None:
    """The notes cross the wire into the one `Estimate` value (the client used to drop them)."""
    client = connect("harbor-insurance")
    terms = Privacy(epsilon=1.0, max_rows_per_unit=5, measures=(MeasureTerms("amount", upper=5e4),))
    estimate = client.estimate_query(Query("medical_claims", (MEAN,), mode=Mode.DP, privacy=terms))
    assert any("clipping bias possible" in n for n in estimate.notes)
    assert any("truncation bias" in n for n in estimate.notes)
    assert estimate.receipt is not None and estimate.receipt.sequence > 0
    plain = client.estimate_query(
        Query("medical_claims", (MEAN,), mode=Mode.DP, privacy=Privacy(epsilon=1.0))
    )
    assert plain.notes == () and plain.spend.epsilon == pytest.approx(1.0)


def test_an_estimate_says_when_the_terms_may_bias(claims) -> None:
    tight = plan_for(
        claims, [MEAN], epsilon=1.0, max_rows_per_unit=5, measures=(MeasureTerms("amount", upper=5e4),)
    )
    notes = DPQuery.compile(tight).calibrate(tight.query.privacy).notes
    assert any("clipping bias possible" in n for n in notes) and any("truncation bias" in n for n in notes)
    catalog = plan_for(claims, [MEAN], epsilon=1.0)
    assert DPQuery.compile(catalog).calibrate(catalog.query.privacy).notes == ()


# --- a smaller row bound really truncates ---------------------------------------------


@pytest.fixture
def heavy(tmp_path: Path) -> tuple[Dataset, Dataset]:
    """The same 50 one-row units, with and without one unit of 40 rows (the catalog cap)."""
    others = {"uid": [f"u{i}" for i in range(50)], "x": [10.0] * 50}
    columns = {"x": value("x", 0.0, 100.0)}
    with_unit = pl.DataFrame({"uid": ["heavy"] * 40 + others["uid"], "x": [100.0] * 40 + others["x"]})
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    return (crafted(tmp_path / "a", with_unit, columns, max_rows=40),
            crafted(tmp_path / "b", pl.DataFrame(others), columns, max_rows=40))  # fmt: skip


def released(dataset, source, k, enforce=True) -> tuple[float, float]:
    aggregates = [COUNT, Aggregate(Function.SUM, "x")]
    plan = plan_for(dataset, aggregates, epsilon=100.0, max_rows_per_unit=k)
    compiled = DPQuery.compile(plan, source=source, enforce_row_bound=enforce)
    calibration = compiled.calibrate(plan.query.privacy)
    return pl.from_arrow(compiled.release(calibration).table).row(0)


@pytest.mark.parametrize("form", FORMS)
def test_a_smaller_row_bound_really_truncates_each_unit(heavy, form, tmp_path) -> None:
    # At epsilon 100 the count's noise is a fraction of a row and the sum's a few units
    # (Laplace b = 2 * 100 / 50): a unit of 40 rows (each at the bound) may move the
    # count by 2 and the sum by 2 * 100, no more.
    (a, b), k = heavy, 2
    count_a, sum_a = released(a, source_for(form, a, tmp_path / "sa"), k)
    count_b, sum_b = released(b, source_for(form, b, tmp_path / "sb"), k)
    assert abs(count_a - count_b) <= k + 1
    assert abs(sum_a - sum_b) <= k * 100 + 40  # 10 b of noise


def test_with_the_truncation_switched_off_the_sensitivity_assumption_is_violated(heavy, tmp_path) -> None:
    # The control off: the prepared copy (40 rows per unit) read as if it held 2. The
    # calibration still charges for 2 rows, yet the one unit moves the answer by 40.
    (a, b), k = heavy, 2
    count_a, sum_a = released(a, source_for("prepared", a, tmp_path / "sa"), k, enforce=False)
    count_b, sum_b = released(b, source_for("prepared", b, tmp_path / "sb"), k, enforce=False)
    assert abs(count_a - count_b) > 10 * k
    assert abs(sum_a - sum_b) > 10 * k * 100


# --- budget weights ---------------------------------------------------------------------


def test_weights_split_the_epsilon_between_aggregates(claims) -> None:
    weighted = [Aggregate(Function.COUNT, weight=3.0), Aggregate(Function.SUM, "amount", weight=1.0)]
    plan = plan_for(claims, weighted, epsilon=1.0, max_rows_per_unit=5)
    compiled = DPQuery.compile(plan)
    calibration = compiled.calibrate(plan.query.privacy)
    noise = scales(compiled, calibration)
    assert calibration.cost.epsilon == pytest.approx(1.0)
    assert noise["count"] == pytest.approx(5 / 0.75)  # 3/4 of epsilon
    assert noise["sum_amount"] == pytest.approx(5 * 500_000 * 1000 / 0.25)


def test_by_default_a_median_takes_less_than_a_mean_and_a_mean_favours_its_sum(claims) -> None:
    plan = plan_for(claims, [MEAN, MEDIAN], epsilon=1.0, max_rows_per_unit=5)
    compiled = DPQuery.compile(plan)
    calibration = compiled.calibrate(plan.query.privacy)
    noise = scales(compiled, calibration)
    # Default weights: mean 1.5 (3:1 sum:count), quantile 0.5, of 2.0 in all.
    assert noise["#sum:mean_amount"] == pytest.approx(5 * 500_000 * 1000 / (1.5 * 0.75 / 2.0))
    assert noise["#count:mean_amount"] == pytest.approx(5 / (1.5 * 0.25 / 2.0))
    assert calibration.cost.epsilon == pytest.approx(1.0)


def test_weights_are_public_terms_in_the_canonical_query(claims) -> None:
    a = plan_for(claims, [Aggregate(Function.COUNT, weight=2.0), SUM], epsilon=1.0).query
    b = plan_for(claims, [COUNT, SUM], epsilon=1.0).query
    assert a.canonical() != b.canonical()


# --- automatic clipping -----------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_automatic_clipping_spends_exactly_the_query_epsilon_in_two_parts(claims, form, tmp_path) -> None:
    privacy = dict(epsilon=2.0, measures=(MeasureTerms("amount", auto_clip_share=0.25),))
    plan = plan_for(claims, [MEAN, SUM], ["age_band"], **privacy)
    query = compile_query(plan, source_for(form, claims, tmp_path))
    assert isinstance(query, AutoClippedQuery)
    calibration = query.calibrate(plan.query.privacy)
    assert calibration.cost.epsilon == 2.0 and calibration.cost.delta == 0.0
    assert [q._compiled.query.privacy.epsilon for q in query.quantiles] == [0.5]
    table = pl.from_arrow(query.release(calibration).table)
    assert table["mean_amount"].is_between(0.0, 500_000.0).all()
    assert any("quantile" in n for n in calibration.notes)


def test_automatic_clipping_debits_one_reservation_for_both_parts(connect, server, config) -> None:
    client = connect("harbor-insurance")
    privacy = Privacy(epsilon=1.0, measures=(MeasureTerms("amount", auto_clip_share=0.2),))
    query = Query("medical_claims", (MEAN,), group_by=("age_band",), mode=Mode.DP, privacy=privacy)
    result = client.run(query)
    assert result.spend.epsilon == pytest.approx(1.0)
    assert server.ledger.spent("harbor-insurance", "medical_claims").epsilon == pytest.approx(1.0)
    with sqlite3.connect(ledger_path(config)) as db:
        rows = db.execute(
            "SELECT status, epsilon FROM reservations WHERE consumer = 'harbor-insurance'"
        ).fetchall()
    assert rows == [("released", 10**12)]  # one reservation, the whole epsilon (1e-12 units)


# --- release keys -----------------------------------------------------------------------


def test_the_release_key_differs_when_the_terms_differ(connect, server) -> None:
    client = connect("harbor-insurance")

    def ask(**terms):
        privacy = Privacy(epsilon=0.25, **terms)
        return client.run(Query("medical_claims", (SUM,), mode=Mode.DP, privacy=privacy))

    first = ask(max_rows_per_unit=5)
    assert ask(max_rows_per_unit=5).reused  # the same terms: the same release, free
    others = [ask(max_rows_per_unit=4), ask(measures=(MeasureTerms("amount", upper=1e5),))]
    assert not any(r.reused for r in others) and not first.reused
    assert server.ledger.spent("harbor-insurance", "medical_claims").epsilon == pytest.approx(0.75)


# --- zCDP grants ------------------------------------------------------------------------


def test_zcdp_costs_are_opendps_conversion_of_the_composed_rho(claims, tmp_path) -> None:
    plan = zcdp(plan_for(claims, [COUNT, MEAN, Aggregate(Function.COUNT_UNITS)], ["age_band"],
                         epsilon=1.0, delta=1e-6))  # fmt: skip
    for source in (None, source_for("prepared", claims, tmp_path)):
        compiled = DPQuery.compile(plan, source=source)
        calibration = compiled.calibrate(plan.query.privacy)
        c = compiled._compiled
        rho = math.fsum(m.map(s.d_in) for m, s in zip(c.build(calibration.scale, None), c.stages))
        assert calibration.rho == rho
        assert calibration.cost.epsilon == zcdp_to_epsilon(rho, 1e-6) <= 1.0
        assert calibration.cost.delta == 1e-6
        assert {a.mechanism for a in calibration.accuracy} == {"discrete_gaussian"}


def test_zcdp_to_epsilon_never_under_counts() -> None:
    # Each debit is OpenDP's conversion of a query's rho; adding debits (what the ledger
    # does) is basic composition of (epsilon, delta), never below converting the sum.
    base = dp.m.make_gaussian(dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=1.0)
    for rho in (1e-4, 0.02, 0.5):
        d = math.sqrt(2 * rho)
        assert base.map(d) >= rho * (1 - 1e-15)
        assert (
            zcdp_to_epsilon(rho, 1e-6)
            >= dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(base), 1e-6).map(d)[0] - 1e-12
        )
    rhos = [0.01, 0.02, 0.03]
    debits = sum(zcdp_to_epsilon(r, 1e-6) for r in rhos)
    assert debits >= zcdp_to_epsilon(sum(rhos), 3e-6)
    assert zcdp_to_epsilon(rho_for_epsilon(0.5, 1e-6), 1e-6) <= 0.5


def set_accounting(config, consumer: str, accounting: str, epsilon: float) -> None:
    path = config.paths.policies / f"{consumer}.toml"
    text = path.read_text().replace("[[grants]]\n", f'[[grants]]\naccounting = "{accounting}"\n', 1)
    start = text.index("[grants.budget]")
    end = text.index("\n[", start + 1)
    path.write_text(text[:start] + f"[grants.budget]\nepsilon = {epsilon}\ndelta = 1e-6\n" + text[end:])


def test_a_zcdp_grant_never_spends_beyond_its_budget(config, pki) -> None:
    from dataops.client import Client
    from dataops.server import build_server

    set_accounting(config, "harbor-insurance", "zcdp", 2.0)
    server = build_server(config).start()
    try:
        client = Client.from_directory(f"localhost:{server.port}", pki.consumer_dir("harbor-insurance"),
                                       "harbor-insurance")  # fmt: skip
        spent, answered = spend_until_refused(client)
        epsilon, delta = server.ledger.spent("harbor-insurance", "medical_claims")
    finally:
        client.close()
        server.stop(grace=1.0)
    # The ledger composes rho (tests/test_zcdp_ledger.py): more releases of 0.7 fit in 2.0
    # than the 2 that adding per-release conversions allows, and then it refuses.
    assert 2 < answered < 12 and epsilon == pytest.approx(spent) and epsilon <= 2.0 and delta == 1e-6


def spend_until_refused(client) -> tuple[float, int]:
    spent, answered = 0.0, 0
    for i in range(12):
        try:
            result = client.query("medical_claims", aggregates=[count(), total("amount")], group_by=["age_band"],
                                  mode="dp", epsilon=0.7 + i * 1e-6, delta=1e-7)  # fmt: skip
        except DataopsClientError as err:
            assert err.reason == "BUDGET_EXHAUSTED"
            continue
        answered += 1
        spent += result.spend.epsilon
        assert result.accuracy["count"].mechanism == "discrete_gaussian"
        assert result.spend.epsilon <= 0.7 + i * 1e-6 and result.spend.delta == (
            1e-6 if answered == 1 else 0.0
        )
    return spent, answered


def test_a_zcdp_grant_without_delta_or_an_unknown_accounting_is_refused(config) -> None:  # noqa: D103
    from dataops.errors import LoadError
    from dataops.policy import load_policies
    from dataops.products import load_products

    catalog = load_catalog(config.paths.catalog, config.paths.sandbox)
    products = load_products(config.paths.products, catalog)  # the grants name table products
    load_policies(config.paths.policies, catalog, products)  # valid as shipped
    set_accounting(config, "harbor-insurance", "renyi", 2.0)
    with pytest.raises(LoadError, match="accounting"):
        load_policies(config.paths.policies, catalog, products)
    path = config.paths.policies / "harbor-insurance.toml"
    path.write_text(path.read_text().replace('"renyi"', '"zcdp"').replace("delta = 1e-6", "delta = 0.0"))
    with pytest.raises(LoadError, match="zcdp grant needs delta"):
        load_policies(config.paths.policies, catalog, products)


# --- consistent tables ------------------------------------------------------------------


def test_projection_keeps_the_total_and_never_goes_negative() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        cells = rng.normal(5, 20, size=rng.integers(1, 12))
        values, total_ = consistent_column(cells)
        assert values.dtype == np.int64 and (values >= 0).all()
        assert values.sum() == total_ == max(0, round(cells.sum()))
    # Already consistent cells are left alone.
    assert list(project_to_total(np.array([1.0, 2.0, 3.0]), 6.0)) == [1.0, 2.0, 3.0]


def test_a_consistent_dp_table_has_non_negative_integer_cells(claims) -> None:
    plan = plan_for(claims, [COUNT, Aggregate(Function.SUM, "amount")], ["district", "sex"], epsilon=0.05,
                    consistent=True)  # fmt: skip
    compiled = DPQuery.compile(plan)
    table = pl.from_arrow(compiled.release(compiled.calibrate(plan.query.privacy)).table)
    for name in ("count", "sum_amount"):
        assert table[name].dtype == pl.Int64 and (table[name] >= 0).all()


def test_the_estimate_over_the_wire_carries_the_bias_notes_and_spends_nothing(connect, server) -> None:
    from dataops import wire
    from dataops.v1 import query_pb2

    client = connect("harbor-insurance")
    privacy = Privacy(epsilon=0.5, max_rows_per_unit=5, measures=(MeasureTerms("amount", upper=5e4),))
    query = Query("medical_claims", (MEAN,), group_by=("age_band",), mode=Mode.DP, privacy=privacy)
    request = query_pb2.EstimateQueryRequest(query=wire.query_to_proto(query))
    estimate = client._call(client._query.EstimateQuery, request)
    assert estimate.spend.epsilon == pytest.approx(0.5)
    assert any("clipping bias possible" in n for n in estimate.notes)
    assert any("truncated to 5 rows" in n for n in estimate.notes)
    assert server.ledger.spent("harbor-insurance", "medical_claims") == PrivacyLoss(0.0, 0.0)


def test_terms_and_weights_cross_the_wire_unchanged() -> None:
    from dataops import wire

    privacy = Privacy(
        epsilon=0.5,
        max_rows_per_unit=5,
        consistent=True,
        measures=(
            MeasureTerms("amount", lower=0.0),
            MeasureTerms("reimbursed", upper=1e4, auto_clip_share=0.0),
        ),
    )
    query = Query("medical_claims", (Aggregate(Function.SUM, "amount", weight=2.0), Aggregate(Function.MEAN, "reimbursed")),
                  group_by=("age_band",), mode=Mode.DP, privacy=privacy)  # fmt: skip
    again = wire.query_from_proto(wire.query_to_proto(query))
    assert again == query and again.canonical() == query.canonical()
    auto = dataclasses.replace(
        privacy, measures=(MeasureTerms("amount", auto_clip_share=0.3, auto_clip_quantile=0.9),)
    )
    query = dataclasses.replace(query, privacy=auto)
    assert wire.query_from_proto(wire.query_to_proto(query)).privacy == auto


def test_the_gaussian_half_width_agrees_with_opendps_where_both_are_computed() -> None:
    from dataops.engines.dp_calibrate import gaussian_accuracy

    for scale in (3.0, 1e4):
        assert gaussian_accuracy(scale, 0.05) == dp.discrete_gaussian_scale_to_accuracy(scale, 0.05, T=float)
    opendp = dp.discrete_gaussian_scale_to_accuracy(2e4, 0.05, T=float)
    assert opendp <= gaussian_accuracy(2e4, 0.05) <= opendp + 1
