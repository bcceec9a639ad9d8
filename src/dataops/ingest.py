"""Ingest: take a CSV or Parquet file into the sandbox and write its catalog entry.

The entry describes the inferred schema but classifies every column except the
privacy unit as `unclassified`, which no policy may grant: a freshly ingested dataset
is unusable until an operator has looked at each column. Numeric bounds are left out
for the same reason (see `_HEADER`), and so is `privacy_unit.max_rows`: the most rows
one unit has in the file is itself a fact about one unit (and DescribeDataset
publishes the bound), so the operator sets it from how the data is produced, and DP
stays off for the dataset until they do.

Ingest is all or nothing. Both files are written to temporary names in their target
directories, the entry is validated with the real loader against the temporary
Parquet, and only then are both renamed into place (Parquet first, so a published
entry never points at a missing file). Any failure removes the temporaries, so a bad
input leaves `catalog/` and `sandbox/` exactly as they were.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl
import tomli_w

from dataops.catalog import (
    COLUMN_PATTERN,
    ID_PATTERN,
    ZONE_PATTERN,
    Classification,
    ColumnType,
    check_data,
    column_type_of,
    load_entry,
)
from dataops.errors import CatalogError, LoadError

# Enough rows that a column's type is rarely guessed wrong; a later value that does not
# fit still fails the ingest loudly rather than being coerced or dropped.
INFER_SCHEMA_ROWS = 10_000

DEFAULT_BUDGET = {"epsilon": 1.0, "delta": 0.0}

_HEADER = """\
# Written by `dataops ingest`. Review every line before granting this dataset.
#
# - Every column except the privacy unit is "unclassified" and therefore unusable:
#   set each to public, sensitive, quasi_identifier or identifier.
# - Numeric columns have no `bounds` on purpose. Bounds must come from domain
#   knowledge, not from the data: a bound taken from the observed minimum or maximum
#   is itself an individual's value, and DP clipping to it leaks that value.
# - privacy_unit.max_rows is NOT set, on purpose, and DP mode stays off for this
#   dataset until you set it (see the note under [privacy_unit]).
# - The budget is a conservative default; raise it deliberately.

"""


_MAX_ROWS_NOTE = """\
# max_rows = ?   # the most rows one privacy unit may contribute. Not taken from the
#                # data: set it from how the data is produced (e.g. 1 for one row per
#                # enterprise, 12 for monthly records over a year). Until it is set,
#                # every DP query on this dataset is refused.
"""


class IngestError(LoadError):
    """The file cannot be ingested; the message says why and what to do about it."""


@dataclass(frozen=True)
class IngestResult:
    dataset_id: str
    parquet: Path
    catalog_entry: Path
    rows: int
    columns: tuple[str, ...]


def ingest(
    source: Path,
    *,
    dataset_id: str,
    zone: str,
    catalog_dir: Path,
    sandbox_dir: Path,
    title: str | None = None,
    provider: str = "unknown",
    unit_column: str | None = None,
    force: bool = False,
) -> IngestResult:
    source = Path(source)
    if not ID_PATTERN.fullmatch(dataset_id):
        raise IngestError(f"dataset id {dataset_id!r} must match {ID_PATTERN.pattern}")
    if not ZONE_PATTERN.fullmatch(zone):
        raise IngestError(f"zone {zone!r} must match {ZONE_PATTERN.pattern}")
    title = dataset_id if title is None else title
    for name, value in (("title", title), ("provider", provider)):
        if not value.strip():
            raise IngestError(f"{name} must not be empty")
    for directory in (catalog_dir, sandbox_dir):
        if not directory.is_dir():
            raise IngestError(f"{directory}: directory does not exist")

    location = f"{zone}/{dataset_id}.parquet"
    entry_path = catalog_dir / f"{dataset_id}.toml"
    parquet_path = sandbox_dir / location
    if not force:
        for existing in (entry_path, parquet_path):
            if existing.exists():
                raise IngestError(
                    f"{existing} already exists; choose another dataset id, or pass "
                    "--force to replace it (its classifications and bounds are lost)"
                )

    frame = _scan(source)
    types = _column_types(source, frame)
    unit = _choose_unit(source, types, unit_column)

    zone_dir = parquet_path.parent
    created_zone_dir = not zone_dir.exists()
    replaces_parquet = parquet_path.exists()
    tmp_parquet: Path | None = None
    tmp_dir: Path | None = None
    published_parquet = False
    try:
        zone_dir.mkdir(exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=zone_dir, prefix=f".{dataset_id}.", suffix=".parquet.tmp")
        os.close(fd)
        tmp_parquet = Path(tmp_name)
        _write_parquet(source, frame, tmp_parquet)
        rows = _unit_stats(source, tmp_parquet, unit)

        # load_entry insists the file stem equals the id, so the temporary entry gets its
        # real name inside a private directory. Its name does not end in .toml, so a
        # concurrent load_catalog (which globs *.toml) never sees a half-made entry.
        tmp_dir = Path(tempfile.mkdtemp(dir=catalog_dir, prefix=f".ingest-{dataset_id}-"))
        tmp_entry = tmp_dir / entry_path.name
        entry = {
            "id": dataset_id,
            "zone": zone,
            "title": title,
            "description": f"Ingested from {source.name} on {dt.datetime.now(dt.UTC).date()}.",
            "provider": provider,
            "location": location,
            "privacy_unit": {"column": unit},
            "budget": dict(DEFAULT_BUDGET),
            "columns": {
                name: {
                    "type": ctype.value,
                    "classification": (
                        Classification.IDENTIFIER if name == unit else Classification.UNCLASSIFIED
                    ).value,
                }
                for name, ctype in types.items()
            },
        }
        text = tomli_w.dumps(entry)
        unit_line = tomli_w.dumps({"privacy_unit": {"column": unit}}).split("\n", 2)[1] + "\n"
        text = text.replace(
            "[privacy_unit]\n" + unit_line, "[privacy_unit]\n" + unit_line + _MAX_ROWS_NOTE, 1
        )
        if _MAX_ROWS_NOTE not in text:  # never publish an entry without the note
            raise IngestError(f"{source}: internal error writing the privacy_unit note")
        tmp_entry.write_text(_HEADER + text, encoding="utf-8")
        _fsync(tmp_entry)
        try:
            dataset = load_entry(tmp_entry, sandbox_dir)
            check_data(replace(dataset, path=tmp_parquet))
        except CatalogError as exc:  # a bug in ingest, but still never publish it
            raise IngestError(f"{source}: the generated catalog entry does not validate: {exc}") from None

        os.replace(tmp_parquet, parquet_path)
        published_parquet = True
        os.replace(tmp_entry, entry_path)
    except OSError as exc:
        if published_parquet and not replaces_parquet:
            parquet_path.unlink(missing_ok=True)
        raise IngestError(f"{source}: cannot write the dataset: {exc}") from None
    finally:
        if tmp_parquet is not None:
            tmp_parquet.unlink(missing_ok=True)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if created_zone_dir and zone_dir.is_dir() and not any(zone_dir.iterdir()):
            zone_dir.rmdir()

    return IngestResult(
        dataset_id=dataset_id,
        parquet=parquet_path,
        catalog_entry=entry_path,
        rows=rows,
        columns=tuple(types),
    )


def _scan(source: Path) -> pl.LazyFrame:
    suffix = source.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise IngestError(f"{source}: unknown file type {source.suffix!r}; expected .csv, .parquet or .pq")
    if not source.is_file():
        raise IngestError(f"{source}: no such file")
    try:
        if suffix == ".csv":
            _check_csv_shape(source)
            return pl.scan_csv(source, infer_schema_length=INFER_SCHEMA_ROWS, try_parse_dates=True)
        return pl.scan_parquet(source)
    except pl.exceptions.PolarsError as exc:
        raise IngestError(f"{source}: cannot be read: {_reason(exc)}") from None


def _check_csv_shape(source: Path) -> None:
    """Refuse a CSV whose header is unusable or whose records are ragged.

    polars silently fills a short record (or a blank line) with nulls, which would
    change the data without telling anyone, so every record's field count is checked
    here first.
    """
    try:
        with source.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise IngestError(f"{source}: the file is empty; expected a header row and data rows")
            _check_names(source, header)
            for record in reader:
                # polars reads a blank line as a row of nulls: one empty field, like csv.
                if len(record or [""]) != len(header):
                    found = f"{len(record)} fields" if record else "a blank line"
                    raise IngestError(
                        f"{source}: line {reader.line_num}: {found}, but the header has "
                        f"{len(header)} fields; fix the row (or quote fields containing commas)"
                    )
    except UnicodeDecodeError as exc:
        raise IngestError(f"{source}: not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from None
    except csv.Error as exc:
        raise IngestError(f"{source}: malformed CSV: {exc}") from None
    except OSError as exc:
        raise IngestError(f"{source}: cannot be read: {exc.strerror}") from None


def _check_names(source: Path, names: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names, start=1):
        if not COLUMN_PATTERN.fullmatch(name):
            raise IngestError(
                f"{source}: column {i} {name!r} is not a valid column name "
                f"(must match {COLUMN_PATTERN.pattern}); rename it before ingesting"
            )
        if name in seen:
            raise IngestError(f"{source}: column {name!r} appears more than once")
        seen.add(name)


def _column_types(source: Path, frame: pl.LazyFrame) -> dict[str, ColumnType]:
    try:
        schema = frame.collect_schema()
    except pl.exceptions.PolarsError as exc:
        raise IngestError(f"{source}: cannot be read: {_reason(exc)}") from None
    if not schema:
        raise IngestError(f"{source}: has no columns")
    _check_names(source, list(schema))  # again for Parquet; cheap for CSV
    types: dict[str, ColumnType] = {}
    for name, dtype in schema.items():
        ctype = column_type_of(dtype)
        if ctype is None and isinstance(dtype, pl.Datetime):
            raise IngestError(
                f"{source}: column {name!r} holds timestamps ({dtype}); the catalog has no "
                "timestamp type: cast it to a date (or split out the part you need) first"
            )
        if ctype is None:
            raise IngestError(
                f"{source}: column {name!r} has type {dtype}, which the catalog cannot describe; "
                f"cast it to one of {', '.join(t.value for t in ColumnType)} first"
            )
        types[name] = ctype
    return types


def _choose_unit(source: Path, types: dict[str, ColumnType], unit_column: str | None) -> str:
    if unit_column is not None:
        if unit_column not in types:
            raise IngestError(f"{source}: privacy unit column {unit_column!r} is not in the file")
        return unit_column
    return next((name for name in types if name.endswith("_id")), next(iter(types)))


def _write_parquet(source: Path, frame: pl.LazyFrame, target: Path) -> None:
    try:
        frame.sink_parquet(target)
    except pl.exceptions.PolarsError as exc:
        reason = _reason(exc)
        if reason.startswith("could not parse"):
            reason += (
                f" (column types are inferred from the first {INFER_SCHEMA_ROWS} rows; "
                "a later value does not fit the inferred type)"
            )
        raise IngestError(f"{source}: cannot be read: {reason}") from None
    _fsync(target)


def _unit_stats(source: Path, parquet: Path, unit: str) -> int:
    """Row count, checking every row has a unit. Nothing about any unit's rows is kept."""
    units = pl.scan_parquet(parquet).select(pl.col(unit).alias("unit"))
    rows, missing = units.select(pl.len(), pl.col("unit").null_count()).collect().row(0)
    if rows == 0:
        raise IngestError(f"{source}: has a header but no data rows")
    if missing:
        # Rows without a unit cannot be bounded per unit; they would all count as one.
        raise IngestError(
            f"{source}: privacy unit column {unit!r} has {missing} empty values; "
            "every row must belong to a unit"
        )
    return int(rows)


def _fsync(path: Path) -> None:
    # Without it a crash just after the rename could leave an empty file in place.
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _reason(exc: Exception) -> str:
    # polars appends hints about its own API options after a blank line; the operator
    # cannot pass those options, so keep only the first paragraph.
    return str(exc).split("\n\n", 1)[0]
