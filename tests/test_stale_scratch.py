"""Scratch a crashed build left behind is swept by the next build, and only when stale.

The bounded-memory builds split raw rows to disk first (`.cube-buckets.*` under the
table store, `.ranges.*` under the subject layouts, `.<dataset>-*.tmp` beside prepared
copies) and remove them on every normal exit. A crash leaves them: raw rows kept past
their use. The next build of the same store removes what nobody touched for an hour
and leaves younger scratch alone, since another build may still be writing it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dataops._fs import STALE_SECONDS, remove_stale
from dataops.catalog import load_catalog
from dataops.engines.subject import SubjectLayouts
from dataops.products import load_products
from dataops.tables import TableStore
from dataops.versions import Fingerprints

REPO = Path(__file__).resolve().parent.parent


def planted(directory: Path, name: str, age: float) -> Path:
    """A scratch directory holding one file, every mtime `age` seconds ago."""
    path = directory / name
    path.mkdir(parents=True)
    (path / "bucket-0.parquet").write_bytes(b"raw rows")
    then = time.time() - age
    for p in (path / "bucket-0.parquet", path):
        os.utime(p, (then, then))
    return path


def test_only_scratch_untouched_for_an_hour_is_removed(tmp_path: Path) -> None:
    stale = planted(tmp_path, ".cube-buckets.a", STALE_SECONDS + 60)
    young = planted(tmp_path, ".cube-buckets.b", 60)
    # An old directory a build is still writing into: its newest file decides.
    busy = planted(tmp_path, ".cube-buckets.c", STALE_SECONDS + 60)
    (busy / "bucket-1.parquet").write_bytes(b"just written")
    other = planted(tmp_path, "cells-kept", STALE_SECONDS + 60)  # not scratch: another name
    assert remove_stale(tmp_path, ".cube-buckets.*") == [stale]
    assert not stale.exists() and young.is_dir() and busy.is_dir() and other.is_dir()
    assert remove_stale(tmp_path / "missing", "*") == []


@pytest.fixture(scope="module")
def setting(sandbox_dir):
    catalog = load_catalog(REPO / "catalog", sandbox_dir)
    return catalog, load_products(REPO / "products", catalog)


def test_a_table_build_sweeps_what_a_crashed_build_left(setting, tmp_path: Path) -> None:
    catalog, products = setting
    product = products.tables["enterprises_by_district_size"]
    store = TableStore(tmp_path / "state")
    where = store.directory(product, "v1")
    stale = [
        planted(store.root, ".cube-buckets.crashed", STALE_SECONDS + 60),
        planted(where.parent, f".{where.name}.crashed", STALE_SECONDS + 60),
    ]
    young = planted(store.root, ".cube-buckets.running", 5)
    table = store.get(product, catalog.get("enterprise_credit"), "v1")
    assert table.data_version == "v1" and where.is_dir()
    assert not any(p.exists() for p in stale)
    assert young.is_dir()


def test_a_subject_layout_build_sweeps_what_a_crashed_build_left(setting, tmp_path: Path) -> None:
    catalog, products = setting
    dataset = catalog.get("medical_claims")
    layouts = SubjectLayouts(tmp_path, products.subjects.values(), Fingerprints())
    stale = [
        planted(layouts.directory, ".ranges.crashed", STALE_SECONDS + 60),
        planted(
            layouts.directory, f".{dataset.id}-0123456789abcdef-01234567.9-crashed.tmp", STALE_SECONDS + 60
        ),
    ]
    young = planted(layouts.directory, ".ranges.running", 5)
    layout = layouts.current(dataset)
    assert layout.row_count > 0
    assert not any(p.exists() for p in stale)
    assert young.is_dir()
