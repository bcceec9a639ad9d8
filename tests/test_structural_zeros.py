"""Structural zeros: combinations impossible by definition, declared by the operator,
published as 0 and never suppressed; data that contradicts a declaration is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from dataops._toml import read_toml
from dataops.catalog import load_catalog
from dataops.errors import ProductError
from dataops.products.table import load_table_product
from dataops.tables import protect
from dataops.tables.primary import StructuralZeroViolated
from test_protect import REPO, write_product

CLAIMS = """
kind = "table"
id = "claims"
dataset = "medical_claims"
title = "Visits by age band, sex and diagnosis group"
dimensions = ["age_band", "sex", "diagnosis_group"]
[[measures]]
function = "count"
[[measures]]
function = "sum"
column = "amount"
[rules]
min_units = 10
"""

ZEROS = """
[[structural_zeros]]
sex = "M"
diagnosis_group = "Pregnancy"
[[structural_zeros]]
age_band = ["0-17", "45-59", "60-74", "75+"]
diagnosis_group = "Pregnancy"
"""


@pytest.fixture(scope="module")
def catalog(sandbox_dir):
    return load_catalog(REPO / "catalog", sandbox_dir)


def product(catalog, directory: Path, text: str):
    path = write_product(directory, "claims", text)
    return load_table_product(read_toml(path, ProductError), path, catalog)


def impossible(cells: pl.DataFrame) -> pl.Expr:
    """The cells the declarations cover, computed here from the labels alone."""
    pregnancy = pl.col("diagnosis_group") == "Pregnancy"
    return pregnancy & ((pl.col("sex") == "M") | pl.col("age_band").is_in(["0-17", "45-59", "60-74", "75+"]))


def test_declared_zeros_are_published_as_zero_and_never_suppressed(catalog, tmp_path):
    p = product(catalog, tmp_path / "with", CLAIMS + ZEROS)
    table = protect(p, catalog.get("medical_claims"))
    assert table.report.audit.passed
    zeros = table.cells.filter(impossible(table.cells).fill_null(False))
    # age 6 + total, sex 2 + total: M x Pregnancy over 7 age codes, and the 4 ages x (F, total)
    assert zeros.height == 7 + 4 * 2 == table.report.structural
    assert (zeros["status"] == "released").all()
    assert (zeros["count"] == 0).all() and (zeros["sum_amount"] == 0).all()
    # The data agrees: no such row exists.
    data = pl.read_parquet(catalog.get("medical_claims").path)
    assert data.filter(impossible(data)).height == 0


def test_declaring_them_costs_less_suppression_and_still_passes_the_audit(catalog, tmp_path):
    with_ = protect(product(catalog, tmp_path / "with", CLAIMS + ZEROS), catalog.get("medical_claims"))
    without = protect(product(catalog, tmp_path / "without", CLAIMS), catalog.get("medical_claims"))
    assert with_.report.audit.passed and without.report.audit.passed
    suppressed = lambda t: int((t.cells["status"] != "released").sum())  # noqa: E731
    assert suppressed(with_) < suppressed(without)
    # Without the declaration the impossible cells are empty cells, suppressed like small ones.
    hidden = without.cells.filter(impossible(without.cells).fill_null(False))
    assert (hidden["status"] != "released").all()


def test_a_declaration_the_data_contradicts_is_refused(catalog, tmp_path):
    """The control: publishing 0 for a cell with rows would be false, and suppressing a
    declared zero would tell everyone it has rows. Switch the check off and the table
    publishes a false 0 beside true margins, from which the hidden rows follow."""
    wrong = CLAIMS + '[[structural_zeros]]\nsex = "F"\ndiagnosis_group = "Pregnancy"\n'
    p = product(catalog, tmp_path / "wrong", wrong)
    with pytest.raises(StructuralZeroViolated) as err:
        protect(p, catalog.get("medical_claims"))
    message = str(err.value)
    assert "claims.toml" in message and "structural_zeros" in message
    assert not any(ch.isdigit() for ch in message.split("claims.toml")[-1])  # no count leaks


def test_without_the_check_a_wrong_declaration_publishes_a_false_zero(catalog, tmp_path, monkeypatch):
    import dataops.tables.primary as primary

    wrong = CLAIMS + '[[structural_zeros]]\nsex = "F"\ndiagnosis_group = "Pregnancy"\n'
    p = product(catalog, tmp_path / "wrong", wrong)
    real = primary.structural_zeros

    def unchecked(product, cube):
        mask = real(product, cube)
        cube.rows[mask] = 0  # what skipping the check amounts to: the declaration wins
        return mask

    monkeypatch.setattr(primary, "structural_zeros", unchecked)
    table = protect(p, catalog.get("medical_claims"))
    cell = table.cells.filter(
        pl.col("sex") == "F", pl.col("diagnosis_group") == "Pregnancy", pl.col("age_band").is_null()
    )
    data = pl.read_parquet(catalog.get("medical_claims").path)
    true = data.filter(pl.col("sex") == "F", pl.col("diagnosis_group") == "Pregnancy").height
    assert true > 0 and cell["count"].item() == 0  # a falsehood was published


@pytest.mark.parametrize(
    "entry, key, words",
    [
        ('colour = "red"', "structural_zeros[0].colour", "not a dimension"),
        ('sex = "X"', "structural_zeros[0].sex", "not in the public key set"),
        ("sex = []", "structural_zeros[0].sex", "non-empty"),
    ],
)
def test_declarations_are_validated_with_file_and_key(catalog, tmp_path, entry, key, words):
    text = CLAIMS + f"[[structural_zeros]]\n{entry}\n"
    with pytest.raises(ProductError) as err:
        product(catalog, tmp_path, text)
    assert "claims.toml" in str(err.value) and key in str(err.value) and words in str(err.value), err.value


def test_an_empty_declaration_is_refused(catalog, tmp_path):
    with pytest.raises(ProductError, match="structural_zeros: an entry needs at least one dimension"):
        product(catalog, tmp_path, CLAIMS + "[[structural_zeros]]\n")


def test_a_sub_total_made_only_of_structural_zeros_is_one(catalog, tmp_path):
    # Every age band declared for Pregnancy: the all-ages sub-totals of Pregnancy are
    # sums of structural zeros, so they are structural too (the entry itself does not
    # name "all ages").
    ages = ", ".join(f'"{a}"' for a in catalog.get("medical_claims").columns["age_band"].keys)
    text = CLAIMS + f'[[structural_zeros]]\ndiagnosis_group = "Pregnancy"\nage_band = [{ages}]\n'
    p = product(catalog, tmp_path, text)
    from dataops.tables.cube import build_cube
    from dataops.tables.primary import structural_zeros

    ds = catalog.get("medical_claims")
    cube = build_cube(p, ds, pl.scan_parquet(ds.path))
    mask = structural_zeros(p, cube)
    preg = p.keys[2].index("Pregnancy")
    every_code = cube.codes()[:, 2] == preg  # any age code, the margin included
    assert np.array_equal(mask, every_code)
    declared_only = every_code & (cube.codes()[:, 0] < len(p.keys[0]))
    assert mask.sum() > declared_only.sum()
