"""Compiled DP queries kept across requests (dataops.engines.dp_engine.CompiledPlans).

A kept plan must change nothing a release means: each epsilon calibrates exactly as a
fresh compile would, every release draws its own noise, and new catalog terms or
data are another plan. The key is also switched off (terms and copy left out), and a
stale plan is then shown to be served.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from types import MappingProxyType

import pytest

from dataops.catalog import Dataset, load_catalog
from dataops.config import Limits
from dataops.engines import dp_autoclip, dp_calibrate
from dataops.engines._base import Plan
from dataops.engines.dp import DPQuery
from dataops.engines.dp_engine import DPEngine
from dataops.engines.prepared import PreparedStore
from dataops.errors import InvalidQuery
from dataops.ir import Aggregate, Equals, Function, InSet, MeasureTerms, Mode, Privacy, Query
from dataops.ledger import Ledger
from dataops.policy import Grant, PolicyStore
from dataops.products import load_products
from dataops.service import Sandbox
from dataops.values import PrivacyLoss

REPO = Path(__file__).resolve().parent.parent
COUNT = Aggregate(Function.COUNT)


def _plan(dataset: Dataset, aggregates, group_by=(), filters=(), accounting="pure", **privacy) -> Plan:
    query = Query(dataset.id, tuple(aggregates), tuple(filters), tuple(group_by), Mode.DP, Privacy(**privacy))
    grant = Grant(
        dataset=dataset.id, purpose="test", expires=dt.date(2099, 1, 1), modes=frozenset(Mode),
        functions=frozenset(Function), budget=PrivacyLoss(1e9, 0.5), columns=MappingProxyType({}),
        accounting=accounting,
    )  # fmt: skip
    return Plan(query, dataset, grant)  # binds the filters, as Sandbox.plan does


@pytest.fixture(scope="module")
def catalog(sandbox_dir):
    return load_catalog(REPO / "catalog", sandbox_dir)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return PreparedStore(tmp_path_factory.mktemp("plans") / "state")


# (dataset, aggregates, group_by, filters, accounting, two sets of privacy terms)
QUESTIONS = {
    "count": ("medical_claims", [COUNT], ["age_band"], [], "pure", {"epsilon": 0.5}, {"epsilon": 0.031}),
    "mean, filtered": (
        "medical_claims",
        [COUNT, Aggregate(Function.MEAN, "amount")],
        ["sex"],
        [Equals("visit_type", "inpatient")],
        "pure",
        {"epsilon": 1.0},
        {"epsilon": 0.2},
    ),
    "quantile": (
        "medical_claims",
        [Aggregate(Function.QUANTILE, "amount", 0.5)],
        [],
        [],
        "pure",
        {"epsilon": 0.4},
        {"epsilon": 2.5},
    ),
    "private keys": (
        "enterprise_credit",
        [COUNT, Aggregate(Function.SUM, "tax_paid")],
        ["arrears_months"],
        [],
        "pure",
        {"epsilon": 1.0, "delta": 1e-6},
        {"epsilon": 0.3, "delta": 1e-6},
    ),
    "accuracy target": (
        "medical_claims",
        [COUNT],
        ["district"],
        [],
        "pure",
        {"target_half_width": 50.0},
        {"target_half_width": 9.0},
    ),
    "zcdp": (
        "medical_claims",
        [COUNT],
        ["age_band"],
        [],
        "zcdp",
        {"epsilon": 0.5, "delta": 1e-7},
        {"epsilon": 0.05, "delta": 1e-7},
    ),  # fmt: skip
    "auto clip": (
        "medical_claims",
        [Aggregate(Function.SUM, "amount")],
        ["sex"],
        [],
        "pure",
        {"epsilon": 1.0, "measures": (MeasureTerms("amount", auto_clip_share=0.2),)},
        {"epsilon": 0.5, "measures": (MeasureTerms("amount", auto_clip_share=0.2),)},
    ),
}


def _estimate(engine: DPEngine, catalog, question, terms):
    dataset, aggregates, group_by, filters, accounting = question[:5]
    return engine.estimate(_plan(catalog.get(dataset), aggregates, group_by, filters, accounting, **terms))


@pytest.mark.parametrize("name", sorted(QUESTIONS))
def test_a_kept_plan_calibrates_each_epsilon_as_a_fresh_compile_would(catalog, store, name):
    question = QUESTIONS[name]
    kept = DPEngine(store)
    first, second = question[5], question[6]
    _estimate(kept, catalog, question, first)
    again = _estimate(kept, catalog, question, second)
    fresh = _estimate(DPEngine(store), catalog, question, second)
    # One compiled question (a new epsilon only calibrates), except automatic clipping,
    # whose parts are planned from the epsilon.
    assert len(kept.compiled) == (2 if name == "auto clip" else 1)
    assert (again.cost, again.accuracy, again.notes, again.rho, again.data_version) == (
        fresh.cost,
        fresh.accuracy,
        fresh.notes,
        fresh.rho,
        fresh.data_version,
    )
    assert again.handle[1] == fresh.handle[1]  # scale, threshold and all
    # The same terms again: the kept calibration itself, which holds no measurements
    # (those are for the release of the request that calibrated).
    hit = _estimate(kept, catalog, question, second).handle[1]
    assert hit == again.handle[1] and hit is _estimate(kept, catalog, question, second).handle[1]
    assert hit.measurements == ()


def test_every_release_of_a_kept_plan_draws_its_own_noise(catalog, store):
    engine = DPEngine(store)
    question = QUESTIONS["count"]
    plan = _plan(catalog.get("medical_claims"), [COUNT], ["age_band"], epsilon=0.01)
    estimate = engine.estimate(plan)
    answers = [engine.release(plan, estimate).table for _ in range(2)]
    kept = engine.estimate(plan)  # from the kept plan and calibration (no measurements: built again)
    assert kept.handle[0]._compiled is estimate.handle[0]._compiled and kept.handle[1] == estimate.handle[1]
    assert estimate.handle[1].measurements and not kept.handle[1].measurements
    answers.append(engine.release(plan, kept).table)
    counts = [tuple(t.column("count").to_pylist()) for t in answers]
    assert len(set(counts)) == 3, counts  # at scale 100 a repeat is all but impossible
    assert question  # the same question as the calibration test's


def _counts(table) -> dict[str, float]:
    return dict(zip(table.column("age_band").to_pylist(), table.column("count").to_pylist()))


@pytest.mark.parametrize("control", ["on", "off"])
def test_a_plan_kept_for_other_filter_values_releases_under_the_requests_own(
    catalog, store, monkeypatch, control
):
    """Other filter values are the same compiled measurements (the filter runs before
    OpenDP), but each release must read the data under its own request's filter.
    Switched off (the kept query's filter is reused), an outpatient question is answered
    with the inpatient counts."""
    if control == "off":
        monkeypatch.setattr(DPQuery, "under", lambda self, plan: self)
    claims = catalog.get("medical_claims")
    kept = DPEngine(store)

    def release(engine: DPEngine, visit_type: str) -> dict[str, float]:
        # At the largest epsilon the noise is a few rows: far less than the filters' gap.
        plan = _plan(claims, [COUNT], ["age_band"], [Equals("visit_type", visit_type)], epsilon=100.0)
        return _counts(engine.release(plan, engine.estimate(plan)).table)

    inpatient = release(kept, "inpatient")
    outpatient = release(kept, "outpatient")
    assert len(kept.compiled) == 1  # one compiled question for both filter values
    reference = release(DPEngine(store), "outpatient")  # compiled for this filter alone
    assert inpatient.keys() == outpatient.keys() == reference.keys()
    apart = max(abs(inpatient[k] - reference[k]) for k in reference)
    assert apart > 100  # the two filters select very different rows
    if control == "off":
        assert max(abs(outpatient[k] - inpatient[k]) for k in inpatient) < 20
        return
    assert max(abs(outpatient[k] - reference[k]) for k in reference) < 20


def test_a_plan_kept_for_one_filter_column_is_not_another_columns(catalog, store):
    """The key keeps each filter's column and form: a filter on the unit column is still
    refused by the compile's own check, however a question like it was compiled before."""
    claims = catalog.get("medical_claims")
    engine = DPEngine(store)
    engine.estimate(_plan(claims, [COUNT], ["age_band"], [Equals("visit_type", "inpatient")], epsilon=1.0))
    unit = _plan(claims, [COUNT], ["age_band"], [Equals(claims.unit_column, "P0001")], epsilon=1.0)
    with pytest.raises(InvalidQuery) as refused:
        engine.estimate(unit)
    assert refused.value.rule == "dp.identifier"
    in_set = _plan(
        claims, [COUNT], ["age_band"], [InSet("visit_type", ("inpatient", "emergency"))], epsilon=1.0
    )
    engine.estimate(in_set)
    assert len(engine.compiled) == 2  # equals and in-set are two forms


@pytest.mark.parametrize("control", ["on", "off"])
def test_new_catalog_terms_are_another_plan(catalog, store, monkeypatch, control):
    """Attack (on the answer's terms): the operator narrows a measure's bounds; a plan
    kept from before would still clip, and noise, at the old ones."""
    engine = DPEngine(store)
    if control == "off":  # the key without the catalog terms and the copy
        keys = DPEngine.keys

        def careless(self, plan, source):
            blind = dataclasses.replace(source, path=Path("x"), fingerprint="", data_version="")
            with monkeypatch.context() as m:
                m.setattr("dataops.engines.dp_engine.catalog_terms", lambda dataset: "")
                return keys(self, plan, blind)

        monkeypatch.setattr(DPEngine, "keys", careless)
    claims = catalog.get("medical_claims")
    aggregates = [Aggregate(Function.SUM, "amount")]
    before = engine.estimate(_plan(claims, aggregates, ["sex"], epsilon=1.0))
    amount = dataclasses.replace(claims.columns["amount"], bounds=(0.0, 1000.0), bins=None)
    narrowed = dataclasses.replace(claims, columns=MappingProxyType({**claims.columns, "amount": amount}))
    after = engine.estimate(_plan(narrowed, aggregates, ["sex"], epsilon=1.0))
    if control == "off":
        assert after.accuracy == before.accuracy  # the old bounds' noise, served as the new
        return
    assert after.accuracy[0].noise_scale == pytest.approx(before.accuracy[0].noise_scale / 500)
    assert (
        after.accuracy == DPEngine(store).estimate(_plan(narrowed, aggregates, ["sex"], epsilon=1.0)).accuracy
    )


def test_catalog_terms_kept_per_entry_never_answer_for_another(catalog, monkeypatch):
    """The digest kept per catalog entry (`versions.catalog_terms`) is that entry's own.
    Kept by id, it is checked to be for the same object. Otherwise an id reused by another
    entry, say one with narrowed bounds, would key its plans and releases as the old one's."""
    from dataops import versions

    claims = catalog.get("medical_claims")
    amount = dataclasses.replace(claims.columns["amount"], bounds=(0.0, 1000.0), bins=None)
    narrowed = dataclasses.replace(claims, columns=MappingProxyType({**claims.columns, "amount": amount}))
    assert versions.catalog_terms(narrowed) != versions.catalog_terms(claims)
    # A digest kept under narrowed's id for another object: what a freed entry's reused id leaves.
    monkeypatch.setitem(versions._TERMS, id(narrowed), (claims, versions.catalog_terms(claims)))
    assert versions.catalog_terms(narrowed) == versions._catalog_terms(narrowed)


def test_a_request_compiles_once_and_the_estimate_before_it_compiles_for_it(
    sandbox_dir, tmp_path, monkeypatch
):
    """EstimateQuery, then RunQuery of the same question, then RunQuery again (a
    re-served release): one compile, one calibration."""
    compiles = []
    real = dp_autoclip.compile_query
    monkeypatch.setattr(
        "dataops.engines.dp_engine.dp_autoclip.compile_query",
        lambda plan, source=None: compiles.append(plan.query.canonical()) or real(plan, source=source),
    )
    catalog = load_catalog(REPO / "catalog", sandbox_dir)
    policies = PolicyStore(REPO / "policies", catalog, products=load_products(REPO / "products", catalog))
    sandbox = Sandbox(catalog, policies, Limits(), Ledger(tmp_path / "ledger.sqlite3"),
                      today=lambda: dt.date(2026, 1, 1), prepared=PreparedStore(tmp_path / "state"))  # fmt: skip
    query = Query("medical_claims", (COUNT,), (), ("age_band",), Mode.DP, Privacy(epsilon=0.5))
    estimate = sandbox.estimate("harbor-insurance", query).result
    first = sandbox.run("harbor-insurance", query).result
    again = sandbox.run("harbor-insurance", query).result
    assert compiles == [query.canonical()]
    assert first.spend.epsilon == pytest.approx(estimate.spend.epsilon) and not first.reused
    assert again.reused and again.table.equals(first.table)
    # Another epsilon for the same question: calibrated, not compiled again.
    sandbox.estimate("harbor-insurance", dataclasses.replace(query, privacy=Privacy(epsilon=0.25)))
    assert len(compiles) == 1


@pytest.mark.parametrize("name", sorted(set(QUESTIONS) - {"auto clip"}))
def test_accuracy_at_a_scale_is_opendps_summary_of_the_measurements_at_it(catalog, store, name):
    """The accuracy a calibration reports comes from the summary at scale 1, scaled:
    it must be exactly what OpenDP's summary of the measurements themselves says."""
    dataset, aggregates, group_by, filters, accounting, terms, _ = QUESTIONS[name]
    plan = _plan(catalog.get(dataset), aggregates, group_by, filters, accounting, **terms)
    compiled = DPQuery.compile(plan, source=store.source(plan.dataset))._compiled
    threshold = dp_calibrate._no_keys(compiled)
    for scale in (1.0, 0.37, 3.0, 1234.5678, 1e-3):
        summarized = dp_calibrate.accuracy(compiled, compiled.build(scale, threshold))
        assert dp_calibrate.accuracy_at(compiled, scale) == summarized
