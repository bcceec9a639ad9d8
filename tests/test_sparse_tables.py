"""A table product too detailed for its data is withheld whole, at once.

The shipped claims table has five dimensions (12,012 cells). Over the tests' 100k
claims 58% of its finest cells fail the primary rules; secondary suppression would
end up hiding nearly every cell after many slow audit rounds. Protection instead
stops before secondary suppression, releases nothing but the structural zeros
(public), says why in the report, and the table is served with every lookup
suppressed. Protection that runs out of time fails closed the same way.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import dataops.tables as tables
from dataops.catalog import load_catalog
from dataops.client import count
from dataops.products import load_products
from dataops.tables import protect, summary

REPO = Path(__file__).resolve().parent.parent
CLAIMS = "claims_by_demography_diagnosis"


@pytest.fixture(scope="module")
def catalog(sandbox_dir):
    return load_catalog(REPO / "catalog", sandbox_dir)


@pytest.fixture(scope="module")
def products(catalog):
    return load_products(REPO / "products", catalog).tables


def only_structural_zeros_released(table) -> bool:
    released = table.cells.filter(pl.col("status") == "released")
    return released.height == table.report.structural and bool((released["count"] == 0).all())


def test_a_table_too_detailed_for_its_data_is_withheld_whole(catalog, products):
    table = protect(products[CLAIMS], catalog.get("medical_claims"), data_version="test")
    report = table.report
    assert report.structural > 0
    assert "too detailed for this data" in report.withheld
    assert report.rounds == 0  # no secondary-suppression round ran
    assert only_structural_zeros_released(table)
    assert report.primary + report.secondary + report.structural == report.cells
    text = summary(table)
    assert "withheld whole" in text and "LP audit" not in text
    assert tables.ProtectionReport.from_json(report.to_json()) == report


def test_the_same_rules_over_four_dimensions_release_cells(catalog, tmp_path):
    """What withholds the table is its detail, not its rules: without district the
    same product is dense enough over the same data, and is protected and audited."""
    text = (REPO / "products" / f"{CLAIMS}.toml").read_text()
    assert '"district", ' in text
    (tmp_path / f"{CLAIMS}.toml").write_text(text.replace('"district", ', ""))
    product = load_products(tmp_path, catalog).tables[CLAIMS]
    assert "district" not in product.dimensions
    table = protect(product, catalog.get("medical_claims"), data_version="test")
    assert table.report.withheld == "" and table.report.audit.passed and table.report.audit.checked > 0
    assert table.cells.filter(pl.col("status") == "released").height > table.report.structural


def test_protection_out_of_time_fails_closed(catalog, products, monkeypatch):
    """No secondary round starts after the budget: the unaudited pattern is not released."""
    monkeypatch.setattr(tables, "SECONDARY_BUDGET_SECONDS", 0.0)
    product = products["enterprises_by_district_industry_size"]
    table = protect(product, catalog.get("enterprise_credit"), data_version="test")
    assert "did not converge" in table.report.withheld
    assert table.cells.filter(pl.col("status") == "released").height == table.report.structural == 0


def test_a_withheld_table_is_served_with_every_lookup_suppressed(connect):
    client = connect("harbor-insurance")
    description = client.describe("medical_claims")
    assert CLAIMS in [t.id for t in description.tables]
    result = client.query("medical_claims", aggregates=[count("visits")], group_by=["sex"])
    assert result.frame.height == 0 and result.rows_suppressed == 2
