"""Protected tables, built once per data version and kept under `<state>/tables/`.

A table is keyed by its product's id, a hash of everything in the product that
changes the protection (dimensions, keys, measures, rules), and the data version
(the dataset's content fingerprint). A new data version or an edited product means a
new build; an unchanged one is read back from disk. A build is written to a temp
directory and renamed into place, so a reader never sees half a table.

Files per table: `cells.parquet` (the released table), `report.json`, and
`confidential.npz` (the true values and protection levels, so `audit_table` can
re-audit a stored table). The state directory is inside the sandbox; the
confidential file never leaves it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import polars as pl

from dataops._fs import remove_stale
from dataops.catalog import Dataset
from dataops.engines.children import (
    ALLOCATOR_LAZY,
    DEFAULT_MEMORY_LIMIT_BYTES,
    BuildFailed,
    Children,
    entry_request,
    rows_if_reloadable,
)
from dataops.products.table import TableProduct
from dataops.tables.cube import ROWS_PER_BUCKET

log = logging.getLogger(__name__)

# Tables built in this process, shared by every TableStore: the same product spec over
# the same data version (a content fingerprint) protects to the same table, so a second
# store (a restarted server, a test's fresh state directory) need not rebuild it.
_SHARED: OrderedDict[tuple, object] = OrderedDict()
_SHARED_MAX = 16
_shared_lock = threading.Lock()


def product_hash(product: TableProduct) -> str:
    spec = repr(
        (product.dataset, product.dimensions, product.keys, product.bins, product.measures, product.rules)
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


# Past this many rows a table is protected in a memory-capped child process
# (`dataops.tables.build`): where the cube is built bucket by bucket anyway.
CHILD_ROWS = ROWS_PER_BUCKET


class TableStore:
    def __init__(
        self,
        state_dir: Path,
        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
        child_rows: int | None = None,
    ):
        self.root = Path(state_dir) / "tables"
        self.memory_limit_bytes = memory_limit_bytes
        self.child_rows = CHILD_ROWS if child_rows is None else child_rows
        self._tables: dict[tuple, object] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()
        self._children = Children()
        self.last_build: dict | None = None  # the last child's stats (seconds, peak_rss_bytes)

    def close(self, timeout: float = 30.0) -> None:
        """Kill a protection running in a child (the server is stopping)."""
        self._children.kill(timeout)

    def directory(self, product: TableProduct, data_version: str) -> Path:
        version = hashlib.sha256(data_version.encode()).hexdigest()[:16] if data_version else "unversioned"
        return self.root / product.id / f"{product_hash(product)}-{version}"

    def get(self, product: TableProduct, dataset: Dataset, data_version: str):
        key = (product.id, product_hash(product), data_version)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one build per table and version, however many requests wait for it
            table = self._tables.get(key)
            if table is None:
                where = self.directory(product, data_version)
                if data_version:
                    with _shared_lock:
                        table = _SHARED.get(key)
                    if table is not None and not where.is_dir():
                        _write(where, table)
                if table is None and where.is_dir():
                    table = _read(where, product, data_version)
                if table is None:
                    # What a crashed build left: its buckets (raw rows) and half-written tables.
                    remove_stale(self.root, ".cube-buckets.*")
                    remove_stale(where.parent, f".{where.name}.*")
                    table = self._protect(product, dataset, data_version, where)
                if data_version:
                    with _shared_lock:
                        _SHARED[key] = table
                        _SHARED.move_to_end(key)
                        while len(_SHARED) > _SHARED_MAX:
                            _SHARED.popitem(last=False)
                self._tables[key] = table
            return table

    def _protect(self, product: TableProduct, dataset: Dataset, data_version: str, where: Path):
        """Protect and store the table: in a child past `child_rows` rows (see
        dataops.tables.build), else here; read back from where it was stored."""
        from dataops.tables import protect

        if not self._in_child(product, dataset):
            table = protect(product, dataset, data_version=data_version, scratch=self.root)
            _write(where, table)
            return table
        request = {
            **entry_request(dataset),
            "product": str(product.source),
            "product_hash": product_hash(product),
            "data_version": data_version,
            "where": str(where),
            "scratch": str(self.root),
            "memory_limit_bytes": self.memory_limit_bytes,
        }
        self.last_build = self._children.run(
            "dataops.tables.build", request, f"table {product.id}", self.memory_limit_bytes, ALLOCATOR_LAZY
        )
        log.info(
            "protected table %s in a child: %.1f s, peak %.2f GiB",
            product.id,
            self.last_build["seconds"],
            self.last_build["peak_rss_bytes"] / 2**30,
        )
        table = _read(where, product, data_version)
        if table is None:
            raise BuildFailed(f"the build of table {product.id} stored nothing this server can read")
        return table

    def _in_child(self, product: TableProduct, dataset: Dataset) -> bool:
        """Large enough to be worth a child, and loaded from files a child can load again."""
        rows = rows_if_reloadable(dataset)
        return rows is not None and rows > self.child_rows and product.source.is_file()


def _write(where: Path, table) -> None:
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=where.parent, prefix=f".{where.name}."))
    try:
        table.cells.write_parquet(tmp / "cells.parquet")
        (tmp / "report.json").write_text(
            json.dumps(
                {
                    "fingerprint": table.fingerprint,
                    "data_version": table.data_version,
                    "report": table.report.to_json(),
                },
                indent=1,
            )
        )
        c = table.confidential
        cube, req = c.cube, c.requirements
        with open(tmp / "confidential.npz", "wb") as f:
            np.savez(
                f,
                shape=np.array(cube.shape),
                rows=cube.rows,
                units=cube.units,
                rows_outside=np.array(cube.rows_outside),
                names=np.array(req.names),
                values=req.values,
                per_row=req.per_row,
                up=req.up,
                down=req.down,
                min_width=req.min_width,
                suppressed=c.suppressed,
                **({"cube_cells": c.cubes.cells, "cube_signs": c.cubes.signs} if c.cubes is not None else {}),
                **{f"sum_{i}": cube.sums[n] for i, n in enumerate(req.names[1:])},
                **{f"top_{i}": cube.top[n] for i, n in enumerate(req.names[1:])},
            )
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, where)
        except OSError:  # another process stored the same build first: same content
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read(where: Path, product: TableProduct, data_version: str):
    from dataops.tables import Confidential, ProtectedTable, ProtectionReport, fingerprint
    from dataops.tables.cube import Cube
    from dataops.tables.hypercube import Cubes
    from dataops.tables.primary import Requirements

    try:
        cells = pl.read_parquet(where / "cells.parquet")
        meta = json.loads((where / "report.json").read_text())
        z = np.load(where / "confidential.npz")
    except (OSError, ValueError):
        return None  # unreadable: rebuild
    if fingerprint(product, data_version, cells) != meta["fingerprint"]:
        return None  # edited or damaged on disk: rebuild rather than serve it
    try:
        names = tuple(str(n) for n in z["names"])
        cube = Cube(
            tuple(int(s) for s in z["shape"]),
            z["rows"],
            z["units"],
            {n: z[f"sum_{i}"] for i, n in enumerate(names[1:])},
            {n: z[f"top_{i}"] for i, n in enumerate(names[1:])},
            int(z["rows_outside"]),
        )
        req = Requirements(names, z["values"], z["per_row"], z["up"], z["down"], z["min_width"])
        suppressed = z["suppressed"]
        cubes = Cubes(z["cube_cells"], z["cube_signs"]) if "cube_cells" in z.files else None
    except KeyError:
        return None  # written by an older layout: rebuild
    return ProtectedTable(
        product,
        data_version,
        meta["fingerprint"],
        cells,
        ProtectionReport.from_json(meta["report"]),
        Confidential(cube, req, suppressed, cubes),
    )
