"""Policies: one operator-written TOML file per consumer → a validated, frozen PolicySet.

Default deny: a consumer, dataset or column not granted is not usable. At start the
policy set is validated whole (the server refuses to start on a mistake). While
serving, `PolicyStore` validates each consumer's file on its own, known by its content
hash (never size, mtime or inode):

* a file that does not validate whole denies its own consumer (rule
  `consumer.policy_invalid`) until fixed; its previous version does not keep serving
  (it may be exactly what the edit meant to narrow), and no other consumer is touched;
* a narrowing edit (revoked, an earlier expiry, a removed grant, column or function,
  a larger minimum group, a stricter dominance rule, a smaller budget) applies at once;
* any other change applies only once its content has stayed the same for
  `settle_seconds`, so a file caught half-written (its dominance table not yet
  there) is never served.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from dataops._toml import Table
from dataops.catalog import Catalog, Classification, Dataset, read_budget
from dataops.errors import PolicyError
from dataops.ir import Function, Mode
from dataops.values import PrivacyLoss

if TYPE_CHECKING:
    from dataops.products import Products

log = logging.getLogger(__name__)

CONSUMER_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# Keys a grant once had; exact answers now come from protected tables whose product
# file carries the rules. Named in the error so an old policy is fixed, not ignored.
_MOVED_TO_TABLES = ("min_group_size", "dominance")


class Use(str, Enum):
    DIMENSION = "dimension"
    FILTER = "filter"
    MEASURE = "measure"


ACCOUNTINGS = ("pure", "zcdp")


@dataclass(frozen=True)
class Grant:
    dataset: str
    purpose: str
    expires: dt.date
    modes: frozenset[Mode]
    functions: frozenset[Function]
    budget: PrivacyLoss
    # DP mode only: what each column may be used for in a free-form DP query.
    columns: Mapping[str, frozenset[Use]]
    # How DP releases on this grant are noised and accounted: "pure" (Laplace noise,
    # epsilon-DP) or "zcdp" (Gaussian noise, zero-concentrated DP converted by OpenDP
    # to the (epsilon, delta) the ledger debits; see dataops.engines.dp).
    accounting: str = "pure"
    # Aggregate (exact) mode only: the table products (ids) this grant may read.
    # Exact answers are lookups in these protected tables, never free-form queries.
    tables: tuple[str, ...] = ()

    def uses(self, column: str) -> frozenset[Use]:
        return self.columns.get(column, frozenset())

    def expired(self, today: dt.date) -> bool:
        return today > self.expires


@dataclass(frozen=True)
class ConsumerPolicy:
    consumer: str
    zone: str
    description: str
    revoked: bool
    grants: Mapping[str, Grant]
    source: Path
    # Set when the consumer's file did not validate: the consumer is denied
    # (rule consumer.policy_invalid) and this is the operator's error message.
    invalid: str | None = None


@dataclass(frozen=True)
class PolicySet:
    consumers: Mapping[str, ConsumerPolicy]
    # SHA-256 over every policy file's name and bytes: the audit log records it so a
    # reviewer knows exactly which rules decided each request.
    version: str

    def get(self, consumer: str) -> ConsumerPolicy | None:
        return self.consumers.get(consumer)


def load_policies(policy_dir: Path, catalog: Catalog, products: Products | None = None) -> PolicySet:
    """Load and validate every `*.toml` in `policy_dir`. Raises PolicyError on the first mistake.

    `products` are the table products grants may name (none when omitted: then a
    grant naming a table is refused as naming an unknown one).
    """
    if not policy_dir.is_dir():
        raise PolicyError(f"{policy_dir}: policy directory does not exist")
    digest = hashlib.sha256()
    consumers: dict[str, ConsumerPolicy] = {}
    for path in sorted(policy_dir.glob("*.toml")):
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PolicyError(f"{path}: cannot be read: {exc.strerror}") from None
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(raw).digest())
        policy = _load_policy(path, raw, catalog, products)
        consumers[policy.consumer] = policy
    return PolicySet(MappingProxyType(consumers), digest.hexdigest())


def _load_policy(
    path: Path, raw: bytes, catalog: Catalog, products: Products | None = None
) -> ConsumerPolicy:
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    doc = Table(data, path, "", PolicyError)
    consumer = doc.string("consumer", pattern=CONSUMER_PATTERN)
    if consumer != path.stem:
        raise doc.fail("consumer", f"{consumer!r} must equal the file name stem {path.stem!r}")
    zone = doc.string("zone")
    grants: dict[str, Grant] = {}
    for table in doc.tables("grants"):
        grant = _load_grant(table, zone, catalog, products)
        if grant.dataset in grants:
            raise table.fail("dataset", f"a second grant on {grant.dataset!r}; merge them into one")
        grants[grant.dataset] = grant
    policy = ConsumerPolicy(
        consumer=consumer,
        zone=zone,
        description=doc.string("description", ""),
        revoked=doc.boolean("revoked", False),
        grants=MappingProxyType(grants),
        source=path,
    )
    doc.reject_unknown()
    return policy


def _enum_set(table: Table, key: str, enum: type[Enum]) -> frozenset:
    values = table.array(key)
    if not values:
        raise table.fail(key, "must list at least one value")
    out = set()
    for value in values:
        try:
            out.add(enum(value))
        except ValueError:
            raise table.fail(key, f"{value!r} is not one of {[e.value for e in enum]}") from None
    return frozenset(out)


def _load_grant(table: Table, zone: str, catalog: Catalog, products: Products | None) -> Grant:
    dataset_id = table.string("dataset")
    dataset = catalog.get(dataset_id)
    if dataset is None:
        raise table.fail("dataset", f"{dataset_id!r} is not in the catalog")
    if dataset.zone != zone:
        raise table.fail(
            "dataset", f"{dataset_id!r} is in zone {dataset.zone!r}, not this consumer's zone {zone!r}"
        )
    expires = table.raw("expires")
    if isinstance(expires, dt.datetime) or not isinstance(expires, dt.date):
        raise table.fail("expires", f"must be a TOML date such as 2027-12-31, got {expires!r}")

    for key in _MOVED_TO_TABLES:
        if table.has(key):
            raise table.fail(
                key,
                "protection rules now belong to table products (products/*.toml); "
                "remove it here and name the tables this grant may read in `tables`",
            )

    budget_table = table.table("budget")
    budget = read_budget(budget_table)
    if not budget <= dataset.budget:
        raise budget_table.fail(
            "epsilon",
            f"exceeds the dataset cap of {dataset_id!r} (epsilon {dataset.budget.epsilon}, "
            f"delta {dataset.budget.delta})",
        )
    budget_table.reject_unknown()

    modes = _enum_set(table, "modes", Mode)
    # Exact answers come only from the named tables; free-form column grants are DP's.
    if Mode.DP in modes:
        columns = _load_columns(table.table("columns"), dataset)
    elif table.has("columns"):
        raise table.fail(
            "columns",
            "column grants apply to DP mode only; exact (aggregate) answers "
            "come from the tables named in `tables`",
        )
    else:
        columns = {}
    tables = _load_tables(table, dataset, products, required=Mode.AGGREGATE in modes)
    if Mode.AGGREGATE in modes and not tables:
        raise table.fail("tables", "an aggregate-mode grant must name the table products it may read")
    # Tables without aggregate mode are validated but unused (dropping "aggregate" from
    # `modes` narrows the grant; the leftover list must not make the file invalid).
    grant = Grant(
        dataset=dataset_id,
        purpose=table.string("purpose"),
        expires=expires,
        modes=modes,
        functions=_enum_set(table, "functions", Function),
        budget=budget,
        columns=MappingProxyType(columns),
        tables=tables,
        accounting=table.string("accounting", "pure"),
    )
    if grant.accounting not in ACCOUNTINGS:
        raise table.fail("accounting", f"must be one of {', '.join(ACCOUNTINGS)}, got {grant.accounting!r}")
    if grant.accounting == "zcdp" and budget.delta == 0:
        raise budget_table.fail(
            "delta", "a zcdp grant needs delta > 0: zCDP is converted to (epsilon, delta)"
        )
    table.reject_unknown()
    return grant


def _load_tables(
    table: Table, dataset: Dataset, products: Products | None, *, required: bool
) -> tuple[str, ...]:
    """The table product ids a grant names: each must exist and be a table of this dataset."""
    ids = table.array("tables") if required else table.array("tables", [])
    known = products.tables if products is not None else {}
    seen: list[str] = []
    for i, table_id in enumerate(ids):
        if not isinstance(table_id, str) or not table_id:
            raise table.fail(f"tables[{i}]", f"must be a table product id, got {table_id!r}")
        product = known.get(table_id)
        if product is None:
            listed = ", ".join(sorted(known)) or "none"
            raise table.fail(
                f"tables[{i}]", f"{table_id!r} is not a table product (products/*.toml; known: {listed})"
            )
        if product.dataset != dataset.id:
            raise table.fail(
                f"tables[{i}]",
                f"table {table_id!r} is over dataset {product.dataset!r}, not this grant's {dataset.id!r}",
            )
        if table_id in seen:
            raise table.fail(f"tables[{i}]", f"{table_id!r} is named twice")
        seen.append(table_id)
    return tuple(seen)


def _load_columns(table: Table, dataset: Dataset) -> dict[str, frozenset[Use]]:
    columns: dict[str, frozenset[Use]] = {}
    for name, _ in table.items():
        column = dataset.column(name)
        if column is None:
            raise table.fail(name, f"{dataset.id!r} has no column {name!r}")
        uses = _enum_set(table, name, Use)
        if column.classification is Classification.IDENTIFIER:
            raise table.fail(
                name, "is an identifier: identifier columns can never be grouped, filtered or output"
            )
        if column.classification is Classification.UNCLASSIFIED:
            raise table.fail(name, "is unclassified: classify it in the catalog before granting it")
        if Use.MEASURE in uses and not column.type.numeric:
            raise table.fail(name, f"only numeric columns can be measures; {name!r} is {column.type.value}")
        columns[name] = uses
    return columns


def _fewer_column_uses(old: Mapping[str, frozenset[Use]], new: Mapping[str, frozenset[Use]]) -> bool:
    return all(column in old and uses <= old[column] for column, uses in new.items())


# How a grant's field may change and still grant no more than before. A field not
# listed here (added later) must stay equal: unknown changes are never "narrowing".
_NARROWER = {
    "expires": lambda old, new: new <= old,
    "modes": lambda old, new: new <= old,
    "functions": lambda old, new: new <= old,
    "tables": lambda old, new: set(new) <= set(old),  # fewer tables read: narrower
    "budget": lambda old, new: new <= old,
    "columns": _fewer_column_uses,
}


def narrows(old: ConsumerPolicy | None, new: ConsumerPolicy) -> bool:
    """True if `new` allows nothing `old` did not: safe to apply the moment it is read."""
    if new.invalid is not None or new.revoked:
        return True  # denies the consumer everything
    if old is None or old.invalid is not None or old.revoked:
        return False  # from "denied" anything valid is wider
    if (new.consumer, new.zone) != (old.consumer, old.zone):
        return False
    for dataset, grant in new.grants.items():
        before = old.grants.get(dataset)
        if before is None:
            return False
        for f in fields(Grant):
            a, b = getattr(before, f.name), getattr(grant, f.name)
            if not _NARROWER.get(f.name, lambda x, y: x == y)(a, b):
                return False
    return True


def _invalid_policy(path: Path, error: str) -> ConsumerPolicy:
    """What stands for a consumer whose file does not validate: a policy that denies."""
    return ConsumerPolicy(
        consumer=path.stem,
        zone="",
        description="",
        revoked=False,
        grants=MappingProxyType({}),
        source=path,
        invalid=error,
    )


def content_digest(path: Path, raw: bytes) -> str:
    """What identifies a policy file's version: its bytes, never size, mtime or inode."""
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class _InForce:
    digest: str
    policy: ConsumerPolicy


class PolicyStore:
    """The policies in force, one consumer file at a time (see the module docstring).

    `poll()` rereads every file and compares content hashes; a background thread calls
    it every `interval` seconds.
    """

    # The per-file control; tests switch it off to show what it stops (False: the old
    # whole-set rule, where any invalid file freezes every consumer's previous version).
    per_file = True

    def __init__(
        self,
        policy_dir: Path,
        catalog: Catalog,
        *,
        products: Products | None = None,
        settle_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy_dir = policy_dir
        self.catalog = catalog
        self.products = products
        self.settle_seconds = settle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # Strict at start: the server refuses to start on any invalid file.
        self._current = load_policies(policy_dir, catalog, products)
        self._files: dict[str, _InForce] = {}
        for name, (path, _raw, digest) in self._scan().items():
            policy = self._current.get(path.stem)
            if policy is not None:
                self._files[name] = _InForce(digest, policy)
        # name -> (digest, first seen): a widening edit waiting for its content to settle.
        self._pending: dict[str, tuple[str, float]] = {}
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> PolicySet:
        return self._current

    def _scan(self) -> dict[str, tuple[Path, bytes | None, str]]:
        files: dict[str, tuple[Path, bytes | None, str]] = {}
        for path in sorted(self.policy_dir.glob("*.toml")):
            try:
                raw = path.read_bytes()
            except OSError as exc:
                files[path.name] = (path, None, f"unreadable: {exc.strerror}")
                continue
            files[path.name] = (path, raw, content_digest(path, raw))
        return files

    def _candidate(self, path: Path, raw: bytes | None, digest: str) -> ConsumerPolicy:
        if raw is None:
            return _invalid_policy(path, f"{path}: cannot be read ({digest})")
        try:
            return _load_policy(path, raw, self.catalog, self.products)
        except PolicyError as exc:
            return _invalid_policy(path, str(exc))

    def poll(self, *, settled: bool = False) -> bool:
        """Apply what changed. Returns True when a new version was installed.

        `settled=True` (the operator's SIGHUP: "my edits are complete") applies
        widening edits without waiting for `settle_seconds`.
        """
        with self._lock:
            now = self._clock()
            scanned = self._scan()
            files = dict(self._files)
            changed = False
            for name in set(files) - set(scanned):
                del files[name]  # a deleted file: its consumer is unknown, denied
                changed = True
            for name, (path, raw, digest) in scanned.items():
                before = files.get(name)
                if before is not None and before.digest == digest:
                    self._pending.pop(name, None)
                    continue
                candidate = self._candidate(path, raw, digest)
                if not narrows(before.policy if before else None, candidate):
                    waiting = self._pending.get(name)
                    if waiting is None or waiting[0] != digest:
                        self._pending[name] = (digest, now)  # changed again: start over
                        log.info(
                            "%s changed; applied once its content is stable for %gs",
                            path,
                            self.settle_seconds,
                        )
                    if not settled and now - self._pending[name][1] < self.settle_seconds:
                        continue
                self._pending.pop(name, None)
                files[name] = _InForce(digest, candidate)
                changed = True
            if not changed:
                return False
            errors = [f.policy.invalid for f in files.values() if f.policy.invalid is not None]
            if errors and not self.per_file:
                self.last_error = errors[0]
                return False
            combined = hashlib.sha256()  # the version: every file's content and validity
            for name, state in sorted(files.items()):
                combined.update(
                    name.encode()
                    + b"\0"
                    + state.digest.encode()
                    + (b"\0invalid" if state.policy.invalid is not None else b"")
                )
            self._files = files
            self._current = PolicySet(
                MappingProxyType({f.policy.consumer: f.policy for f in files.values()}), combined.hexdigest()
            )
            self.last_error = "\n".join(errors) or None
            for error in errors:
                log.error("policy refused, its consumer is denied until fixed: %s", error)
            log.info("policy version %s in force", self._current.version[:12])
            return True

    def start(self, interval: float) -> None:
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.poll()
                except Exception:  # a poller that dies would freeze policy silently
                    log.exception("policy poll failed")

        self._thread = threading.Thread(target=run, name="policy-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
