"""The DP engine: the `Engine` protocol over OpenDP measurements (`dp`, `dp_autoclip`).

estimate compiles the query over the prepared, contribution-bounded copy of its
dataset (`dataops.engines.prepared`; the store builds it once per data version), calibrates its noise scale to the requested epsilon or accuracy and
returns the cost, accuracy and data version; it reads no data. release runs the
calibrated measurements and refuses to spend more than the estimate said. Reserving
that cost, reusing an identical release and committing it are the release
coordinator's (`dataops.releases`), never this module's.

Compiling (OpenDP's make_private_lazyframe for every term, to split the loss) and
calibrating (a few more, to map the loss at a scale) read no data and are the bulk
of a DP request's own CPU; a request does each once (release runs the estimate's
compiled query and calibration). Across requests both are kept (`CompiledPlans`),
keyed by everything they are made from (`DPEngine.keys`):

* the query's canonical form (the release store's "same question": dataset, filters,
  groups, aggregates and every privacy term), the catalog terms of its dataset (unit,
  row cap, types, bounds, keys, bins: `versions.catalog_terms`), the prepared copy it
  reads (path, fingerprint, data version), the grant's accounting and the output-row
  limit. New data or new catalog terms are another key.
* A compiled query reads which of epsilon or target_half_width the query gives, never
  its value (that is calibrate's argument), so its key leaves the value out: a new
  epsilon for a question compiled before only calibrates. Automatic clipping plans
  its parts from the epsilon, so its key keeps it.
* Nor do its measurements read the filters' values: a filter is a row-by-row step on
  the data before OpenDP (`dp.DPQuery`). Its key keeps each filter's column and form
  (equals, in, a range and which ends it has) and leaves the values out; each request
  runs the kept measurements under its own filters (`DPQuery.under`). Most fresh
  questions differ from an earlier one in their epsilon and filter values alone. An
  automatically clipped query's first part reads the data under the filters, so its
  key keeps them.
* A calibration is keyed by all of it, the epsilon included.

Nothing kept holds noise: a compiled query and a calibration are the measurement's
structure and scale; release builds the measurement again and OpenDP draws fresh
noise each time it runs. What a release spends is still OpenDP's map of what it
runs, checked against the calibration (`DPQuery.release`), so a wrong entry could
refuse a release, never make it spend more than it was charged.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from dataops.engines import dp, dp_autoclip
from dataops.engines._base import EngineEstimate, EngineResult, Plan
from dataops.engines.dp_calibrate import Calibration
from dataops.engines.prepared import PreparedStore
from dataops.engines.processes import EngineProcesses
from dataops.errors import InternalError
from dataops.versions import catalog_terms

T = TypeVar("T")

# Compiled questions kept (each a few OpenDP plans over empty frames, a few KiB) and
# calibrations (a scale and its accuracy, per epsilon asked).
COMPILED_PLANS = 512
CALIBRATIONS = 4096


class CompiledPlans:
    """A bounded map, least recently used out, safe across request threads.

    `get` makes a missing entry outside the lock (two threads may make the same one;
    both are the same, one is kept); a refusal raised while making is not kept.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str, make: Callable[[], T]) -> T:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                entry: T = self._entries[key]
                return entry
        entry = make()
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return entry

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _digest(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


class DPEngine:
    spends = True  # every release costs budget: reserved first, committed after

    def __init__(self, prepared: PreparedStore, processes: EngineProcesses | None = None) -> None:
        # Every release reads a prepared (truncated once) copy. The identifier form over
        # the raw dataset (`DPQuery.compile(plan)`, no source) is never released here:
        # `dataops policy explain` calibrates it (the same cost, with no copy to build)
        # and the tests hold the fast path to it as the reference.
        self.prepared = prepared
        # Where releases run: None here, else in child processes (dataops.engines.processes).
        self.processes = processes
        self.compiled = CompiledPlans(COMPILED_PLANS)
        self.calibrations = CompiledPlans(CALIBRATIONS)

    def keys(self, plan: Plan, source: dp.PreparedSource) -> tuple[str, str]:
        """(compiled query's key, calibration's key); see the module docstring."""
        query = plan.query.to_json()
        material = {
            "query": query,
            "terms": catalog_terms(plan.dataset),
            "dataset": plan.dataset.id,
            "copy": [str(source.path), source.fingerprint, source.data_version, source.max_rows_per_unit],
            "accounting": plan.grant.accounting,
            "max_output_rows": plan.max_output_rows,
        }
        privacy = plan.query.dp_privacy
        if privacy is not None and privacy.auto_clipped:
            # Its parts are planned from these very terms, and it calibrates for them
            # alone (in their order, which the canonical form sorts away).
            material["auto_clip"] = repr(privacy)
        calibration = _digest(material)
        if privacy is not None and not privacy.auto_clipped:
            # Which of the two is given, not its value, and each filter's column and form,
            # not its values: the compiled query reads no more.
            terms = dict(query["privacy"])
            for name in ("epsilon", "target_half_width"):
                if name in terms:
                    terms[name] = "given"
            forms = sorted(
                ({k: v if k == "column" else "given" for k, v in f.items()} for f in query["filters"]),
                key=lambda f: json.dumps(f, sort_keys=True),
            )
            material = {**material, "query": {**query, "privacy": terms, "filters": forms}}
        return _digest(material), calibration

    def _compile(
        self, plan: Plan, source: dp.PreparedSource, key: str
    ) -> dp.DPQuery | dp_autoclip.AutoClippedQuery:
        """The compiled query over the prepared copy.

        A query asking for automatic clipping compiles to its two parts (the clip's DP
        quantile and the answer); calibrate gives their total, reserved once.
        """
        compiled = self.compiled.get(key, lambda: dp_autoclip.compile_query(plan, source=source))
        # Kept by a key without filter values: run under this request's own filters.
        return compiled.under(plan) if isinstance(compiled, dp.DPQuery) else compiled

    def estimate(self, plan: Plan) -> EngineEstimate:
        privacy = plan.query.privacy
        if privacy is None:  # the IR gives every DP query its privacy terms
            raise InternalError("a DP query without privacy terms")
        dp.require_max_rows(plan.dataset)
        # Built once per data version: the one the plan checked.
        source = self.prepared.source(plan.dataset, version=plan.data_version)
        compiled_key, calibration_key = self.keys(plan, source)
        compiled = self._compile(plan, source, compiled_key)
        # The calibration alone decides the spend; `release` refuses to cost more. Made
        # here, it carries the measurements it mapped for this request's release; the
        # one kept for others holds none (each release builds its own).
        made: list[Calibration] = []

        def calibrate() -> Calibration:
            if not isinstance(compiled, dp.DPQuery):
                return compiled.calibrate(privacy)
            made.append(compiled.calibrate_measured(privacy))
            return made[0].kept()

        kept = self.calibrations.get(calibration_key, calibrate)
        calibration = made[0] if made else kept
        return EngineEstimate(
            cost=calibration.cost,
            accuracy=calibration.accuracy,
            notes=calibration.notes,
            rho=calibration.rho,
            data_version=source.data_version,
            handle=(compiled, calibration, source, compiled_key),
        )

    def release(self, plan: Plan, estimate: EngineEstimate, deadline: float | None = None) -> EngineResult:
        if estimate.handle is None:
            raise InternalError("a DP release needs the estimate it was calibrated by")
        compiled, calibration, source, key = estimate.handle
        if self.processes is not None and isinstance(compiled, dp.DPQuery):
            # An automatically clipped query releases its two parts here (its clip is chosen
            # from the first part's answer).
            return self.processes.release(key, plan, source, calibration)
        return compiled.release(calibration)
