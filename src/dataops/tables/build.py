"""A large table's protection, run in a child process under a memory cap.

`dataops.tables.store.TableStore` runs ``python -m dataops.tables.build`` for a dataset
past `CHILD_ROWS` rows, with the request on stdin (JSON), and reads one line of JSON
back. The child caps its memory before it imports polars, loads the catalog
entry and the product file the server loaded, refuses if either is not the one the
server asked for (the product's hash, the entry's terms), protects the table
(`dataops.tables.protect`: the cube bucket by bucket, primary and secondary
suppression, the audit) and stores it where the server will read it (`store._write`).

Why a child: the cube, the suppression models and the LP audit of a 100M-row table
peak at about 1.6 GiB, and memory a process has held it rarely gives back; after the
builds of a 100M-row dataset the server idled at 4.5 GiB, against 0.27 GiB restarted
on the stored builds. In a child the pages go when it exits, a build past its memory
cap fails alone, and the server keeps answering from its other tables.
"""

from __future__ import annotations

import sys
import time

from dataops.engines.children import child_main


def build(request: dict) -> dict:
    from pathlib import Path

    from dataops._toml import read_toml
    from dataops.catalog import Catalog
    from dataops.engines.build import peak
    from dataops.engines.children import entry_again
    from dataops.errors import ProductError
    from dataops.products.table import load_table_product
    from dataops.tables import protect
    from dataops.tables.store import _write, product_hash

    started = time.monotonic()
    dataset = entry_again(request)
    path = Path(request["product"])
    product = load_table_product(read_toml(path, ProductError), path, Catalog({dataset.id: dataset}))
    if product_hash(product) != request["product_hash"]:
        raise SystemExit(f"the product {product.id} changed since the server loaded it")
    table = protect(product, dataset, data_version=request["data_version"], scratch=Path(request["scratch"]))
    _write(Path(request["where"]), table)
    return {
        "seconds": round(time.monotonic() - started, 3),
        "peak_rss_bytes": peak("VmHWM"),
        "fingerprint": table.fingerprint,
    }


def main() -> int:
    """Request: catalog_entry, sandbox, dataset_terms, product, product_hash, data_version,
    where, scratch (paths and strings), memory_limit_bytes."""
    return child_main(build, "protection")


if __name__ == "__main__":
    sys.exit(main())
