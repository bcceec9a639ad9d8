"""The catalog: one operator-written TOML file per dataset → validated frozen objects.

A catalog entry says where a dataset's Parquet lives, what its privacy unit is and
how much one unit may contribute, and for every column its type, classification,
bounds, public key set and bins. Everything downstream (policy validation,
authorization, the engines) trusts these objects, so loading is strict.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from dataops._toml import Table, read_toml
from dataops.errors import CatalogError, InternalError
from dataops.values import PrivacyLoss

ID_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,62}")
ZONE_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,62}")
COLUMN_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class ColumnType(str, Enum):
    STRING = "string"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    DATE = "date"

    @property
    def numeric(self) -> bool:
        return self in (ColumnType.INT, ColumnType.FLOAT)


class Classification(str, Enum):
    IDENTIFIER = "identifier"
    QUASI_IDENTIFIER = "quasi_identifier"
    PUBLIC = "public"
    SENSITIVE = "sensitive"
    UNCLASSIFIED = "unclassified"

    @property
    def usable(self) -> bool:
        """Identifiers and unclassified columns can never appear in a query."""
        return self not in (Classification.IDENTIFIER, Classification.UNCLASSIFIED)


@dataclass(frozen=True)
class Column:
    name: str
    type: ColumnType
    classification: Classification
    description: str = ""
    bounds: tuple[float, float] | None = None
    keys: tuple[Any, ...] | None = None
    bins: tuple[float, ...] | None = None

    @property
    def key_set(self) -> tuple[Any, ...]:
        """The public key set, for a column the caller knows has one."""
        if self.keys is None:
            raise InternalError(f"column {self.name!r} has no public key set")
        return self.keys


@dataclass(frozen=True)
class Dataset:
    id: str
    zone: str
    title: str
    description: str
    provider: str
    location: str
    path: Path
    unit_column: str
    # None until the operator sets privacy_unit.max_rows: DP is off for the dataset
    # (a bound taken from the data would publish the heaviest unit's row count).
    max_rows_per_unit: int | None
    budget: PrivacyLoss  # the cap across all consumers
    columns: Mapping[str, Column]
    source: Path
    sandbox: Path | None = None  # the sandbox root `path` must resolve inside

    def column(self, name: str) -> Column | None:
        return self.columns.get(name)

    @property
    def dp_ready(self) -> bool:
        return self.max_rows_per_unit is not None


@dataclass(frozen=True)
class Catalog:
    datasets: Mapping[str, Dataset]

    def get(self, dataset_id: str) -> Dataset | None:
        return self.datasets.get(dataset_id)

    def in_zone(self, zone: str) -> list[Dataset]:
        return [d for d in self.datasets.values() if d.zone == zone]


def bin_index(value: Any, edges: tuple[float, ...] | list[float]) -> Any:
    """The half-open bin [e_i, e_i+1) of a column's `bins` holding each value, as its index
    i (UInt32, a polars expression); null for a value outside every bin, missing or NaN
    (polars orders NaN above every number). The one place this arithmetic is written: DP
    serving copies (`dataops.engines.dp.bin_position`) and protected tables' cell codes
    (`dataops.tables.cube.code_expressions`) both go through it."""
    import polars as pl  # here: loading a catalog needs no polars

    inside = (value >= edges[0]) & (value < edges[-1])
    inner = [(value >= e).cast(pl.UInt32) for e in edges[1:-1]]
    return pl.when(inside).then(pl.sum_horizontal(inner) if inner else pl.lit(0, pl.UInt32))


def bin_label(low: float, high: float) -> str:
    """'[1990, 2000)': the half-open interval of one bin, as every engine names it.

    Exact: an integer edge in full ("[100000, 1000000)"), any other as Python's shortest
    round-trip repr, so two different bins never share a label (a `:g` label did at seven
    significant digits: 1234567 and 1234568 both read "1.23457e+06")."""

    def number(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else repr(float(x))

    return f"[{number(low)}, {number(high)})"


def real_path(path: Path | str) -> str:
    """`os.path.realpath`, resolved by the kernel where it can be.

    realpath walks the path in Python, one lstat per component, and every data request
    checks its dataset's location this way (a tenth of a loaded server's Python time went
    to it). On Linux, opening the path with O_PATH resolves every link as an open would,
    and /proc/self/fd names what was opened: two system calls. A path that cannot be
    opened so (missing, no /proc) is resolved by realpath, whose answer it then is.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)  # Linux only: AttributeError elsewhere
    except (AttributeError, OSError):
        return os.path.realpath(path)
    try:
        resolved = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)
    finally:
        os.close(fd)
    # Only an absolute name is a path; anything else (a pseudo-file's "anon_inode:...")
    # is left to realpath.
    return resolved if resolved.startswith("/") else os.path.realpath(path)


def resolves_inside(path: Path, root: Path) -> bool:
    """Whether `path`, every symlink on the way resolved, lies inside `root` (itself resolved).

    Checked at catalog load and again before every read (dataops.versions): a link
    swapped in later is refused too.
    """
    return is_inside(real_path(path), root)


def is_inside(real: Path | str, root: Path) -> bool:
    """Whether an already resolved path (`real_path`'s answer) lies inside `root`, resolved now.

    For a path the caller has just resolved: resolving it a second time would cost a
    third of the per-request check and prove nothing the first resolution did not.
    """
    return Path(real).is_relative_to(real_path(root))


def read_budget(table: Table) -> PrivacyLoss:
    """A `[budget]` table (a dataset's cap or a grant's budget): epsilon >= 0, 0 <= delta < 1."""
    budget = PrivacyLoss(
        epsilon=table.number("epsilon", minimum=0.0),
        delta=table.number("delta", 0.0, minimum=0.0),
    )
    if budget.delta >= 1:
        raise table.fail("delta", "must be < 1")
    return budget


def load_catalog(catalog_dir: Path, sandbox_dir: Path) -> Catalog:
    """Load every `*.toml` in `catalog_dir`. Raises CatalogError on the first mistake."""
    if not catalog_dir.is_dir():
        raise CatalogError(f"{catalog_dir}: catalog directory does not exist")
    datasets: dict[str, Dataset] = {}
    by_file: dict[str, Dataset] = {}
    for path in sorted(catalog_dir.glob("*.toml")):
        dataset = load_entry(path, sandbox_dir)
        # One file under two entries would get two budget caps. Different files with
        # the same bytes are caught by their content hash (DataVersions.check_unique).
        real = os.path.realpath(dataset.path)
        if real in by_file:
            first = by_file[real]
            raise CatalogError(
                f"{path}: location: {dataset.location!r} is the same file as {first.source} "
                f"(location {first.location!r}); two entries over one dataset would give it two "
                "privacy budget caps: remove one entry"
            )
        by_file[real] = dataset
        datasets[dataset.id] = dataset
    return Catalog(MappingProxyType(datasets))


def load_entry(path: Path, sandbox_dir: Path) -> Dataset:
    doc = read_toml(path, CatalogError)
    dataset_id = doc.string("id", pattern=ID_PATTERN)
    if dataset_id != path.stem:
        raise doc.fail("id", f"{dataset_id!r} must equal the file name stem {path.stem!r}")
    location = doc.string("location")
    rel = PurePosixPath(location)
    if rel.is_absolute() or ".." in rel.parts or rel.suffix != ".parquet":
        raise doc.fail("location", f"{location!r} must be a relative path to a .parquet file under sandbox/")
    # Resolve every symlink: a link (of the file or of a directory on the way) that
    # leads out of the sandbox would serve data nobody catalogued there.
    if not resolves_inside(sandbox_dir / rel, sandbox_dir):
        raise doc.fail(
            "location",
            f"{location!r} resolves to {os.path.realpath(sandbox_dir / rel)}, outside the sandbox "
            f"{os.path.realpath(sandbox_dir)}; a symlink out of sandbox/ is refused",
        )

    columns = _read_columns(doc)
    unit = doc.table("privacy_unit")
    unit_column = unit.string("column")
    # Optional: without it the dataset serves no DP query (see Dataset.max_rows_per_unit).
    max_rows = unit.integer("max_rows", None, minimum=1)
    unit.reject_unknown()
    if unit_column not in columns:
        raise unit.fail("column", f"{unit_column!r} is not a column of this dataset")
    if columns[unit_column].classification is not Classification.IDENTIFIER:
        raise unit.fail("column", f"the privacy unit column {unit_column!r} must be classified 'identifier'")

    budget_table = doc.table("budget")
    budget = read_budget(budget_table)
    budget_table.reject_unknown()

    dataset = Dataset(
        id=dataset_id,
        zone=doc.string("zone", pattern=ZONE_PATTERN),
        title=doc.string("title"),
        description=doc.string("description", ""),
        provider=doc.string("provider"),
        location=location,
        path=sandbox_dir / rel,
        unit_column=unit_column,
        max_rows_per_unit=max_rows,
        budget=budget,
        columns=MappingProxyType(columns),
        source=path,
        sandbox=sandbox_dir,
    )
    doc.reject_unknown()
    return dataset


def _read_columns(doc: Table) -> dict[str, Column]:
    table = doc.table("columns")
    columns: dict[str, Column] = {}
    for name, _ in table.items():
        if not COLUMN_PATTERN.fullmatch(name):
            raise table.fail(name, f"column name must match {COLUMN_PATTERN.pattern}")
        columns[name] = _read_column(table.table(name), name)
    if not columns:
        raise doc.fail("columns", "a dataset needs at least one column")
    return columns


def _read_column(col: Table, name: str) -> Column:
    try:
        ctype = ColumnType(col.string("type"))
    except ValueError:
        raise col.fail("type", f"must be one of {[t.value for t in ColumnType]}") from None
    try:
        classification = Classification(col.string("classification"))
    except ValueError:
        raise col.fail("classification", f"must be one of {[c.value for c in Classification]}") from None

    bounds = None
    if col.has("bounds"):
        raw = col.array("bounds")
        if not ctype.numeric:
            raise col.fail("bounds", f"only numeric columns have bounds; {name!r} is {ctype.value}")
        if len(raw) != 2 or not all(_is_number(v) for v in raw) or not raw[0] < raw[1]:
            raise col.fail("bounds", f"must be [lower, upper] with finite lower < upper, got {raw!r}")
        bounds = (float(raw[0]), float(raw[1]))

    keys = None
    if col.has("keys"):
        raw = col.array("keys")
        if not raw:
            raise col.fail("keys", "a public key set cannot be empty")
        for value in raw:
            if not _matches_type(value, ctype):
                raise col.fail("keys", f"key {value!r} is not a {ctype.value}")
        if len(set(raw)) != len(raw):
            raise col.fail("keys", "keys must be distinct")
        keys = tuple(raw)

    bins = None
    if col.has("bins"):
        raw = col.array("bins")
        if not ctype.numeric:
            raise col.fail("bins", f"only numeric columns have bins; {name!r} is {ctype.value}")
        if len(raw) < 2 or not all(_is_number(v) for v in raw) or any(a >= b for a, b in zip(raw, raw[1:])):
            raise col.fail("bins", f"must be at least two strictly ascending numbers, got {raw!r}")
        bins = tuple(float(v) for v in raw)

    column = Column(
        name=name,
        type=ctype,
        classification=classification,
        description=col.string("description", ""),
        bounds=bounds,
        keys=keys,
        bins=bins,
    )
    col.reject_unknown()
    return column


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _matches_type(value: Any, ctype: ColumnType) -> bool:
    if ctype is ColumnType.STRING:
        return isinstance(value, str)
    if ctype is ColumnType.INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if ctype is ColumnType.FLOAT:
        return _is_number(value)
    if ctype is ColumnType.BOOL:
        return isinstance(value, bool)
    return isinstance(value, dt.date)


def typed_value(value: Any, ctype: ColumnType) -> Any | None:
    """`value` as a value of a column of type `ctype`, or None if it is not one.

    The one type check for values (catalog keys, query filter values): an ISO date
    string is a date, an int in a FLOAT column becomes a float (polars refuses a list
    mixing the two), and a bool is never a number.
    """
    if ctype is ColumnType.DATE and isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            return None
    if not _matches_type(value, ctype):
        return None
    return float(value) if ctype is ColumnType.FLOAT else value


def column_type_of(dtype: Any) -> ColumnType | None:
    """The catalog type of a polars dtype, or None if the catalog cannot describe it."""
    import polars as pl

    if dtype == pl.String:
        return ColumnType.STRING
    if dtype.is_integer():
        return ColumnType.INT
    if dtype.is_float():
        return ColumnType.FLOAT
    if dtype == pl.Boolean:
        return ColumnType.BOOL
    if dtype == pl.Date:
        return ColumnType.DATE
    return None


def check_data(dataset: Dataset) -> None:
    """Check that the Parquet file exists and its schema matches the entry.

    Run at server start so an operator's mismatch is found then, not mid-query.
    """
    import polars as pl

    if not dataset.path.is_file():
        raise CatalogError(f"{dataset.source}: location: {dataset.path} does not exist")
    try:
        schema = pl.scan_parquet(dataset.path).collect_schema()
    except Exception as exc:  # polars raises its own error types for a damaged file
        raise CatalogError(
            f"{dataset.source}: location: {dataset.path} is not a readable Parquet file "
            f"({type(exc).__name__})"
        ) from None
    problems = []  # every mismatching column at once, one line each
    for name, column in dataset.columns.items():
        if name not in schema:
            problems.append(f"{dataset.source}: columns.{name}: not in {dataset.path}")
            continue
        actual = column_type_of(schema[name])
        if actual is not column.type:
            problems.append(
                f"{dataset.source}: columns.{name}.type: catalog says {column.type.value}, "
                f"the data has {schema[name]}"
            )
    if problems:
        raise CatalogError("\n".join(problems))
