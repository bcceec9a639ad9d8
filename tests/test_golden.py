"""Golden files for the shapes other things key on, so that a refactor cannot change them unseen.

- `Query.canonical()` and the release key: release reuse is keyed by them (a changed
  form re-charges every stored question, or worse, makes two questions one).
- Authorization decisions: who may ask what, and the rule and column a refusal names.
- The audit record's shape: reviewers' tools and exports read these keys.

The expected values live in tests/golden/*.json. A deliberate change regenerates them:
`DATAOPS_UPDATE_GOLDENS=1 python -m pytest tests/test_golden.py`; review the diff and
commit it with the change (and a CHANGELOG line where users see it).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest

from conftest import audit_records
from dataops.audit.record import CallRecord
from dataops.client import DataopsClientError, count, count_units, mean, total
from dataops.ir import (
    Aggregate,
    Between,
    Equals,
    Function,
    InSet,
    MeasureTerms,
    Mode,
    Privacy,
    Query,
)

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("DATAOPS_UPDATE_GOLDENS") == "1"


def check_golden(name: str, actual: dict[str, Any]) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(actual, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return
    expected = json.loads(path.read_text())
    assert sorted(actual) == sorted(expected), f"{name}: the set of cases changed"
    for case in expected:
        assert actual[case] == expected[case], f"{name}: {case} changed"


def dp(epsilon: float = 1.0, **terms: Any) -> Privacy:
    return Privacy(epsilon=epsilon, **terms)


# Every part of the canonical form at least once: each mode, filter kind, value type,
# aggregate option and privacy term. The purpose is left out of the form on purpose.
QUERIES: dict[str, Query] = {
    "aggregate_count": Query("enterprise_credit", (Aggregate(Function.COUNT),)),
    "aggregate_grouped_filtered": Query(
        "enterprise_credit",
        (Aggregate(Function.COUNT), Aggregate(Function.SUM, "tax_paid")),
        filters=(Equals("district", "Dongcheng"), InSet("size_band", ("micro", "small"))),
        group_by=("industry", "size_band"),
    ),
    "aggregate_purpose_not_in_form": Query(
        "enterprise_credit", (Aggregate(Function.COUNT),), purpose="pre-loan review"
    ),
    "between_dates_and_numbers": Query(
        "medical_claims",
        (Aggregate(Function.MEAN, "amount"),),
        filters=(
            Between("visit_date", dt.date(2024, 1, 1), dt.date(2024, 6, 30)),
            Between("amount", 0, 1000.5),
        ),
        group_by=("age_band",),
    ),
    "filter_order_is_not_significant": Query(
        "enterprise_credit",
        (Aggregate(Function.COUNT),),
        filters=(InSet("size_band", ("small", "micro")), Equals("district", "Dongcheng")),
    ),
    "aliases_and_quantile": Query(
        "medical_claims",
        (Aggregate(Function.QUANTILE, "amount", 0.9, alias="p90"), Aggregate(Function.COUNT, alias="n")),
        mode=Mode.DP,
        privacy=dp(0.5),
    ),
    "dp_epsilon_delta": Query(
        "enterprise_credit",
        (Aggregate(Function.COUNT_UNITS), Aggregate(Function.SUM, "tax_paid")),
        group_by=("district",),
        mode=Mode.DP,
        privacy=dp(1.0, delta=1e-7),
    ),
    "dp_target_half_width": Query(
        "enterprise_credit",
        (Aggregate(Function.COUNT),),
        mode=Mode.DP,
        privacy=Privacy(target_half_width=25.0),
    ),
    "dp_terms_and_weights": Query(
        "medical_claims",
        (Aggregate(Function.SUM, "amount", weight=3.0), Aggregate(Function.COUNT, weight=1.0)),
        group_by=("age_band",),
        mode=Mode.DP,
        privacy=dp(
            2.0,
            max_rows_per_unit=5,
            measures=(MeasureTerms("amount", lower=0.0, upper=5000.0),),
            consistent=True,
        ),
    ),
    "dp_auto_clip": Query(
        "medical_claims",
        (Aggregate(Function.MEAN, "amount"),),
        mode=Mode.DP,
        privacy=dp(1.0, measures=(MeasureTerms("amount", lower=0.0, auto_clip_share=0.2),)),
    ),
}


def test_canonical_query_forms_are_unchanged():
    forms = {name: query.canonical() for name, query in QUERIES.items()}
    # Two ways of writing one question are one form (and so one release).
    assert forms["aggregate_purpose_not_in_form"] == forms["aggregate_count"]
    reordered = Query(
        "enterprise_credit",
        (Aggregate(Function.COUNT),),
        filters=(Equals("district", "Dongcheng"), InSet("size_band", ("micro", "small"))),
    )
    assert forms["filter_order_is_not_significant"] == reordered.canonical()
    check_golden("canonical.json", forms)


# The reuse key of a DP release: the consumer, the canonical query, the data version, the
# catalog's terms for the dataset and the grant's accounting.
RELEASES = {
    "city_bank_units_by_district": ("city-bank", "dp_epsilon_delta"),
    "city_bank_target_half_width": ("city-bank", "dp_target_half_width"),
    "harbor_claims_terms": ("harbor-insurance", "dp_terms_and_weights"),
    "harbor_auto_clip": ("harbor-insurance", "dp_auto_clip"),
    "harbor_quantile": ("harbor-insurance", "aliases_and_quantile"),
}
DATA_VERSION = "a" * 64  # fixed, so the key depends on the code and the catalog only


def test_release_keys_are_unchanged(server):
    keys = {}
    for name, (consumer, query) in RELEASES.items():
        plan = server.sandbox.plan(consumer, QUERIES[query], CallRecord("golden"))
        keys[name] = server.sandbox._release_key(consumer, plan, DATA_VERSION)
    assert len(set(keys.values())) == len(keys)
    check_golden("release_keys.json", keys)


# Who may ask what, through the real server (estimates spend nothing): the decision the
# audit log records and the refusal the consumer reads.
DECISIONS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "exact_table_lookup": (
        "city-bank",
        "enterprise_credit",
        dict(aggregates=[count(), total("tax_paid")], group_by=["district", "industry"]),
    ),
    "exact_column_outside_the_tables": (
        "city-bank",
        "enterprise_credit",
        dict(aggregates=[count()], group_by=["year_founded"]),
    ),
    "exact_quantile": (
        "city-bank",
        "enterprise_credit",
        dict(aggregates=["quantile(tax_paid, 0.5)"]),
    ),
    "dp_allowed": (
        "city-bank",
        "enterprise_credit",
        dict(aggregates=[count_units(), total("tax_paid")], group_by=["district"], mode="dp", epsilon=0.5),
    ),
    "dp_identifier_grouped": (
        "city-bank",
        "enterprise_credit",
        dict(aggregates=[count()], group_by=["enterprise_id"], mode="dp", epsilon=0.5),
    ),
    "dp_mode_not_granted": (
        "river-bank",
        "enterprise_credit",
        dict(aggregates=[count()], group_by=["district"], mode="dp", epsilon=0.5),
    ),
    "dp_measure_used_as_a_dimension": (
        "city-bank",
        "enterprise_credit",
        dict(aggregates=[count()], group_by=["tax_paid"], mode="dp", epsilon=0.5),
    ),
    "exact_other_consumers_table": (
        "river-bank",
        "enterprise_credit",
        dict(aggregates=[count()], group_by=["district", "industry"]),
    ),
    "dp_estimate_beyond_the_budget": (
        "city-bank",
        "enterprise_credit",
        dict(aggregates=[count()], mode="dp", epsilon=50.0),
    ),
    "another_zone": ("city-bank", "medical_claims", dict(aggregates=[count()])),
    "no_such_dataset": ("city-bank", "no_such_dataset", dict(aggregates=[count()])),
    "no_policy": ("ghost", "enterprise_credit", dict(aggregates=[count()])),
    "purpose_not_granted": (
        "city-bank",
        "enterprise_credit",
        dict(aggregates=[count()], mode="dp", epsilon=0.5, purpose="marketing"),
    ),
    "insurer_mean_claims": (
        "harbor-insurance",
        "medical_claims",
        dict(aggregates=[mean("amount")], group_by=["age_band"], mode="dp", epsilon=0.5),
    ),
}


def test_authorization_decisions_are_unchanged(server, connect, config):
    assert server.tables.wait_ready(timeout=600)
    decisions = {}
    for name, (consumer, dataset, query) in DECISIONS.items():
        client = connect(consumer)
        before = len(audit_records(config))
        try:
            client.estimate(dataset, **query)
            refusal = None
        except DataopsClientError as exc:
            refusal = {"code": exc.code.name, "reason": exc.reason, "message": exc.message}
        (record,) = audit_records(config)[before:]
        decisions[name] = {
            "audit": {k: record[k] for k in ("decision", "code", "reason", "rule", "column", "purpose")},
            "refusal": refusal,
        }
    check_golden("authorization.json", decisions)


def json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def test_audit_record_shapes_are_unchanged(server, connect, config):
    """Each kind of record, as keys and JSON types (values vary with time and data)."""
    assert server.tables.wait_ready(timeout=600)
    client = connect("city-bank")
    client.list_datasets()
    client.describe("enterprise_credit")
    client.query("enterprise_credit", aggregates=[count()], group_by=["district"])
    client.query("enterprise_credit", aggregates=[count()], mode="dp", epsilon=0.25)
    client.estimate("enterprise_credit", aggregates=[count()], mode="dp", epsilon=0.25)
    client.budgets()
    with pytest.raises(DataopsClientError):
        client.query("enterprise_credit", aggregates=[count()], group_by=["enterprise_id"])
    records = audit_records(config)
    kinds = [
        "ListDatasets",
        "DescribeDataset",
        "RunQuery aggregate allowed",
        "RunQuery dp allowed",
        "EstimateQuery dp allowed",
        "GetBudget",
        "RunQuery aggregate denied",
    ]
    assert len(records) == len(kinds)
    shapes = {
        kind: {key: json_type(value) for key, value in record.items()} for kind, record in zip(kinds, records)
    }
    for kind, record in zip(kinds, records):
        assert record["method"] == kind.split()[0]
    check_golden("audit_record_shapes.json", shapes)
