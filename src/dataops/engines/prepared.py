"""Prepared copies: each dataset truncated once to its contribution bound, for DP.

Every DP plan used to truncate each privacy unit to k = `max_rows_per_unit` rows
itself (`int_range(len).over(unit) < k`), a window over the unit column that took
most of a release's time. The bound must stay *enforced*, never assumed from the
data, but it need not be enforced again for every query: `PreparedStore` makes,
once per version of a dataset, a copy that holds at most k rows per unit (each
unit's first k rows in file order, as the in-plan truncation kept), and the DP
engine's fast path (`DPQuery.compile(plan, source=...)`) reads that copy.

Why the OpenDP guarantee on the copy is a unit-level guarantee for the data:

* The truncation T acts on each unit separately: a unit's rows in T(D) are its
  first k rows in D, whatever the other units have. So if D and D' differ by one
  unit's rows (unit-level neighbours), T(D) and T(D') differ by at most k rows:
  their symmetric distance is at most k. The row plans therefore use OpenDP's
  `symmetric_distance()` with d_in = k and no truncation of their own, and the
  epsilon (and delta) OpenDP proves for T(D) at d_in = k holds for D at the unit
  level. For a grouped count at scale s that is the identifier form's loss, k/s:
  a unit moves at most k rows in either form (tests/test_dp_prepared.py compares
  OpenDP's privacy maps of both forms for several query shapes).
* Building the copy is our code enforcing the bound, not a release: nothing about
  the copy reaches a consumer except through OpenDP's measurements. Values are
  still clipped by OpenDP in every query.
* Filters now run after the truncation (before, they ran first and the plan then
  kept a unit's first k *matching* rows). A filter is row-by-row, so the filtered
  copies of neighbours still differ by at most k rows: equally sound; only a unit
  above the cap may keep fewer matching rows.
* The copy also holds each bounded measure in the engine's fixed point (a row-by-
  row step that depends on the catalog only), and the unit id as a 64-bit hash
  (`UNIT_CODE`), sorted by it. The hash is only used by COUNT_UNITS to keep one
  row per unit and group: a per-unit step that, even where two units' hashes
  collide, adds or removes at most one row per group that the changed unit has
  rows in. The truncation itself is done on the real unit ids: a collision there
  would let one unit's rows displace another's.

COUNT_UNITS still hashes every (unit, group) pair per query, so it costs several
times a row aggregate (0.7-2 s at 10M rows on two cores); the row aggregates cost
about as much as the same polars group-by.

A copy is `state/prepared/<dataset_id>-<fingerprint[:16]>.parquet`, where the
fingerprint covers the dataset file and its catalog entry (`Fingerprints`). It is
written to a temporary file and renamed into place, built under a per-dataset lock
(concurrent first queries wait for one build), checked against the layout, dataset,
fingerprint and cap recorded in its Parquet metadata before it is used, and older
versions of the dataset are removed once a new one is in place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable

import polars as pl

from dataops._fs import fsync_dir
from dataops.catalog import Dataset
from dataops.engines.dp import PREPARED_LAYOUT, UNIT_CODE, PreparedSource, prepared_columns
from dataops.errors import InternalError

__all__ = ["Fingerprints", "PreparedSource", "PreparedStore"]

log = logging.getLogger(__name__)

_BUILD_ATTEMPTS = 3  # the dataset file changed while a copy was being built: try again
_STALE_TEMPORARY_SECONDS = 3600  # a temporary file this old is no build in progress


class Fingerprints:
    """SHA-256 of each dataset file, recomputed only when the file changes.

    Part of the release-reuse key ("the same question" means the same data too) and
    of a prepared copy's name.
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[tuple[int, int], str]] = {}
        self._lock = threading.Lock()

    def of(self, dataset: Dataset) -> str:
        st = dataset.path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._cache.get(str(dataset.path))
        if cached and cached[0] == stamp:
            return cached[1]
        digest = hashlib.sha256()
        with dataset.path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        # The catalog entry too: new bounds or keys make a different question.
        digest.update(dataset.source.read_bytes())
        with self._lock:
            self._cache[str(dataset.path)] = (stamp, digest.hexdigest())
        return digest.hexdigest()


class PreparedStore:
    """Truncated copies of the datasets under `state_dir/prepared`; see the module docstring."""

    def __init__(self, state_dir: Path, fingerprints: Fingerprints | None = None) -> None:
        self.directory = Path(state_dir) / "prepared"
        self.fingerprints = fingerprints if fingerprints is not None else Fingerprints()
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._ready: dict[str, PreparedSource] = {}

    def source(self, dataset: Dataset) -> PreparedSource:
        """The copy of the dataset's current version, built first if there is none."""
        fingerprint = self.fingerprints.of(dataset)
        ready = self._current(dataset, fingerprint)
        if ready is not None:
            return ready
        with self._lock_for(dataset.id):
            for _ in range(_BUILD_ATTEMPTS):
                ready = self._current(dataset, fingerprint)
                if ready is not None:
                    return ready
                path = self.path_for(dataset, fingerprint)
                if not self._valid(path, dataset, fingerprint):
                    self._build(dataset, fingerprint, path)
                now = self.fingerprints.of(dataset)
                if now != fingerprint:  # the data changed under the build: that copy is stale
                    fingerprint = now
                    continue
                source = PreparedSource(dataset.id, fingerprint, path, dataset.max_rows_per_unit)
                with self._guard:
                    self._ready[dataset.id] = source
                self._remove_old(dataset, keep=path)
                return source
        raise InternalError(f"{dataset.id} kept changing while its prepared copy was built")

    def warm(self, datasets: Iterable[Dataset]) -> threading.Thread:
        """Build the copies in a background thread, so the first DP query need not wait."""
        datasets = list(datasets)

        def build_all() -> None:
            for dataset in datasets:
                try:
                    self.source(dataset)
                except Exception:  # the first query on it builds again and reports the error
                    log.exception("could not prepare %s for DP queries", dataset.id)

        thread = threading.Thread(target=build_all, name="dataops-prepare", daemon=True)
        thread.start()
        return thread

    def path_for(self, dataset: Dataset, fingerprint: str) -> Path:
        return self.directory / f"{dataset.id}-{fingerprint[:16]}.parquet"

    # --- internals ----------------------------------------------------------------

    def _current(self, dataset: Dataset, fingerprint: str) -> PreparedSource | None:
        with self._guard:
            ready = self._ready.get(dataset.id)
        if ready is None or ready.fingerprint != fingerprint:
            return None
        return ready if ready.max_rows_per_unit == dataset.max_rows_per_unit else None

    def _lock_for(self, dataset_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(dataset_id, threading.Lock())

    @staticmethod
    def _metadata(dataset: Dataset, fingerprint: str) -> dict[str, str]:
        return {
            "dataops.prepared.layout": str(PREPARED_LAYOUT),
            "dataops.prepared.dataset": dataset.id,
            "dataops.prepared.fingerprint": fingerprint,
            "dataops.prepared.max_rows_per_unit": str(dataset.max_rows_per_unit),
        }

    def _valid(self, path: Path, dataset: Dataset, fingerprint: str) -> bool:
        """An existing copy is used only if it says it is this version, layout and cap."""
        if not path.exists():
            return False
        try:
            found = pl.read_parquet_metadata(path)
        except Exception:  # a torn or foreign file: build it again
            return False
        expected = self._metadata(dataset, fingerprint)
        return all(found.get(key) == value for key, value in expected.items())

    def _build(self, dataset: Dataset, fingerprint: str, path: Path) -> None:
        """Truncate each unit to its first k rows (real unit ids, file order) and write atomically."""
        unit, k = dataset.unit_column, dataset.max_rows_per_unit
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.directory / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp"
        try:
            truncated = pl.scan_parquet(dataset.path).filter(pl.int_range(pl.len()).over(unit) < k)
            # Sorted by the unit code (stably): one unit's rows are adjacent, which makes
            # COUNT_UNITS' per-unit step several times faster. Order means nothing to DP.
            frame = truncated.select(prepared_columns(dataset)).sort(UNIT_CODE, maintain_order=True).collect()
            frame.write_parquet(temporary, compression="lz4", metadata=self._metadata(dataset, fingerprint))
            with temporary.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(temporary, path)
            fsync_dir(self.directory)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        log.info("prepared %s for DP queries: %d rows, at most %d per unit", dataset.id, frame.height, k)

    def _remove_old(self, dataset: Dataset, keep: Path) -> None:
        """Older versions, and temporary files a stopped build left (after a grace period)."""
        pattern = re.compile(rf"{re.escape(dataset.id)}-[0-9a-f]{{16}}\.parquet")
        for old in self.directory.glob(f"{dataset.id}-*.parquet"):
            if old != keep and pattern.fullmatch(old.name):
                old.unlink(missing_ok=True)
        for left in self.directory.glob(f".{dataset.id}-*.tmp"):
            try:
                if time.time() - left.stat().st_mtime > _STALE_TEMPORARY_SECONDS:
                    left.unlink(missing_ok=True)
            except FileNotFoundError:
                pass

