"""The flow of one request, transport-free:

    identity → plan (IR) → authorize → [reserve budget] → execute → output controls → result

`Sandbox` plans and authorizes a query, then hands it to the engine for its mode
(`dataops.engines`: exact lookups in protected tables, or DP) and, for an engine that
spends budget, to the release coordinator (`dataops.releases`: reuse, reserve,
commit). Each request returns an `Outcome` (dataops.outcome): the answer and what
the request did, from which the gRPC layer (`dataops.server`) writes the audit
record. Everything here is plain Python and testable as such.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from dataops.authorize import authorize, consumer_policy, live_grant, visible_dataset
from dataops.catalog import Catalog, Dataset
from dataops.config import Limits
from dataops.engines import Engine, EngineResult, Plan, Spend
from dataops.engines.dp_engine import DPEngine
from dataops.engines.prepared import PreparedStore
from dataops.engines.processes import EngineProcesses
from dataops.engines.table import TableEngine
from dataops.errors import DeadlineExceeded, FieldViolation, InternalError, InvalidQuery, RequestError
from dataops.ir import MAX_NAME_LENGTH, Mode, Query
from dataops.ledger import Ledger
from dataops.outcome import Outcome
from dataops.policy import Grant, PolicyStore
from dataops.releases import ReleaseCoordinator
from dataops.values import Budget, Estimate
from dataops.versions import DataVersions, Fingerprints


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


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
        prepared: PreparedStore,
        today: Callable[[], dt.date] = _today,
        engine_workers: int = 8,
        versions: DataVersions | None = None,
        tables: TableEngine | None = None,
        processes: EngineProcesses | None = None,
    ) -> None:
        self.catalog = catalog
        self.processes = processes  # where DP releases run (None: in this process)
        # Aggregate mode: lookups in the protected tables (none: exact queries are refused).
        self.tables = tables
        self.policies = policies
        self.limits = limits
        self.ledger = ledger
        self.today = today
        # DP releases read the contribution-bounded copies this store keeps (one per
        # data version); there is no DP engine without one.
        self.prepared = prepared
        # Engines run here so a request can stop waiting at its client's deadline.
        self._engines = ThreadPoolExecutor(max_workers=engine_workers, thread_name_prefix="engine")
        # The content hash of each dataset file: what "the same data" means for reuse.
        if versions is None:
            versions = prepared.versions
        self.versions = versions
        # One engine per mode; a mode without one is refused (authorize refuses exact
        # queries without tables first).
        self.engines: dict[Mode, Engine[Plan, EngineResult]] = {Mode.DP: DPEngine(prepared, processes)}
        if tables is not None:
            self.engines[Mode.AGGREGATE] = tables
        self.releases = ReleaseCoordinator(ledger)

    @property
    def fingerprints(self) -> Fingerprints:
        """Data version and catalog terms together, for stores laid out by the catalog
        too (subject layouts); everything else keys on `versions.of(dataset)`."""
        return Fingerprints(self.versions)

    def close(self) -> None:
        self._engines.shutdown(wait=False, cancel_futures=True)
        if self.processes is not None:
            self.processes.close()

    def datasets(self, consumer: str) -> list[DatasetView]:
        policy = consumer_policy(self.policies.current, consumer)
        today = self.today()
        views = []
        for dataset in self.catalog.in_zone(policy.zone):
            grant = policy.grants.get(dataset.id)
            if grant is not None and not grant.expired(today):
                views.append(DatasetView(dataset, grant))
        return views

    def describe(self, consumer: str, dataset_id: str) -> Outcome:
        """The dataset as this consumer sees it (`Outcome.result`: a `DatasetView`)."""
        outcome = Outcome(dataset=dataset_id[:MAX_NAME_LENGTH])  # bounded: the audit line must stay small
        try:
            outcome.result = self._view(consumer, dataset_id)
        except Exception as exc:
            outcome.attach(exc)
            raise
        return outcome

    def _view(self, consumer: str, dataset_id: str) -> DatasetView:
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

    def _within_deadline(self, deadline: float | None, work: Callable[[], EngineResult]) -> EngineResult:
        """Run `work`, giving up at the client's deadline.

        On a timeout the result is discarded whenever it arrives, so for DP the
        reservation can be returned: nothing was released. The engine thread runs on
        to completion (polars cannot be interrupted) but its answer goes nowhere.
        """
        if deadline is None:
            return work()
        remaining = deadline - time.monotonic()
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

    def plan(self, consumer: str, query: Query, outcome: Outcome | None = None) -> Plan:
        """Validate and authorize a query; nothing has run and nothing is spent yet.

        `outcome` records as it goes what the audit record will say was asked.
        """
        outcome = outcome if outcome is not None else Outcome()
        outcome.dataset, outcome.mode = query.dataset, query.mode.value
        # Limits first: an over-limit request must not write its whole text into the audit log.
        check_limits(query, self.limits)
        outcome.query = query.canonical()
        outcome.purpose = query.purpose or None
        decision = authorize(
            self.policies.current, self.catalog, consumer, query, self.today(), self._table_products
        )
        outcome.purpose = decision.grant.purpose  # what the answer may be used for, as granted
        # In every mode: the file still resolves inside the sandbox and is not another
        # entry's content (dataops.versions); cheap while the file is unchanged.
        version = self.versions.of(decision.dataset)
        # The bind step (dataops.bind): making the plan checks every filter value against
        # its column's catalog type and types it, once, before anything runs and before any
        # budget is reserved. (Exact queries: the coverage has already matched every filter
        # value to the table's key sets, which hold values of those types.)
        return Plan(
            query,
            decision.dataset,
            decision.grant,
            self.limits.max_output_rows,
            coverage=decision.coverage,
            data_version=version,
        )

    def _engine(self, mode: Mode) -> Engine[Plan, EngineResult]:
        engine = self.engines.get(mode)
        if engine is None:  # authorize refuses exact queries without tables first
            raise InternalError(f"{mode.value} mode without an engine")
        return engine

    def run(
        self,
        consumer: str,
        query: Query,
        *,
        request_id: str = "",
        deadline: float | None = None,
        scan_slot: Callable[[], AbstractContextManager[None]] = nullcontext,
    ) -> Outcome:
        """Plan, estimate, release (reserving first when the engine spends budget).

        `scan_slot` makes what an engine run that scans data is held by (the server's
        scan lane, `dataops.server.lanes`): entered only once the plan, the grant, the
        release store and the ledger have let the query through to its engine, so a
        refusal or a re-served release never waits for it. Refused there, the query is
        refunded like any release that did not happen.

        `Outcome.result` is the `EngineResult`; on a refusal the outcome so far rides
        on the error.
        """
        outcome = Outcome()
        try:
            plan = self.plan(consumer, query, outcome)
            engine = self._engine(query.mode)
            estimate = engine.estimate(plan)
            if not engine.spends:
                # A lookup in an index held in memory: bounded work, no scan, no thread hop.
                result = engine.release(plan, estimate, deadline)
                outcome.table, outcome.table_fingerprint = result.table_id, result.table_fingerprint
            else:

                def scan() -> EngineResult:
                    with scan_slot():
                        return self._within_deadline(
                            deadline, lambda: engine.release(plan, estimate, deadline)
                        )

                released = self.releases.release(consumer, plan, estimate, scan, request_id=request_id)
                result, outcome.spent, outcome.reused = released.result, released.spent, released.reused
        except Exception as exc:
            outcome.attach(exc)
            raise
        outcome.rows_returned = result.table.num_rows
        outcome.rows_suppressed = result.rows_suppressed
        outcome.result = result
        return outcome

    def estimate(self, consumer: str, query: Query) -> Outcome:
        """Cost and accuracy of a query (`Outcome.result`: an `Estimate`); runs nothing, spends nothing."""
        outcome = Outcome()
        try:
            plan = self.plan(consumer, query, outcome)
            engine = self._engine(query.mode)
            estimate = engine.estimate(plan)  # the form a run would use: the same cost
            if engine.spends:
                spend = self.releases.remaining(consumer, plan, self.releases.quote(consumer, plan, estimate))
            else:
                spend = Spend()
        except Exception as exc:
            outcome.attach(exc)
            raise
        outcome.result = Estimate(spend, estimate.accuracy, notes=estimate.notes)
        return outcome

    def budgets(self, consumer: str, dataset_id: str | None) -> Outcome:
        """The consumer's grants' budgets (`Outcome.result`: a list of `Budget`)."""
        outcome = Outcome(dataset=dataset_id[:MAX_NAME_LENGTH] if dataset_id else None)
        try:
            views = self.datasets(consumer)
            if dataset_id is not None:
                views = [self._view(consumer, dataset_id)]
        except Exception as exc:
            outcome.attach(exc)
            raise
        outcome.result = [
            Budget(view.dataset.id, view.grant.budget, self.ledger.spent(consumer, view.dataset.id), consumer)
            for view in views
        ]
        return outcome
