"""Automatic clipping: a DP quantile of a measure chooses its upper clip (calibration, not proof).

A measure's catalog bounds are wide (a claim may be 500 000), so a sum or mean
clipped there carries noise for values almost nobody has. With automatic clipping
the query spends a stated share of its epsilon on a DP quantile of the measure
(OpenDP's exponential mechanism over the usual candidates, under the same filters
and row bound) and clips at the released quantile instead, spending the rest on the
answer. Nothing here adds privacy reasoning of its own:

* Both parts are ordinary `DPQuery` measurements; each one's spend is OpenDP's map.
  The parts compose sequentially, so the query's spend is their sum, fixed before any
  data is read: the quantile part at share * epsilon, the answer at the rest (its
  scale depends on the chosen clip, its epsilon does not).
* The clip is a released DP value, so choosing the answer's terms with it is
  post-processing of the first part; the second part is then a DP query with
  public terms inside the catalog's.
* The service reserves the total once (one ledger reservation covers both parts)
  and refunds it only if nothing was released.

Estimates read no data, so they report the answer's noise at the catalog's upper
bound: the most it can be (the chosen clip is never above it).
"""

from __future__ import annotations

import dataclasses
import math

from dataops.engines._base import EngineResult, Plan
from dataops.engines.dp import Calibration, DPQuery, PreparedSource
from dataops.errors import FieldViolation, InternalError, InvalidQuery
from dataops.ir import Aggregate, Function, MeasureTerms, Privacy, Query
from dataops.values import PrivacyLoss


def compile_query(plan: Plan, source: PreparedSource | None = None) -> DPQuery | AutoClippedQuery:
    """The DP query for a plan: with automatic clipping if its terms ask for it."""
    if plan.query.dp_privacy is not None and plan.query.dp_privacy.auto_clipped:
        return AutoClippedQuery(plan, source)
    return DPQuery.compile(plan, source=source)


class AutoClippedQuery:
    """calibrate → release like DPQuery, in two measured parts (see the module docstring)."""

    def __init__(self, plan: Plan, source: PreparedSource | None) -> None:
        self.plan, self.source = plan, source
        privacy = plan.query.dp_privacy
        if privacy.epsilon is None:
            raise InternalError("automatic clipping needs epsilon (the IR refuses it otherwise)")
        self.epsilon: float = privacy.epsilon
        if plan.grant.accounting == "zcdp":
            raise InvalidQuery(
                "automatic clipping is not offered on a zcdp grant; state the bounds instead",
                rule="dp.auto-clip",
                field_violations=(
                    FieldViolation("query.privacy.measures", "auto_clip_share on a zcdp grant"),
                ),
            )
        self.clips = privacy.auto_clipped
        self.main_share = 1.0 - math.fsum(t.auto_clip_share for t in self.clips)
        # The answer at the catalog's upper bound: the same validation and the same
        # epsilon as the real second part, and an upper bound on its noise.
        self.main = DPQuery.compile(plan, source=source)
        self.quantiles = [DPQuery.compile(self._quantile_plan(t), source=source) for t in self.clips]

    def _quantile_plan(self, terms: MeasureTerms) -> Plan:
        """An ungrouped DP quantile of the measure, under the query's filters and row bound."""
        privacy = self.plan.query.dp_privacy
        q_privacy = Privacy(
            epsilon=self.epsilon * terms.auto_clip_share,
            delta=0.0,
            max_rows_per_unit=privacy.max_rows_per_unit,
            measures=(MeasureTerms(terms.column, lower=terms.lower),),
        )
        query = Query(
            dataset=self.plan.query.dataset,
            aggregates=(Aggregate(Function.QUANTILE, terms.column, terms.auto_clip_quantile, alias="clip"),),
            filters=self.plan.query.filters,
            mode=self.plan.query.mode,
            privacy=q_privacy,
        )
        return dataclasses.replace(self.plan, query=query)

    def _debit(self) -> float:
        # The same products the parts are planned with (_quantile_plan, _main_privacy).
        targets = [self.epsilon * t.auto_clip_share for t in self.clips] + [self.epsilon * self.main_share]
        return math.fsum(targets)

    def _main_privacy(self) -> Privacy:
        return dataclasses.replace(self.plan.query.dp_privacy, epsilon=self.epsilon * self.main_share)

    def calibrate(self, privacy: Privacy) -> Calibration:
        if privacy != self.plan.query.dp_privacy:
            raise InternalError("an automatically clipped query is calibrated for its own privacy only")
        parts = [q.calibrate(q_plan_privacy(q)) for q in self.quantiles]
        main = self.main.calibrate(self._main_privacy())
        # The debit is the parts' targets: each part's OpenDP loss is at most its target
        # whatever clip the first part picks, so their sum is at most this.
        epsilon = self._debit()
        delta = privacy.delta if main.cost.delta > 0 else 0.0
        notes = main.notes + tuple(
            f"{t.column}: clipped above at a DP {t.auto_clip_quantile:g}-quantile bought with "
            f"{t.auto_clip_share:g} of epsilon; the noise shown is at the catalog bound, the most it can be"
            for t in self.clips
        )
        rho = None if main.rho is None else math.fsum([p.rho or 0.0 for p in parts] + [main.rho])
        return dataclasses.replace(main, cost=PrivacyLoss(epsilon, delta), notes=notes, rho=rho)

    def release(self, calibration: Calibration) -> EngineResult:
        """The clips first (released DP values), then the answer at them; never above the debit."""
        planned = self.calibrate(self.plan.query.dp_privacy)
        if calibration.cost != planned.cost:
            raise InternalError("the calibration does not belong to this query")
        clips: dict[str, float] = {}
        epsilons, deltas = [], []
        for terms, query in zip(self.clips, self.quantiles, strict=True):
            part = query.calibrate(q_plan_privacy(query))
            value = query.release(part).table.column("clip")[0].as_py()
            epsilons.append(part.cost.epsilon)
            deltas.append(part.cost.delta)
            lower, upper = query.terms[terms.column]
            # The quantile is one of the candidates, inside [lower, upper]. At the lower
            # bound the answer would carry nothing of the measure: keep the upper bound then.
            clips[terms.column] = float(value) if value is not None and value > lower else upper
        main = DPQuery.compile(self.plan, source=self.source, clip_uppers=clips)
        main_calibration = main.calibrate(self._main_privacy())
        epsilons.append(main_calibration.cost.epsilon)
        deltas.append(main_calibration.cost.delta)
        if math.fsum(epsilons) > calibration.cost.epsilon or math.fsum(deltas) > calibration.cost.delta:
            raise InternalError("automatic clipping would spend more than was debited")
        result = main.release(main_calibration)
        return dataclasses.replace(result, accuracy=main_calibration.accuracy)


def q_plan_privacy(query: DPQuery) -> Privacy:
    return query._compiled.query.dp_privacy
