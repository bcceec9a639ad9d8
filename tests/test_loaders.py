"""Operator mistakes in catalog and policy files are refused, naming the file and the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import REPO
from dataops.catalog import Classification, load_catalog
from dataops.errors import CatalogError, PolicyError, ProductError
from dataops.policy import PolicyStore, load_policies
from dataops.products import load_products


@pytest.fixture
def work(tmp_path: Path) -> Path:
    for name in ("catalog", "policies", "products"):
        shutil.copytree(REPO / name, tmp_path / name)
    return tmp_path


def tables(work: Path, catalog):
    return load_products(work / "products", catalog)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_the_demo_catalog_and_policies_load(work):
    catalog = load_catalog(work / "catalog", work / "sandbox")
    assert set(catalog.datasets) == {"enterprise_credit", "medical_claims"}
    claims = catalog.get("medical_claims")
    assert claims.unit_column == "person_id" and claims.max_rows_per_unit == 40
    assert claims.columns["person_id"].classification is Classification.IDENTIFIER
    policies = load_policies(work / "policies", catalog, tables(work, catalog))
    assert set(policies.consumers) == {"city-bank", "river-bank", "harbor-insurance"}
    assert policies.get("city-bank").grants["enterprise_credit"].tables == (
        "enterprises_by_district_industry_size",
    )
    assert len(policies.version) == 64


CATALOG_MISTAKES = [
    ('zone = "finance"', 'zone = "Finance Zone"', "zone"),
    ('column = "enterprise_id"', 'column = "district"', "privacy_unit.column"),
    ("max_rows = 1", "max_rows = 0", "privacy_unit.max_rows"),
    ('[columns.district]\ntype = "string"', '[columns.district]\ntype = "text"', "columns.district.type"),
    ('classification = "public"', 'classification = "open"', "classification"),
    ('location = "finance/enterprise_credit.parquet"', 'location = "../../etc/passwd.parquet"', "location"),
    ('id = "enterprise_credit"', 'id = "enterprise_credit"\ntitel = "typo"', "titel"),
]


@pytest.mark.parametrize("old,new,key", CATALOG_MISTAKES)
def test_a_catalog_mistake_names_file_and_key(work, old, new, key):
    path = work / "catalog" / "enterprise_credit.toml"
    edit(path, old, new)
    with pytest.raises(CatalogError) as err:
        load_catalog(work / "catalog", work / "sandbox")
    assert str(path) in str(err.value) and key in str(err.value)


def test_catalog_bounds_must_be_ordered(work):
    path = work / "catalog" / "enterprise_credit.toml"
    text = path.read_text()
    start = text.index("[columns.tax_paid]")
    bounds = text.index("bounds", start)
    line_end = text.index("\n", bounds)
    path.write_text(text[:bounds] + "bounds = [10.0, 1.0]" + text[line_end:])
    with pytest.raises(CatalogError, match=r"columns\.tax_paid\.bounds"):
        load_catalog(work / "catalog", work / "sandbox")


POLICY_MISTAKES = [
    (
        'district = ["dimension", "filter"]',
        'district = ["dimension", "filter"]\nenterprise_id = ["filter"]',
        "grants[0].columns.enterprise_id",
        "identifier",
    ),
    (
        'district = ["dimension", "filter"]',
        'district = ["dimension", "filter"]\nturnover = ["measure"]',
        "grants[0].columns.turnover",
        "no column",
    ),
    (
        'district = ["dimension", "filter"]',
        'district = ["dimension", "sort"]',
        "grants[0].columns.district",
        "sort",
    ),
    (
        'purpose = "pre-loan review"',
        'purpose = "pre-loan review"\nmin_group_size = 10',
        "grants[0].min_group_size",
        "table products",
    ),
    (
        'tables = ["enterprises_by_district_industry_size"]',
        'tables = ["no_such_table"]',
        "grants[0].tables[0]",
        "not a table product",
    ),
    (
        'tables = ["enterprises_by_district_industry_size"]',
        'tables = ["claims_by_demography_diagnosis"]',
        "grants[0].tables[0]",
        "over dataset 'medical_claims'",
    ),
    ('tables = ["enterprises_by_district_industry_size"]', "tables = []", "grants[0].tables", "must name"),
    ("expires = 2027-12-31", 'expires = "next year"', "grants[0].expires", "TOML date"),
    ('dataset = "enterprise_credit"', 'dataset = "medical_claims"', "grants[0].dataset", "zone"),
    ('consumer = "city-bank"', 'consumer = "other-bank"', "consumer", "file name"),
    (
        'purpose = "pre-loan review"',
        'purpose = "pre-loan review"\npurpose_code = 7',
        "purpose_code",
        "unknown key",
    ),
    ('modes = ["aggregate", "dp"]', "modes = []", "grants[0].modes", "at least one"),
]


@pytest.mark.parametrize("old,new,key,why", POLICY_MISTAKES)
def test_a_policy_mistake_names_file_key_and_reason(work, old, new, key, why):
    catalog = load_catalog(work / "catalog", work / "sandbox")
    path = work / "policies" / "city-bank.toml"
    edit(path, old, new)
    with pytest.raises(PolicyError) as err:
        load_policies(work / "policies", catalog, tables(work, catalog))
    message = str(err.value)
    assert str(path) in message and key in message and why in message, message


def test_an_unclassified_column_cannot_be_granted(work):
    path = work / "catalog" / "enterprise_credit.toml"
    text = path.read_text()
    start = text.index("[columns.industry]")
    text = text[:start] + text[start:].replace(
        'classification = "public"', 'classification = "unclassified"', 1
    )
    path.write_text(text)
    catalog = load_catalog(work / "catalog", work / "sandbox")
    # The table product over it is refused first; the DP column grant would be too.
    with pytest.raises(ProductError, match="'industry' is unclassified"):
        tables(work, catalog)
    with pytest.raises(PolicyError, match="unclassified"):
        load_policies(work / "policies", catalog)


def test_an_invalid_file_denies_its_own_consumer_until_fixed_and_no_other(work):
    catalog = load_catalog(work / "catalog", work / "sandbox")
    now = [0.0]
    store = PolicyStore(
        work / "policies", catalog, settle_seconds=2.0, clock=lambda: now[0], products=tables(work, catalog)
    )
    river = store.current.get("river-bank")
    path = work / "policies" / "city-bank.toml"
    edit(path, 'tables = ["enterprises_by_district_industry_size"]', 'tables = ["enterprises_by_district"]')
    assert store.poll() is True  # denying is never delayed
    assert "enterprises_by_district" in store.current.get("city-bank").invalid
    assert "enterprises_by_district" in store.last_error
    assert store.current.get("river-bank") is river
    edit(path, 'tables = ["enterprises_by_district"]', 'tables = ["enterprises_by_district_size"]')
    assert store.poll() is False  # from "denied", the fix widens: it waits for stable content
    now[0] = 2.5
    assert store.poll() is True
    assert store.current.get("city-bank").grants["enterprise_credit"].tables == (
        "enterprises_by_district_size",
    )
    assert store.last_error is None
