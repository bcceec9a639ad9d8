"""Subject layouts in bounded memory: cut into ranges of subjects, the same answers.

Past `PIECE_ROWS` rows the build sorts one range of subject ids at a time and writes
each as a record batch of its own. Every subject's evaluation must be the same as
from the layout sorted in one piece, including subjects at the ranges' edges and
subjects with no rows.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

import dataops.engines.subject as subject_engine
from dataops.catalog import load_catalog
from dataops.engines.subject import SubjectLayouts
from dataops.products import load_products
from dataops.versions import Fingerprints

REPO = Path(__file__).resolve().parent.parent
TODAY = dt.date(2026, 11, 30)


@pytest.fixture(scope="module")
def setting(sandbox_dir):
    catalog = load_catalog(REPO / "catalog", sandbox_dir)
    products = load_products(REPO / "products", catalog).subjects
    return catalog, products


def layouts(tmp_path: Path, products) -> SubjectLayouts:
    return SubjectLayouts(tmp_path, products.values(), Fingerprints())


@pytest.mark.parametrize("dataset_id", ["medical_claims", "enterprise_credit"])
def test_a_layout_cut_into_ranges_answers_like_one_sorted_in_one_piece(
    setting, tmp_path, monkeypatch, dataset_id
):
    catalog, products = setting
    dataset = catalog.get(dataset_id)
    readers = [p for p in products.values() if p.dataset.id == dataset_id]
    assert readers, f"no shipped subject product reads {dataset_id}"
    whole = layouts(tmp_path / "whole", products).current(dataset)
    monkeypatch.setattr(subject_engine, "PIECE_ROWS", 7_000)
    cut = layouts(tmp_path / "cut", products).current(dataset)
    rows = pl.scan_parquet(dataset.path).select(pl.len()).collect().item()
    assert len(whole.pieces) == 1 and len(cut.pieces) >= rows // 7_000 - 1
    assert cut.row_count == whole.row_count
    with ipc.open_file(pa.memory_map(str(cut.directory / "rows.arrow"))) as f:
        assert f.num_record_batches == len(cut.pieces)

    ids = pl.read_parquet(dataset.path, columns=[dataset.unit_column])[dataset.unit_column].cast(pl.String)
    edges = [piece[0][0].decode() for piece in cut.pieces] + [piece[0][-1].decode() for piece in cut.pieces]
    subjects = sorted(set(ids.unique().sort().gather_every(97).to_list()) | set(edges))
    subjects += ["not-a-subject", "", "\x00", "ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ"]
    for product in readers:
        for subject in subjects:
            assert cut.evaluate(product, subject, TODAY) == whole.evaluate(product, subject, TODAY), subject
    # Every sampled subject has rows in both: the comparison is not between empty answers.
    found = [s for s in subjects if cut.rows_of(s)[1] > 0]
    assert len(found) == len(subjects) - 4
    assert all(cut.rows_of(s)[1] == whole.rows_of(s)[1] == (ids == s).sum() for s in found[:50])


def test_a_layout_built_in_a_child_answers_like_one_built_here(setting, tmp_path, monkeypatch):
    """Past `CHILD_ROWS` rows the layout is built by `python -m dataops.engines.subject_build`;
    lowered here, so the tests' data takes that path."""
    catalog, products = setting
    dataset = catalog.get("medical_claims")
    readers = [p for p in products.values() if p.dataset.id == "medical_claims"]
    here = layouts(tmp_path / "here", products).current(dataset)

    def not_here(*args, **kwargs):
        raise AssertionError("laid out in the server process")

    monkeypatch.setattr(SubjectLayouts, "_lay_out", not_here)  # the child has its own, untouched
    built = SubjectLayouts(tmp_path / "child", products.values(), Fingerprints(), child_rows=0)
    child = built.current(dataset)
    assert built.last_build is not None and built.last_build["peak_rss_bytes"] > 0
    assert child.row_count == here.row_count
    ids = pl.read_parquet(dataset.path, columns=[dataset.unit_column])[dataset.unit_column].cast(pl.String)
    for subject in [*ids.unique().sort().gather_every(211).to_list(), "not-a-subject"]:
        for product in readers:
            assert child.evaluate(product, subject, TODAY) == here.evaluate(product, subject, TODAY), subject


def test_a_layout_child_past_its_cap_or_given_another_entry_fails_alone(setting, tmp_path):
    from dataops.engines.children import BuildFailed

    catalog, products = setting
    dataset = catalog.get("medical_claims")
    capped = SubjectLayouts(tmp_path / "capped", products.values(), Fingerprints(), 64 * 2**20, child_rows=0)
    with pytest.raises(BuildFailed, match="memory limit 0.06 GiB"):
        capped.current(dataset)
    assert not [p for p in capped.directory.iterdir() if not p.name.startswith(".")]
    import dataclasses

    other = dataclasses.replace(dataset, max_rows_per_unit=(dataset.max_rows_per_unit or 0) + 1)
    edited = SubjectLayouts(tmp_path / "edited", products.values(), Fingerprints(), child_rows=0)
    with pytest.raises(BuildFailed, match="changed since the server loaded it"):
        edited._build(other, "f" * 16, edited.directory / "medical_claims-ffffffffffffffff-00000000")
