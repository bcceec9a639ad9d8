"""The flow of one request, transport-free:

    identity → plan (IR) → authorize → [reserve budget] → execute → output controls → result

The gRPC layer (`dataops.server`) wraps this with identity extraction, the audit
append and error mapping; everything here is plain Python and testable as such.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from dataops.audit.record import CallRecord
from dataops.authorize import authorize, consumer_policy, live_grant, visible_dataset
from dataops.catalog import Catalog, Dataset
from dataops.config import Limits
from dataops.engines import AggregateAccuracy, EngineResult, Plan, Spend, dp_autoclip
from dataops.engines import dp as dp_engine
from dataops.engines._base import predicate
from dataops.engines.prepared import PreparedStore
from dataops.engines.table import TableEngine
from dataops.errors import DeadlineExceeded, FieldViolation, InternalError, InvalidQuery, RequestError
from dataops.ir import MAX_NAME_LENGTH, Mode, Query
from dataops.ledger import BudgetState, Ledger
from dataops.policy import Grant, PolicyStore
from dataops.versions import DataVersions, Fingerprints, catalog_terms
from dataops.wire import table_from_ipc, table_to_ipc


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


@dataclass(frozen=True)
class Estimate:
    spend: Spend
    accuracy: tuple[AggregateAccuracy, ...]
    # Public facts about the query's terms (read from no data), e.g. that clipping may bias.
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetView:
    """A dataset as one consumer sees it: the entry, the consumer's grant and its tables."""

    dataset: Dataset
    grant: Grant
    # The table products the grant names (`TableProduct`), in the grant's order.
    tables: tuple[Any, ...] = field(default_factory=tuple)


def check_limits(query: Query, limits: Limits) -> None:
    """Complexity caps from configuration; beyond them the request is refused outright."""
    checks = [
        ("query.filters", len(query.filters), limits.max_filters, "max_filters"),
        ("query.group_by", len(query.group_by), limits.max_group_by, "max_group_by"),
        ("query.aggregates", len(query.aggregates), limits.max_aggregates, "max_aggregates"),
    ]
    checks += [
        (f"query.filters[{i}].in_set", len(getattr(f, "values", ())), limits.max_in_values, "max_in_values")
        for i, f in enumerate(query.filters)
    ]
    for field_path, size, cap, name in checks:
        if size > cap:
            description = f"has {size} entries; the limit is {cap}"
            raise InvalidQuery(
                f"{field_path} {description}",
                rule=f"limits.{name}",
                field_violations=(FieldViolation(field_path, description),),
            )


class Sandbox:
    def __init__(
        self,
        catalog: Catalog,
        policies: PolicyStore,
        limits: Limits,
        ledger: Ledger,
        today: Callable[[], dt.date] = _today,
        prepared: PreparedStore | None = None,
        engine_workers: int = 8,
        versions: DataVersions | None = None,
        tables: TableEngine | None = None,
    ) -> None:
        self.catalog = catalog
        # Aggregate mode: lookups in the protected tables (none: exact queries are refused).
        self.tables = tables
        self.policies = policies
        self.limits = limits
        self.ledger = ledger
        self.today = today
        # DP releases read the prepared (truncated once) copies when there is a store;
        # without one, every plan truncates the dataset itself (same losses, slower).
        self.prepared = prepared
        # Engines run here so a request can stop waiting at its client's deadline.
        self._engines = ThreadPoolExecutor(max_workers=engine_workers, thread_name_prefix="engine")
        # The content hash of each dataset file: what "the same data" means for reuse.
        if versions is None:
            versions = prepared.versions if prepared is not None else DataVersions()
        self.versions = versions

    @property
    def fingerprints(self) -> Fingerprints:
        """Data version and catalog terms together, for stores laid out by the catalog
        too (subject layouts); everything else keys on `versions.of(dataset)`."""
        return Fingerprints(self.versions)

    def close(self) -> None:
        self._engines.shutdown(wait=False, cancel_futures=True)

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
        call.dataset = dataset_id[:MAX_NAME_LENGTH]  # bounded: the audit line must stay small
        policy = consumer_policy(self.policies.current, consumer)
        dataset = visible_dataset(policy, self.catalog, dataset_id)
        grant = live_grant(policy, dataset, self.today())
        products = self._table_products
        return DatasetView(dataset, grant, tuple(products[t] for t in grant.tables if t in products))

    @property
    def _table_products(self) -> Mapping[str, Any]:
        return self.tables.tables if self.tables is not None else {}

    def unit_column_for(self, consumer: str) -> Callable[[str], str | None]:
        """For SQL's COUNT(DISTINCT <unit>): a dataset's privacy-unit column, as
        DescribeDataset would tell this consumer, or None where it would refuse (the
        query's authorisation then refuses it the same way, naming nothing more)."""

        def unit_column(dataset_id: str) -> str | None:
            try:
                policy = consumer_policy(self.policies.current, consumer)
                dataset = visible_dataset(policy, self.catalog, dataset_id)
                live_grant(policy, dataset, self.today())
            except RequestError:
                return None
            return dataset.unit_column

        return unit_column

    def _within_deadline(self, call: CallRecord, work: Callable[[], EngineResult]) -> EngineResult:
        """Run `work`, giving up at the client's deadline.

        On a timeout the result is discarded whenever it arrives, so for DP the
        reservation can be returned: nothing was released. The engine thread runs on
        to completion (polars cannot be interrupted) but its answer goes nowhere.
        """
        if call.deadline is None:
            return work()
        remaining = call.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the client's deadline passed before the query started; nothing was run")
        future = self._engines.submit(work)
        try:
            return future.result(timeout=remaining)
        except FutureTimeout:
            future.cancel()
            raise DeadlineExceeded(
                "the query did not finish before the client's deadline; nothing was released"
            ) from None

    def plan(self, consumer: str, query: Query, call: CallRecord) -> Plan:
        """Validate and authorize a query; nothing has run and nothing is spent yet."""
        call.dataset, call.mode = query.dataset, query.mode.value
        # Limits first: an over-limit request must not write its whole text into the audit log.
        check_limits(query, self.limits)
        call.query = query.canonical()
        call.purpose = query.purpose or None
        decision = authorize(
            self.policies.current, self.catalog, consumer, query, self.today(), self._table_products
        )
        call.purpose = decision.grant.purpose  # what the answer may be used for, as granted
        # In every mode: the file still resolves inside the sandbox and is not another
        # entry's content (dataops.versions); cheap while the file is unchanged.
        self.versions.of(decision.dataset)
        if query.mode is Mode.DP:
            # Building the predicate type-checks every filter value against the catalog,
            # before anything runs and before any budget is reserved. (Exact queries:
            # the coverage checked every filter value against the table's key sets.)
            predicate(decision.dataset, query.filters)
        return Plan(
            query, decision.dataset, decision.grant, self.limits.max_output_rows, coverage=decision.coverage
        )

    def run(self, consumer: str, query: Query, call: CallRecord) -> EngineResult:
        plan = self.plan(consumer, query, call)
        if query.mode is Mode.AGGREGATE:
            # A lookup in an index held in memory: bounded work, no scan, no thread hop.
            result = self._exact_engine().release(plan, deadline=call.deadline)
            call.table, call.table_fingerprint = result.table_id, result.table_fingerprint
        else:
            result = self._run_dp(consumer, plan, call)
        call.rows_returned = result.table.num_rows
        call.rows_suppressed = result.rows_suppressed
        return result

    def _exact_engine(self) -> TableEngine:
        if self.tables is None:  # authorize refuses exact queries without tables first
            raise InternalError("aggregate mode without a table engine")
        return self.tables

    def _remaining(self, consumer: str, plan: Plan, spent_now: tuple[float, float] = (0.0, 0.0)) -> Spend:
        epsilon, delta = self.ledger.spent(consumer, plan.dataset.id)
        budget = plan.grant.budget
        return Spend(
            epsilon=spent_now[0],
            delta=spent_now[1],
            remaining_epsilon=max(0.0, budget.epsilon - epsilon),
            remaining_delta=max(0.0, budget.delta - delta),
        )

    def _release_key(self, consumer: str, plan: Plan, data_version: str) -> str:
        """The same question, from the same consumer, on the same data and catalog terms.

        The consumer is part of the key: a release is reused free only for the consumer
        who paid for it. Another consumer's identical question gets its own release,
        charged to its own grant (and the dataset cap), and can learn nothing from the
        reuse store: neither the other's answer nor that anyone asked (a bank's
        questions are its business secret).
        """
        material = {
            "consumer": consumer,
            "query": plan.query.canonical(),
            "data": data_version,
            "terms": catalog_terms(plan.dataset),  # new bounds or keys make a different question
            # Pure or zCDP noise: the same question on other terms (the query's own terms,
            # bounds and row bound, are in its canonical form).
            "accounting": plan.grant.accounting,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    def _compile_dp(self, plan: Plan) -> tuple[dp_engine.DPQuery | dp_autoclip.AutoClippedQuery, str]:
        """The compiled query (over the prepared copy if there is a store) and its data version.

        A query asking for automatic clipping compiles to its two parts (the clip's DP
        quantile and the answer); calibrate gives their total, reserved once below.
        """
        dp_engine.require_max_rows(plan.dataset)
        if self.prepared is None:
            return dp_autoclip.compile_query(plan), self.versions.of(plan.dataset)
        source = self.prepared.source(plan.dataset)  # built once per data version
        return dp_autoclip.compile_query(plan, source=source), source.data_version

    def _run_dp(self, consumer: str, plan: Plan, call: CallRecord) -> EngineResult:
        """Reuse an identical release, or debit the ledger first and only then add noise."""
        compiled, data_version = self._compile_dp(plan)
        # The calibration alone decides the spend; `release` refuses to cost more.
        calibration = compiled.calibrate(plan.query.dp_privacy)
        key = self._release_key(consumer, plan, data_version)
        stored = self.ledger.find_release(key)
        if stored is None:
            grant_total = (plan.grant.budget.epsilon, plan.grant.budget.delta)
            dataset_total = (plan.dataset.budget.epsilon, plan.dataset.budget.delta)
            if calibration.rho is not None:
                # zCDP: the ledger composes rho across the grant's releases and debits
                # the growth of OpenDP's conversion of the total (the module docstring).
                reservation = self.ledger.reserve_zcdp(
                    consumer,
                    plan.dataset.id,
                    calibration.rho,
                    grant_total=grant_total,
                    dataset_total=dataset_total,
                    request=call.request_id,
                )
            else:
                reservation = self.ledger.reserve(
                    consumer,
                    plan.dataset.id,
                    calibration.cost.epsilon,
                    calibration.cost.delta,
                    grant_total=grant_total,
                    dataset_total=dataset_total,
                    request=call.request_id,
                )
            try:
                result = self._within_deadline(call, lambda: compiled.release(calibration))
            except BaseException:
                self.ledger.refund(reservation)  # nothing left the process
                raise
            stored = self.ledger.commit(
                reservation,
                release_key=key,
                payload=table_to_ipc(result.table),
                metadata=json.dumps([a.__dict__ for a in result.accuracy]),
            )
            assert stored is not None  # with a release_key, commit returns the canonical release
            if stored.reservation_id == reservation.id:  # ours is the canonical release
                call.epsilon_spent, call.delta_spent = reservation.epsilon, reservation.delta
                return EngineResult(
                    table=result.table,
                    accuracy=result.accuracy,
                    spend=self._remaining(consumer, plan, (reservation.epsilon, reservation.delta)),
                )
        # This consumer asked the same question before: the same noisy answer again costs
        # nothing and stops averaging attacks.
        call.reused = True
        return EngineResult(
            table=table_from_ipc(stored.payload),
            accuracy=tuple(AggregateAccuracy(**a) for a in json.loads(stored.metadata)),
            spend=self._remaining(consumer, plan),
            reused=True,
        )

    def estimate(self, consumer: str, query: Query, call: CallRecord) -> Estimate:
        """Cost and accuracy of a query; runs nothing and spends nothing."""
        plan = self.plan(consumer, query, call)
        if query.mode is Mode.AGGREGATE:
            estimate = self._exact_engine().estimate(plan)
            return Estimate(estimate.spend, estimate.accuracy)
        compiled, _ = self._compile_dp(plan)  # the form a run would use: the same cost
        calibration = compiled.calibrate(query.dp_privacy)
        cost = (calibration.cost.epsilon, calibration.cost.delta)
        if calibration.rho is not None:  # what reserve_zcdp would debit now
            cost = self.ledger.quote_zcdp(consumer, plan.dataset.id, calibration.rho, plan.grant.budget.delta)
        spend = self._remaining(consumer, plan, cost)
        return Estimate(spend, calibration.accuracy, calibration.notes)

    def budgets(self, consumer: str, dataset_id: str | None, call: CallRecord) -> list[BudgetState]:
        call.dataset = dataset_id[:MAX_NAME_LENGTH] if dataset_id else None
        views = self.datasets(consumer)
        if dataset_id is not None:
            views = [self.describe(consumer, dataset_id, call)]
        states = []
        for view in views:
            epsilon, delta = self.ledger.spent(consumer, view.dataset.id)
            budget = view.grant.budget
            states.append(
                BudgetState(consumer, view.dataset.id, budget.epsilon, budget.delta, epsilon, delta)
            )
        return states
