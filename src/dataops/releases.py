"""Reserve, reuse and commit: the one place a release meets the budget ledger.

For an engine whose releases spend budget (`Engine.spends`):

1. The same question from the same consumer on the same data and catalog terms is
   answered by its stored release again, free: the same noisy answer stops averaging
   attacks and costs nothing.
2. Otherwise the estimate's cost is reserved in the ledger (per grant and per dataset,
   atomically) *before* any noisy value is computed; a refusal records nothing.
3. The engine releases; if that fails or the client's deadline passes, the
   reservation is refunded (nothing left the process).
4. The release is committed with its payload; when an identical release won a race,
   that one is the answer and this reservation is returned.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from dataops.arrow_ipc import table_from_ipc, table_to_ipc
from dataops.engines._base import EngineEstimate, EngineResult, Plan
from dataops.errors import InternalError
from dataops.ledger import Ledger
from dataops.values import AggregateAccuracy, PrivacyLoss, Spend
from dataops.versions import catalog_terms


def release_key(consumer: str, plan: Plan, data_version: str) -> str:
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


@dataclass(frozen=True)
class Released:
    result: EngineResult  # with `spend`: what was debited now and what remains
    spent: PrivacyLoss  # debited by this request (zero when reused)
    reused: bool


class ReleaseCoordinator:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def key(self, consumer: str, plan: Plan, data_version: str) -> str:
        """What reuse is keyed by (`release_key`); a method so a test can switch the control off."""
        return release_key(consumer, plan, data_version)

    def remaining(self, consumer: str, plan: Plan, spent_now: PrivacyLoss | None = None) -> Spend:
        spent = self.ledger.spent(consumer, plan.dataset.id)
        return Spend.of(spent_now or PrivacyLoss.zero(), plan.grant.budget.remaining_after(spent))

    def quote(self, consumer: str, plan: Plan, estimate: EngineEstimate) -> PrivacyLoss:
        """What a release would debit now: its cost, or on a zCDP grant the growth of
        the grant's composed total (what `reserve_zcdp` would charge)."""
        if estimate.rho is None:
            return estimate.cost
        return self.ledger.quote_zcdp(consumer, plan.dataset.id, estimate.rho, plan.grant.budget.delta)

    def release(
        self,
        consumer: str,
        plan: Plan,
        estimate: EngineEstimate,
        run: Callable[[], EngineResult],
        request_id: str = "",
    ) -> Released:
        """Reuse an identical release, or debit the ledger first and only then run `run`."""
        if estimate.data_version is None:
            raise ValueError("a release that spends budget must name the data version it reads")
        key = self.key(consumer, plan, estimate.data_version)
        stored = self.ledger.find_release(key)
        if stored is None:
            grant_total, dataset_total = plan.grant.budget, plan.dataset.budget
            if estimate.rho is not None:
                # zCDP: the ledger composes rho across the grant's releases and debits
                # the growth of OpenDP's conversion of the total (dataops.engines.dp).
                reservation = self.ledger.reserve_zcdp(
                    consumer,
                    plan.dataset.id,
                    estimate.rho,
                    grant_total=grant_total,
                    dataset_total=dataset_total,
                    request=request_id,
                )
            else:
                reservation = self.ledger.reserve(
                    consumer,
                    plan.dataset.id,
                    estimate.cost.epsilon,
                    estimate.cost.delta,
                    grant_total=grant_total,
                    dataset_total=dataset_total,
                    request=request_id,
                )
            try:
                result = run()
            except BaseException:
                self.ledger.refund(reservation)  # nothing left the process
                raise
            committed = self.ledger.commit(
                reservation,
                release_key=key,
                payload=table_to_ipc(result.table),
                metadata=json.dumps([a.__dict__ for a in result.accuracy]),
            )
            if committed is None:  # a release key was given: the ledger returns the stored release
                raise InternalError("the ledger stored no release for a committed reservation")
            if committed.reservation_id == reservation.id:  # ours is the canonical release
                spent = PrivacyLoss(reservation.epsilon, reservation.delta)
                answer = EngineResult(
                    table=result.table,
                    accuracy=result.accuracy,
                    spend=self.remaining(consumer, plan, spent),
                )
                return Released(answer, spent, reused=False)
            stored = committed  # an identical release won the race: it is the answer
        # This consumer asked the same question before: the same noisy answer again costs
        # nothing and stops averaging attacks.
        answer = EngineResult(
            table=table_from_ipc(stored.payload),
            accuracy=tuple(AggregateAccuracy(**a) for a in json.loads(stored.metadata)),
            spend=self.remaining(consumer, plan),
            reused=True,
        )
        return Released(answer, PrivacyLoss.zero(), reused=True)
