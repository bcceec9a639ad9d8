"""Subject products: declared outputs over one privacy unit's rows, evaluated under consent.

An operator writes one TOML file per product in `products/`:

    kind = "subject"
    id = "underwriting"                 # = the file name's stem
    dataset = "medical_claims"
    subject = "person_id"               # must be the dataset's privacy-unit column
    title = "Health underwriting indicators"
    purposes = ["underwriting"]         # a consent must name one of these
    consumers = ["harbor-insurance"]    # optional: default, any consumer with a live grant on the dataset

    [[outputs]]
    name = "inpatient_stays_24m"
    function = "count"                  # count | sum | max | any_in | months_with
    where = { visit_type = ["inpatient"] }        # optional: column -> catalog keys
    window = { column = "visit_date", months = 24 }  # optional: relative to the evaluation date

    [[outputs]]
    name = "claims_12m_band"
    function = "sum"
    column = "amount"
    window = { column = "visit_date", months = 12 }
    bands = [1000.0, 10000.0, 50000.0]   # optional: edges; the value is replaced by its band's label
    labels = ["<1k", "1k-10k", "10k-50k", "50k+"]

    [scorecard]                          # optional: points per band, summed to a grade
    base = 50
    points = { claims_12m_band = [10, 0, -10, -25] }
    edges = [30, 50]
    grades = ["C", "B", "A"]

Why this shape is safe to release under consent:

* Every output is one of five fixed aggregates over the subject's rows; there is no
  expression language, so nothing can be computed that the operator did not declare.
* A measure is a numeric, usable (not identifier / unclassified) column; `where` and
  `any_in` test catalog key sets only; windows read date columns only. No output is a
  row, an identifier, or a raw date.
* Bands cap precision; a scorecard sees only bands (and any_in flags).

Everything is checked at load; a mistake names the file and the key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from dataops._toml import Table
from dataops.catalog import Catalog, ColumnType, Dataset
from dataops.errors import InternalError

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,62}")
MAX_OUTPUTS = 32
MAX_BANDS = 16
MAX_WINDOW_MONTHS = 600


class OutputFunction(str, Enum):
    COUNT = "count"  # rows (matching `where`, in the window)
    SUM = "sum"  # of a numeric column
    MAX = "max"  # of a numeric column; no value when the subject has no rows
    ANY_IN = "any_in"  # does any row have `column` in `values`
    MONTHS_WITH = "months_with"  # distinct calendar months (of `column`, a date) with a matching row


@dataclass(frozen=True)
class Window:
    """Rows whose `column` lies in (evaluation date - `months`, evaluation date]."""

    column: str
    months: int


@dataclass(frozen=True)
class Banding:
    edges: tuple[float, ...]  # strictly increasing; band i holds edges[i-1] <= v < edges[i]
    labels: tuple[str, ...]  # len(edges) + 1

    def label(self, value: float) -> str:
        return self.labels[self.index(value)]

    def index(self, value: float) -> int:
        return sum(1 for edge in self.edges if value >= edge)


@dataclass(frozen=True)
class Output:
    name: str
    function: OutputFunction
    column: str | None = None
    values: tuple[str, ...] = ()  # any_in
    where: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (column, allowed keys), ANDed
    window: Window | None = None
    banding: Banding | None = None

    @property
    def measured_column(self) -> str:
        """The column of a function that reads one (every function but count; the loader checks)."""
        if self.column is None:
            raise InternalError(f"output {self.name!r} ({self.function.value}) has no column")
        return self.column

    @property
    def band_labels(self) -> tuple[str, ...]:
        """The labels of a banded output (a scorecard scores only banded outputs; the loader checks)."""
        if self.banding is None:
            raise InternalError(f"output {self.name!r} has no banding")
        return self.banding.labels

    @property
    def columns(self) -> set[str]:
        used = {c for c, _ in self.where}
        if self.column:
            used.add(self.column)
        if self.window:
            used.add(self.window.column)
        return used


@dataclass(frozen=True)
class Scorecard:
    name: str  # the output holding the grade; `<name>_points` holds the summed points
    base: float
    points: tuple[tuple[str, tuple[float, ...]], ...]  # output -> points per band (any_in: [false, true])
    grading: Banding  # points -> grade


@dataclass(frozen=True)
class SubjectProduct:
    id: str
    dataset: Dataset
    subject: str
    title: str
    description: str
    purposes: tuple[str, ...]
    consumers: tuple[str, ...] | None  # None: any consumer with a live grant on the dataset
    outputs: tuple[Output, ...]
    scorecard: Scorecard | None
    source: Path

    @property
    def columns(self) -> set[str]:
        """Every dataset column an evaluation reads, besides the subject column."""
        used: set[str] = set()
        for output in self.outputs:
            used |= output.columns
        return used

    @property
    def output_names(self) -> tuple[str, ...]:
        names = tuple(o.name for o in self.outputs)
        if self.scorecard:
            names += (f"{self.scorecard.name}_points", self.scorecard.name)
        return names


def load_subject_product(doc: Table, path: Path, catalog: Catalog) -> SubjectProduct:
    product_id = doc.string("id", pattern=NAME_PATTERN)
    if product_id != path.stem:
        raise doc.fail("id", f"{product_id!r} must equal the file name stem {path.stem!r}")
    doc.string("kind")
    dataset_id = doc.string("dataset")
    dataset = catalog.get(dataset_id)
    if dataset is None:
        raise doc.fail("dataset", f"no dataset {dataset_id!r} in the catalog")
    subject = doc.string("subject")
    if subject != dataset.unit_column:
        # The subject is whom the consent speaks for: evaluating over any other column
        # would aggregate across several people under one person's consent.
        raise doc.fail(
            "subject",
            f"must be {dataset_id!r}'s privacy-unit column {dataset.unit_column!r}, got {subject!r}",
        )
    title = doc.string("title", product_id)
    description = doc.string("description", "")
    purposes = tuple(_strings(doc, "purposes"))
    consumers = tuple(_strings(doc, "consumers")) if doc.has("consumers") else None

    outputs: list[Output] = []
    tables = list(doc.tables("outputs"))
    if not tables:
        raise doc.fail("outputs", "declare at least one [[outputs]]")
    if len(tables) > MAX_OUTPUTS:
        raise doc.fail("outputs", f"at most {MAX_OUTPUTS} outputs, got {len(tables)}")
    for table in tables:
        output = _load_output(table, dataset)
        if any(o.name == output.name for o in outputs):
            raise table.fail("name", f"{output.name!r} is declared twice")
        outputs.append(output)

    scorecard = None
    card = doc.table("scorecard", required=False)
    if card is not None:
        scorecard = _load_scorecard(card, dataset, outputs)
    doc.reject_unknown()
    return SubjectProduct(
        product_id, dataset, subject, title, description, purposes, consumers, tuple(outputs), scorecard, path
    )


def _strings(doc: Table, key: str) -> list[str]:
    values = doc.array(key)
    if (
        not values
        or not all(isinstance(v, str) and v.strip() for v in values)
        or len(set(values)) != len(values)
    ):
        raise doc.fail(key, f"must be a non-empty list of distinct non-empty strings, got {values!r}")
    return values


def _output_name(table: Table, dataset: Dataset) -> str:
    name = table.string("name", pattern=NAME_PATTERN)
    if name in dataset.columns:
        # An output labelled like a column would pass a derived value off as the raw one.
        raise table.fail("name", f"{name!r} is a column of {dataset.id!r}; choose another name")
    return name


def _usable_column(table: Table, key: str, name: Any, dataset: Dataset):
    if not isinstance(name, str):
        raise table.fail(key, f"must be a column name, got {name!r}")
    column = dataset.column(name)
    if column is None:
        raise table.fail(key, f"{dataset.id!r} has no column {name!r}")
    if not column.classification.usable:
        raise table.fail(key, f"column {name!r} is {column.classification.value} and can never be used")
    if name == dataset.unit_column:
        raise table.fail(key, f"{name!r} is the subject column itself")
    return column


def _keys(table: Table, key: str, column, values: Any) -> tuple[str, ...]:
    """Values of a categorical column: a non-empty subset of its catalog key set."""
    if not column.keys:
        raise table.fail(key, f"column {column.name!r} has no public key set in the catalog")
    if not isinstance(values, list) or not values:
        raise table.fail(key, f"must be a non-empty list of {column.name!r} keys, got {values!r}")
    unknown = [v for v in values if v not in column.keys]
    if unknown:
        raise table.fail(key, f"{unknown[0]!r} is not a key of {column.name!r} ({list(column.keys)})")
    return tuple(dict.fromkeys(values))


def _load_output(table: Table, dataset: Dataset) -> Output:
    name = _output_name(table, dataset)
    raw_function = table.string("function")
    try:
        function = OutputFunction(raw_function)
    except ValueError:
        raise table.fail(
            "function", f"must be one of {[f.value for f in OutputFunction]}, got {raw_function!r}"
        ) from None

    column_name: str | None = None
    values: tuple[str, ...] = ()
    if function in (OutputFunction.SUM, OutputFunction.MAX):
        column = _usable_column(table, "column", table.string("column"), dataset)
        if not column.type.numeric:
            raise table.fail(
                "column", f"{function.value} needs a numeric column; {column.name!r} is {column.type.value}"
            )
        column_name = column.name
    elif function is OutputFunction.ANY_IN:
        column = _usable_column(table, "column", table.string("column"), dataset)
        values = _keys(table, "values", column, table.array("values"))
        column_name = column.name
    elif function is OutputFunction.MONTHS_WITH:
        column = _usable_column(table, "column", table.string("column"), dataset)
        if column.type is not ColumnType.DATE:
            raise table.fail(
                "column", f"months_with needs a date column; {column.name!r} is {column.type.value}"
            )
        column_name = column.name
    else:
        if table.has("column"):
            raise table.fail("column", "count takes no column (it counts the subject's matching rows)")
    if function is not OutputFunction.ANY_IN and table.has("values"):
        raise table.fail("values", "only any_in takes values")

    where: list[tuple[str, tuple[str, ...]]] = []
    where_table = table.table("where", required=False)
    if where_table is not None:
        for col_name, allowed in where_table.items():
            column = _usable_column(where_table, col_name, col_name, dataset)
            where.append((col_name, _keys(where_table, col_name, column, allowed)))

    window = None
    window_table = table.table("window", required=False)
    if window_table is not None:
        column = _usable_column(window_table, "column", window_table.string("column"), dataset)
        if column.type is not ColumnType.DATE:
            raise window_table.fail(
                "column", f"a window needs a date column; {column.name!r} is {column.type.value}"
            )
        months = window_table.integer("months", minimum=1)
        if months > MAX_WINDOW_MONTHS:
            raise window_table.fail("months", f"at most {MAX_WINDOW_MONTHS}, got {months}")
        window_table.reject_unknown()
        window = Window(column.name, months)

    banding = None
    if table.has("bands") or table.has("labels"):
        if function is OutputFunction.ANY_IN:
            raise table.fail("bands", "any_in is already a yes/no answer; it takes no bands")
        banding = _load_banding(table, "bands", "labels")
    table.reject_unknown()
    return Output(name, function, column_name, values, tuple(where), window, banding)


def _load_banding(table: Table, edges_key: str, labels_key: str) -> Banding:
    edges = table.array(edges_key)
    if (
        not edges
        or len(edges) > MAX_BANDS
        or not all(
            isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) for e in edges
        )
        or any(b <= a for a, b in zip(edges, edges[1:]))
    ):
        raise table.fail(
            edges_key, f"must be 1 to {MAX_BANDS} strictly increasing finite numbers, got {edges!r}"
        )
    labels = table.array(labels_key)
    if (
        len(labels) != len(edges) + 1
        or not all(isinstance(v, str) and v.strip() for v in labels)
        or len(set(labels)) != len(labels)
    ):
        raise table.fail(
            labels_key,
            f"must be {len(edges) + 1} distinct non-empty strings "
            f"(one more than {edges_key}), got {labels!r}",
        )
    return Banding(tuple(float(e) for e in edges), tuple(labels))


def _load_scorecard(card: Table, dataset: Dataset, outputs: list[Output]) -> Scorecard:
    name = card.string("name", "grade", pattern=NAME_PATTERN)
    taken = {o.name for o in outputs} | set(dataset.columns)
    for candidate in (name, f"{name}_points"):
        if candidate in taken:
            raise card.fail("name", f"{candidate!r} is already an output or a column")
    base = card.number("base", 0.0)
    by_name = {o.name: o for o in outputs}
    points_table = card.table("points")
    points = []
    for output_name, values in points_table.items():
        output = by_name.get(output_name)
        if output is None:
            raise points_table.fail(output_name, "is not an output of this product")
        if output.function is OutputFunction.ANY_IN:
            expected = 2
        elif output.banding is not None:
            expected = len(output.banding.labels)
        else:
            # Points on a raw value would make the grade as precise as the value.
            raise points_table.fail(output_name, "only banded outputs and any_in outputs can score points")
        if (
            not isinstance(values, list)
            or len(values) != expected
            or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
            )
        ):
            raise points_table.fail(
                output_name,
                f"must be {expected} finite numbers (one per band"
                f"{'' if expected != 2 else ', or [false, true]'}), got {values!r}",
            )
        points.append((output_name, tuple(float(v) for v in values)))
    if not points:
        raise card.fail("points", "score at least one output")
    grading = _load_banding(card, "edges", "grades")
    card.reject_unknown()
    return Scorecard(name, base, tuple(points), grading)
