"""Table products: an operator-declared, jointly protected table over public dimensions.

A table product names a dataset, the dimensions that span its cube (catalog columns
with a public key set, or numeric columns with bins: the cell key is then the bin's
label), the measures published per cell, and the protection rules. The protected
table (`dataops.tables.protect`) holds every cell of the cube and every sub-total;
exact answers are lookups in it.

    kind = "table"
    id = "enterprises_by_district"            # = the file stem
    dataset = "enterprise_credit"
    title = "Enterprises and tax paid by district, industry and size"
    dimensions = ["district", "industry", "size_band"]

    [[measures]]
    function = "count"                        # count | count_units | sum | mean
    [[measures]]
    function = "sum"
    column = "tax_paid"                       # a bounded numeric column, lower bound >= 0

    [rules]
    min_units = 5                             # frequency rule, never below 3
    dominance_n = 2                           # (n, k) rule on magnitude cells
    dominance_percent = 85.0
    p_percent = 10.0                          # p% rule (optional)
    sensitive_dimensions = ["diagnosis_group"]
    group_attribute_percent = 90.0            # a group where one category holds >= 90% of units
    protection_percent = 30.0                 # interval a suppressed magnitude cell must keep

    [[structural_zeros]]                      # a combination impossible by definition:
    sex = "M"                                 # public knowledge, published as 0
    diagnosis_group = "Pregnancy"             # (a value, or a list of values, per dimension)

Loading is as strict as the catalog's: an unknown key, an identifier used as a
dimension or measure, a measure without bounds, a dimension without keys or bins is
refused with the file and the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataops._toml import Table
from dataops.catalog import Catalog, Classification, Column, Dataset, bin_label
from dataops.errors import InternalError
from dataops.ir import Function

ID_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,62}")
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,62}")
# The frequency rule's floor: a cell of one or two units discloses them to each other
# (and to anyone who knows one of them); offices never publish below three.
MIN_UNITS_FLOOR = 3
# Beyond five dimensions the cube (every sub-total) outgrows what one protection
# pass and one LP audit handle in seconds; split such a table into several.
MAX_DIMENSIONS = 5
MAX_CELLS = 200_000
TABLE_FUNCTIONS = (Function.COUNT, Function.COUNT_UNITS, Function.SUM, Function.MEAN)


@dataclass(frozen=True)
class Measure:
    """One published statistic per cell."""

    function: Function
    column: str | None
    name: str

    @property
    def magnitude(self) -> bool:
        """SUM and MEAN cells are magnitude cells: dominance and p% apply to them."""
        return self.function in (Function.SUM, Function.MEAN)

    @property
    def measured_column(self) -> str:
        """The column a magnitude measure sums (the loader gives SUM and MEAN one)."""
        if self.column is None:
            raise InternalError(f"measure {self.name!r} ({self.function.value}) has no column")
        return self.column


@dataclass(frozen=True)
class ProtectionRules:
    # Frequency rule: a cell needs at least this many distinct privacy units.
    min_units: int = 5
    # (n, k) dominance: a magnitude cell whose n largest units hold more than k% of it.
    dominance_n: int = 2
    dominance_percent: float = 85.0
    # p% rule: a magnitude cell where the others' total lets the second-largest unit
    # estimate the largest within p%. None: not applied.
    p_percent: float | None = None
    # Group-attribute rule: in a group (a cell with the sensitive dimension summed
    # over) where one category holds >= this share of the units, that category's cell
    # is suppressed, so membership of the group does not disclose the category.
    sensitive_dimensions: tuple[str, ...] = ()
    group_attribute_percent: float = 90.0
    # Protection levels (what the LP audit demands of every suppressed cell):
    # a frequency-unsafe cell's count must be able to lie anywhere within
    # +- frequency_protection rows (so an empty cell cannot be told from one with that
    # many rows); its magnitudes within +- protection_percent % of their value.
    frequency_protection: int = 0  # 0: the same as min_units
    protection_percent: float = 30.0

    @property
    def count_protection(self) -> int:
        return self.frequency_protection or self.min_units


@dataclass(frozen=True)
class TableProduct:
    id: str
    dataset: str
    title: str
    description: str
    dimensions: tuple[str, ...]
    measures: tuple[Measure, ...]
    rules: ProtectionRules
    source: Path
    # The public key set of each dimension, in catalog order; for a binned column the
    # bins' labels "[lo, hi)" (the bin is the cell key).
    keys: tuple[tuple[Any, ...], ...] = ()
    # Bin edges of binned dimensions (None for a keyed dimension).
    bins: tuple[tuple[float, ...] | None, ...] = ()
    # Structural zeros: combinations of keys no row can have by definition (no
    # pregnancy is coded for a man), as the operator declares them. Public knowledge:
    # such cells are published as 0 and never suppressed, so they cost no protection.
    # One entry per [[structural_zeros]]: per named dimension, the key positions it covers.
    structural_zeros: tuple[tuple[tuple[int, frozenset[int]], ...], ...] = ()

    def keys_of(self, dimension: str) -> tuple[Any, ...]:
        return self.keys[self.dimensions.index(dimension)]

    @property
    def magnitude_columns(self) -> tuple[str, ...]:
        """The measure columns whose sums the table determines (SUM and MEAN alike:
        a released MEAN times the released COUNT is the sum)."""
        seen: list[str] = []
        for m in self.measures:
            if m.magnitude and m.column not in seen:
                seen.append(m.column)  # type: ignore[arg-type]
        return tuple(seen)

    @property
    def n_cells(self) -> int:
        n = 1
        for k in self.keys:
            n *= len(k) + 1
        return n


def load_table_product(doc: Table, path: Path, catalog: Catalog) -> TableProduct:
    doc.string("kind")  # "table": dispatched on by dataops.products
    product_id = doc.string("id", pattern=ID_PATTERN)
    if product_id != path.stem:
        raise doc.fail("id", f"{product_id!r} must equal the file name stem {path.stem!r}")
    dataset_id = doc.string("dataset")
    dataset = catalog.get(dataset_id)
    if dataset is None:
        raise doc.fail("dataset", f"{dataset_id!r} is not a dataset in the catalog")

    dimensions, keys, bins = _read_dimensions(doc, dataset)
    measures = _read_measures(doc, dataset)
    rules = _read_rules(doc, dimensions)
    structural = _read_structural_zeros(doc, dimensions, keys)
    product = TableProduct(
        id=product_id,
        dataset=dataset_id,
        title=doc.string("title"),
        description=doc.string("description", ""),
        dimensions=dimensions,
        measures=measures,
        rules=rules,
        source=path,
        keys=keys,
        bins=bins,
        structural_zeros=structural,
    )
    if product.n_cells > MAX_CELLS:
        raise doc.fail(
            "dimensions",
            f"the cube has {product.n_cells} cells with its sub-totals; "
            f"at most {MAX_CELLS} are supported, split the table",
        )
    doc.reject_unknown()
    return product


def _read_dimensions(doc: Table, dataset: Dataset):
    raw = doc.array("dimensions")
    if not raw:
        raise doc.fail("dimensions", "a table needs at least one dimension")
    if len(raw) > MAX_DIMENSIONS:
        raise doc.fail("dimensions", f"at most {MAX_DIMENSIONS} dimensions, got {len(raw)}")
    if len(set(map(str, raw))) != len(raw):
        raise doc.fail("dimensions", "dimensions must be distinct")
    keys: list[tuple[str, ...]] = []
    bins: list[tuple[float, ...] | None] = []  # a dimension's bin edges; None for a key set
    for i, name in enumerate(raw):
        where = f"dimensions[{i}]"
        if not isinstance(name, str):
            raise doc.fail(where, f"must be a column name, got {name!r}")
        column = _usable_column(doc, where, dataset, name)
        if column.keys is not None:
            keys.append(tuple(column.keys))
            bins.append(None)
        elif column.bins is not None:
            edges = column.bins
            keys.append(tuple(bin_label(a, b) for a, b in zip(edges, edges[1:])))
            bins.append(tuple(edges))
        else:
            raise doc.fail(
                where,
                f"column {name!r} has neither a public key set nor bins "
                "in the catalog: its cells would disclose which values occur",
            )
    return tuple(raw), tuple(keys), tuple(bins)


def _usable_column(doc: Table, where: str, dataset: Dataset, name: str) -> Column:
    column = dataset.column(name)
    if column is None:
        raise doc.fail(where, f"{name!r} is not a column of dataset {dataset.id!r}")
    if column.classification is Classification.IDENTIFIER or name == dataset.unit_column:
        raise doc.fail(where, f"{name!r} is an identifier: it can never be a dimension or measure")
    if not column.classification.usable:
        raise doc.fail(where, f"{name!r} is {column.classification.value}: it cannot be published")
    return column


def _read_measures(doc: Table, dataset: Dataset) -> tuple[Measure, ...]:
    measures: list[Measure] = []
    for m in doc.tables("measures"):
        try:
            function = Function(m.string("function"))
        except ValueError:
            function = None
        if function not in TABLE_FUNCTIONS:
            raise m.fail("function", f"must be one of {[f.value for f in TABLE_FUNCTIONS]}")
        column = None
        if function in (Function.SUM, Function.MEAN):
            column = m.string("column")
            col = _usable_column(m, "column", dataset, column)
            if not col.type.numeric or col.bounds is None:
                raise m.fail(
                    "column",
                    f"{column!r} needs numeric bounds in the catalog: "
                    "the audit's attacker knows them, and so must we",
                )
            if col.bounds[0] < 0:
                raise m.fail(
                    "column",
                    f"{column!r} may be negative (bounds {list(col.bounds)}); "
                    "dominance and p% need non-negative contributions",
                )
        elif m.has("column"):
            m.raw("column")
            raise m.fail("column", f"{function.value} takes no column")
        # Unset max_rows (DP off): allowed; the build refuses data where a unit spans cells.
        if function is Function.COUNT_UNITS and (dataset.max_rows_per_unit or 1) > 1:
            # Distinct units are not additive over cells when a unit spans cells (a
            # person's 40 visits fall in many cells): margins would not be the sums of
            # their cells and the LP audit could not bound them. Publish COUNT (rows).
            raise m.fail(
                "function",
                f"count_units is not additive in {dataset.id!r} (a unit "
                f"has up to {dataset.max_rows_per_unit} rows, in different cells): "
                "publish count instead",
            )
        default = function.value if column is None else f"{function.value}_{column}"
        name = m.string("name", default, pattern=NAME_PATTERN)
        if name in {x.name for x in measures}:
            raise m.fail("name", f"measure name {name!r} is used twice")
        m.reject_unknown()
        measures.append(Measure(function, column, name))
    if not measures:
        raise doc.fail("measures", "a table needs at least one [[measures]]")
    return tuple(measures)


def _read_structural_zeros(
    doc: Table, dimensions: tuple[str, ...], keys: tuple[tuple[Any, ...], ...]
) -> tuple[tuple[tuple[int, frozenset[int]], ...], ...]:
    entries = []
    for entry in doc.tables("structural_zeros"):
        if not entry.data:
            raise doc.fail("structural_zeros", "an entry needs at least one dimension = key")
        covered = []
        for name in list(entry.data):
            if name not in dimensions:
                raise entry.fail(name, f"{name!r} is not a dimension of this table")
            value = entry.raw(name)
            wanted = value if isinstance(value, list) else [value]
            if not wanted:
                raise entry.fail(name, "needs a key or a non-empty list of keys")
            j = dimensions.index(name)
            positions = set()
            for v in wanted:
                if v not in keys[j]:
                    raise entry.fail(name, f"{v!r} is not in the public key set of {name!r}: {list(keys[j])}")
                positions.add(keys[j].index(v))
            covered.append((j, frozenset(positions)))
        entry.reject_unknown()
        entries.append(tuple(sorted(covered)))
    return tuple(entries)


def _read_rules(doc: Table, dimensions: tuple[str, ...]) -> ProtectionRules:
    r = doc.table("rules")
    min_units = r.integer("min_units", minimum=MIN_UNITS_FLOOR)
    dominance_n = r.integer("dominance_n", 2, minimum=1)
    dominance_percent = r.number("dominance_percent", 85.0, minimum=0.0)
    if not 0 < dominance_percent < 100:
        raise r.fail("dominance_percent", f"must lie strictly between 0 and 100, got {dominance_percent}")
    p_percent = r.number("p_percent", None, minimum=0.0) if r.has("p_percent") else None
    if p_percent is not None and not 0 < p_percent <= 100:
        raise r.fail("p_percent", f"must lie in (0, 100], got {p_percent}")
    sensitive = r.array("sensitive_dimensions", [])
    for i, name in enumerate(sensitive):
        if name not in dimensions:
            raise r.fail(f"sensitive_dimensions[{i}]", f"{name!r} is not a dimension of this table")
    group_percent = r.number("group_attribute_percent", 90.0, minimum=0.0)
    if not 50 < group_percent <= 100:
        raise r.fail("group_attribute_percent", f"must lie in (50, 100], got {group_percent}")
    frequency_protection = r.integer("frequency_protection", 0, minimum=0)
    protection_percent = r.number("protection_percent", 30.0, minimum=0.0)
    if not 0 < protection_percent <= 100:
        raise r.fail("protection_percent", f"must lie in (0, 100], got {protection_percent}")
    r.reject_unknown()
    return ProtectionRules(
        min_units=min_units,
        dominance_n=dominance_n,
        dominance_percent=dominance_percent,
        p_percent=p_percent,
        sensitive_dimensions=tuple(sensitive),
        group_attribute_percent=group_percent,
        frequency_protection=frequency_protection,
        protection_percent=protection_percent,
    )
