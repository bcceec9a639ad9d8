"""Realistic synthetic audit records, for the benchmark and the tests.

Shaped like `CallRecord.to_record` output from the demo zones: two banks and an
insurer, mostly allowed queries, some refusals with their reasons and rules, DP
releases that spend epsilon, aggregate releases with suppressed rows.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Iterator
from typing import Any

ZONES = {
    "city-bank": "enterprise_credit",
    "river-bank": "enterprise_credit",
    "harbor-insurance": "medical_claims",
}
DIMENSIONS = {
    "enterprise_credit": ["district", "industry", "size_band", "year_founded"],
    "medical_claims": ["age_band", "sex", "district", "diagnosis_group", "hospital_level"],
}
MEASURES = {"enterprise_credit": ["tax_paid", "penalties", "employees"], "medical_claims": ["amount"]}
REFUSALS = [  # (decision, code, reason, rule, column)
    ("denied", "PERMISSION_DENIED", "POLICY_DENIED", "identifier", "enterprise_id"),
    ("denied", "PERMISSION_DENIED", "POLICY_DENIED", "grant.columns", "tax_paid"),
    ("denied", "NOT_FOUND", "UNKNOWN_DATASET", "dataset.unknown", None),
    ("denied", "FAILED_PRECONDITION", "OUTPUT_CONTROL", "tracker", "district"),
    ("denied", "RESOURCE_EXHAUSTED", "BUDGET_EXHAUSTED", "budget.grant", None),
    ("invalid", "INVALID_ARGUMENT", "INVALID_QUERY", "wire", None),
]
POLICY_VERSION = "5f0c9a1e" * 8


def sample_record(rng: random.Random, when: dt.datetime) -> dict[str, Any]:
    consumer = rng.choice(list(ZONES))
    dataset = ZONES[consumer]
    method = rng.choices(["RunQuery", "DescribeDataset", "ListDatasets"], weights=[8, 1, 1])[0]
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="microseconds"),
        "consumer": consumer,
        "method": method,
        "dataset": None if method == "ListDatasets" else dataset,
        "query": None,
        "mode": None,
        "decision": "allowed",
        "code": "OK",
        "reason": None,
        "rule": "grant",
        "column": None,
        "rows_returned": None,
        "rows_suppressed": None,
        "epsilon_spent": 0.0,
        "delta_spent": 0.0,
        "reused": False,
        "latency_ms": round(rng.lognormvariate(3.0, 0.6), 3),
        "policy_version": POLICY_VERSION,
    }
    if method != "RunQuery":
        return record
    mode = "dp" if rng.random() < 0.3 else "aggregate"
    group_by = sorted(rng.sample(DIMENSIONS[dataset], rng.randint(0, 2)))
    measure = rng.choice(MEASURES[dataset])
    query = {
        "aggregates": [
            {"function": "count_units", "name": "count_units"},
            {"column": measure, "function": "mean", "name": f"mean_{measure}"},
        ],
        "dataset": dataset,
        "filters": [],
        "group_by": group_by,
        "mode": mode,
    }
    record.update(query=json.dumps(query, sort_keys=True, separators=(",", ":")), mode=mode)
    if rng.random() < 0.15:
        decision, code, reason, rule, column = rng.choice(REFUSALS)
        record.update(decision=decision, code=code, reason=reason, rule=rule, column=column)
        return record
    rows = rng.randint(1, 60) if group_by else 1
    suppressed = rng.randint(0, rows // 4) if mode == "aggregate" else 0
    record.update(rows_returned=rows - suppressed, rows_suppressed=suppressed)
    if mode == "dp":
        reused = rng.random() < 0.2
        record.update(
            reused=reused,
            epsilon_spent=0.0 if reused else rng.choice([0.1, 0.25, 0.5, 1.0]),
            delta_spent=0.0 if reused or not group_by else 1e-8,
        )
    return record


def sample_records(
    n: int, *, seed: int = 0, start: dt.datetime | None = None, mean_gap_seconds: float = 5.0
) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    when = start or dt.datetime(2025, 3, 3, 8, 0, tzinfo=dt.UTC)
    for _ in range(n):
        when += dt.timedelta(seconds=rng.expovariate(1 / mean_gap_seconds))
        yield sample_record(rng, when)
