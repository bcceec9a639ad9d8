"""Golden fixtures: the shapes other things depend on, pinned in tests/golden/*.json.

* `canonical.json`: `Query.canonical()` and the release key of each query. The
  canonical form is what the audit log records and, with the consumer, the data
  version and the catalog terms, what keys the reuse of a DP release: a change to
  either silently re-charges (or worse, wrongly reuses) every stored release.
* `decisions.json`: what `authorize` decides for a spread of consumers and
  queries: allowed (with the grant's purpose and the covering table) or refused
  (reason, rule, column, kind). Catalog, policies and products are the repo's own.
* `decisions_wire.json`: the same over the wire, through the real server: the
  decision, rule and column the audit record keeps and the refusal the consumer
  reads (status code, reason, message).
* `audit_records.json`: the audit record's shape (keys, in order, and values) for
  each kind of request, with the fields that differ per run (time, request id,
  latency) masked. Reviewers' tools read these records. The real server's records of
  the kinds it can be driven through here are checked against it (keys and JSON types;
  a DP release's values too).

When a change is intended, regenerate and review the diff before committing:

    DATAOPS_REGENERATE_GOLDEN=1 pytest tests/test_golden.py

(docs/architecture.md, "Golden fixtures").
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, audit_records
from dataops.audit.record import CallRecord
from dataops.authorize import authorize
from dataops.catalog import load_catalog
from dataops.client import DataopsClientError, count, count_units, mean, total
from dataops.engines import Plan
from dataops.errors import (
    BudgetExhausted,
    DeadlineExceeded,
    InvalidQuery,
    PolicyDenied,
    RequestError,
    TableUnavailable,
    UnknownDataset,
)
from dataops.ir import Aggregate, Between, Equals, Function, InSet, MeasureTerms, Mode, Privacy, Query
from dataops.outcome import Outcome
from dataops.policy import load_policies
from dataops.products import load_products
from dataops.releases import release_key
from dataops.server.status import status_code
from dataops.values import PrivacyLoss

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("DATAOPS_REGENERATE_GOLDEN") == "1"
TODAY = dt.date(2026, 1, 1)
DATA_VERSION = "0" * 64  # a fixed data version: the key's other inputs are what is pinned

CREDIT, CLAIMS = "enterprise_credit", "medical_claims"
COUNT, SUM_TAX = Aggregate(Function.COUNT), Aggregate(Function.SUM, "tax_paid")


def _dp(dataset: str, aggregates, *, filters=(), group_by=(), **privacy) -> Query:
    return Query(dataset, tuple(aggregates), tuple(filters), tuple(group_by), Mode.DP, Privacy(**privacy))


QUERIES: dict[str, tuple[str, Query]] = {
    "exact count by district": ("city-bank", Query(CREDIT, (COUNT,), group_by=("district",))),
    "exact sum, filters in any order": (
        "city-bank",
        Query(
            CREDIT,
            (SUM_TAX, COUNT),
            (
                InSet("industry", ("Manufacturing", "Catering", "Manufacturing")),
                Equals("district", "Dongcheng"),
            ),
            ("size_band",),
        ),
    ),
    "dp count": ("city-bank", _dp(CREDIT, [COUNT], epsilon=0.5)),
    "dp mean with a range and a date": (
        "city-bank",
        _dp(
            CREDIT,
            [Aggregate(Function.MEAN, "tax_paid", alias="avg_tax")],
            filters=[Between("year_founded", 1990, 2010)],
            group_by=["district"],
            epsilon=1.0,
        ),
    ),
    "dp quantile with terms": (
        "city-bank",
        _dp(
            CREDIT,
            [Aggregate(Function.QUANTILE, "tax_paid", 0.9, weight=2.0), Aggregate(Function.COUNT_UNITS)],
            epsilon=1.0,
            max_rows_per_unit=2,
            measures=(MeasureTerms("tax_paid", 0.0, 100_000.0),),
        ),
    ),
    "dp accuracy target, consistent": (
        "harbor-insurance",
        _dp(CLAIMS, [COUNT], group_by=["age_band"], target_half_width=50.0, consistent=True),
    ),
    "dp auto clip": (
        "harbor-insurance",
        _dp(
            CLAIMS,
            [Aggregate(Function.SUM, "amount")],
            epsilon=1.0,
            measures=(MeasureTerms("amount", auto_clip_share=0.2),),
        ),
    ),
    "exact mean between dates and numbers": (
        "harbor-insurance",
        Query(
            CLAIMS,
            (Aggregate(Function.MEAN, "amount"),),
            (
                Between("visit_date", dt.date(2024, 1, 1), dt.date(2024, 6, 30)),
                Between("amount", 0, 1000.5),
            ),
            ("age_band",),
        ),
    ),
    "dp with a delta, grouped": (
        "city-bank",
        _dp(
            CREDIT, [Aggregate(Function.COUNT_UNITS), SUM_TAX], group_by=["district"], epsilon=1.0, delta=1e-7
        ),
    ),
    "dp terms, weights and consistency": (
        "harbor-insurance",
        _dp(
            CLAIMS,
            [Aggregate(Function.SUM, "amount", weight=3.0), Aggregate(Function.COUNT, weight=1.0)],
            group_by=["age_band"],
            epsilon=2.0,
            max_rows_per_unit=5,
            measures=(MeasureTerms("amount", 0.0, 5000.0),),
            consistent=True,
        ),
    ),
}

# Queries authorize refuses (or allows) for who asks: the decision table.
DECISIONS: dict[str, tuple[str, Query]] = {
    **QUERIES,
    "another zone's dataset": ("city-bank", Query(CLAIMS, (COUNT,))),
    "no such dataset": ("city-bank", Query("no_such", (COUNT,))),
    "unknown consumer": ("ghost", Query(CREDIT, (COUNT,))),
    "group by an identifier": ("city-bank", Query(CREDIT, (COUNT,), group_by=("enterprise_id",))),
    "exact quantile": ("city-bank", Query(CREDIT, (Aggregate(Function.QUANTILE, "tax_paid", 0.5),))),
    "no table covers it": ("city-bank", Query(CREDIT, (COUNT,), group_by=("year_founded",))),
    "a key the table lacks": ("city-bank", Query(CREDIT, (COUNT,), (Equals("district", "Atlantis"),))),
    "an alias naming a column": ("city-bank", Query(CREDIT, (Aggregate(Function.COUNT, alias="district"),))),
    "another purpose": ("city-bank", Query(CREDIT, (COUNT,), purpose="marketing")),
    "dp on an exact-only grant": ("river-bank", _dp(CREDIT, [COUNT], epsilon=0.5)),
}


def _compare(name: str, actual: Any) -> None:
    path = GOLDEN / name
    text = json.dumps(actual, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    if REGENERATE:
        path.write_text(text)
        return
    assert path.exists(), f"{path} is missing; run DATAOPS_REGENERATE_GOLDEN=1 pytest {__file__}"
    # The text, not only the parsed values: the order of an audit record's keys is its shape too.
    assert text == path.read_text(), (
        f"{path.name} differs from the code; if the change is intended, regenerate it "
        f"(DATAOPS_REGENERATE_GOLDEN=1 pytest tests/test_golden.py) and review the diff"
    )


@pytest.fixture(scope="module")
def loaded(sandbox_dir):
    catalog = load_catalog(REPO / "catalog", sandbox_dir)
    products = load_products(REPO / "products", catalog)
    return catalog, load_policies(REPO / "policies", catalog, products), products


def _decide(loaded, consumer: str, query: Query) -> dict[str, Any]:
    catalog, policies, products = loaded
    try:
        decision = authorize(policies, catalog, consumer, query, TODAY, products.tables)
    except RequestError as exc:
        return {
            "decision": "invalid" if exc.invalid else "denied",
            "kind": exc.kind.value,
            "code": status_code(exc).name,
            "reason": exc.reason,
            "rule": exc.rule,
            "column": exc.column,
            "message": exc.message,
        }
    return {
        "decision": "allowed",
        "purpose": decision.grant.purpose,
        "accounting": decision.grant.accounting,
        "table": decision.coverage.table if decision.coverage is not None else None,
    }


def test_canonical_forms_and_release_keys_are_pinned(loaded):
    catalog, policies, products = loaded
    actual = {}
    for name, (consumer, query) in QUERIES.items():
        entry: dict[str, Any] = {"canonical": query.canonical()}
        if query.mode is Mode.DP:
            dataset = catalog.get(query.dataset)
            grant = policies.consumers[consumer].grants[dataset.id]
            entry["release_key"] = release_key(consumer, Plan(query, dataset, grant), DATA_VERSION)
        actual[name] = entry
    _compare("canonical.json", actual)


def test_release_keys_differ_by_consumer(loaded):
    """The golden keys would not notice a key that forgot the consumer: this does."""
    catalog, policies, _ = loaded
    consumer, query = QUERIES["dp count"]
    dataset = catalog.get(query.dataset)
    plan = Plan(query, dataset, policies.consumers[consumer].grants[dataset.id])
    assert release_key("city-bank", plan, DATA_VERSION) != release_key("river-bank", plan, DATA_VERSION)


def test_the_canonical_form_leaves_out_the_purpose_and_the_filter_order():
    """Two ways of writing one question are one form, so one audit entry and one release
    (the golden forms above pin one way of writing each)."""
    filters = (Equals("district", "Dongcheng"), InSet("size_band", ("micro", "small")))
    one = Query(CREDIT, (COUNT,), filters)
    assert Query(CREDIT, (COUNT,), filters[::-1]).canonical() == one.canonical()
    assert Query(CREDIT, (COUNT,), filters, purpose="pre-loan review").canonical() == one.canonical()
    assert Query(CREDIT, (COUNT,), filters[:1]).canonical() != one.canonical()


def test_authorization_decisions_are_pinned(loaded):
    _compare("decisions.json", {name: _decide(loaded, *case) for name, case in DECISIONS.items()})


# Who may ask what, through the real server (estimates spend nothing): consumer,
# dataset and the client's query arguments.
WIRE_DECISIONS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "exact table lookup": (
        "city-bank",
        CREDIT,
        dict(aggregates=[count(), total("tax_paid")], group_by=["district", "industry"]),
    ),
    "exact column outside the tables": (
        "city-bank",
        CREDIT,
        dict(aggregates=[count()], group_by=["year_founded"]),
    ),
    "exact quantile": ("city-bank", CREDIT, dict(aggregates=["quantile(tax_paid, 0.5)"])),
    "exact, another consumer's table": (
        "river-bank",
        CREDIT,
        dict(aggregates=[count()], group_by=["district", "industry"]),
    ),
    "dp allowed": (
        "city-bank",
        CREDIT,
        dict(aggregates=[count_units(), total("tax_paid")], group_by=["district"], mode="dp", epsilon=0.5),
    ),
    "dp grouped by an identifier": (
        "city-bank",
        CREDIT,
        dict(aggregates=[count()], group_by=["enterprise_id"], mode="dp", epsilon=0.5),
    ),
    "dp mode not granted": (
        "river-bank",
        CREDIT,
        dict(aggregates=[count()], group_by=["district"], mode="dp", epsilon=0.5),
    ),
    "dp measure used as a dimension": (
        "city-bank",
        CREDIT,
        dict(aggregates=[count()], group_by=["tax_paid"], mode="dp", epsilon=0.5),
    ),
    "dp estimate beyond the budget": (
        "city-bank",
        CREDIT,
        dict(aggregates=[count()], mode="dp", epsilon=50.0),
    ),
    "dp mean of claims": (
        "harbor-insurance",
        CLAIMS,
        dict(aggregates=[mean("amount")], group_by=["age_band"], mode="dp", epsilon=0.5),
    ),
    "another zone": ("city-bank", CLAIMS, dict(aggregates=[count()])),
    "no such dataset": ("city-bank", "no_such_dataset", dict(aggregates=[count()])),
    "no policy": ("ghost", CREDIT, dict(aggregates=[count()])),
    "purpose not granted": (
        "city-bank",
        CREDIT,
        dict(aggregates=[count()], mode="dp", epsilon=0.5, purpose="marketing"),
    ),
}


def test_authorization_decisions_over_the_wire_are_pinned(server, connect):
    assert server.tables.wait_ready(timeout=600)
    decisions = {}
    for name, (consumer, dataset, query) in WIRE_DECISIONS.items():
        client = connect(consumer)
        before = len(audit_records(server.config))
        try:
            client.estimate(dataset, **query)
            refusal = None
        except DataopsClientError as exc:
            refusal = {"code": exc.code.name, "reason": exc.reason, "message": exc.message}
        (record,) = audit_records(server.config)[before:]
        decisions[name] = {
            "audit": {k: record[k] for k in ("decision", "code", "reason", "rule", "column", "purpose")},
            "refusal": refusal,
        }
    _compare("decisions_wire.json", decisions)


def _record(call: CallRecord) -> dict[str, Any]:
    record = call.to_record("policy-version-0")
    for volatile in ("time", "request_id", "latency_ms"):
        assert volatile in record
        record[volatile] = f"<{volatile}>"
    return record


def _call(method: str, **fields: Any) -> CallRecord:
    call = CallRecord(method=method, consumer="city-bank")
    for name, value in fields.items():
        setattr(call, name, value)
    return call


def _refused(call: CallRecord, error: RequestError, outcome: Outcome | None = None) -> CallRecord:
    if outcome is not None:
        call.record_outcome(outcome)
    call.refused(error, status_code(error).name)
    return call


def _allowed(call: CallRecord, outcome: Outcome) -> CallRecord:
    call.record_outcome(outcome)
    call.allowed()
    return call


def test_audit_record_shapes_are_pinned():
    query = QUERIES["dp count"][1]
    asked = Outcome(dataset=CREDIT, mode="dp", query=query.canonical(), purpose="pre-loan review")
    released = Outcome(
        dataset=CREDIT,
        mode="dp",
        query=query.canonical(),
        purpose="pre-loan review",
        spent=PrivacyLoss(0.5, 0.0),
        rows_returned=1,
        rows_suppressed=0,
    )
    reused = Outcome(**{**released.__dict__, "spent": PrivacyLoss.zero(), "reused": True})
    exact = Outcome(
        dataset=CREDIT,
        mode="aggregate",
        query=QUERIES["exact count by district"][1].canonical(),
        purpose="pre-loan review",
        rows_returned=12,
        rows_suppressed=2,
        table="enterprises_by_district_industry_size",
        table_fingerprint="f" * 64,
    )
    # Refused by authorization: the purpose is the request's (none here), not yet the grant's.
    unauthorized = Outcome(dataset=CREDIT, mode="dp", query=query.canonical())
    entry = {"index": 0, "decision": "allowed", "product": "pre_loan_review", "subject_hash": "a" * 64}
    subject = Outcome(
        dataset=CREDIT, mode="subject", query="subject:pre_loan_review", rows_returned=1, evaluations=[entry]
    )
    malformed = _call("RunQuery")
    malformed.unparsed(b"\x00\xff not protobuf")
    failed = _call("RunQuery")
    failed.record_outcome(asked)
    failed.failed("INTERNAL")
    stream = _allowed(_call("Watch", stream_event="message", messages=1), subject)
    listed = _call("ListDatasets")  # the servicer reports no outcome: nothing but the decision
    listed.allowed()
    shapes = {
        "list datasets": listed,
        "describe dataset": _allowed(_call("DescribeDataset"), Outcome(dataset=CREDIT)),
        "budget": _allowed(_call("GetBudget"), Outcome()),
        "dp release": _allowed(_call("RunQuery"), released),
        "dp release reused": _allowed(_call("RunQuery"), reused),
        "exact lookup": _allowed(_call("RunQuery"), exact),
        "estimate": _allowed(_call("EstimateQuery"), asked),
        "budget exhausted": _refused(
            _call("RunQuery"),
            BudgetExhausted("grant:city-bank/enterprise_credit: ...", rule="budget.grant"),
            asked,
        ),
        "policy denied": _refused(
            _call("RunQuery"), PolicyDenied("...", rule="identifier", column="enterprise_id"), unauthorized
        ),
        "unknown dataset": _refused(_call("DescribeDataset", dataset="no_such"), UnknownDataset("...")),
        "invalid before planning": _refused(
            _call("RunQuery"),
            InvalidQuery("...", rule="limits.max_filters"),
            Outcome(dataset=CREDIT, mode="dp"),
        ),
        "malformed": _refused(malformed, InvalidQuery("...", rule="wire")),
        "deadline": _refused(_call("RunQuery"), DeadlineExceeded("...", rule="deadline"), asked),
        "table not ready": _refused(
            _call("RunQuery"), TableUnavailable("...", rule="table.not_ready"), asked
        ),
        "internal error": failed,
        "subject evaluation": _allowed(_call("Evaluate"), subject),
        "watch message": stream,
    }
    _compare("audit_records.json", {name: _record(call) for name, call in shapes.items()})


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


# What the real server is driven through below, in order: the method, and the golden
# kind its record must have the shape of.
SERVED: list[tuple[str, str]] = [
    ("ListDatasets", "list datasets"),
    ("DescribeDataset", "describe dataset"),
    ("RunQuery", "exact lookup"),
    ("RunQuery", "dp release"),
    ("EstimateQuery", "estimate"),
    ("GetBudget", "budget"),
    ("RunQuery", "policy denied"),
]


def test_the_servers_own_records_have_the_pinned_shapes(server, connect):
    """The shapes above are built by hand; the real server's records of the same kinds
    must have the same keys and JSON types (values vary with time and data), and its
    record of a DP release the same values too. The log stores each record as
    canonical JSON (keys sorted) with its chain fields."""
    assert server.tables.wait_ready(timeout=600)
    client = connect("city-bank")
    client.list_datasets()
    client.describe(CREDIT)
    client.query(CREDIT, aggregates=[count()], group_by=["district"])
    client.query(CREDIT, aggregates=[Aggregate(Function.COUNT)], mode="dp", epsilon=0.5)
    client.estimate(CREDIT, aggregates=[count()], mode="dp", epsilon=0.5)
    client.budgets()
    with pytest.raises(DataopsClientError):
        client.query(CREDIT, aggregates=[count()], group_by=["enterprise_id"])
    records = audit_records(server.config)
    assert [r["method"] for r in records] == [method for method, _ in SERVED]
    golden = json.loads((GOLDEN / "audit_records.json").read_text())
    for record, (_, kind) in zip(records, SERVED):
        expected = golden[kind]
        chain = {key: record.pop(key) for key in set(record) - set(expected)}
        assert set(chain) == {"seq", "prev", "hash"}, (kind, chain)
        for volatile in ("time", "request_id", "latency_ms", "policy_version"):
            record[volatile] = expected[volatile]
        assert {k: _json_type(v) for k, v in record.items()} == {
            k: _json_type(v) for k, v in expected.items()
        }, kind
    assert records[SERVED.index(("RunQuery", "dp release"))] == golden["dp release"]
