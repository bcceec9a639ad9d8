"""The privacy-budget ledger: durable, atomic debits in SQLite (WAL) or PostgreSQL.

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
spend inside one write transaction that no other check-and-debit on the same dataset
can interleave with. On SQLite that is ``BEGIN IMMEDIATE``: the file's one write lock,
across every thread and process using it. On PostgreSQL, where several server
replicas share the database, it is a row lock on the dataset's budget row taken
before any read (`dataops.ledger_store`). Other writers wait rather than fail. The
logic and the SQL here are the same for both; the store only opens transactions.

Reservation states (rows are never deleted; they are the audit trail) are `State`,
and every move between them is a row of `TRANSITIONS`:

* ``reserved``   — debited, outcome not yet known. Counts as spent.
* ``released``   — `commit`: the value may have left. Counts as spent.
* ``orphaned``   — was ``reserved`` when a `Ledger` opened the store (`recover`) and
  its owner (the `Ledger` that reserved it) was gone, e.g. the process died between
  reserve and commit/refund. We cannot know whether a value left the process, so it
  stays spent for ever (fail closed). On SQLite every other opener counts as gone; on
  PostgreSQL an owner is alive while it holds its advisory lock (`ledger_store`).
* ``refunded``   — `refund`: the query failed before anything was released.
* ``superseded`` — `commit` found an identical release already stored: this
  reservation's value is discarded and the stored one is returned instead.

Only ``reserved`` can return budget. Transitions out of ``orphaned`` may only keep it
spent: a live process whose reservation was orphaned by another process opening the
SQLite file can still commit, but its refund is ignored.

Group commit: SQLite's own fsync at each COMMIT (synchronous=FULL) serialises every
debit behind one disk flush while holding the write lock. Instead the ledger commits
with synchronous=NORMAL (in WAL mode: no fsync at commit, nothing lost or torn on a
crash of the process) and then waits in `GroupSync` for one fsync of the WAL that
covers every transaction committed so far. A call returns only after its
transaction is on disk, as before; concurrent calls share the fsync. PostgreSQL
flushes at COMMIT and groups concurrent flushes itself. At start the server checks
the ledger against the audit log (`dataops.audit.receipts`).

Amounts are stored as integers — epsilon in units of 1e-12, delta in units of 1e-18 —
so sums are exact and comparisons need no tolerance (with floats, ten debits of 0.1
against a budget of 1.0 would fail or pass depending on summation order). A float is
converted through its shortest decimal form (``repr``), i.e. the number the operator
wrote in TOML, so a budget of 0.3 admits exactly three debits of 0.1. Spends round up
and totals round down to the unit, so rounding can only ever refuse, never admit.

zCDP grants (`reserve_zcdp`): zCDP composes by adding rho, and converting the summed
rho once is far tighter than adding per-release conversions (20 releases of 0.1 each:
about 0.45 instead of 2.0). So for such a grant the ledger also keeps its total rho
(table ``zcdp_spend``, rho in 1e-12 units, rounded up) and the grant's epsilon spent
is, at all times, OpenDP's conversion of that total rho at the grant's delta (rounded
up to the unit): a release is charged eps(rho_before + rho) - eps(rho_before), and the
grant's delta once, with its first release (what the delta leaves after pure-DP
releases, if the grant was switched from pure). A refund takes its rho out again and
returns the difference, but never takes the grant below the sum of its other spent
reservations' own charges (column ``charged``): those are what the audit log records,
and the ledger must never be behind the log. The dataset cap still sums the grants' (epsilon, delta) —
basic composition across grants, which is sound whatever each grant's accounting.
The conversion delta is fixed at the grant's first release (stored in the row), so an
operator editing the grant's delta later cannot lower an epsilon already charged.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
import uuid
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path

from dataops.errors import BudgetExhausted, InternalError, QuotaViolation
from dataops.ledger_store import Connection, SQLiteStore, Store, open_store
from dataops.values import PrivacyLoss

# Decimal places of the integer units. int64 holds 9.2e18, hence the maxima: no sum
# of admitted spends can exceed a total, so no SUM can overflow.
_EPSILON_PLACES = 12
_DELTA_PLACES = 18
MAX_EPSILON = 1e6
MAX_DELTA = 1.0


class State(enum.StrEnum):
    """A reservation's state; the value is what the ``status`` column holds."""

    RESERVED = "reserved"
    RELEASED = "released"
    ORPHANED = "orphaned"
    REFUNDED = "refunded"
    SUPERSEDED = "superseded"

    @property
    def spent(self) -> bool:
        """Whether its debit counts against the budgets (see the module docstring)."""
        return self in (State.RESERVED, State.RELEASED, State.ORPHANED)


class Event(enum.Enum):
    """What happens to a reservation; the value is the word a refusal uses."""

    COMMIT = "committed"  # the value may leave (`commit`)
    REFUND = "refunded"  # nothing left the process (`refund`)
    SUPERSEDE = "superseded"  # an identical release was stored first (`commit`)
    ORPHAN = "orphaned"  # its process is gone (`recover`)


# Every allowed move. A pair not listed is refused with ValueError; a move to the same
# state is an idempotent no-op. Budget comes back exactly when a move leaves a spent
# state for one that is not: only out of ``reserved`` (an orphan stays spent, and a
# released value can never be unspent).
TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.RESERVED, Event.COMMIT): State.RELEASED,
    (State.ORPHANED, Event.COMMIT): State.RELEASED,  # its live owner finishes; stays spent
    (State.RESERVED, Event.REFUND): State.REFUNDED,
    (State.REFUNDED, Event.REFUND): State.REFUNDED,
    (State.SUPERSEDED, Event.REFUND): State.SUPERSEDED,
    (State.ORPHANED, Event.REFUND): State.ORPHANED,  # fail closed: whether it left is unknowable
    (State.RESERVED, Event.SUPERSEDE): State.SUPERSEDED,
    (State.REFUNDED, Event.SUPERSEDE): State.REFUNDED,
    (State.SUPERSEDED, Event.SUPERSEDE): State.SUPERSEDED,
    (State.ORPHANED, Event.SUPERSEDE): State.ORPHANED,
    (State.RESERVED, Event.ORPHAN): State.ORPHANED,
}


def transition(state: State, event: Event) -> State:
    """The state ``event`` moves ``state`` to, or ValueError naming both."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        verb = "refunded" if event is Event.SUPERSEDE else event.value  # superseding returns budget too
        raise ValueError(f"is {state}; it cannot be {verb}") from None


_SPENT = tuple(s.value for s in State if s.spent)
_ORPHANABLE = tuple(s.value for s in State if (s, Event.ORPHAN) in TRANSITIONS)
_RELEASE_KEY = re.compile(r"[0-9a-f]{16,128}")
_SCHEMA_VERSION = 3
# zCDP rho, like epsilon, in units of 1e-12 (rounded up on the way in).
_RHO_PLACES = 12
# The schema, once for both stores: {id}, {int} and {blob} are the store's column types
# (`Store.types`); the version is the store's to record. Version 1 -> 2 (in place, in
# one transaction): zCDP grants keep their rho.
_MIGRATE_1_TO_2 = """
ALTER TABLE reservations ADD COLUMN rho {int} CHECK (rho IS NULL OR rho >= 0);
CREATE TABLE IF NOT EXISTS zcdp_spend (
    consumer  TEXT NOT NULL,
    dataset   TEXT NOT NULL,
    rho       {int} NOT NULL CHECK (rho >= 0),      -- spent rho, 1e-12 units
    delta     {int} NOT NULL CHECK (delta >= 0),    -- conversion delta charged (0 if rho is 0)
    epsilon   {int} NOT NULL CHECK (epsilon >= 0),  -- max(eps(rho, delta) rounded up, charged): in grant_spend
    charged   {int} NOT NULL CHECK (charged >= 0),  -- sum of the spent reservations' own charges
    PRIMARY KEY (consumer, dataset)
)
"""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    id        {id},
    consumer  TEXT NOT NULL,
    dataset   TEXT NOT NULL,
    epsilon   {int} NOT NULL CHECK (epsilon >= 0),   -- 1e-12 units
    delta     {int} NOT NULL CHECK (delta >= 0),     -- 1e-18 units
    status    TEXT NOT NULL CHECK (status IN {states}),
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
    epsilon   {int} NOT NULL CHECK (epsilon >= 0),
    delta     {int} NOT NULL CHECK (delta >= 0),
    PRIMARY KEY (consumer, dataset)
);
CREATE TABLE IF NOT EXISTS releases (
    key            TEXT PRIMARY KEY,
    payload        {blob} NOT NULL,
    metadata       TEXT NOT NULL,
    consumer       TEXT NOT NULL,
    dataset        TEXT NOT NULL,
    reservation_id {int} NOT NULL REFERENCES reservations (id),
    created        TEXT NOT NULL
)
"""


# Version 2 -> 3: who holds each reservation (`Ledger.owner`), so that on PostgreSQL a
# replica starting orphans only the open reservations of replicas that are gone.
# NULL for reservations made before.
_MIGRATE_2_TO_3 = """
ALTER TABLE reservations ADD COLUMN owner TEXT
"""


def _schema_scripts(types: dict[str, str]) -> list[str]:
    """Script i brings the schema from version i to i + 1."""
    states = "(" + ", ".join(f"'{s.value}'" for s in State) + ")"
    return [script.format(states=states, **types) for script in (_SCHEMA, _MIGRATE_1_TO_2, _MIGRATE_2_TO_3)]


@dataclass(frozen=True)
class Reservation:
    id: int
    consumer: str
    dataset: str
    epsilon: float  # what this reservation debited (on a zCDP grant: the marginal charge)
    delta: float
    rho: float | None = None  # zCDP grants: the rho it added to the grant's total


@dataclass(frozen=True)
class SpentTotal:
    """The ledger's running total of what a grant has spent (``consumer`` None: the
    dataset-wide total, all consumers), for `dataops budget show`.

    Not `dataops.values.Spend`, which is what one request spent next to what remains
    of its grant: the ledger keeps spends only, never the limits (those are the
    policy's and the catalog's at call time), and `Budget` puts the two together.
    """

    consumer: str | None
    dataset: str
    spent: PrivacyLoss


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


def _rho_units(rho: float) -> int:
    """Rho up to the next unit from its exact binary value (never below it)."""
    return int(Decimal(float(rho)).scaleb(_RHO_PLACES).to_integral_value(ROUND_CEILING))


def _up(units: int, places: int) -> float:
    """The float nearest above the decimal value of ``units``: never below it."""
    exact = Decimal(units).scaleb(-places)
    value = float(exact)
    return math.nextafter(value, math.inf) if Decimal(value) < exact else value


def _zcdp_epsilon_units(rho_u: int, delta_u: int) -> int:
    """OpenDP's conversion of a total rho at delta, in epsilon units rounded up.

    The rho passed is never below the units' value, the delta never above it, and the
    result rounds up: every step can only over-count the loss.
    """
    if rho_u == 0:
        return 0
    from dataops.engines.dp_calibrate import zcdp_to_epsilon  # OpenDP; loaded on first zCDP use

    delta = float(Decimal(delta_u).scaleb(-_DELTA_PLACES))
    if Decimal(delta) > Decimal(delta_u).scaleb(-_DELTA_PLACES):
        delta = math.nextafter(delta, 0.0)
    epsilon = zcdp_to_epsilon(_up(rho_u, _RHO_PLACES), delta)
    return int(Decimal(epsilon).scaleb(_EPSILON_PLACES).to_integral_value(ROUND_CEILING))


def _zcdp_charge(
    before: tuple[int, int, int], rho_u: int, grant_delta_u: int
) -> tuple[int, int, tuple[int, int, int]]:
    """The (epsilon, delta) units a release adding ``rho_u`` is charged, and the grant's
    new (rho, delta, epsilon) row. ``before`` is the row as spent so far.

    zCDP composes additively in rho; the grant's epsilon is always the conversion of
    its total rho, so the charge is the increase of that conversion. The delta is the
    grant's, charged once (with the first rho) and fixed from then on.
    """
    rho_before, delta_before, eps_before = before
    delta_u = delta_before if rho_before > 0 else grant_delta_u
    rho_after = rho_before + rho_u
    # max: should a conversion ever fail to grow with rho, the charged total still never
    # drops below the conversion of any total rho the grant has had.
    eps_after = max(eps_before, _zcdp_epsilon_units(rho_after, delta_u))
    return eps_after - eps_before, delta_u - delta_before, (rho_after, delta_u, eps_after)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


class Ledger:
    """The budget ledger; safe to share between threads. Any number of processes may
    open the same SQLite file, and any number of server replicas the same PostgreSQL
    database."""

    def __init__(
        self,
        where: Path | str,
        *,
        recover: bool = True,
        group_commit: bool = True,
        lock_budgets: bool = True,
    ) -> None:
        """Open (creating if needed) the ledger at ``where``: a SQLite file's path, or a
        ``postgresql://`` URL (libpq's; a password belongs in ~/.pgpass, not the URL).

        ``recover`` (default) orphans reservations left open by a previous run; see
        `recover`. A read-only tool opened beside a running server (e.g. `dataops
        budget show`) should pass False so it does not orphan that server's in-flight
        reservations (which would only cost their refunds, never overspend).

        ``group_commit`` False makes SQLite fsync inside every COMMIT (the baseline the
        benchmark compares against). ``lock_budgets`` False (PostgreSQL only) leaves out
        the row locks that serialise debits across replicas: only for the test that
        shows the race they stop.
        """
        self._store: Store = open_store(where, group_commit=group_commit, lock_budgets=lock_budgets)
        # This ledger's name on the reservations it makes: random, so it says nothing but
        # "the same opener". The store keeps it marked alive while the ledger is open.
        self.owner = uuid.uuid4().hex
        self.location = self._store.location
        # The SQLite file (tools and tests read it directly); None on PostgreSQL.
        self.path = self._store.path if isinstance(self._store, SQLiteStore) else None
        self.group_commit = group_commit
        self._group = self._store.group
        try:
            version = self._store.schema_version(self._store.connection())
            if not 0 <= version <= _SCHEMA_VERSION:
                raise InternalError(
                    f"{self.location}: ledger schema version {version}, expected {_SCHEMA_VERSION}"
                )
            if version != _SCHEMA_VERSION:
                self._store.migrate(_schema_scripts(self._store.types))
            self._store.hold(self.owner)
            if recover:
                self.recover()
        except BaseException:
            self._store.close()
            raise

    # -- connections -------------------------------------------------------------

    def _conn(self) -> Connection:
        """This thread's connection (neither driver's are for concurrent use)."""
        return self._store.connection()

    def close(self) -> None:
        self._store.close()

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
        grant_total: PrivacyLoss,
        dataset_total: PrivacyLoss,
        request: str = "",
        _rho: float | None = None,
    ) -> Reservation:
        """Debit (epsilon, delta) from the grant and the dataset cap, or raise
        `BudgetExhaustedError` and record nothing. ``request`` is a free-form note for
        the audit trail (e.g. the request id). ``_rho``: see `reserve_zcdp`, which is
        how a zCDP release calls this (epsilon and delta are then computed here)."""
        _check_id("consumer", consumer)
        _check_id("dataset", dataset)
        epsilon = _check_amount("epsilon", epsilon, MAX_EPSILON)
        delta = _check_amount("delta", delta, MAX_DELTA)
        eps_u = _units(epsilon, _EPSILON_PLACES, ROUND_CEILING)
        delta_u = _units(delta, _DELTA_PLACES, ROUND_CEILING)
        limits = {}
        for which, (eps_total, delta_total) in (("grant", grant_total), ("dataset", dataset_total)):
            limits[which] = (
                _units(
                    _check_amount(f"{which} epsilon total", eps_total, MAX_EPSILON),
                    _EPSILON_PLACES,
                    ROUND_FLOOR,
                ),
                _units(
                    _check_amount(f"{which} delta total", delta_total, MAX_DELTA), _DELTA_PLACES, ROUND_FLOOR
                ),
            )
        rho_u = None if _rho is None else _rho_units(_check_amount("rho", _rho, MAX_EPSILON))
        with self._store.write(dataset) as conn:
            if rho_u is not None:  # zCDP: the charge is the growth of the total's conversion
                eps_u, delta_u, zcdp_after = self._zcdp_quote(
                    conn, consumer, dataset, rho_u, limits["grant"][1]
                )
            spent = {
                "grant": _sums(conn, "consumer = ? AND dataset = ?", (consumer, dataset)),
                "dataset": _sums(conn, "dataset = ?", (dataset,)),
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
            (reservation_id,) = conn.execute(
                "INSERT INTO reservations (consumer, dataset, epsilon, delta, rho, status, request, created, owner)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    consumer,
                    dataset,
                    eps_u,
                    delta_u,
                    rho_u,
                    State.RESERVED.value,
                    str(request),
                    _now(),
                    self.owner,
                ),
            ).fetchone()
            self._add_spend(conn, consumer, dataset, eps_u, delta_u)
            if rho_u is None:
                return Reservation(reservation_id, consumer, dataset, epsilon, delta)
            self._set_zcdp_row(conn, consumer, dataset, zcdp_after, eps_u)
            return Reservation(
                reservation_id,
                consumer,
                dataset,
                _float(eps_u, _EPSILON_PLACES),
                _float(delta_u, _DELTA_PLACES),
                _float(rho_u, _RHO_PLACES),
            )

    def reserve_zcdp(
        self,
        consumer: str,
        dataset: str,
        rho: float,
        *,
        grant_total: PrivacyLoss,
        dataset_total: PrivacyLoss,
        request: str = "",
    ) -> Reservation:
        """Add ``rho`` to a zCDP grant's total and debit the grant and the dataset cap
        with the increase of OpenDP's conversion of that total at the grant's delta
        (``grant_total.delta``), or raise `BudgetExhaustedError` and record nothing.

        Read, convert and debit happen in one write transaction, so concurrent
        reservations compose in some order and none is charged against a stale total.
        """
        if not grant_total.delta > 0:
            raise ValueError("a zCDP grant needs a delta total > 0: its rho is converted at that delta")
        if not rho > 0:
            raise ValueError("rho must be > 0 (a release without loss needs no reservation)")
        return self.reserve(
            consumer,
            dataset,
            0.0,
            0.0,
            grant_total=grant_total,
            dataset_total=dataset_total,
            request=request,
            _rho=rho,
        )

    def quote_zcdp(self, consumer: str, dataset: str, rho: float, grant_delta: float) -> PrivacyLoss:
        """The (epsilon, delta) `reserve_zcdp` would charge now for ``rho``; records
        nothing (for estimates: the same computation on the same spend)."""
        rho_u = _rho_units(_check_amount("rho", rho, MAX_EPSILON))
        delta_u = _units(
            _check_amount("grant delta total", grant_delta, MAX_DELTA), _DELTA_PLACES, ROUND_FLOOR
        )
        with self._store.snapshot() as conn:  # one snapshot for both reads
            eps_u, delta_u, _ = self._zcdp_quote(conn, consumer, dataset, rho_u, delta_u)
        return PrivacyLoss(_float(eps_u, _EPSILON_PLACES), _float(delta_u, _DELTA_PLACES))

    def _zcdp_quote(
        self, conn: Connection, consumer: str, dataset: str, rho_u: int, grant_delta_u: int
    ) -> tuple[int, int, tuple[int, int, int]]:
        """`_zcdp_charge` on this grant's row. The conversion delta is what the grant's
        delta leaves after its pure-DP releases (a grant switched from pure to zCDP keeps
        what it spent); with none left no rho can be converted, so it is refused."""
        before = self._zcdp_row(conn, consumer, dataset)
        if before[0] == 0:
            _, delta_spent = _sums(conn, "consumer = ? AND dataset = ?", (consumer, dataset))
            grant_delta_u -= delta_spent - before[1]
            if grant_delta_u <= 0:
                raise BudgetExhaustedError("grant", consumer, dataset, 0.0, 0.0)
        return _zcdp_charge(before, rho_u, grant_delta_u)

    def rho_spent(self, consumer: str, dataset: str) -> float:
        """The total rho of a zCDP grant's spent releases (0 for a pure-DP grant)."""
        return _float(self._zcdp_row(self._conn(), consumer, dataset)[0], _RHO_PLACES)

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
        with self._store.write(reservation.dataset) as conn:
            state = self._state(conn, reservation)
            if release_key is not None:
                existing = self._find(conn, release_key)
                if existing is not None:
                    if existing.reservation_id == reservation.id:
                        return existing  # a retried commit of the winner
                    self._settle(conn, reservation, state, Event.SUPERSEDE)
                    return existing
            self._settle(conn, reservation, state, Event.COMMIT)
            if release_key is None:
                return None
            assert payload is not None and metadata is not None  # checked above
            stored = StoredRelease(
                release_key,
                payload,
                metadata,
                reservation.consumer,
                _now(),
                reservation.dataset,
                reservation.id,
            )
            conn.execute(
                "INSERT INTO releases (key, payload, metadata, consumer, dataset, reservation_id, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    stored.key,
                    stored.payload,
                    stored.metadata,
                    stored.consumer,
                    stored.dataset,
                    stored.reservation_id,
                    stored.created,
                ),
            )
            return stored

    def refund(self, reservation: Reservation) -> None:
        """Return the budget of a reservation whose value never left the process.

        Idempotent. An orphaned reservation stays spent (see the module docstring);
        refunding a released one raises ValueError — a value that may have left
        cannot be unspent.
        """
        with self._store.write(reservation.dataset) as conn:
            self._settle(conn, reservation, self._state(conn, reservation), Event.REFUND)

    def recover(self) -> int:
        """Mark reservations left ``reserved`` as ``orphaned`` (still spent) and check
        the running totals against the reservations. Returns how many were orphaned.

        Runs at startup: a reservation still open then belongs to a process that died
        between reserve and commit/refund, and whether its value left is unknowable.
        Which owners are gone is the store's to say (`Store.gone`): on SQLite every
        other opener counts as gone (one server per file), so their open reservations
        are orphaned too, which costs at most their refunds; on PostgreSQL a replica
        that is still running keeps its open reservations, and can refund them.
        """
        orphans = "(" + ", ".join(f"'{s}'" for s in _ORPHANABLE) + ")"
        with self._store.write(None) as conn:
            owners = [
                owner
                for (owner,) in conn.execute(
                    f"SELECT DISTINCT owner FROM reservations WHERE status IN {orphans} AND owner IS NOT NULL"
                ).fetchall()
            ]
            gone = self._store.gone(conn, owners)
            orphaned = conn.execute(
                f"UPDATE reservations SET status = ?, settled = ? WHERE status IN {orphans} AND owner IS NULL",
                (State.ORPHANED.value, _now()),
            ).rowcount
            for owner in sorted(gone):
                orphaned += conn.execute(
                    f"UPDATE reservations SET status = ?, settled = ? WHERE status IN {orphans} AND owner = ?",
                    (State.ORPHANED.value, _now(), owner),
                ).rowcount
            spent = "(" + ", ".join(f"'{s}'" for s in _SPENT) + ")"
            # Each check is one statement, so one snapshot also on PostgreSQL with other
            # replicas writing (totals and reservations change in the same transactions).
            mismatch = conn.execute(
                f"""
                SELECT consumer, dataset FROM (
                    SELECT consumer, dataset, epsilon AS e, delta AS d, 0 AS r FROM grant_spend
                    UNION ALL
                    SELECT consumer, dataset, -epsilon, -delta, 0 FROM reservations
                        WHERE status IN {spent} AND rho IS NULL
                    UNION ALL
                    SELECT consumer, dataset, -epsilon, -delta, rho FROM zcdp_spend
                    UNION ALL
                    SELECT consumer, dataset, 0, 0, -rho FROM reservations WHERE status IN {spent} AND rho IS NOT NULL
                ) AS spends GROUP BY consumer, dataset HAVING SUM(e) != 0 OR SUM(d) != 0 OR SUM(r) != 0
                """
            ).fetchall()
            # A zCDP grant's epsilon: never below its reservations' own charges (which
            # must add up), nor below OpenDP's conversion of its rho.
            mismatch += conn.execute(
                f"""
                SELECT z.consumer, z.dataset FROM zcdp_spend AS z WHERE z.epsilon < z.charged OR z.charged != (
                    SELECT COALESCE(SUM(r.epsilon), 0) FROM reservations AS r WHERE r.status IN {spent}
                    AND r.rho IS NOT NULL AND r.consumer = z.consumer AND r.dataset = z.dataset)
                """
            ).fetchall()
            mismatch += [
                (consumer, dataset)
                for consumer, dataset, rho_u, delta_u, eps_u in conn.execute(
                    "SELECT consumer, dataset, rho, delta, epsilon FROM zcdp_spend"
                ).fetchall()
                if eps_u < _zcdp_epsilon_units(rho_u, delta_u) or (rho_u > 0) != (delta_u > 0)
            ]
            if mismatch:
                mismatch = [tuple(row) for row in mismatch]
                raise InternalError(
                    f"{self.location}: spend totals disagree with reservations for {mismatch}"
                )
        return orphaned

    # -- reading -----------------------------------------------------------------

    def find_release(self, key: str) -> StoredRelease | None:
        return self._find(self._conn(), _check_release_key(key))

    def spent(self, consumer: str, dataset: str) -> PrivacyLoss:
        eps_u, delta_u = self.spent_units(consumer, dataset)
        return PrivacyLoss(_float(eps_u, _EPSILON_PLACES), _float(delta_u, _DELTA_PLACES))

    def spent_units(self, consumer: str, dataset: str) -> tuple[int, int]:
        """What a grant has spent in the ledger's exact units (1e-12 epsilon, 1e-18 delta),
        for reconciliation against the audit log."""
        return _sums(self._conn(), "consumer = ? AND dataset = ?", (consumer, dataset))

    def dataset_spent(self, dataset: str) -> PrivacyLoss:
        eps_u, delta_u = _sums(self._conn(), "dataset = ?", (dataset,))
        return PrivacyLoss(_float(eps_u, _EPSILON_PLACES), _float(delta_u, _DELTA_PLACES))

    def budgets(self) -> list[SpentTotal]:
        """Everything spent: one row per consumer × dataset, then one per dataset
        (consumer None), sorted; for `dataops budget show`."""
        rows = (
            self._conn()
            .execute(
                "SELECT consumer, dataset, epsilon, delta FROM grant_spend"
                " UNION ALL SELECT NULL, dataset, SUM(epsilon), SUM(delta) FROM grant_spend GROUP BY dataset"
            )
            .fetchall()
        )
        rows.sort(key=lambda row: (row[1], row[0] is None, row[0] or ""))
        return [
            SpentTotal(
                consumer,
                dataset,
                PrivacyLoss(_float(int(eps), _EPSILON_PLACES), _float(int(delta), _DELTA_PLACES)),
            )
            for consumer, dataset, eps, delta in rows
        ]

    # -- internals ---------------------------------------------------------------

    @staticmethod
    def _add_spend(conn: Connection, consumer: str, dataset: str, eps_u: int, delta_u: int) -> None:
        conn.execute(
            "INSERT INTO grant_spend (consumer, dataset, epsilon, delta) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (consumer, dataset) DO UPDATE"
            " SET epsilon = grant_spend.epsilon + excluded.epsilon, delta = grant_spend.delta + excluded.delta",
            (consumer, dataset, eps_u, delta_u),
        )

    @staticmethod
    def _zcdp_row(conn: Connection, consumer: str, dataset: str) -> tuple[int, int, int]:
        row = conn.execute(
            "SELECT rho, delta, epsilon FROM zcdp_spend WHERE consumer = ? AND dataset = ?",
            (consumer, dataset),
        ).fetchone()
        return (0, 0, 0) if row is None else (int(row[0]), int(row[1]), int(row[2]))

    @staticmethod
    def _set_zcdp_row(
        conn: Connection, consumer: str, dataset: str, row: tuple[int, int, int], charged_change: int
    ) -> None:
        updated = conn.execute(
            "UPDATE zcdp_spend SET rho = ?, delta = ?, epsilon = ?, charged = charged + ?"
            " WHERE consumer = ? AND dataset = ?",
            (*row, charged_change, consumer, dataset),
        ).rowcount
        if not updated:  # the grant's first zCDP reservation
            conn.execute(
                "INSERT INTO zcdp_spend (consumer, dataset, rho, delta, epsilon, charged) VALUES (?, ?, ?, ?, ?, ?)",
                (consumer, dataset, *row, charged_change),
            )

    def _state(self, conn: Connection, reservation: Reservation) -> State:
        # FOR UPDATE on PostgreSQL: no other replica's recover() may move it until we settle.
        row = conn.execute(
            f"SELECT consumer, dataset, status FROM reservations WHERE id = ?{self._store.for_update}",
            (reservation.id,),
        ).fetchone()
        if row is None or tuple(row[:2]) != (reservation.consumer, reservation.dataset):
            raise ValueError(f"no such reservation: {reservation}")
        return State(row[2])

    def _settle(self, conn: Connection, reservation: Reservation, state: State, event: Event) -> None:
        """Apply ``event`` (`TRANSITIONS`) and return the budget if it leaves a spent state."""
        try:
            after = transition(state, event)
        except ValueError as exc:
            raise ValueError(f"reservation {reservation.id} {exc}") from None
        if after is state:
            return  # idempotent, or an orphan that stays spent
        changed = conn.execute(
            "UPDATE reservations SET status = ?, settled = ? WHERE id = ? AND status = ?",
            (after.value, _now(), reservation.id, state.value),
        ).rowcount
        if changed != 1:  # the row lock (or SQLite's write lock) makes this impossible
            raise InternalError(f"reservation {reservation.id} changed state under a settle")
        if state.spent and not after.spent:
            self._return_budget(conn, reservation)

    def _return_budget(self, conn: Connection, reservation: Reservation) -> None:
        eps_u, delta_u, rho_u = conn.execute(
            "SELECT epsilon, delta, rho FROM reservations WHERE id = ?", (reservation.id,)
        ).fetchone()
        if rho_u is not None:
            # zCDP: take the rho out and return what the conversion of the rest
            # saves, not this reservation's own charge (others may have composed
            # on top of it since). Never below the other spent reservations' own
            # charges, which the audit log records: the ledger must stay >= it
            # (`dataops.audit.receipts.reconcile_ledger`), also to the last unit.
            rho_total, conv_delta_u, eps_total = self._zcdp_row(
                conn, reservation.consumer, reservation.dataset
            )
            (charged,) = conn.execute(
                "SELECT charged FROM zcdp_spend WHERE consumer = ? AND dataset = ?",
                (reservation.consumer, reservation.dataset),
            ).fetchone()
            rho_left = rho_total - rho_u
            delta_left = conv_delta_u if rho_left > 0 else 0
            eps_left = max(_zcdp_epsilon_units(rho_left, delta_left), charged - eps_u)
            self._set_zcdp_row(
                conn, reservation.consumer, reservation.dataset, (rho_left, delta_left, eps_left), -eps_u
            )
            eps_u, delta_u = eps_total - eps_left, conv_delta_u - delta_left
        conn.execute(
            "UPDATE grant_spend SET epsilon = epsilon - ?, delta = delta - ? WHERE consumer = ? AND dataset = ?",
            (eps_u, delta_u, reservation.consumer, reservation.dataset),
        )

    @staticmethod
    def _find(conn: Connection, key: str) -> StoredRelease | None:
        row = conn.execute(
            "SELECT key, payload, metadata, consumer, created, dataset, reservation_id FROM releases WHERE key = ?",
            (key,),
        ).fetchone()
        return None if row is None else StoredRelease(row[0], bytes(row[1]), *row[2:])


def _sums(conn: Connection, where: str, params: tuple[str, ...]) -> tuple[int, int]:
    """Spent (epsilon, delta) units of the grant_spend rows matching ``where``, as ints
    (PostgreSQL sums BIGINT into NUMERIC)."""
    eps_u, delta_u = conn.execute(
        f"SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0) FROM grant_spend WHERE {where}", params
    ).fetchone()
    return int(eps_u), int(delta_u)
