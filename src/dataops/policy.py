"""Policies: one operator-written TOML file per consumer → a validated, frozen PolicySet.

Default deny: a consumer, dataset or column not granted is not usable. A policy set
is validated whole against the catalog before it is served; one bad file refuses the
whole new version and the previous version keeps serving (`PolicyStore`), so an
operator's typo can never widen access or take the service down.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import threading
import tomllib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

from dataops._toml import Table
from dataops.catalog import Catalog, Classification, Dataset
from dataops.errors import PolicyError
from dataops.ir import Function, Mode

log = logging.getLogger(__name__)

CONSUMER_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# Below three, a "group" can be one person and a witness: no statistical office goes lower.
MIN_GROUP_SIZE_FLOOR = 3


class Use(str, Enum):
    DIMENSION = "dimension"
    FILTER = "filter"
    MEASURE = "measure"


@dataclass(frozen=True)
class Dominance:
    """(n, k) rule: the top `n` units may not make up more than `percent` of a cell."""

    n: int = 2
    percent: float = 85.0


@dataclass(frozen=True)
class GrantBudget:
    epsilon: float
    delta: float


@dataclass(frozen=True)
class Grant:
    dataset: str
    purpose: str
    expires: dt.date
    modes: frozenset[Mode]
    functions: frozenset[Function]
    min_group_size: int
    dominance: Dominance
    budget: GrantBudget
    columns: Mapping[str, frozenset[Use]]

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


@dataclass(frozen=True)
class PolicySet:
    consumers: Mapping[str, ConsumerPolicy]
    # SHA-256 over every policy file's name and bytes: the audit log records it so a
    # reviewer knows exactly which rules decided each request.
    version: str

    def get(self, consumer: str) -> ConsumerPolicy | None:
        return self.consumers.get(consumer)


def load_policies(policy_dir: Path, catalog: Catalog) -> PolicySet:
    """Load and validate every `*.toml` in `policy_dir`. Raises PolicyError on the first mistake."""
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
        policy = _load_policy(path, raw, catalog)
        consumers[policy.consumer] = policy
    return PolicySet(MappingProxyType(consumers), digest.hexdigest())


def _load_policy(path: Path, raw: bytes, catalog: Catalog) -> ConsumerPolicy:
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    doc = Table(data, path, "", PolicyError)
    consumer = doc.str("consumer", pattern=CONSUMER_PATTERN)
    if consumer != path.stem:
        raise doc.fail("consumer", f"{consumer!r} must equal the file name stem {path.stem!r}")
    zone = doc.str("zone")
    grants: dict[str, Grant] = {}
    for table in doc.tables("grants"):
        grant = _load_grant(table, zone, catalog)
        if grant.dataset in grants:
            raise table.fail("dataset", f"a second grant on {grant.dataset!r}; merge them into one")
        grants[grant.dataset] = grant
    policy = ConsumerPolicy(
        consumer=consumer,
        zone=zone,
        description=doc.str("description", ""),
        revoked=doc.bool("revoked", False),
        grants=MappingProxyType(grants),
        source=path,
    )
    doc.reject_unknown()
    return policy


def _enum_set(table: Table, key: str, enum: type[Enum]) -> frozenset:
    values = table.list(key)
    if not values:
        raise table.fail(key, "must list at least one value")
    out = set()
    for value in values:
        try:
            out.add(enum(value))
        except ValueError:
            raise table.fail(key, f"{value!r} is not one of {[e.value for e in enum]}") from None
    return frozenset(out)


def _load_grant(table: Table, zone: str, catalog: Catalog) -> Grant:
    dataset_id = table.str("dataset")
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

    dominance_table = table.table("dominance", required=False)
    dominance = Dominance()
    if dominance_table is not None:
        dominance = Dominance(
            n=dominance_table.int("n", 2, minimum=1),
            percent=dominance_table.number("percent", 85.0, minimum=0.0),
        )
        if not 0 < dominance.percent <= 100:
            raise dominance_table.fail("percent", "must lie in (0, 100]")
        dominance_table.reject_unknown()

    budget_table = table.table("budget")
    budget = GrantBudget(
        epsilon=budget_table.number("epsilon", minimum=0.0),
        delta=budget_table.number("delta", 0.0, minimum=0.0),
    )
    if budget.delta >= 1:
        raise budget_table.fail("delta", "must be < 1")
    if budget.epsilon > dataset.budget.epsilon or budget.delta > dataset.budget.delta:
        raise budget_table.fail(
            "epsilon", f"exceeds the dataset cap of {dataset_id!r} (epsilon {dataset.budget.epsilon}, "
            f"delta {dataset.budget.delta})"
        )
    budget_table.reject_unknown()

    grant = Grant(
        dataset=dataset_id,
        purpose=table.str("purpose"),
        expires=expires,
        modes=_enum_set(table, "modes", Mode),
        functions=_enum_set(table, "functions", Function),
        min_group_size=table.int("min_group_size", minimum=MIN_GROUP_SIZE_FLOOR),
        dominance=dominance,
        budget=budget,
        columns=MappingProxyType(_load_columns(table.table("columns"), dataset)),
    )
    table.reject_unknown()
    return grant


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


class PolicyStore:
    """The policy set in force, replaced only by a new version that validates whole.

    `poll()` is cheap (a stat per file) and reloads only when a file changed; a
    background thread calls it every `interval` seconds.
    """

    def __init__(
        self,
        policy_dir: Path,
        catalog: Catalog,
        *,
        on_reload: Callable[[PolicySet | None, str | None], None] | None = None,
    ) -> None:
        self.policy_dir = policy_dir
        self.catalog = catalog
        self._on_reload = on_reload
        self._lock = threading.Lock()
        self._fingerprint = self._stat()
        self._current = load_policies(policy_dir, catalog)
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> PolicySet:
        return self._current

    def _stat(self) -> tuple:
        entries = []
        for path in sorted(self.policy_dir.glob("*.toml")):
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append((path.name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(entries)

    def poll(self) -> bool:
        """Reload if any file changed. Returns True when a new version was installed."""
        with self._lock:
            fingerprint = self._stat()
            if fingerprint == self._fingerprint:
                return False
            self._fingerprint = fingerprint
            try:
                candidate = load_policies(self.policy_dir, self.catalog)
            except PolicyError as exc:
                self.last_error = str(exc)
                log.error("policy edit refused, previous version %s keeps serving: %s",
                          self._current.version[:12], exc)
                if self._on_reload:
                    self._on_reload(None, str(exc))
                return False
            if candidate.version == self._current.version:
                return False
            self._current = candidate
            self.last_error = None
            log.info("policy version %s in force", candidate.version[:12])
            if self._on_reload:
                self._on_reload(candidate, None)
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
