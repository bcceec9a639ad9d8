"""The demo data generator: deterministic, consistent with the catalog, and skewed
enough that the privacy controls have something to do."""

from __future__ import annotations

import tomllib
from pathlib import Path

import polars as pl
import pytest

from dataops.demo import generate as demo

ROOT = Path(__file__).resolve().parent.parent
ENTERPRISES, CLAIMS, SEED = 5_000, 20_000, 7

# Which module tuple is the public key set of which catalog column.
KEY_SETS = {
    "enterprise_credit": {
        "district": demo.DISTRICTS,
        "industry": demo.INDUSTRIES,
        "size_band": demo.SIZE_BANDS,
    },
    "medical_claims": {
        "age_band": demo.AGE_BANDS,
        "sex": demo.SEXES,
        "district": demo.DISTRICTS,
        "visit_type": demo.VISIT_TYPES,
        "hospital_level": demo.HOSPITAL_LEVELS,
        "diagnosis_group": demo.DIAGNOSIS_GROUPS,
    },
}
DTYPE_CHECKS = {
    "string": lambda d: d == pl.String,
    "int": lambda d: d.is_integer(),
    "float": lambda d: d.is_float(),
    "date": lambda d: d == pl.Date,
}


def _generate(sandbox: Path, seed: int = SEED) -> dict[str, pl.DataFrame]:
    paths = demo.generate(sandbox, enterprises=ENTERPRISES, claims=CLAIMS, seed=seed)
    return {dataset_id: pl.read_parquet(path) for dataset_id, path in paths.items()}


def _catalog(dataset_id: str) -> dict:
    with (ROOT / "catalog" / f"{dataset_id}.toml").open("rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> dict[str, pl.DataFrame]:
    return _generate(tmp_path_factory.mktemp("sandbox"))


@pytest.fixture(scope="module")
def firms(frames) -> pl.DataFrame:
    return frames["enterprise_credit"]


@pytest.fixture(scope="module")
def claims(frames) -> pl.DataFrame:
    return frames["medical_claims"]


def test_writes_each_dataset_where_its_catalog_entry_says(tmp_path):
    paths = demo.generate(tmp_path, enterprises=ENTERPRISES, claims=CLAIMS, seed=SEED)

    assert set(paths) == {"enterprise_credit", "medical_claims"}
    for dataset_id, path in paths.items():
        assert path == tmp_path / _catalog(dataset_id)["location"]
        # The temp file was renamed into place, not left beside it.
        assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_same_seed_gives_identical_data(tmp_path, frames):
    again = _generate(tmp_path)
    for dataset_id, frame in frames.items():
        assert again[dataset_id].equals(frame)


def test_different_seed_gives_different_data(tmp_path, frames):
    other = _generate(tmp_path, seed=SEED + 1)
    for dataset_id, frame in frames.items():
        assert not other[dataset_id].equals(frame)


def test_sizes_and_ids_are_unique(firms, claims):
    assert firms.height == ENTERPRISES and firms["enterprise_id"].n_unique() == ENTERPRISES
    assert claims.height == CLAIMS and claims["claim_id"].n_unique() == CLAIMS
    assert firms["enterprise_id"].str.len_bytes().unique().to_list() == [18]


@pytest.mark.parametrize("dataset_id", ["enterprise_credit", "medical_claims"])
def test_columns_and_types_match_the_catalog(frames, dataset_id):
    columns = _catalog(dataset_id)["columns"]
    frame = frames[dataset_id]

    assert frame.columns == list(columns)
    for name, column in columns.items():
        assert DTYPE_CHECKS[column["type"]](frame.schema[name]), name


@pytest.mark.parametrize("dataset_id", ["enterprise_credit", "medical_claims"])
def test_categories_are_the_public_key_sets_of_the_catalog(frames, dataset_id):
    columns = _catalog(dataset_id)["columns"]
    keyed = {name for name, column in columns.items() if "keys" in column}

    assert keyed == set(KEY_SETS[dataset_id])
    for name, categories in KEY_SETS[dataset_id].items():
        assert tuple(columns[name]["keys"]) == categories
        assert set(frames[dataset_id][name].unique()) <= set(categories)


@pytest.mark.parametrize("dataset_id", ["enterprise_credit", "medical_claims"])
def test_numbers_stay_within_the_catalog_bounds(frames, dataset_id):
    bounded = {n: c for n, c in _catalog(dataset_id)["columns"].items() if "bounds" in c}

    assert bounded, "every numeric column should carry bounds"
    for name, column in bounded.items():
        low, high = column["bounds"]
        values = frames[dataset_id][name]
        assert low <= values.min() and values.max() <= high, name
        if "bins" in column:  # half-open bins must hold every in-bounds value
            assert column["bins"][0] <= low and column["bins"][-1] > high, name


def test_a_person_has_one_age_band_sex_and_district_and_at_most_40_claims(claims):
    per_person = claims.group_by("person_id").agg(
        pl.len().alias("rows"), *(pl.col(c).n_unique() for c in ("age_band", "sex", "district"))
    )

    max_rows = _catalog("medical_claims")["privacy_unit"]["max_rows"]
    assert per_person["rows"].max() <= demo.MAX_VISITS == max_rows
    assert (per_person.select("age_band", "sex", "district").max_horizontal() == 1).all()
    # About five claims per person, with a long tail of frequent visitors.
    assert CLAIMS / 7 < per_person.height < CLAIMS / 3.5
    assert per_person["rows"].max() >= 20


def test_pregnancy_only_for_women_of_childbearing_age(claims):
    pregnant = claims.filter(pl.col("diagnosis_group") == "Pregnancy")

    assert pregnant.height > 0
    assert set(pregnant["sex"]) == {"F"}
    assert set(pregnant["age_band"]) <= {"18-29", "30-44"}


def test_claim_money_is_consistent(claims):
    ratio = claims["reimbursed"] / claims["amount"]
    assert ratio.min() >= 0.5 - 1e-3 and ratio.max() <= 0.9
    by_type = claims.group_by("visit_type").agg(pl.col("amount").median()).rows_by_key("visit_type")
    assert by_type["inpatient"][0] > 10 * by_type["outpatient"][0]


def test_most_firms_are_micro_and_the_top_percent_pays_most_tax(firms):
    sizes = firms["size_band"].value_counts(sort=True)
    assert sizes["size_band"][0] == "micro"

    tax = firms["tax_paid"].sort(descending=True)
    assert tax.head(ENTERPRISES // 100).sum() > 0.30 * tax.sum()
    assert (tax == 0).any()


def test_two_firms_dominate_the_tax_of_one_district_industry_cell(firms):
    cell = firms.filter(district="Binhai", industry="Finance")["tax_paid"].sort(descending=True)
    assert cell.head(2).sum() > 0.85 * cell.sum()


def test_some_district_industry_cells_have_fewer_than_five_firms(firms):
    cells = firms.group_by("district", "industry").len()
    assert cells.filter(pl.col("len") < 5).height >= 2


def test_arrears_amount_is_zero_exactly_when_there_are_no_arrears_months(firms):
    assert (firms.filter(pl.col("arrears_months") == 0)["arrears_amount"] == 0).all()
    assert (firms.filter(pl.col("arrears_months") > 0)["arrears_amount"] > 0).all()


def test_a_failed_write_leaves_neither_a_partial_file_nor_a_temp_file(tmp_path, monkeypatch):
    def crash_midway(frame, file, **kwargs):
        file.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        demo.generate(tmp_path, enterprises=ENTERPRISES, claims=CLAIMS, seed=SEED)

    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
