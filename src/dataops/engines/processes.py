"""DP releases run in child processes: their Python half off the server's GIL.

Under load one server process is held to about 1.3 of two cores by its GIL, a fifth of
the machine idle (docs/scale-out.md, "What bounds one process"); a fresh release's
Python (OpenDP's bindings building and invoking its measurements, the post-processing)
is the largest share of it. With `[server] engine_processes = N` (N > 0) the release
step of a compiled DP query runs in one of N spawned children instead:

* the server still plans, authorizes, estimates (compiles and calibrates), reserves the
  ledger, stores the release and audits it; only `DPQuery.release` moves;
* a child is sent the plan, the serving copy it reads (`PreparedSource`, paths and
  fingerprint) and the calibration without its measurements (`Calibration.kept`: scale,
  threshold, cost, rho). It compiles the query (kept by the server's own key), builds the
  measurements at that scale and runs them through the same `DPQuery.release`, which
  maps their loss through OpenDP and refuses any that costs more than was calibrated;
* the answer (an Arrow table) comes back; a child that fails or dies fails the request
  like any failed release: the reservation is refunded (nothing left the server's
  processes), and a dead pool is replaced for the next request.

The children are the server's own processes, same user, same trust domain: they read
the serving copies the server reads and nothing else crosses to them.
"""

from __future__ import annotations

import copyreg
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import MappingProxyType
from typing import Any

from dataops.engines import dp
from dataops.engines._base import EngineResult, Plan
from dataops.engines.dp_calibrate import Calibration
from dataops.errors import InternalError


def _mapping(items: dict[str, Any]) -> MappingProxyType[str, Any]:
    return MappingProxyType(items)


def _reduce_mapping(m: MappingProxyType[str, Any]) -> tuple[Any, tuple[dict[str, Any]]]:
    return _mapping, (dict(m),)


# Catalog entries and grants hold read-only mappings, which pickle cannot send as they are.
copyreg.pickle(MappingProxyType, _reduce_mapping)


class EngineProcesses:
    """A pool of `size` spawned children that run DP releases (see the module docstring)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("engine processes need a size of at least 1")
        self.size = size
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: the server has threads (polars', gRPC's) a fork would copy mid-state.
                self._pool = ProcessPoolExecutor(
                    self.size, mp_context=multiprocessing.get_context("spawn"), initializer=_start_child
                )
            return self._pool

    def warm(self) -> None:
        """Start the children now, not on the first release (each imports OpenDP and polars)."""
        pool = self._executor()
        for _ in range(self.size):
            pool.submit(_ready)

    def release(
        self, key: str, plan: Plan, source: dp.PreparedSource, calibration: Calibration
    ) -> EngineResult:
        pool = self._executor()
        try:
            return pool.submit(_release, key, plan, source, calibration.kept()).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:  # replaced once, by whichever request saw it first
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise InternalError(
                "the engine process running this release stopped; nothing was released"
            ) from None

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


# --- in the child ---------------------------------------------------------------------

_COMPILED: Any = None  # the child's CompiledPlans (dataops.engines.dp_engine), made at start


def _start_child() -> None:
    global _COMPILED
    # Imported here: dp_engine imports this module. The same bounded map the server keeps.
    from dataops.engines.dp_engine import COMPILED_PLANS, CompiledPlans

    dp.enable_opendp()
    _COMPILED = CompiledPlans(COMPILED_PLANS)


def _ready() -> bool:
    return True


def _release(key: str, plan: Plan, source: dp.PreparedSource, calibration: Calibration) -> EngineResult:
    compiled: dp.DPQuery = _COMPILED.get(key, lambda: dp.DPQuery.compile(plan, source=source))
    # Measurements built again at the calibration's scale; release maps their loss and
    # refuses one above calibration.cost (or rho), as in the server.
    return compiled.under(plan).release(calibration)
