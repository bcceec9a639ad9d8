"""The exact engine: answers are lookups in published, jointly protected tables.

Per-query output controls do not survive combinations of queries (a margin minus
its released cells is the suppressed cell), so exact answers come only from table
products (`dataops.products.table`) that `dataops.tables.protect` protected once
per data version, jointly with all their sub-totals. What a consumer can learn is
then fixed by the released cells of the tables its grant names, whatever and
however many questions it asks. This module never reads the data.

A query is *covered* by a table (`cover`, a pure function that authorization and
`dataops policy explain` call) when:

* every group-by column and every filtered column is a dimension of the table;
* every filter is `equals` or `in_set` over keys of that dimension's public key set
  (key sets are public, so naming a key that is not one is a malformed query);
* every aggregate is a measure of the table: COUNT, COUNT_UNITS and SUM(column) as
  declared; MEAN(column) only where the table holds SUM(column) and COUNT, and it is
  computed from them (so MEAN is released exactly where SUM and COUNT are: a grant
  cannot get a sum it may not see as MEAN x COUNT).

The answer (`TableIndex.lookup`): the requested key grid is the product of the
group-by dimensions' keys (the filtered ones only). Each grid row needs the cells
with the filtered-but-not-grouped dimensions at each selected key, and every other
dimension at its margin ("all values"). A row is returned only if every value it
needs is released; a row that needs one suppressed cell is suppressed whole. Sums of
released cells are what the consumer could add up itself, so they reveal nothing new.

No side channels: an empty cell is treated exactly like a suppressed one (never
returned; it counts as not released when cells are combined), and `rows_suppressed`
is the size of the requested grid minus the rows returned. The grid is public (key
sets), the returned rows are released cells: the count says nothing the released
tables do not.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from dataops.catalog import Catalog, ColumnType, Dataset
from dataops.engines._base import AggregateAccuracy, EngineEstimate, EngineResult, Plan, PrivacyLoss
from dataops.errors import (
    FieldViolation,
    InternalError,
    InvalidQuery,
    LimitExceeded,
    PolicyDenied,
    TableUnavailable,
)
from dataops.ir import Between, Equals, Function, InSet, Query

if TYPE_CHECKING:
    from dataops.policy import Grant
    from dataops.products.table import TableProduct

log = logging.getLogger(__name__)

# How long a query waits for a table still being protected before UNAVAILABLE.
WAIT_FOR_TABLE_SECONDS = 2.0  # the default of [server] table_wait_seconds
_RETRY_SECONDS = 5  # the retry hint of a query that waited in vain
_DEADLINE_MARGIN_SECONDS = 0.25
_DP_HINT = "exact answers are lookups in the published tables; DP mode (mode=dp) can answer other questions"


# --- coverage: which granted table answers a query (pure) -------------------------


@dataclass(frozen=True)
class Axis:
    """What one dimension of the covering table does in a query.

    `grouped`: the dimension is a group-by column and the grid runs over `keys`.
    Not grouped with `keys`: the cells at those keys are added up (a filter).
    Not grouped, no keys: the margin ("all values", a null in the cell key).
    """

    dimension: str
    grouped: bool
    keys: tuple[Any, ...] | None

    @property
    def grid_keys(self) -> tuple[Any, ...]:
        """The keys a grouped axis runs over (a grouped axis always has them)."""
        if self.keys is None:
            raise InternalError(f"the axis {self.dimension!r} has no keys to run over")
        return self.keys


@dataclass(frozen=True)
class Coverage:
    """A query as a lookup in one table: the table, each dimension's axis, each output's measures."""

    table: str
    axes: tuple[Axis, ...]
    group_by: tuple[str, ...]
    # Per aggregate: (output name, function, names of the measures it is computed from).
    outputs: tuple[tuple[str, Function, tuple[str, ...]], ...]

    @property
    def grid_size(self) -> int:
        size = 1
        for axis in self.axes:
            if axis.grouped:
                size *= len(axis.keys or ())
        return size


def _measure_names(product: TableProduct) -> dict[tuple[Function, str | None], str]:
    return {(m.function, m.column): m.name for m in product.measures}


def _needed_measures(product: TableProduct, function: Function, column: str | None) -> tuple[str, ...] | None:
    """The table's measures an aggregate is computed from, or None if the table lacks them."""
    names = _measure_names(product)
    if function is Function.MEAN:
        # Only from SUM and COUNT: MEAN is released exactly where both are.
        total, count = names.get((Function.SUM, column)), names.get((Function.COUNT, None))
        return (total, count) if total and count else None
    name = names.get((function, column))
    return (name,) if name else None


def _misses(product: TableProduct, query: Query) -> list[tuple[str | None, str]]:
    """Why `product` does not cover `query`: (column, what is missing), in query order."""
    out: list[tuple[str | None, str]] = []
    dims = set(product.dimensions)
    for column in query.group_by:
        if column not in dims:
            out.append((column, f"group by {column!r}"))
    for f in query.filters:
        if f.column not in dims:
            out.append((f.column, f"filter on {f.column!r}"))
        elif isinstance(f, Between):
            out.append((f.column, f"a range filter on {f.column!r} (tables take equals or in_set keys)"))
    for a in query.aggregates:
        if _needed_measures(product, a.function, a.column) is None:
            what = f"{a.function.value}({a.column})" if a.column else a.function.value
            if a.function is Function.MEAN:
                what += " (a mean needs the table's sum and count)"
            out.append((a.column, what))
    return out


def _keys_of(product: TableProduct, dimension: str, f: Equals | InSet, index: int) -> tuple[Any, ...]:
    """The filter's keys, each checked against the dimension's public key set (order kept, repeats dropped)."""
    keys = product.keys_of(dimension)
    values = (f.value,) if isinstance(f, Equals) else tuple(dict.fromkeys(f.values))
    field = f"query.filters[{index}].{'equals' if isinstance(f, Equals) else 'in_set'}"
    for value in values:
        # bool is an int to Python: True must not select key 1.
        if not any(type(value) is type(k) and value == k for k in keys):
            description = f"{value!r} is not a key of {dimension!r} (its public key set: {list(keys)[:12]})"
            raise InvalidQuery(
                f"{field}: {description}",
                rule="table.key",
                column=dimension,
                field_violations=(FieldViolation(field, description),),
            )
    return values


def cover(query: Query, grant: Grant, tables: Mapping[str, TableProduct]) -> Coverage:
    """The lookup that answers an aggregate-mode query from the grant's tables, or the refusal.

    Of the granted tables that cover the query, the one with the fewest dimensions
    (then the lowest id) answers: a deterministic choice, so the same question always
    reads the same cells.
    """
    products = [tables[t] for t in grant.tables if t in tables]
    covering = sorted((p for p in products if not _misses(p, query)), key=lambda p: (len(p.dimensions), p.id))
    if not covering:
        raise _uncovered(query, grant, products)
    product = covering[0]
    filters: dict[str, tuple[Any, ...]] = {}
    for i, f in enumerate(query.filters):
        keys = _keys_of(product, f.column, f, i)  # type: ignore[arg-type]  # no Between: _misses
        # Two filters on one column AND together: the keys in both, in the first's order.
        filters[f.column] = tuple(k for k in filters[f.column] if k in keys) if f.column in filters else keys
    axes = []
    for dimension in product.dimensions:
        if dimension in query.group_by:
            axes.append(Axis(dimension, True, filters.get(dimension, product.keys_of(dimension))))
        else:
            axes.append(Axis(dimension, False, filters.get(dimension)))
    outputs = tuple(
        (a.name, a.function, _needed_measures(product, a.function, a.column) or ()) for a in query.aggregates
    )
    return Coverage(product.id, tuple(axes), query.group_by, outputs)


def _uncovered(query: Query, grant: Grant, products: Sequence[TableProduct]) -> PolicyDenied:
    """The refusal of an uncovered query: names the column, the tables there are, and DP mode."""
    if not products:
        return PolicyDenied(
            f"the grant on {grant.dataset!r} names no table you may read; {_DP_HINT}", rule="table.coverage"
        )
    # The table missing the least says best what is missing.
    best = min(products, key=lambda p: (len(_misses(p, query)), len(p.dimensions), p.id))
    column, what = _misses(best, query)[0]
    listed = "; ".join(
        f"{p.id} ({' x '.join(p.dimensions)}: {', '.join(m.name for m in p.measures)})" for p in products
    )
    return PolicyDenied(
        f"no table you may read covers {what} together with the rest of this query "
        f"(tables: {listed}); {_DP_HINT}",
        rule="table.coverage",
        column=column,
    )


# --- lookups in one protected table -----------------------------------------------


_ARROW_TYPES = {
    ColumnType.STRING: pa.string(),
    ColumnType.INT: pa.int64(),
    ColumnType.FLOAT: pa.float64(),
    ColumnType.BOOL: pa.bool_(),
    ColumnType.DATE: pa.date32(),
}


class TableIndex:
    """The released cells of one protected table, indexed once by their dimension values.

    `cells` maps the tuple of dimension values (None: the margin) to the tuple of
    measure values in `product.measures` order, None where not released. A cell
    whose count is zero (an empty cell) is stored as not released: it must read
    exactly like a suppressed one.
    """

    def __init__(self, product: TableProduct, dataset: Dataset, protected: Any, data_version: str) -> None:
        self.product = product
        self.data_version = data_version
        self.protected = protected
        self.measures = tuple(m.name for m in product.measures)
        self._position = {name: i for i, name in enumerate(self.measures)}
        counts = [
            i for i, m in enumerate(product.measures) if m.function in (Function.COUNT, Function.COUNT_UNITS)
        ]
        frame = protected.cells
        self.cells: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        n_dims = len(product.dimensions)
        for row in frame.select(*product.dimensions, *self.measures).iter_rows():
            self.cells[row[:n_dims]] = self._hide_empty(row[n_dims:], counts)
        self.dimension_types = {
            d: pa.string() if bins is not None else _ARROW_TYPES[dataset.columns[d].type]
            for d, bins in zip(product.dimensions, product.bins or (None,) * n_dims)
        }

    @staticmethod
    def _hide_empty(values: tuple[Any, ...], counts: Sequence[int]) -> tuple[Any, ...]:
        """An empty cell reads as not released. The protection suppresses empty cells
        already (the frequency rule counts zero units); this holds even if a table did not."""
        if any(values[i] == 0 for i in counts):
            return (None,) * len(values)
        return values

    def lookup(self, coverage: Coverage, max_output_rows: int) -> EngineResult:
        if coverage.grid_size > max_output_rows:
            raise LimitExceeded(
                f"the result grid has {coverage.grid_size} rows, more than max_output_rows={max_output_rows}; "
                "group by fewer columns or filter on fewer keys",
                rule="limits.max_output_rows",
            )
        by_dim = {a.dimension: a for a in coverage.axes}
        grouped = [by_dim[d] for d in coverage.group_by]
        # For each dimension of the table, in table order: where a grid row's key goes,
        # or the fixed keys it is summed over (a margin is the one key None).
        slot = {a.dimension: i for i, a in enumerate(grouped)}
        summed = [a.keys if (not a.grouped and a.keys is not None) else (None,) for a in coverage.axes]
        positions = [
            (name, function, tuple(self._position[m] for m in measures))
            for name, function, measures in coverage.outputs
        ]
        columns: list[list[Any]] = [[] for _ in grouped] + [[] for _ in positions]
        # The common case, one cell per row (no filter selects several keys): its key is
        # the grid key placed among the fixed keys; no product of choices to walk.
        single = all(len(summed[i]) == 1 for i, a in enumerate(coverage.axes) if not a.grouped)
        for grid_key in itertools.product(*(a.grid_keys for a in grouped)):
            choices = [
                (grid_key[slot[a.dimension]],) if a.grouped else summed[i]
                for i, a in enumerate(coverage.axes)
            ]
            cells = (tuple(c[0] for c in choices),) if single else itertools.product(*choices)
            row = self._combine(cells, positions)
            if row is None:
                continue  # needs a suppressed (or empty) cell: the whole row is suppressed
            for i, value in enumerate(grid_key):
                columns[i].append(value)
            for j, value in enumerate(row):
                columns[len(grouped) + j].append(value)
        arrays, names = [], []
        for i, axis in enumerate(grouped):
            arrays.append(pa.array(columns[i], type=self.dimension_types[axis.dimension]))
            names.append(axis.dimension)
        for j, (name, function, _) in enumerate(positions):
            kind = pa.int64() if function in (Function.COUNT, Function.COUNT_UNITS) else pa.float64()
            arrays.append(pa.array(columns[len(grouped) + j], type=kind))
            names.append(name)
        table = pa.Table.from_arrays(arrays, names=names)
        return EngineResult(
            table=table,
            rows_suppressed=coverage.grid_size - table.num_rows,
            table_id=self.product.id,
            table_fingerprint=self.protected.fingerprint,
        )

    def _combine(
        self, keys: Any, positions: Sequence[tuple[str, Function, tuple[int, ...]]]
    ) -> list[Any] | None:
        """The outputs of one grid row from the cells at `keys`, or None if one is not released."""
        totals = [[0.0] * len(p) for _, _, p in positions]
        cells = 0
        for key in keys:
            cells += 1
            values = self.cells.get(key)
            if values is None:
                return None  # not a cell of the table (cannot happen for covered keys): suppressed
            for j, (_, _, measures) in enumerate(positions):
                for m, position in enumerate(measures):
                    value = values[position]
                    if value is None:
                        return None
                    totals[j][m] += value
        if cells == 0:
            return None  # filters that select no key (x = a AND x = b): reads like an empty cell
        row: list[Any] = []
        for (_, function, _), total in zip(positions, totals):
            if function is Function.MEAN:
                row.append(total[0] / total[1])  # SUM / COUNT; COUNT > 0: empty cells are not released
            elif function in (Function.COUNT, Function.COUNT_UNITS):
                row.append(int(round(total[0])))
            else:
                row.append(total[0])
        return row


# --- the engine: protect once per data version, answer by lookup -------------------


class TableEngine:
    """Keeps every table product protected for its dataset's current data version.

    `refresh()` protects (or loads from the `TableStore`) each table whose dataset's
    data version changed and swaps its index in; `start()` runs it now and then every
    `poll_seconds` in a background thread. Each protection is recorded in the audit
    log (`record`, normally `AuditLog.append`) with the table id, data version and
    fingerprint. Until a table is ready a query waits for it (at most until its
    deadline, or `wait_seconds`) and then gets UNAVAILABLE with a retry hint.

    A table is served only for the data version it was protected for. A query that finds
    its dataset at a newer version than the published table waits for the new table, as
    for a first one, and wakes the protection thread rather than leave it to the next poll:
    the previous version's table, served meanwhile, would answer from data the operator
    has replaced.
    """

    def __init__(
        self,
        catalog: Catalog,
        tables: Mapping[str, TableProduct],
        store: Any,
        data_version: Callable[[Dataset, str | None], str],
        record: Callable[[dict[str, Any]], Any] | None = None,
        poll_seconds: float = 5.0,
        wait_seconds: float = WAIT_FOR_TABLE_SECONDS,
    ) -> None:
        self.catalog = catalog
        self.tables = tables
        self.store = store
        self.data_version = data_version
        self.record = record
        self.poll_seconds = poll_seconds
        self.wait_seconds = wait_seconds
        self._indexes: dict[str, TableIndex] = {}
        self._ready = threading.Condition()
        # table id -> (the data version its protection failed for, None if unknown; why)
        self._failed: dict[str, tuple[str | None, str]] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()  # a query saw a new data version: refresh now
        self._thread: threading.Thread | None = None

    # The Engine protocol (dataops.engines._base): estimate → cost and accuracy; release → result.
    # Lookups in published tables spend no budget, so nothing is reserved or stored for reuse.
    spends = False

    def estimate(self, plan: Plan) -> EngineEstimate:
        """Nothing: the tables are published; and exact (the suppression is in the table)."""
        return EngineEstimate(
            PrivacyLoss.zero(),
            tuple(AggregateAccuracy(a.name, mechanism="exact") for a in plan.query.aggregates),
        )

    def release(
        self, plan: Plan, estimate: EngineEstimate | None = None, deadline: float | None = None
    ) -> EngineResult:
        coverage = plan.coverage
        if coverage is None:  # authorize covers every aggregate-mode query
            raise PolicyDenied(f"no table covers this query; {_DP_HINT}", rule="table.coverage")
        # The dataset's version as the plan checked it: never a table of another.
        version = self.data_version(plan.dataset, plan.data_version)
        return self.index(coverage.table, deadline, version).lookup(coverage, plan.max_output_rows)

    def index(self, table_id: str, deadline: float | None = None, version: str | None = None) -> TableIndex:
        """The published table, once it is protected for `version` (None: whichever is published)."""
        wait_until = time.monotonic() + self.wait_seconds
        if deadline is not None:
            # Answer UNAVAILABLE a little before the client gives up, so it hears why.
            wait_until = min(wait_until, deadline - _DEADLINE_MARGIN_SECONDS)
        with self._ready:
            while not self._serves(table_id, version):
                remaining = wait_until - time.monotonic()
                if remaining <= 0 or self._failed_for(table_id, version):
                    raise TableUnavailable(
                        f"table {table_id!r} is being protected for the current data version; "
                        f"retry in {_RETRY_SECONDS} seconds",
                        rule="table.not_ready",
                        retry_after_seconds=_RETRY_SECONDS,
                    )
                if table_id in self._indexes:  # published for another version: protect this one now
                    self._wake.set()
                self._ready.wait(remaining)
            return self._indexes[table_id]

    def _failed_for(self, table_id: str, version: str | None) -> bool:
        """Whether the protection of this version failed (another version's failure: wait)."""
        failed = self._failed.get(table_id)
        return failed is not None and (version is None or failed[0] in (None, version))

    def _serves(self, table_id: str, version: str | None) -> bool:
        index = self._indexes.get(table_id)
        return index is not None and (version is None or index.data_version == version)

    def wait_ready(self, timeout: float) -> bool:
        """Block until every table is served (or failed); True if all are served."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while len(self._indexes.keys() | self._failed.keys()) < len(self.tables):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            return len(self._indexes) == len(self.tables)

    # Protection, once per data version.

    def refresh(self) -> None:
        # Smallest cubes first: the tables that are quick to protect serve soonest.
        for product in sorted(self.tables.values(), key=lambda p: (p.n_cells, p.id)):
            if self._stop.is_set():
                return
            dataset = self.catalog.get(product.dataset)
            if dataset is None:
                continue
            version: str | None = None
            try:
                version = self.data_version(dataset, None)
                current = self._indexes.get(product.id)
                if current is not None and current.data_version == version:
                    continue
                self._publish(product, dataset, version)
            except Exception as exc:  # one table failing must not take the others down
                log.exception("protecting table %s failed", product.id)
                with self._ready:
                    # Failed for the dataset's current version: queries stop waiting for it.
                    # A table of an earlier version is kept, and served to no query of this one.
                    self._failed[product.id] = (version, str(exc))
                    self._ready.notify_all()

    def _publish(self, product: TableProduct, dataset: Dataset, version: str) -> None:
        started = time.perf_counter()
        directory = getattr(self.store, "directory", None)
        stored = directory is not None and directory(product, version).is_dir()
        protected = self.store.get(product, dataset, version)
        if self._stop.is_set():
            return  # the server is stopping: its audit log may already be closed
        if not audit_passed(protected):
            # Fail closed: a table whose LP audit did not prove every suppressed cell
            # protected is never served (`dataops tables show` says which cells fail).
            raise RuntimeError(
                f"table {product.id!r} failed its LP audit for data version {version[:12]}; it is not served"
            )
        index = TableIndex(product, dataset, protected, version)
        if self.record is not None and not stored:
            # A protection is recorded once, when it is made, before it is served; a table
            # read back from the store was recorded when it was built. Every exact answer's
            # record names the table and this fingerprint.
            self.record(protection_record(product, version, protected, time.perf_counter() - started))
        with self._ready:
            self._indexes[product.id] = index
            self._failed.pop(product.id, None)
            self._ready.notify_all()
        log.info("table %s protected for data version %s", product.id, version[:12])

    def start(self) -> TableEngine:
        def run() -> None:
            self.refresh()
            while not self._stop.is_set():
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
                if not self._stop.is_set():
                    self.refresh()

        self._thread = threading.Thread(target=run, name="table-protection", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching; a protection in progress here finishes in its (daemon) thread and
        is dropped, one in a child process is killed."""
        self._stop.set()
        self._wake.set()
        close = getattr(self.store, "close", None)
        if close is not None:
            close(timeout)
        if self._thread is not None:
            self._thread.join(timeout=timeout)


def audit_passed(protected: Any) -> bool:
    """Whether the LP audit proved no suppressed cell derivable from the released ones."""
    return bool(protected.report.audit.passed)


def protection_record(product: TableProduct, version: str, protected: Any, seconds: float) -> dict[str, Any]:
    """The audit record of one protection, in the shape of an RPC's record (`CallRecord`)."""
    import datetime as dt
    import uuid

    statuses = protected.cells["status"].value_counts()
    count = {row[0]: row[1] for row in statuses.iter_rows()}
    return {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
        "request_id": uuid.uuid4().hex,
        "consumer": None,
        "method": "ProtectTable",
        "dataset": product.dataset,
        "query": None,
        "mode": "aggregate",
        "purpose": None,
        "decision": "allowed",
        "code": "OK",
        "reason": None,
        "rule": "table.protect",
        "column": None,
        "rows_returned": count.get("released", 0),
        "rows_suppressed": count.get("primary", 0) + count.get("secondary", 0),
        "epsilon_spent": 0.0,
        "delta_spent": 0.0,
        "reused": False,
        "latency_ms": round(seconds * 1000, 3),
        "table": product.id,
        "data_version": version,
        "fingerprint": getattr(protected, "fingerprint", None),
        "cells_primary": count.get("primary", 0),
        "cells_secondary": count.get("secondary", 0),
    }
