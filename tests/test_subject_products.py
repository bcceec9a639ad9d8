"""Subject product files: strictly validated at load, each mistake named by file and key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import REPO
from dataops.catalog import load_catalog
from dataops.errors import LoadError, ProductError
from dataops.products import load_products
from dataops.products.subject import OutputFunction

GOOD = (REPO / "products" / "underwriting.toml").read_text()


@pytest.fixture
def catalog(sandbox_dir):
    return load_catalog(REPO / "catalog", sandbox_dir)


def load(tmp_path: Path, catalog, text: str, name: str = "underwriting"):
    directory = tmp_path / "products"
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.toml").write_text(text)
    return load_products(directory, catalog)


def test_the_repository_products_load(catalog):
    products = load_products(REPO / "products", catalog)
    assert set(products.subjects) >= {"pre_loan_review", "underwriting", "credit_monitoring"}
    review = products.subjects["pre_loan_review"]
    assert review.subject == "enterprise_id" and review.scorecard.name == "grade"
    assert review.output_names[-2:] == ("grade_points", "grade")
    underwriting = products.subjects["underwriting"]
    assert {o.function for o in underwriting.outputs} == {
        OutputFunction.COUNT,
        OutputFunction.SUM,
        OutputFunction.ANY_IN,
        OutputFunction.MONTHS_WITH,
    }


def test_the_demo_products_are_the_repository_products():
    demo = REPO / "src/dataops/demo/products"
    for path in demo.glob("*.toml"):
        assert path.read_text() == (REPO / "products" / path.name).read_text()


MISTAKES = {
    "subject is not the privacy unit": (('subject = "person_id"', 'subject = "claim_id"'), "subject"),
    "unknown dataset": (('dataset = "medical_claims"', 'dataset = "hospital_beds"'), "dataset"),
    "identifier as a measure": (('column = "amount"', 'column = "claim_id"'), "outputs[1].column"),
    "the subject column as a measure": (('column = "amount"', 'column = "person_id"'), "outputs[1].column"),
    "sum of a text column": (('column = "amount"', 'column = "visit_type"'), "outputs[1].column"),
    "a raw date as an output": (
        ('function = "sum"\ncolumn = "amount"', 'function = "max"\ncolumn = "visit_date"'),
        "outputs[1].column",
    ),
    "free-form expression": (('function = "count"', 'function = "amount * 2"'), "outputs[0].function"),
    "unknown key": (
        ('function = "count"', 'function = "count"\nexpression = "amount"'),
        "outputs[0].expression",
    ),
    "a key outside the key set": (
        ('visit_type = ["inpatient"]', 'visit_type = ["spa"]'),
        "outputs[0].where.visit_type",
    ),
    "where on a column without keys": (
        ('where = { visit_type = ["inpatient"] }', "where = { amount = [1.0] }"),
        "outputs[0].where.amount",
    ),
    "window on a non-date column": (
        (
            'window = { column = "visit_date", months = 24 }\n\n[[outputs]]\nname = "claims',
            'window = { column = "amount", months = 24 }\n\n[[outputs]]\nname = "claims',
        ),
        "outputs[0].window.column",
    ),
    "window of zero months": (("months = 12", "months = 0"), "outputs[1].window.months"),
    "bands not increasing": (
        ("bands = [1000, 10000, 50000]", "bands = [1000, 500, 50000]"),
        "outputs[1].bands",
    ),
    "labels do not match bands": (
        ('labels = ["<1k", "1k-10k", "10k-50k", "50k+"]', 'labels = ["<1k", "1k+"]'),
        "outputs[1].labels",
    ),
    "an output named like a column": (('name = "inpatient_stays_24m"', 'name = "amount"'), "outputs[0].name"),
    "an output declared twice": (
        ('name = "claims_12m_band"', 'name = "inpatient_stays_24m"'),
        "outputs[1].name",
    ),
    "id is not the file name": (('id = "underwriting"', 'id = "other"'), "id"),
    "no purposes": (('purposes = ["underwriting"]', "purposes = []"), "purposes"),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_a_malformed_product_is_refused_naming_file_and_key(tmp_path, catalog, case):
    (old, new), key = MISTAKES[case]
    assert old in GOOD
    with pytest.raises(ProductError) as refused:
        load(tmp_path, catalog, GOOD.replace(old, new, 1))
    message = str(refused.value)
    assert "underwriting.toml" in message and f": {key}:" in message, message


def test_a_scorecard_scores_only_bands(tmp_path, catalog):
    card = (
        GOOD
        + '\n[scorecard]\nedges = [0]\ngrades = ["low", "high"]\n[scorecard.points]\ninpatient_stays_24m = [1]\n'
    )
    with pytest.raises(ProductError, match=r"scorecard\.points\.inpatient_stays_24m: only banded"):
        load(tmp_path, catalog, card)
    card = card.replace("inpatient_stays_24m = [1]", "claims_12m_band = [1, 2]")
    with pytest.raises(ProductError, match=r"claims_12m_band: must be 4 finite numbers"):
        load(tmp_path, catalog, card)
    ok = card.replace(
        "claims_12m_band = [1, 2]", "claims_12m_band = [1, 2, 3, 4]\nchronic_diagnosis_24m = [0, -5]"
    )
    assert load(tmp_path, catalog, ok).subjects["underwriting"].scorecard.grading.labels == ("low", "high")


def test_the_server_refuses_to_start_on_a_malformed_product(config):
    from dataops.server import build_server

    shutil.copytree(REPO / "products", config.paths.products, dirs_exist_ok=True)
    path = config.paths.products / "underwriting.toml"
    path.write_text(GOOD.replace('function = "count"', 'function = "rows"'))
    with pytest.raises(LoadError, match=r"underwriting\.toml: outputs\[0\]\.function"):
        build_server(config)
