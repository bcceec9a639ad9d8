"""Products: operator-written TOML, one file per product, in the `products/` directory.

Two kinds, told apart by the file's `kind` key:

* `kind = "table"`   — a protected table (`dataops.products.table`): dimensions,
  measures and protection rules; grants name the tables a consumer may read, and
  exact answers are lookups in the table protected once per data version.
* `kind = "subject"` — a subject product (`dataops.products.subject`): declared
  outputs over one privacy unit's rows, evaluated only under a signed consent.

`load_products` reads the directory whole and refuses it on any error, naming the
file and the key; the product id is the file name's stem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dataops._toml import read_toml
from dataops.catalog import Catalog
from dataops.errors import ProductError

KINDS = ("table", "subject")


@dataclass(frozen=True)
class Products:
    """Every product in force, by id and by kind."""

    tables: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    subjects: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def load_products(products_dir: Path, catalog: Catalog) -> Products:
    """Load every `*.toml` in `products_dir` (a missing directory holds no products)."""
    tables: dict[str, Any] = {}
    subjects: dict[str, Any] = {}
    if not products_dir.exists():
        return Products()
    if not products_dir.is_dir():
        raise ProductError(f"{products_dir}: products path is not a directory")
    for path in sorted(products_dir.glob("*.toml")):
        doc = read_toml(path, ProductError)
        kind = doc.string("kind")
        if kind == "table":
            from dataops.products.table import load_table_product

            table = load_table_product(doc, path, catalog)
            tables[table.id] = table
        elif kind == "subject":
            from dataops.products.subject import load_subject_product

            subject = load_subject_product(doc, path, catalog)
            subjects[subject.id] = subject
        else:
            raise doc.fail("kind", f"must be one of {list(KINDS)}, got {kind!r}")
    return Products(MappingProxyType(tables), MappingProxyType(subjects))
