"""Data versions: each dataset is known by the SHA-256 of its Parquet file's bytes.

Everything derived from a dataset is keyed by this version: stored DP releases
(`dataops.releases.release_key`), prepared copies (`dataops.engines.prepared`) and the
protected tables (`TableStore.get(product, dataset, data_version)`). One call gives
it: `DataVersions.of(dataset) -> str` (64 hex digits).

The identity is always the content hash, never the file's size or mtime (both are
set at will: `touch -d`, `os.utime`). Hashing a large file on every query would be
slow, so a hash is reused only while all of these hold:

* the file's stat signature is unchanged: device, inode, size, mtime *and ctime*.
  Replacing the file by a rename gives it a new inode; writing it in place changes
  its ctime, which the kernel sets to the current time on every change and no
  system call lets an unprivileged process set back. So a file replaced with the
  same size and mtime is noticed at the next query, cheaply.
* the hash is younger than `recheck_seconds` (default 300 s). This covers
  filesystems whose inode or ctime mean little (network and FUSE mounts, restored
  snapshots, a clock set back): after at most that long the file is hashed again,
  whatever stat says.
* nobody asked for a fresh hash: `verify(dataset)` always hashes, and is called at
  catalog load (server start) and before a prepared copy is trusted for the first
  time in a process (`PreparedStore.source`), because a copy vouches for one version.

A new version's schema is checked against the catalog entry (`check_data`) before it
is served.

Reading is streamed in 1 MiB blocks (never the whole file in memory), through a
descriptor opened with O_NOFOLLOW after checking the path resolves inside the
sandbox: a dataset is never read through a symlink out of `sandbox/`.

Two catalog entries over the same bytes would be one dataset with two caps (each
consumer zone spending its own), so they are refused: at load (`check_unique`)
and whenever a changed file turns out to equal another entry's current version.

Limits: the hash names bytes, not rows. The same rows re-encoded (another
compression, another row order) are a different file, so a re-encoded copy under a
second entry is not caught as a duplicate; the operator is trusted not to do that on
purpose. The engines read by path after the check, so a file swapped in the instant
between the check and the read is read once; the next request sees the change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dataops import catalog
from dataops.catalog import Dataset
from dataops.errors import CatalogError, DataUnavailable

log = logging.getLogger(__name__)

_BLOCK = 1 << 20
DEFAULT_RECHECK_SECONDS = 300.0


def stat_signature(st: os.stat_result) -> tuple[int, ...]:
    """What must be unchanged for a cached hash to be reused (see the module docstring)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def inside_sandbox(dataset: Dataset) -> Path:
    """The dataset file's real path, or CatalogError if it resolves outside the sandbox."""
    real = Path(catalog.real_path(dataset.path))
    if dataset.sandbox is not None and not catalog.is_inside(real, dataset.sandbox):
        raise CatalogError(
            f"{dataset.source}: location: {dataset.location!r} resolves to {real}, outside the "
            f"sandbox {catalog.real_path(dataset.sandbox)}; a symlink out of sandbox/ is refused"
        )
    return real


def hash_file(path: Path) -> tuple[str, os.stat_result]:
    """SHA-256 of the file's bytes, streamed, and its stat taken on the same descriptor."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest(), st


# catalog_terms per Dataset object (entries are frozen; a reload makes new ones), by id with
# the object kept, so an id is never reused while its entry stands. Asked on every exact
# and DP request: 22 us each to compute, one lookup once known.
_TERMS: dict[int, tuple[Dataset, str]] = {}
_TERMS_KEPT = 1024


def catalog_terms(dataset: Dataset) -> str:
    """SHA-256 of the catalog terms a DP answer depends on (unit, cap, types, bounds, keys, bins)."""
    known = _TERMS.get(id(dataset))
    if known is not None and known[0] is dataset:
        return known[1]
    digest = _catalog_terms(dataset)
    if len(_TERMS) >= _TERMS_KEPT:
        _TERMS.clear()
    _TERMS[id(dataset)] = (dataset, digest)
    return digest


def _catalog_terms(dataset: Dataset) -> str:
    columns = [
        [c.name, c.type.value, c.classification.value, c.bounds, [str(k) for k in c.keys or ()], c.bins]
        for c in dataset.columns.values()
    ]
    material = {
        "unit": dataset.unit_column,
        "max_rows_per_unit": dataset.max_rows_per_unit,
        "columns": columns,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class _Known:
    signature: tuple[int, ...]
    version: str
    hashed_at: float  # time.monotonic()


class DataVersions:
    """The content hash of each dataset file; see the module docstring.

    `of` and `verify` serve requests: an unusable file raises `DataUnavailable` (the
    consumer learns the dataset id only; the operator's details go to the log).
    `check_unique` serves catalog load and raises `CatalogError` naming file and key.
    """

    def __init__(
        self,
        recheck_seconds: float = DEFAULT_RECHECK_SECONDS,
        signature: Callable[[os.stat_result], tuple] = stat_signature,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.recheck_seconds = recheck_seconds
        self._signature = signature
        self._clock = clock
        self._known: dict[str, _Known] = {}  # dataset id -> its last hash
        self._datasets: dict[str, Dataset] = {}
        self._refused: set[str] = set()  # entries found to share their content with another
        self._hash_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def of(self, dataset: Dataset) -> str:
        """The dataset's current version: cached while its stat is unchanged and the hash fresh."""
        return self._serving(dataset, fresh=False)

    def verify(self, dataset: Dataset) -> str:
        """Hash the file now, whatever stat says: an explicit check."""
        return self._serving(dataset, fresh=True)

    def check_unique(self, datasets: Iterable[Dataset]) -> dict[str, str]:
        """Hash every dataset (at load); CatalogError if two entries hold the same bytes."""
        return {dataset.id: self._version(dataset, fresh=True) for dataset in datasets}

    # --- internals ----------------------------------------------------------------

    def _serving(self, dataset: Dataset, fresh: bool) -> str:
        try:
            return self._version(dataset, fresh)
        except CatalogError as exc:
            log.error("refusing requests on %s: %s", dataset.id, exc)
            raise DataUnavailable(dataset.id) from None

    def _version(self, dataset: Dataset, fresh: bool) -> str:
        real = inside_sandbox(dataset)
        if fresh:
            return self._hash(dataset, real)
        cached = self._cached(dataset, real)
        if cached is not None:
            return cached
        with self._hashing(dataset.id):  # concurrent requests after a change: one hash
            cached = self._cached(dataset, real)
            return cached if cached is not None else self._hash(dataset, real)

    def _cached(self, dataset: Dataset, real: Path) -> str | None:
        try:
            signature = self._signature(os.stat(real))
        except OSError as exc:
            raise CatalogError(f"{dataset.source}: location: {real} cannot be read: {exc.strerror}") from None
        with self._lock:
            known = self._known.get(dataset.id)
            refused = dataset.id in self._refused
        if (
            not refused  # a refused entry is hashed every time, until it is fixed
            and known is not None
            and known.signature == signature
            and self._clock() - known.hashed_at < self.recheck_seconds
        ):
            return known.version
        return None

    def _hashing(self, dataset_id: str) -> threading.Lock:
        with self._lock:
            return self._hash_locks.setdefault(dataset_id, threading.Lock())

    def _hash(self, dataset: Dataset, real: Path) -> str:
        try:
            version, st = hash_file(real)
        except OSError as exc:
            raise CatalogError(f"{dataset.source}: location: {real} cannot be read: {exc.strerror}") from None
        with self._lock:
            previous = self._known.get(dataset.id)
        if previous is None or previous.version != version:
            # A new version (or the first): its schema must still match the entry, or
            # every query on it would fail mid-release instead of being refused cleanly.
            try:
                catalog.check_data(dataset)
            except CatalogError:
                raise
            except Exception as exc:  # polars on a file that is not Parquet
                first = str(exc).split("\n", 1)[0]
                raise CatalogError(
                    f"{dataset.source}: location: {real} is not a readable Parquet file: {first}"
                ) from exc
        with self._lock:
            self._datasets[dataset.id] = dataset
            self._known[dataset.id] = _Known(self._signature(st), version, self._clock())
        self._refuse_twins(dataset, version)
        return version

    def _refuse_twins(self, dataset: Dataset, version: str) -> None:
        """CatalogError if another entry's current content is these bytes (both are refused)."""
        with self._lock:
            twins = [
                other for other, k in self._known.items() if other != dataset.id and k.version == version
            ]
        for other in twins:
            # The other entry's hash may be stale (its file changed since): hash it again
            # before refusing anything.
            other_dataset = self._datasets[other]
            if self._rehash_quietly(other_dataset) == version:
                with self._lock:
                    self._refused.update((dataset.id, other))
                a, b = sorted([dataset, other_dataset], key=lambda d: d.id)
                raise CatalogError(
                    f"{b.source}: location: {b.location!r} holds the same data (sha256 {version[:16]}...) "
                    f"as {a.source} (location {a.location!r}); two catalog entries over one content "
                    "would give it two privacy budget caps, so both are refused: remove one entry"
                )
        with self._lock:
            self._refused.discard(dataset.id)

    def _rehash_quietly(self, dataset: Dataset) -> str | None:
        try:
            version, st = hash_file(inside_sandbox(dataset))
        except (OSError, CatalogError):
            return None
        with self._lock:
            self._known[dataset.id] = _Known(self._signature(st), version, self._clock())
        return version


class Fingerprints:
    """A dataset's data version together with its catalog terms (`catalog_terms`).

    For stores whose output depends on the catalog entry as well as the data (the
    subject layouts lay columns out by their catalog type and keys): an edited entry
    must not reuse a layout made under the old one. Same-content checks, symlink
    refusal and caching are the underlying `DataVersions`'.
    """

    def __init__(self, versions: DataVersions | None = None) -> None:
        self.versions = versions if versions is not None else DataVersions()
        self._known: dict[tuple[str, str], str] = {}  # (version, terms) -> fingerprint

    def of(self, dataset: Dataset, version: str | None = None) -> str:
        """The fingerprint of the dataset at `version` (its data version; None: look it up)."""
        key = (self.versions.of(dataset) if version is None else version, catalog_terms(dataset))
        fingerprint = self._known.get(key)
        if fingerprint is None:
            fingerprint = hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()
            if len(self._known) >= _TERMS_KEPT:
                self._known.clear()
            self._known[key] = fingerprint
        return fingerprint
