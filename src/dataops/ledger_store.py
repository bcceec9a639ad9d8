"""Where the budget ledger keeps its tables: one SQLite file, or a PostgreSQL database.

`dataops.ledger.Ledger` holds all of the ledger's logic and SQL; a store only gives it
connections and transactions, and says how its database spells the few things that
differ (column types, the schema version, row locks). The SQL the ledger writes runs
unchanged on both: ``?`` placeholders (rewritten to ``%s`` for psycopg), ``INSERT ...
RETURNING`` and ``ON CONFLICT`` (SQLite >= 3.35 and PostgreSQL both have them).

How each store makes a check-and-debit atomic:

* SQLite: `write` opens ``BEGIN IMMEDIATE``, which takes the file's single write lock
  for every thread and process using it; no two write transactions interleave.
* PostgreSQL: several server replicas share one database. `write` opens a READ
  COMMITTED transaction and, before any read, locks the dataset's row in
  ``budget_locks`` with ``SELECT ... FOR UPDATE``. Every debit, refund and commit on a
  dataset takes that lock first, so they run one at a time per dataset, and each
  statement after the lock sees everything the previous holder committed. A lock on the
  grant's own row would not do: the dataset cap sums every grant of the dataset, and a
  concurrent first debit of another consumer inserts a row no lock covers. Reservation
  rows are read ``FOR UPDATE`` too, so a replica's `recover` cannot orphan a
  reservation between another replica's status check and its settle.
  ``lock_budgets=False`` leaves both locks out: it exists only for the test that shows
  two replicas then overspend the last of a budget.

Which openers are alive, for `Ledger.recover`: on PostgreSQL each open ledger holds a
session advisory lock named after its owner id, on a connection of its own, and an
owner whose lock can be taken is gone (`PostgresStore.hold`, `gone`). SQLite has one
server per file, so every other opener counts as gone.

Durability: SQLite commits with synchronous=NORMAL and the ledger waits for a shared
fsync of the WAL (`GroupSync`); PostgreSQL flushes its WAL at each COMMIT
(synchronous_commit, on by default) and groups concurrent flushes itself.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from dataops._group import GroupSync
from dataops.errors import InternalError

# Long enough that writers queue behind each other under load (a transaction here
# lasts well under a millisecond plus one fsync); when it does run out the caller
# gets sqlite3.OperationalError and nothing is recorded.
_BUSY_TIMEOUT_S = 30.0

POSTGRES_SCHEMES = ("postgresql://", "postgres://")

# A constant key for the advisory lock PostgreSQL replicas take while creating the
# schema, so two replicas starting at once do not both create it. (One bigint: a space
# of its own, apart from the two-int4 keys below.)
_SCHEMA_LOCK_KEY = 0x646174616F7073  # "dataops"
# The first int4 of the advisory locks that mark a ledger owner alive (`hold`).
_OWNER_LOCK_SPACE = 0x646F7073  # "dops"


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    # Positional, as sqlite3's own execute takes them.
    def execute(self, sql: str, params: Any = (), /) -> Any: ...


class Store(Protocol):
    location: str  # for messages: the file, or the database URL without a password
    group: GroupSync | None  # the shared fsync, where the store has one
    types: dict[str, str]  # column types for the schema templates in dataops.ledger
    for_update: str  # appended to a SELECT whose rows the transaction will update

    def connection(self) -> Connection: ...
    def write(self, dataset: str | None) -> Any: ...  # context manager -> Connection
    def snapshot(self) -> Any: ...  # context manager -> Connection: one consistent read
    def schema_version(self, conn: Connection) -> int: ...
    def migrate(self, scripts: list[str]) -> None: ...  # script i: version i -> i + 1
    def create(self, statements: list[str]) -> None: ...  # CREATE ... IF NOT EXISTS, once across openers
    def hold(self, owner: str) -> None: ...  # mark this opener alive until close
    def gone(self, conn: Connection, owners: list[str]) -> set[str]: ...  # which are not
    def close(self) -> None: ...


def open_store(
    where: Path | str, *, group_commit: bool = True, lock_budgets: bool = True, fsync: bool = True
) -> Store:
    """A PostgreSQL store for a ``postgresql://`` URL, else the SQLite file at ``where``.

    fsync=False (SQLite only): commits survive a killed process, not a power cut, and
    nothing waits for a sync; for stores another durable record backs (consent uses,
    restored from the audit log at start). PostgreSQL always flushes at COMMIT.
    """
    if is_postgres(where):
        return PostgresStore(str(where), lock_budgets=lock_budgets)
    if not lock_budgets:
        raise ValueError("lock_budgets=False exists only for PostgreSQL (SQLite has one write lock)")
    return SQLiteStore(Path(where), group_commit=group_commit and fsync, fsync=fsync)


def is_postgres(where: Path | str) -> bool:
    return isinstance(where, str) and where.startswith(POSTGRES_SCHEMES)


def _statements(script: str) -> list[str]:
    # The schema scripts hold no ";" but between statements (no strings, no triggers).
    return [s for s in script.split(";") if s.strip()]


class _PerThread:
    """One connection per thread (neither driver's connections are for concurrent use),
    all closed by `close`."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> Any:
        if self._closed:
            raise ValueError("ledger is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None or self._broken(conn):
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._all:
                conn.close()
            self._all.clear()

    def _connect(self) -> Any:
        raise NotImplementedError

    def _broken(self, conn: Any) -> bool:
        return False


class SQLiteStore(_PerThread):
    types = {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "int": "INTEGER", "blob": "BLOB"}
    for_update = ""  # BEGIN IMMEDIATE already holds the only write lock

    def __init__(self, path: Path, *, group_commit: bool = True, fsync: bool = True) -> None:
        super().__init__()
        self.path = path
        self.location = str(path)
        self.group_commit = group_commit
        self.fsync = fsync
        self.group: GroupSync | None = GroupSync(self.sync_wal) if fsync else None

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves; the module's
        # implicit (deferred) BEGIN would let two writers read the same spend.
        # check_same_thread=False only so close() may close it from another thread.
        conn = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        # FULL: SQLite fsyncs the WAL in every commit; NORMAL: we do, once per group
        # (write), or nobody does (fsync=False: another durable record backs the store).
        full = self.fsync and not self.group_commit
        conn.execute("PRAGMA synchronous=FULL" if full else "PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def connection(self) -> sqlite3.Connection:
        return self.get()

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        conn = self.get()
        conn.execute(begin)
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def write(self, dataset: str | None) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding SQLite's single write lock from the start."""
        with self._transaction("BEGIN IMMEDIATE") as conn:
            yield conn
        if self.group_commit and self.group is not None:
            self.group.wait()  # outside the write lock: others commit while we sync

    def snapshot(self) -> Any:
        return self._transaction("BEGIN")  # deferred: one snapshot from the first read

    def schema_version(self, conn: Connection) -> int:
        return conn.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self, scripts: list[str]) -> None:
        """Run the scripts the file lacks: all on a new file, from its version on an older one.

        Under the write lock, reading the version again inside the transaction: another
        process may have created or migrated the file meanwhile.
        """
        with self._transaction("BEGIN IMMEDIATE") as conn:
            have = self.schema_version(conn)
            for script in scripts[have:]:
                for statement in _statements(script):
                    conn.execute(statement)
            if have < len(scripts):
                conn.execute(f"PRAGMA user_version = {len(scripts)}")

    def create(self, statements: list[str]) -> None:
        with self._transaction("BEGIN IMMEDIATE") as conn:
            for statement in statements:
                conn.execute(statement)

    def hold(self, owner: str) -> None:
        pass  # one server per file: see `gone`

    def gone(self, conn: Connection, owners: list[str]) -> set[str]:
        """Every owner: a server opening its file is the only one (the other openers are
        tools, which make no reservations, or tests playing several processes), so any
        reservation still open is a dead process's, as before owners were recorded."""
        return set(owners)

    def sync_wal(self) -> None:
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


class _PgConnection:
    """A psycopg connection taking the ledger's ``?`` placeholders."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self._sql: dict[str, str] = {}

    def execute(self, sql: str, params: Any = (), /) -> Any:
        text = self._sql.get(sql)
        if text is None:
            # psycopg's placeholder is %s, so a literal % must be doubled.
            text = self._sql[sql] = sql.replace("%", "%%").replace("?", "%s")
        return self.raw.execute(text, params)

    def close(self) -> None:
        self.raw.close()


class PostgresStore(_PerThread):
    types = {"id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "int": "BIGINT", "blob": "BYTEA"}

    def __init__(self, url: str, *, lock_budgets: bool = True) -> None:
        super().__init__()
        try:
            import psycopg  # the `server` extra
        except ImportError:
            raise InternalError(
                "a postgresql:// ledger needs psycopg: pip install 'dataops[server]'"
            ) from None
        self._psycopg = psycopg
        self.url = url
        self.location = _without_password(url)
        self.group: GroupSync | None = None  # PostgreSQL flushes its WAL at COMMIT, grouping flushes itself
        self.lock_budgets = lock_budgets
        self.for_update = " FOR UPDATE" if lock_budgets else ""
        self._liveness: Any = None  # the connection holding this opener's owner lock

    def _connect(self) -> _PgConnection:
        # autocommit: the ledger issues BEGIN and COMMIT itself, as on SQLite, so one
        # code path serves both. application_name shows each replica in pg_stat_activity.
        raw = self._psycopg.connect(self.url, autocommit=True, application_name="dataops-ledger")
        return _PgConnection(raw)

    def _broken(self, conn: _PgConnection) -> bool:
        return conn.raw.closed or conn.raw.broken  # a dropped connection: open a new one

    def connection(self) -> _PgConnection:
        return self.get()

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[_PgConnection]:
        conn = self.get()
        conn.execute(begin)
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if not (conn.raw.closed or conn.raw.broken):  # a lost connection rolled back already
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def write(self, dataset: str | None) -> Iterator[_PgConnection]:
        with self._transaction("BEGIN ISOLATION LEVEL READ COMMITTED") as conn:
            if dataset is not None and self.lock_budgets:
                # The dataset's budget row, created on its first debit. Concurrent
                # creators wait for each other on the primary key, then all lock it.
                conn.execute(
                    "INSERT INTO budget_locks (dataset) VALUES (?) ON CONFLICT DO NOTHING", (dataset,)
                )
                conn.execute("SELECT dataset FROM budget_locks WHERE dataset = ? FOR UPDATE", (dataset,))
            yield conn

    def snapshot(self) -> Any:
        return self._transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def schema_version(self, conn: Connection) -> int:
        row = conn.execute("SELECT to_regclass('ledger_schema') IS NOT NULL").fetchone()
        if not row[0]:
            return 0
        return conn.execute("SELECT version FROM ledger_schema").fetchone()[0]

    def migrate(self, scripts: list[str]) -> None:
        """Create the schema in one transaction (DDL is transactional in PostgreSQL),
        under an advisory lock so replicas starting at once take turns.

        The lock is the session's, taken before the transaction begins: a transaction
        that began before another replica created the schema would keep its cached
        "no such table" and create it again (a lock on no relation brings no news of
        the catalog; a new transaction does).
        """
        version = len(scripts)
        conn = self.get()
        conn.execute("SELECT pg_advisory_lock(?)", (_SCHEMA_LOCK_KEY,))
        try:
            with self._transaction("BEGIN") as conn:
                have = self.schema_version(conn)
                if have == version:
                    return
                if have != 0:  # no older PostgreSQL schema was ever released
                    raise InternalError(f"{self.location}: ledger schema version {have}, expected {version}")
                for script in scripts:
                    for statement in _statements(script):
                        conn.execute(statement)
                conn.execute("CREATE TABLE budget_locks (dataset TEXT PRIMARY KEY)")
                conn.execute("CREATE TABLE ledger_schema (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO ledger_schema (version) VALUES (?)", (version,))
        finally:
            conn.execute("SELECT pg_advisory_unlock(?)", (_SCHEMA_LOCK_KEY,))

    def create(self, statements: list[str]) -> None:
        """Run ``CREATE ... IF NOT EXISTS`` statements in one transaction, under the schema
        lock: two replicas creating one table at once would otherwise collide in
        PostgreSQL's catalog (a unique violation, not a no-op)."""
        conn = self.get()
        conn.execute("SELECT pg_advisory_lock(?)", (_SCHEMA_LOCK_KEY,))
        try:
            with self._transaction("BEGIN") as conn:
                for statement in statements:
                    conn.execute(statement)
        finally:
            conn.execute("SELECT pg_advisory_unlock(?)", (_SCHEMA_LOCK_KEY,))

    def hold(self, owner: str) -> None:
        """Hold a session advisory lock named after ``owner`` on a connection of its own
        for as long as this ledger is open. PostgreSQL releases it when the session
        ends, however the process ends (a killed process's socket closes; a vanished
        host's session is reaped by TCP keepalive), so the lock is the liveness."""
        liveness = self._psycopg.connect(self.url, autocommit=True, application_name="dataops-ledger-owner")
        liveness.execute("SELECT pg_advisory_lock(%s, %s)", (_OWNER_LOCK_SPACE, _owner_key(owner)))
        self._liveness = liveness

    def gone(self, conn: Connection, owners: list[str]) -> set[str]:
        """The owners whose lock this session can take: nobody holds it, so their
        ledger is closed or their process dead. Taken for the transaction only (an
        owner that is gone never comes back: owners are random per opener)."""
        return {
            owner
            for owner in owners
            if conn.execute(
                "SELECT pg_try_advisory_xact_lock(?, ?)", (_OWNER_LOCK_SPACE, _owner_key(owner))
            ).fetchone()[0]
        }

    def close(self) -> None:
        super().close()
        if self._liveness is not None:
            self._liveness.close()
            self._liveness = None


def _owner_key(owner: str) -> int:
    """A ledger owner's advisory lock key: 32 bits of its hash. Two live owners sharing
    a key would each look alive to the other's check; a dead one sharing a live one's
    key looks alive, and its open reservations stay ``reserved`` (still spent)."""
    return int.from_bytes(hashlib.sha256(owner.encode()).digest()[:4], "big", signed=True)


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))
