"""The flow of one request, transport-free:

    identity → plan (IR) → authorize → [reserve budget] → execute → output controls → result

The gRPC layer (`dataops.server`) wraps this with identity extraction, the audit
append and error mapping; everything here is plain Python and testable as such.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Callable

from dataops.audit.record import CallRecord
from dataops.authorize import authorize, consumer_policy, live_grant, visible_dataset
from dataops.catalog import Catalog, Dataset
from dataops.config import Limits
from dataops.engines import EngineResult, Plan
from dataops.engines import aggregate as aggregate_engine
from dataops.engines._base import predicate
from dataops.errors import FieldViolation, InvalidQuery, PolicyDenied
from dataops.ir import Mode, Query
from dataops.policy import Grant, PolicyStore


def _today() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date()


@dataclass(frozen=True)
class DatasetView:
    """A dataset as one consumer sees it: the entry and the consumer's grant."""

    dataset: Dataset
    grant: Grant


def check_limits(query: Query, limits: Limits) -> None:
    """Complexity caps from configuration; beyond them the request is refused outright."""
    checks = [
        ("query.filters", len(query.filters), limits.max_filters),
        ("query.group_by", len(query.group_by), limits.max_group_by),
        ("query.aggregates", len(query.aggregates), limits.max_aggregates),
    ]
    checks += [
        (f"query.filters[{i}].in_set", len(getattr(f, "values", ())), limits.max_in_values)
        for i, f in enumerate(query.filters)
    ]
    for field_path, size, cap in checks:
        if size > cap:
            description = f"has {size} entries; the limit is {cap}"
            raise InvalidQuery(
                f"{field_path} {description}",
                rule=f"limits.{field_path.split('.')[1].split('[')[0]}",
                field_violations=(FieldViolation(field_path, description),),
            )


class Sandbox:
    def __init__(
        self,
        catalog: Catalog,
        policies: PolicyStore,
        limits: Limits,
        today: Callable[[], dt.date] = _today,
    ) -> None:
        self.catalog = catalog
        self.policies = policies
        self.limits = limits
        self.today = today

    def datasets(self, consumer: str) -> list[DatasetView]:
        policy = consumer_policy(self.policies.current, consumer)
        today = self.today()
        views = []
        for dataset in self.catalog.in_zone(policy.zone):
            grant = policy.grants.get(dataset.id)
            if grant is not None and not grant.expired(today):
                views.append(DatasetView(dataset, grant))
        return views

    def describe(self, consumer: str, dataset_id: str, call: CallRecord) -> DatasetView:
        call.dataset = dataset_id
        policy = consumer_policy(self.policies.current, consumer)
        dataset = visible_dataset(policy, self.catalog, dataset_id)
        return DatasetView(dataset, live_grant(policy, dataset, self.today()))

    def plan(self, consumer: str, query: Query, call: CallRecord) -> Plan:
        """Validate and authorize a query; nothing has run and nothing is spent yet."""
        call.dataset, call.query, call.mode = query.dataset, query.canonical(), query.mode.value
        check_limits(query, self.limits)
        decision = authorize(self.policies.current, self.catalog, consumer, query, self.today())
        # Building the predicate type-checks every filter value against the catalog,
        # before anything runs (and, for DP, before any budget is reserved).
        predicate(decision.dataset, query.filters)
        return Plan(query, decision.dataset, decision.grant, self.limits.max_output_rows)

    def run(self, consumer: str, query: Query, call: CallRecord) -> EngineResult:
        plan = self.plan(consumer, query, call)
        if query.mode is Mode.AGGREGATE:
            result = aggregate_engine.run(plan)
        else:
            raise PolicyDenied("DP queries are not served yet", rule="grant.modes")
        call.rows_returned = result.table.num_rows
        call.rows_suppressed = result.rows_suppressed
        return result
