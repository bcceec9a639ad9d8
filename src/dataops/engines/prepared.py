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
* The copy holds only what queries can use (dataops.engines.dp.prepared_column_names):
  no identifier column, no unclassified column, and no unit id, and each column once
  in its own type (a measure's fixed point is computed in the plan), and a string
  column with public keys also as its key positions (`prepared_codes`), a binned one as
  its bin positions (`prepared_bins`). The unit is a
  dense integer code (`UNIT_CODE`, 0..n-1) that says nothing about the id it stands
  for: its bucket is a hash of the id under a seed drawn for the build and forgotten,
  and inside the bucket a random permutation nobody keeps (an unkeyed hash of an
  enterprise code could be inverted by hashing the public register). Codes are one
  per unit but for 64-bit hash collisions inside a bucket, which only ever drop rows
  from COUNT_UNITS (see dataops.engines.build). The truncation itself runs on the
  real ids.

How a copy is built (dataops.engines.build): out of core, in a child process whose
memory is capped (`memory_limit_bytes`, 4 GiB by default: RLIMIT_DATA, what it
allocates; the source file it maps to read is page cache, outside the cap).
The rows are hash-partitioned by unit into buckets on disk (Parquet files), so a unit
never spans buckets, and the bound is enforced bucket by bucket, each bucket holding
whole units; memory is set by the bucket size, not the dataset's. A build that needs
more than the cap fails in the child alone: the server keeps serving (exact answers
never read a copy), and DP queries on that dataset get `CopyUnavailable`
(UNAVAILABLE, reason DP_COPY_FAILED, a RetryInfo) until a retry after a back-off
succeeds. Builds run one at a time on one worker thread, started when the server
starts (`warm`) and whenever a query finds a new data version; a query waits for its
copy at most `wait_seconds`, then gets UNAVAILABLE (reason DP_COPY_NOT_READY) with a
retry hint instead of blocking for the whole build. The parent, never the child,
holds the secret that tags the copy.

COUNT_UNITS still deduplicates every (unit, group) pair per query, so it costs several
times a row aggregate (0.7-2 s at 10M rows on two cores), one range of unit codes at a
time so its memory stays bounded (dataops.engines.dp); the row aggregates cost about as
much as the same polars group-by.

Why a copy can be trusted. A copy is the directory
`state/prepared/<dataset_id>-<key[:16]>.copy` of Parquet parts (`part-00000.parquet`
on; dataops.engines.build says why parts), where the key (`copy_key`) covers the
dataset's data version (the SHA-256 of its Parquet, `dataops.versions.DataVersions`)
and the catalog terms the copy depends on (unit, cap, the columns and their bounds). Beside it, `<name>.tag` records the key,
dataset, data version, cap and layout, and the SHA-256 of the copy's bytes, under an
HMAC-SHA256 with a server secret (`state/prepared.key`, 32 random bytes, mode 0600;
refused if anyone else may read it); the copy's hash is over its parts' names and
each part's SHA-256 (`hash_copy`), so a part added, removed, renamed or changed is a
copy that does not verify, and a directory holding anything but parts is none. A copy
is used only if its tag verifies and the copy's bytes hash to what the tag says: a
planted copy (say, untruncated, with the right names and metadata) is rebuilt, never
read. The check runs when a copy is first used in a process and again whenever the
stat signature (inode, size, mtime, ctime) of the directory or of any part changes;
the data itself is hashed afresh (`DataVersions.verify`) each time a copy is adopted,
so a copy is never trusted for a version it was not made from. `prepared/` itself is kept private to the server's user (mode 0700), so no other user
can plant a file there while it runs; the tag catches copies that arrive by other ways
(a restored backup, a copy from another host, an edit while the server was stopped).
Between the check and polars reading the file, a writer who can write `prepared/`
anyway (the server's own user) could still swap it; that user can read the secret too,
which is the compromised host the threat model leaves out.

Copies are written to a temporary directory and renamed into place, built under a
per-dataset lock (concurrent first queries share one build), and older versions of
the dataset are removed once a new one is in place.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from dataops._fs import STALE_SECONDS, fsync_dir, remove_stale
from dataops.catalog import Dataset
from dataops.engines.build import PART_PATTERN, PART_ROWS, ROWS_PER_BUCKET
from dataops.engines.children import DEFAULT_MEMORY_LIMIT_BYTES, BuildFailed, Children
from dataops.engines.dp import (
    PREPARED_LAYOUT,
    PreparedSource,
    prepared_bins,
    prepared_codes,
    prepared_column_names,
    prepared_fixed,
    require_max_rows,
)
from dataops.errors import ConfigError, CopyFailed, CopyUnavailable, InternalError
from dataops.versions import DataVersions, Fingerprints, hash_file, stat_signature

__all__ = ["BuildFailed", "DataVersions", "Fingerprints", "PreparedSource", "PreparedStore", "copy_key"]

log = logging.getLogger(__name__)


_BUILD_ATTEMPTS = 3  # the dataset file changed while a copy was being built: try again
_STALE_TEMPORARY_SECONDS = STALE_SECONDS  # a temporary file this old is no build in progress
_SECRET_BYTES = 32
SECRET_NAME = "prepared.key"
_RETRY_WHILE_BUILDING_SECONDS = 5
_FIRST_RETRY_SECONDS = 60.0  # after a failed build; doubled on each failure of the same version
_MAX_RETRY_SECONDS = 3600.0


def copy_parts(path: Path) -> tuple[Path, ...]:
    """A copy's parts in name order (which is code order); ValueError if the directory
    holds anything else, or is no directory: that is no copy we wrote."""
    if os.path.islink(path) or not path.is_dir():
        raise ValueError(f"{path.name} is not a copy's directory")
    names = sorted(os.listdir(path))
    if not names or any(not re.fullmatch(PART_PATTERN, name) for name in names):
        raise ValueError(f"{path.name} holds files that are no copy's parts")
    return tuple(path / name for name in names)


def copy_signature(path: Path, parts: Iterable[Path]) -> tuple:
    """The stat signatures of the directory and each part: any change to a part, or a
    part added or removed (the directory's mtime), is a different signature."""
    return (stat_signature(os.stat(path)), *(stat_signature(os.stat(part)) for part in parts))


def hash_copy(path: Path) -> tuple[str, tuple[Path, ...], tuple]:
    """(SHA-256 over the parts' names and contents, the parts, their copy_signature).

    Each part is hashed on the descriptor its stat is taken from (`hash_file`); the
    signature is taken from those stats, so bytes that change after they were hashed
    change the signature too."""
    parts = copy_parts(path)
    directory = stat_signature(os.stat(path))
    manifest, signatures = [], []
    for part in parts:
        digest, st = hash_file(part)
        manifest.append([part.name, digest])
        signatures.append(stat_signature(st))
    digest = hashlib.sha256(json.dumps(manifest, separators=(",", ":")).encode()).hexdigest()
    if copy_parts(path) != parts:  # a part came or went while the others were hashed
        raise ValueError(f"{path.name} changed while it was hashed")
    return digest, parts, (directory, *signatures)


def copy_key(dataset: Dataset, data_version: str) -> str:
    """What a copy is made from: the data version and the catalog terms the copy depends on."""
    # Each column's type and bounds also fix its `#fixed:` column (prepared_fixed), and its
    # bins its `#bin:` column (prepared_bins): a new bound or new edges, a new copy.
    columns = [
        [
            c.name,
            c.type.value,
            c.classification.value,
            list(c.bounds) if c.bounds else None,
            list(c.bins) if c.bins else None,
        ]
        for c in dataset.columns.values()
    ]
    material = {
        "layout": PREPARED_LAYOUT,
        "dataset": dataset.id,
        "data_version": data_version,
        "unit": dataset.unit_column,
        "max_rows_per_unit": dataset.max_rows_per_unit,
        "columns": columns,
        # The key positions are the keys' order: new or reordered keys, a new copy.
        "codes": prepared_codes(dataset),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def load_secret(path: Path) -> bytes:
    """The server secret that authenticates prepared copies, created on first use (mode 0600).

    Refused if it is not a regular file of ours that only we may read: a secret others
    could read lets them forge a copy's tag.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(_SECRET_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)  # atomic, and never replaces a secret another process made
        except FileExistsError:
            pass
        finally:
            temporary.unlink(missing_ok=True)
        fsync_dir(path.parent)
    st = os.lstat(path)
    fix = "(chmod 600 it, or delete it: the prepared copies are then rebuilt under a new one)"
    if not os.path.isfile(path) or os.path.islink(path):
        raise ConfigError(f"{path}: the prepared-copy secret must be a regular file, not a link {fix}")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"{path}: mode {st.st_mode & 0o777:o}, owner {st.st_uid}: the prepared-copy secret must be "
            f"readable by the server's user only {fix}"
        )
    secret = path.read_bytes()
    if len(secret) != _SECRET_BYTES:
        raise ConfigError(f"{path}: the prepared-copy secret must be {_SECRET_BYTES} bytes {fix}")
    return secret


class PreparedStore:
    """Truncated, authenticated copies of the datasets under `state_dir/prepared`.

    See the module docstring. ``authenticate=False`` trusts a copy whose tag merely
    names the right version (no HMAC, no content hash): for tests that show the
    attack the HMAC stops.
    """

    def __init__(
        self,
        state_dir: Path,
        versions: DataVersions | None = None,
        *,
        authenticate: bool = True,
        wait_seconds: float | None = None,
        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
        rows_per_bucket: int = ROWS_PER_BUCKET,
        part_rows: int = PART_ROWS,
    ) -> None:
        self.directory = Path(state_dir) / "prepared"
        self.versions = versions if versions is not None else DataVersions()
        self.authenticate = authenticate
        self._secret = load_secret(Path(state_dir) / SECRET_NAME)
        self._private_directory()
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._ready: dict[str, tuple[PreparedSource, tuple]] = {}  # id -> (copy, its copy_signature)
        self._closing = threading.Event()
        self.wait_seconds = wait_seconds  # None: `source` waits for a build however long it takes
        self.memory_limit_bytes = memory_limit_bytes
        self.rows_per_bucket = rows_per_bucket
        self.part_rows = part_rows
        self.last_build: dict | None = None  # the stats the last build's child reported
        # One build at a time: each may use up to memory_limit_bytes.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dataops-prepare")
        self._builds: dict[str, concurrent.futures.Future] = {}
        # id -> (copy key, retry at (monotonic), back-off, the failed future)
        self._failed: dict[str, tuple[str, float, float, concurrent.futures.Future]] = {}
        self._children = Children()

    @property
    def fingerprints(self) -> Fingerprints:
        """Data version and catalog terms together (`dataops.versions.Fingerprints`)."""
        return Fingerprints(self.versions)

    def source(
        self, dataset: Dataset, *, wait: float | None = None, version: str | None = None
    ) -> PreparedSource:
        """The copy of the dataset's current version, built in the background if there is none.

        Waits for a build at most `wait` seconds (the store's `wait_seconds` if None;
        None there too, or math.inf: until it is done), then answers `CopyUnavailable` with a retry
        hint, so a query never blocks for a long build. A build that failed (its child
        ran out of its memory limit, say) is tried again only after a back-off; until
        then queries get `CopyUnavailable` at once.
        """
        require_max_rows(dataset)
        # version: the data version the request's plan checked (None: look it up now).
        key = copy_key(dataset, self.versions.of(dataset) if version is None else version)
        ready = self._current(dataset, key)
        if ready is not None:
            return ready
        future = self._start(dataset, key)
        timeout = self.wait_seconds if wait is None else wait
        if timeout is not None and math.isinf(timeout):
            timeout = None  # math.inf: until it is built, whatever the store's wait
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise CopyUnavailable(
                f"the DP serving copy of {dataset.id!r} is being built for its current data version; "
                f"retry in {_RETRY_WHILE_BUILDING_SECONDS} seconds",
                rule="dp.copy_building",
                retry_after_seconds=_RETRY_WHILE_BUILDING_SECONDS,
            ) from None
        except BuildFailed:
            with self._guard:
                failed = self._failed.get(dataset.id)
            retry = max(1, math.ceil(failed[1] - time.monotonic())) if failed else 1
            # What failed is the operator's to read in the server log; the consumer
            # learns only that DP on this dataset is down for now.
            raise CopyFailed(
                f"the DP serving copy of {dataset.id!r} could not be built; DP queries on it are "
                f"unavailable until the operator fixes it (next attempt in {retry} seconds)",
                rule="dp.copy_failed",
                retry_after_seconds=retry,
            ) from None

    def warm(self, datasets: Iterable[Dataset]) -> list[concurrent.futures.Future]:
        """Queue the copies' builds, so the first DP query need not wait (or wait less)."""
        futures = []
        for dataset in datasets:
            if not dataset.dp_ready:  # no cap set: no DP, no copy
                continue
            try:
                key = copy_key(dataset, self.versions.of(dataset))
                if self._current(dataset, key) is None:
                    futures.append(self._start(dataset, key))
            except Exception:  # the first query on it builds again and reports the error
                log.exception("could not prepare %s for DP queries", dataset.id)
        return futures

    def wait_ready(self, datasets: Iterable[Dataset], timeout: float | None = None) -> bool:
        """Block until every DP dataset's copy is built or failed; True if all are built."""
        deadline = None if timeout is None else time.monotonic() + timeout
        built = True
        for future in self.warm(datasets):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                future.result(remaining)
            except concurrent.futures.TimeoutError:
                return False
            except Exception:
                built = False
        return built

    def close(self, timeout: float = 60.0) -> None:
        """Stop building: queued builds are dropped and a running build's child is killed
        (a build is a child process, so stopping it never interrupts native code here)."""
        self._closing.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._children.kill(timeout)

    def path_for(self, dataset: Dataset, key: str) -> Path:
        """The copy's directory (its parts inside)."""
        return self.directory / f"{dataset.id}-{key[:16]}.copy"

    @staticmethod
    def tag_path(path: Path) -> Path:
        return path.with_name(path.name + ".tag")

    # --- internals ----------------------------------------------------------------

    def _current(self, dataset: Dataset, key: str) -> PreparedSource | None:
        """The adopted copy, if it is still this key's and its file was not touched since."""
        with self._guard:
            ready = self._ready.get(dataset.id)
        if ready is None or ready[0].fingerprint != key:
            return None
        try:
            unchanged = copy_signature(ready[0].path, ready[0].parts) == ready[1]
        except OSError:
            unchanged = False
        return ready[0] if unchanged else None

    def _start(self, dataset: Dataset, key: str) -> concurrent.futures.Future:
        """The build of this dataset's copy under way, queued, or failed recently; else a new one.

        Builds run one at a time (one worker): each may use up to the memory limit.
        """
        with self._guard:
            running = self._builds.get(dataset.id)
            if running is not None and not running.done():
                return running
            failed = self._failed.get(dataset.id)
            if failed is not None and failed[0] == key and time.monotonic() < failed[1]:
                return failed[3]
            if self._closing.is_set():
                stopped: concurrent.futures.Future = concurrent.futures.Future()
                stopped.set_exception(BuildFailed("the server is stopping"))
                return stopped
            future = self._executor.submit(self._prepare, dataset)
            self._builds[dataset.id] = future

        def done(finished: concurrent.futures.Future) -> None:
            if finished.cancelled() or finished.exception() is None or self._closing.is_set():
                with self._guard:
                    self._failed.pop(dataset.id, None)
                return
            with self._guard:
                previous = self._failed.get(dataset.id)
                delay = _FIRST_RETRY_SECONDS if previous is None or previous[0] != key else previous[2] * 2
                delay = min(delay, _MAX_RETRY_SECONDS)
                self._failed[dataset.id] = (key, time.monotonic() + delay, delay, finished)
            log.error("could not prepare %s for DP queries: %s", dataset.id, finished.exception())

        future.add_done_callback(done)
        return future

    def _prepare(self, dataset: Dataset) -> PreparedSource:
        """Build (or adopt a built) copy of the dataset's current version; the build worker's job."""
        max_rows = require_max_rows(dataset)
        with self._lock_for(dataset.id):
            for _ in range(_BUILD_ATTEMPTS):
                version = self.versions.of(dataset)
                key = copy_key(dataset, version)
                ready = self._current(dataset, key)
                if ready is not None:
                    return ready
                path = self.path_for(dataset, key)
                valid = self._valid(path, dataset, version, key)
                if valid is None:
                    self._build(dataset, version, key, path)
                    valid = self._valid(path, dataset, version, key)
                    if valid is None:
                        raise InternalError(f"the prepared copy {path.name} does not verify after its build")
                # Adopting a copy: hash the data now, whatever its stat says, so the copy
                # is never trusted for a version it was not made from.
                if self.versions.verify(dataset) != version:
                    continue  # the data changed under the build: that copy is stale
                parts, signature = valid
                source = PreparedSource(dataset.id, key, path, parts, max_rows, version)
                with self._guard:
                    self._ready[dataset.id] = (source, signature)
                self._remove_old(dataset, keep=path)
                return source
        raise InternalError(f"{dataset.id} kept changing while its prepared copy was built")

    def _private_directory(self) -> None:
        """`prepared/` is the server user's alone (0700): no other user can plant a file in it."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.directory.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            log.warning(
                "%s was open to other users (mode %o); making it 0700", self.directory, st.st_mode & 0o777
            )
            self.directory.chmod(0o700)

    def _lock_for(self, dataset_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(dataset_id, threading.Lock())

    @staticmethod
    def _claims(dataset: Dataset, version: str, key: str) -> dict:
        return {
            "layout": PREPARED_LAYOUT,
            "dataset": dataset.id,
            "data_version": version,
            "copy_key": key,
            "max_rows_per_unit": dataset.max_rows_per_unit,
        }

    def _mac(self, fields: dict) -> str:
        message = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _valid(
        self, path: Path, dataset: Dataset, version: str, key: str
    ) -> tuple[tuple[Path, ...], tuple] | None:
        """The copy's parts and copy_signature if its tag verifies and names this version; else None."""
        try:
            tag = json.loads(self.tag_path(path).read_text())
            if not isinstance(tag, dict):
                return None
            claims = self._claims(dataset, version, key)
            if any(tag.get(name) != value for name, value in claims.items()):
                return None
            parts = copy_parts(path)
            if not self.authenticate:  # the control switched off: the metadata is believed
                return parts, copy_signature(path, parts)
            fields = {name: value for name, value in tag.items() if name != "mac"}
            if not hmac.compare_digest(str(tag.get("mac", "")), self._mac(fields)):
                log.warning("prepared copy %s: its tag does not verify; building it again", path.name)
                return None
            digest, parts, signature = hash_copy(path)
            if not hmac.compare_digest(digest, str(tag.get("sha256", ""))):
                log.warning(
                    "prepared copy %s: its bytes are not the ones tagged; building it again", path.name
                )
                return None
            return parts, signature
        except (OSError, ValueError):  # missing, torn or foreign: build it again
            return None

    def _build(self, dataset: Dataset, version: str, key: str, path: Path) -> None:
        """Bound each unit to its first k rows (real unit ids, file order), code the units and
        keep only usable columns, in a memory-capped child (dataops.engines.build); then tag
        the copy here, where the secret is, and move both into place."""
        self._private_directory()
        stem = f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}"
        temporary, temporary_tag = self.directory / f"{stem}.tmp", self.directory / f"{stem}.tag.tmp"
        scratch = self.directory / f"{stem}.buckets.tmp"
        request = {
            "source": str(dataset.path),
            "output": str(temporary),
            "scratch": str(scratch),
            "unit": dataset.unit_column,
            "columns": prepared_column_names(dataset),
            "codes": prepared_codes(dataset),
            "fixed": prepared_fixed(dataset),
            "bins": prepared_bins(dataset),
            "max_rows_per_unit": dataset.max_rows_per_unit,
            "memory_limit_bytes": self.memory_limit_bytes,
            "rows_per_bucket": self.rows_per_bucket,
            "part_rows": self.part_rows,
        }
        replaced = self.directory / f"{stem}.old.tmp"
        try:
            stats = self._run_build(request)
            digest, _, _ = hash_copy(temporary)
            fields = {**self._claims(dataset, version, key), "sha256": digest}
            temporary_tag.write_text(json.dumps({**fields, "mac": self._mac(fields)}, sort_keys=True))
            with temporary_tag.open("rb") as f:
                os.fsync(f.fileno())
            # A directory that did not verify (planted, torn) is moved aside first: a
            # rename cannot replace a directory that is not empty.
            if os.path.lexists(path):
                os.replace(path, replaced)
            # The copy first: a crash before the tag lands leaves a copy that does not verify.
            os.replace(temporary, path)
            os.replace(temporary_tag, self.tag_path(path))
            fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary_tag.unlink(missing_ok=True)
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        finally:
            _remove(replaced)
        self.last_build = stats
        log.info(
            "prepared %s for DP queries: %d rows of %d, at most %d per unit, %d buckets, %d parts, "
            "%.1f s, peak RSS %.2f GiB",
            dataset.id,
            stats["rows"],
            stats["source_rows"],
            dataset.max_rows_per_unit,
            stats["buckets"],
            stats["parts"],
            stats["seconds"],
            stats["peak_rss_bytes"] / 2**30,
        )

    def _run_build(self, request: dict) -> dict:
        """Run dataops.engines.build in a child process; its stats, or BuildFailed."""
        return self._children.run(
            "dataops.engines.build", request, Path(request["output"]).name, self.memory_limit_bytes
        )

    def _remove_old(self, dataset: Dataset, keep: Path) -> None:
        """Older versions (layout 4's single files too), and temporary files a stopped build
        left (after a grace period)."""
        pattern = re.compile(rf"{re.escape(dataset.id)}-[0-9a-f]{{16}}\.(copy|parquet)(\.tag)?")
        kept = {keep.name, self.tag_path(keep).name}
        for old in self.directory.glob(f"{dataset.id}-*"):
            if old.name not in kept and pattern.fullmatch(old.name):
                _remove(old)
        # A build's buckets are a directory whose files change as it runs.
        remove_stale(self.directory, f".{dataset.id}-*.tmp", _STALE_TEMPORARY_SECONDS)


def _remove(path: Path) -> None:
    """A file, or a directory and what is in it (not a link's target); nothing if absent."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
