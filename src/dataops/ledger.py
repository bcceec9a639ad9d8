"""The privacy-budget ledger: durable, atomic debits in SQLite (WAL).

A grant (consumer × dataset) has a DP budget and a dataset has a cap across all
consumers (colluding consumers add up). The ledger records *spends*; the limits come
from the policy and the catalog at call time, because operators may edit them.

The life of one DP request::

    r = ledger.reserve(...)      # debit first, before any noisy value exists
    try:
        value = run_the_measurement()
    except Exception:
        ledger.refund(r)         # nothing left the process: the budget comes back
        raise
    stored = ledger.commit(r, release_key=..., payload=..., metadata=...)
    write_the_audit_record()     # then respond

The service commits before the audit append: if the append then fails, the response
is refused and the value never leaves, yet the budget stays spent (fail closed) and
the stored release is only ever returned again by a later request that is itself
audited — re-releasing the same noisy value adds no privacy loss.

Why it cannot overspend: `reserve` reads what has been spent and records the new
spend inside one `BEGIN IMMEDIATE` transaction. SQLite grants that write lock to one
connection at a time across every thread and process using the file, so no two
check-and-debit sequences interleave. Other writers wait (`busy_timeout`) rather than
fail.

Reservation states (rows are never deleted; they are the audit trail):

* ``reserved``   — debited, outcome not yet known. Counts as spent.
* ``released``   — `commit`: the value may have left. Counts as spent.
* ``orphaned``   — was ``reserved`` when a `Ledger` opened the file (`recover`), e.g.
  the process died between reserve and commit/refund. We cannot know whether a value
  left the process, so it stays spent for ever (fail closed).
* ``refunded``   — `refund`: the query failed before anything was released.
* ``superseded`` — `commit` found an identical release already stored: this
  reservation's value is discarded and the stored one is returned instead.

Only ``reserved`` can return budget. Transitions out of ``orphaned`` may only keep it
spent: a live process whose reservation was orphaned by another process opening the
file can still commit, but its refund is ignored.

Group commit: SQLite's own fsync at each COMMIT (synchronous=FULL) serialises every
debit behind one disk flush while holding the write lock. Instead the ledger commits
with synchronous=NORMAL (in WAL mode: no fsync at commit, nothing lost or torn on a
crash of the process) and then waits in `GroupSync` for one fsync of the WAL that
covers every transaction committed so far. A call returns only after its
transaction is on disk, as before; concurrent calls share the fsync. At start the
server checks the ledger against the audit log (`dataops.audit.receipts`).

Amounts are stored as integers — epsilon in units of 1e-12, delta in units of 1e-18 —
so sums are exact and comparisons need no tolerance (with floats, ten debits of 0.1
against a budget of 1.0 would fail or pass depending on summation order). A float is
converted through its shortest decimal form (``repr``), i.e. the number the operator
wrote in TOML, so a budget of 0.3 admits exactly three debits of 0.1. Spends round up
and totals round down to the unit, so rounding can only ever refuse, never admit.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Iterator

from dataops._group import GroupSync
from dataops.errors import BudgetExhausted, InternalError, QuotaViolation

# Decimal places of the integer units. int64 holds 9.2e18, hence the maxima: no sum
# of admitted spends can exceed a total, so no SUM can overflow.
_EPSILON_PLACES = 12
_DELTA_PLACES = 18
MAX_EPSILON = 1e6
MAX_DELTA = 1.0

# Long enough that writers queue behind each other under load (a transaction here
# lasts well under a millisecond plus one fsync); when it does run out the caller
# gets sqlite3.OperationalError and nothing is recorded.
_BUSY_TIMEOUT_S = 30.0

_SPENT = ("reserved", "released", "orphaned")
_RELEASE_KEY = re.compile(r"[0-9a-f]{16,128}")
_SCHEMA_VERSION = 1
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS reservations (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer  TEXT NOT NULL,
    dataset   TEXT NOT NULL,
    epsilon   INTEGER NOT NULL CHECK (epsilon >= 0),   -- 1e-12 units
    delta     INTEGER NOT NULL CHECK (delta >= 0),     -- 1e-18 units
    status    TEXT NOT NULL CHECK (status IN
                ('reserved', 'released', 'orphaned', 'refunded', 'superseded')),
    request   TEXT NOT NULL,
    created   TEXT NOT NULL,
    settled   TEXT
);
-- Running totals of spent reservations, kept in the same transactions as the
-- reservations so a debit costs O(1) however long the history grows.
-- recover() checks them against the reservations.
CREATE TABLE IF NOT EXISTS grant_spend (
    consumer  TEXT NOT NULL,
    dataset   TEXT NOT NULL,
    epsilon   INTEGER NOT NULL CHECK (epsilon >= 0),
    delta     INTEGER NOT NULL CHECK (delta >= 0),
    PRIMARY KEY (consumer, dataset)
);
CREATE TABLE IF NOT EXISTS releases (
    key            TEXT PRIMARY KEY,
    payload        BLOB NOT NULL,
    metadata       TEXT NOT NULL,
    consumer       TEXT NOT NULL,
    dataset        TEXT NOT NULL,
    reservation_id INTEGER NOT NULL REFERENCES reservations (id),
    created        TEXT NOT NULL
);
PRAGMA user_version = {_SCHEMA_VERSION};
"""


@dataclass(frozen=True)
class Reservation:
    id: int
    consumer: str
    dataset: str
    epsilon: float
    delta: float


@dataclass(frozen=True)
class Spend:
    """What has been spent; ``consumer`` None is the dataset-wide row (all consumers)."""

    consumer: str | None
    dataset: str
    epsilon_spent: float
    delta_spent: float


@dataclass(frozen=True)
class BudgetState:
    """Spend next to its limit, for display. The ledger knows no limits: the caller
    joins a `Spend` with the policy (grant) or catalog (dataset cap) totals."""

    consumer: str | None
    dataset: str
    epsilon_total: float
    delta_total: float
    epsilon_spent: float
    delta_spent: float

    @property
    def epsilon_remaining(self) -> float:
        return max(0.0, self.epsilon_total - self.epsilon_spent)

    @property
    def delta_remaining(self) -> float:
        return max(0.0, self.delta_total - self.delta_spent)


@dataclass(frozen=True)
class StoredRelease:
    key: str
    payload: bytes
    metadata: str
    consumer: str  # who paid for it
    created: str
    dataset: str
    reservation_id: int  # != your reservation's id: an identical release won the race


class BudgetExhaustedError(BudgetExhausted):
    """A reservation would exceed the grant budget or the dataset cap; nothing recorded.

    ``epsilon_remaining``/``delta_remaining`` are of the budget named by ``which``.
    For ``which == "dataset"`` they reflect other consumers' activity, so the message
    (which crosses the wire) leaves them out; the service decides what to disclose.
    """

    def __init__(
        self, which: str, consumer: str, dataset: str, epsilon_remaining: float, delta_remaining: float
    ) -> None:
        self.which = which
        self.consumer = consumer
        self.dataset = dataset
        self.epsilon_remaining = epsilon_remaining
        self.delta_remaining = delta_remaining
        if which == "grant":
            subject = f"grant:{consumer}/{dataset}"
            description = (
                f"the privacy budget of this grant is exhausted for this request "
                f"(epsilon remaining {epsilon_remaining:g}, delta remaining {delta_remaining:g})"
            )
        else:
            subject = f"dataset:{dataset}"
            description = "the dataset-wide privacy budget cap is exhausted for this request"
        super().__init__(
            f"{subject}: {description}",
            rule=f"budget.{which}",
            quota_violations=(QuotaViolation(subject, description),),
        )


def _units(value: float, places: int, rounding: str) -> int:
    return int(Decimal(repr(float(value))).scaleb(places).to_integral_value(rounding))


def _float(units: int, places: int) -> float:
    return float(Decimal(units).scaleb(-places))


def _check_amount(name: str, value: object, maximum: float) -> float:
    # bool is an int; a True epsilon is a bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum:g}, got {value!r}")
    return value


def _check_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def _check_release_key(key: object) -> str:
    if not isinstance(key, str) or not _RELEASE_KEY.fullmatch(key):
        raise ValueError("release_key must be 16 to 128 lowercase hex digits")
    return key


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


class Ledger:
    """The budget ledger on one SQLite file; safe to share between threads, and any
    number of processes may open the same file."""

    def __init__(self, path: Path, *, recover: bool = True, group_commit: bool = True) -> None:
        """Open (creating if needed) the ledger at ``path``.

        ``recover`` (default) orphans reservations left open by a previous run; see
        `recover`. A read-only tool opened beside a running server (e.g. `dataops
        budget show`) should pass False so it does not orphan that server's in-flight
        reservations (which would only cost their refunds, never overspend).

        ``group_commit`` False makes SQLite fsync inside every COMMIT (the baseline the
        benchmark compares against).
        """
        self.path = Path(path)
        self.group_commit = group_commit
        self._group = GroupSync(self._sync_wal)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        conn = self._conn()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, _SCHEMA_VERSION):
            raise InternalError(f"{self.path}: ledger schema version {version}, expected {_SCHEMA_VERSION}")
        if version == 0:
            # Idempotent (IF NOT EXISTS), so processes creating the file together are fine.
            try:
                conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        if recover:
            self.recover()

    # -- connections -------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection: sqlite3 connections are not for concurrent use."""
        if self._closed:
            raise ValueError("ledger is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves; the module's
            # implicit (deferred) BEGIN would let two writers read the same spend.
            # check_same_thread=False only so close() may close it from another thread.
            conn = sqlite3.connect(
                self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            # FULL: SQLite fsyncs the WAL in every commit; NORMAL: we do, once per group (_write).
            conn.execute("PRAGMA synchronous=NORMAL" if self.group_commit else "PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding SQLite's single write lock from the start."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if self.group_commit:
            self._group.wait()  # outside the write lock: others commit while we sync

    def _sync_wal(self) -> None:
        """fsync the WAL (or, once SQLite has folded and removed it, the database file)."""
        for name in (f"{self.path.name}-wal", self.path.name):
            try:
                fd = os.open(self.path.with_name(name), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- spending ----------------------------------------------------------------

    def reserve(
        self,
        consumer: str,
        dataset: str,
        epsilon: float,
        delta: float,
        *,
        grant_total: tuple[float, float],
        dataset_total: tuple[float, float],
        request: str = "",
    ) -> Reservation:
        """Debit (epsilon, delta) from the grant and the dataset cap, or raise
        `BudgetExhaustedError` and record nothing. ``request`` is a free-form note for
        the audit trail (e.g. the request id)."""
        _check_id("consumer", consumer)
        _check_id("dataset", dataset)
        epsilon = _check_amount("epsilon", epsilon, MAX_EPSILON)
        delta = _check_amount("delta", delta, MAX_DELTA)
        eps_u = _units(epsilon, _EPSILON_PLACES, ROUND_CEILING)
        delta_u = _units(delta, _DELTA_PLACES, ROUND_CEILING)
        limits = {}
        for which, (eps_total, delta_total) in (("grant", grant_total), ("dataset", dataset_total)):
            limits[which] = (
                _units(_check_amount(f"{which} epsilon total", eps_total, MAX_EPSILON), _EPSILON_PLACES, ROUND_FLOOR),
                _units(_check_amount(f"{which} delta total", delta_total, MAX_DELTA), _DELTA_PLACES, ROUND_FLOOR),
            )
        with self._write() as conn:
            spent = {
                "grant": conn.execute(
                    "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0) FROM grant_spend"
                    " WHERE consumer = ? AND dataset = ?",
                    (consumer, dataset),
                ).fetchone(),
                "dataset": conn.execute(
                    "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0) FROM grant_spend WHERE dataset = ?",
                    (dataset,),
                ).fetchone(),
            }
            for which in ("grant", "dataset"):
                (eps_spent, delta_spent), (eps_total, delta_total) = spent[which], limits[which]
                if eps_spent + eps_u > eps_total or delta_spent + delta_u > delta_total:
                    raise BudgetExhaustedError(
                        which,
                        consumer,
                        dataset,
                        _float(max(0, eps_total - eps_spent), _EPSILON_PLACES),
                        _float(max(0, delta_total - delta_spent), _DELTA_PLACES),
                    )
            cursor = conn.execute(
                "INSERT INTO reservations (consumer, dataset, epsilon, delta, status, request, created)"
                " VALUES (?, ?, ?, ?, 'reserved', ?, ?)",
                (consumer, dataset, eps_u, delta_u, str(request), _now()),
            )
            self._add_spend(conn, consumer, dataset, eps_u, delta_u)
            return Reservation(cursor.lastrowid, consumer, dataset, epsilon, delta)

    def commit(
        self,
        reservation: Reservation,
        *,
        release_key: str | None = None,
        payload: bytes | None = None,
        metadata: str | None = None,
    ) -> StoredRelease | None:
        """Mark the reservation released; with ``release_key``, also store the release
        for reuse, in the same transaction. Call it once the value exists and will not
        be discarded for any reason but a failed audit append: a released reservation
        can never be refunded (the service commits, then appends the audit record; see
        the module docstring for why that order is safe).

        First writer wins. If a release with this key is already stored (an identical
        query raced this one), nothing new is stored, this reservation becomes
        ``superseded`` — its budget is returned — and the stored release is returned.
        The caller must then respond with the returned payload and discard its own
        value: returning the budget is sound only because that value never leaves.
        ``returned.reservation_id != reservation.id`` tells the caller it lost.

        Returns the canonical stored release, or None without ``release_key``.
        """
        if release_key is None:
            if payload is not None or metadata is not None:
                raise ValueError("payload and metadata need a release_key")
        else:
            _check_release_key(release_key)
            if not isinstance(payload, bytes) or not isinstance(metadata, str):
                raise ValueError("a release_key needs payload (bytes) and metadata (str)")
        with self._write() as conn:
            status = self._status(conn, reservation)
            if release_key is not None:
                existing = self._find(conn, release_key)
                if existing is not None:
                    if existing.reservation_id == reservation.id:
                        return existing  # a retried commit of the winner
                    self._settle(conn, reservation, status, "superseded")
                    return existing
            self._settle(conn, reservation, status, "released")
            if release_key is None:
                return None
            stored = StoredRelease(
                release_key, payload, metadata, reservation.consumer, _now(), reservation.dataset, reservation.id
            )
            conn.execute(
                "INSERT INTO releases (key, payload, metadata, consumer, dataset, reservation_id, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (stored.key, stored.payload, stored.metadata, stored.consumer, stored.dataset,
                 stored.reservation_id, stored.created),
            )
            return stored

    def refund(self, reservation: Reservation) -> None:
        """Return the budget of a reservation whose value never left the process.

        Idempotent. An orphaned reservation stays spent (see the module docstring);
        refunding a released one raises ValueError — a value that may have left
        cannot be unspent.
        """
        with self._write() as conn:
            self._settle(conn, reservation, self._status(conn, reservation), "refunded")

    def recover(self) -> int:
        """Mark reservations left ``reserved`` as ``orphaned`` (still spent) and check
        the running totals against the reservations. Returns how many were orphaned.

        Runs at startup: a reservation still open then belongs to a process that died
        between reserve and commit/refund, and whether its value left is unknowable.
        """
        with self._write() as conn:
            orphaned = conn.execute(
                "UPDATE reservations SET status = 'orphaned', settled = ? WHERE status = 'reserved'", (_now(),)
            ).rowcount
            mismatch = conn.execute(
                f"""
                SELECT consumer, dataset FROM (
                    SELECT consumer, dataset, epsilon AS e, delta AS d FROM grant_spend
                    UNION ALL
                    SELECT consumer, dataset, -epsilon, -delta FROM reservations WHERE status IN {_SPENT}
                ) GROUP BY consumer, dataset HAVING SUM(e) != 0 OR SUM(d) != 0
                """
            ).fetchall()
            if mismatch:
                raise InternalError(f"{self.path}: spend totals disagree with reservations for {mismatch}")
        return orphaned

    # -- reading -----------------------------------------------------------------

    def find_release(self, key: str) -> StoredRelease | None:
        return self._find(self._conn(), _check_release_key(key))

    def spent(self, consumer: str, dataset: str) -> tuple[float, float]:
        row = self._conn().execute(
            "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0) FROM grant_spend"
            " WHERE consumer = ? AND dataset = ?",
            (consumer, dataset),
        ).fetchone()
        return _float(row[0], _EPSILON_PLACES), _float(row[1], _DELTA_PLACES)

    def spent_units(self, consumer: str, dataset: str) -> tuple[int, int]:
        """What a grant has spent in the ledger's exact units (1e-12 epsilon, 1e-18 delta),
        for reconciliation against the audit log."""
        row = self._conn().execute(
            "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0) FROM grant_spend"
            " WHERE consumer = ? AND dataset = ?",
            (consumer, dataset),
        ).fetchone()
        return int(row[0]), int(row[1])

    def dataset_spent(self, dataset: str) -> tuple[float, float]:
        row = self._conn().execute(
            "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0) FROM grant_spend WHERE dataset = ?",
            (dataset,),
        ).fetchone()
        return _float(row[0], _EPSILON_PLACES), _float(row[1], _DELTA_PLACES)

    def budgets(self) -> list[Spend]:
        """Everything spent: one row per consumer × dataset, then one per dataset
        (consumer None), sorted; for `dataops budget show`."""
        rows = self._conn().execute(
            "SELECT consumer, dataset, epsilon, delta FROM grant_spend"
            " UNION ALL SELECT NULL, dataset, SUM(epsilon), SUM(delta) FROM grant_spend GROUP BY dataset"
        ).fetchall()
        rows.sort(key=lambda row: (row[1], row[0] is None, row[0] or ""))
        return [
            Spend(consumer, dataset, _float(eps, _EPSILON_PLACES), _float(delta, _DELTA_PLACES))
            for consumer, dataset, eps, delta in rows
        ]

    # -- internals ---------------------------------------------------------------

    @staticmethod
    def _add_spend(conn: sqlite3.Connection, consumer: str, dataset: str, eps_u: int, delta_u: int) -> None:
        conn.execute(
            "INSERT INTO grant_spend (consumer, dataset, epsilon, delta) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (consumer, dataset) DO UPDATE"
            " SET epsilon = epsilon + excluded.epsilon, delta = delta + excluded.delta",
            (consumer, dataset, eps_u, delta_u),
        )

    @staticmethod
    def _status(conn: sqlite3.Connection, reservation: Reservation) -> str:
        row = conn.execute(
            "SELECT consumer, dataset, status FROM reservations WHERE id = ?", (reservation.id,)
        ).fetchone()
        if row is None or tuple(row[:2]) != (reservation.consumer, reservation.dataset):
            raise ValueError(f"no such reservation: {reservation}")
        return row[2]

    def _settle(self, conn: sqlite3.Connection, reservation: Reservation, status: str, outcome: str) -> None:
        """Move a reservation to ``released``, ``refunded`` or ``superseded``."""
        if outcome == "released":
            if status not in ("reserved", "orphaned"):
                # A refunded budget may already be spent by someone else.
                raise ValueError(f"reservation {reservation.id} is {status}; it cannot be committed")
        elif status == "released":
            raise ValueError(f"reservation {reservation.id} is released; it cannot be refunded")
        elif status != "reserved":
            return  # already refunded/superseded (idempotent), or orphaned (stays spent)
        conn.execute(
            "UPDATE reservations SET status = ?, settled = ? WHERE id = ?", (outcome, _now(), reservation.id)
        )
        if outcome != "released":
            eps_u, delta_u = conn.execute(
                "SELECT epsilon, delta FROM reservations WHERE id = ?", (reservation.id,)
            ).fetchone()
            conn.execute(
                "UPDATE grant_spend SET epsilon = epsilon - ?, delta = delta - ? WHERE consumer = ? AND dataset = ?",
                (eps_u, delta_u, reservation.consumer, reservation.dataset),
            )

    @staticmethod
    def _find(conn: sqlite3.Connection, key: str) -> StoredRelease | None:
        row = conn.execute(
            "SELECT key, payload, metadata, consumer, created, dataset, reservation_id FROM releases WHERE key = ?",
            (key,),
        ).fetchone()
        return None if row is None else StoredRelease(row[0], bytes(row[1]), *row[2:])
