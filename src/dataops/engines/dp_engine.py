"""The DP engine: the `Engine` protocol over OpenDP measurements (`dp`, `dp_autoclip`).

estimate compiles the query over the prepared, contribution-bounded copy of its
dataset (`dataops.engines.prepared`; the store builds it once per data version), calibrates its noise scale to the requested epsilon or accuracy and
returns the cost, accuracy and data version; it reads no data. release runs the
calibrated measurements and refuses to spend more than the estimate said. Reserving
that cost, reusing an identical release and committing it are the release
coordinator's (`dataops.releases`), never this module's.
"""

from __future__ import annotations

from dataops.engines import dp, dp_autoclip
from dataops.engines._base import EngineEstimate, EngineResult, Plan
from dataops.engines.prepared import PreparedStore
from dataops.errors import InternalError


class DPEngine:
    spends = True  # every release costs budget: reserved first, committed after

    def __init__(self, prepared: PreparedStore) -> None:
        # Every release reads a prepared (truncated once) copy. The identifier form over
        # the raw dataset (`DPQuery.compile(plan)`, no source) is never released here:
        # `dataops policy explain` calibrates it (the same cost, with no copy to build)
        # and the tests hold the fast path to it as the reference.
        self.prepared = prepared

    def _compile(self, plan: Plan) -> tuple[dp.DPQuery | dp_autoclip.AutoClippedQuery, str]:
        """The compiled query (over the prepared copy) and the copy's data version.

        A query asking for automatic clipping compiles to its two parts (the clip's DP
        quantile and the answer); calibrate gives their total, reserved once.
        """
        dp.require_max_rows(plan.dataset)
        source = self.prepared.source(plan.dataset)  # built once per data version
        return dp_autoclip.compile_query(plan, source=source), source.data_version

    def estimate(self, plan: Plan) -> EngineEstimate:
        if plan.query.privacy is None:  # the IR gives every DP query its privacy terms
            raise InternalError("a DP query without privacy terms")
        compiled, data_version = self._compile(plan)
        # The calibration alone decides the spend; `release` refuses to cost more.
        calibration = compiled.calibrate(plan.query.privacy)
        return EngineEstimate(
            cost=calibration.cost,
            accuracy=calibration.accuracy,
            notes=calibration.notes,
            rho=calibration.rho,
            data_version=data_version,
            handle=(compiled, calibration),
        )

    def release(self, plan: Plan, estimate: EngineEstimate, deadline: float | None = None) -> EngineResult:
        if estimate.handle is None:
            raise InternalError("a DP release needs the estimate it was calibrated by")
        compiled, calibration = estimate.handle
        return compiled.release(calibration)
