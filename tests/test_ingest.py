"""`dataops ingest`: a file in, a Parquet file and an unclassified catalog entry out.

A bad file is refused with a message an operator can act on, and leaves the catalog
and the sandbox exactly as they were.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from pathlib import Path

import polars as pl
import pytest

from dataops.catalog import Classification, ColumnType, check_data, load_catalog, load_entry
from dataops.engines.dp import DPQuery
from dataops.errors import PolicyDenied
from dataops.ingest import IngestError, ingest
from dataops.ir import Aggregate, Function
from test_dp_engine import plan_for

CREDIT_CSV = """\
enterprise_id,district,employees,tax_paid,founded,active
E1,Dongcheng,12,1500.5,2001-03-04,true
E1,Dongcheng,12,1700.0,2001-03-04,true
E1,Dongcheng,13,900.25,2001-03-04,false
E2,Xicheng,4,20.0,2015-11-30,true
E3,Xicheng,250,,1999-01-01,false
"""


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    catalog, sandbox = tmp_path / "catalog", tmp_path / "sandbox"
    catalog.mkdir()
    sandbox.mkdir()
    return catalog, sandbox


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def run(source: Path, dirs: tuple[Path, Path], dataset_id: str = "credit", **kwargs):
    catalog, sandbox = dirs
    return ingest(
        source, dataset_id=dataset_id, zone="finance", catalog_dir=catalog, sandbox_dir=sandbox, **kwargs
    )


def snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every path under the roots (directories too) with its contents."""
    return {
        str(path): (path.read_bytes() if path.is_file() else None)
        for root in roots
        for path in sorted([root, *root.rglob("*")])
    }


# --- round trips ---------------------------------------------------------------------


def test_csv_ingest_writes_parquet_and_a_loadable_unclassified_entry(tmp_path, dirs):
    catalog, sandbox = dirs
    result = run(write(tmp_path, "credit.csv", CREDIT_CSV), dirs, title="Credit", provider="Bureau")

    assert result.dataset_id == "credit"
    assert result.parquet == sandbox / "finance" / "credit.parquet"
    assert result.catalog_entry == catalog / "credit.toml"
    assert result.rows == 5
    assert result.columns == ("enterprise_id", "district", "employees", "tax_paid", "founded", "active")

    dataset = load_entry(result.catalog_entry, sandbox)
    check_data(dataset)
    assert (dataset.zone, dataset.title, dataset.provider) == ("finance", "Credit", "Bureau")
    assert dataset.location == "finance/credit.parquet"
    assert "credit.csv" in dataset.description
    assert {name: c.type for name, c in dataset.columns.items()} == {
        "enterprise_id": ColumnType.STRING,
        "district": ColumnType.STRING,
        "employees": ColumnType.INT,
        "tax_paid": ColumnType.FLOAT,
        "founded": ColumnType.DATE,
        "active": ColumnType.BOOL,
    }
    assert pl.read_parquet(result.parquet).height == 5


def test_only_the_privacy_unit_is_classified_and_it_is_an_identifier(tmp_path, dirs):
    result = run(write(tmp_path, "credit.csv", CREDIT_CSV), dirs)
    dataset = load_entry(result.catalog_entry, dirs[1])

    assert dataset.unit_column == "enterprise_id"
    assert dataset.columns["enterprise_id"].classification is Classification.IDENTIFIER
    others = {c.classification for name, c in dataset.columns.items() if name != "enterprise_id"}
    assert others == {Classification.UNCLASSIFIED}


def test_max_rows_is_never_taken_from_the_data_and_dp_stays_off_until_the_operator_sets_it(tmp_path, dirs):
    """The heaviest unit's row count (E1: 3) is a fact about one enterprise, published by
    DescribeDataset as the bound: ingest leaves max_rows for the operator to set."""
    result = run(write(tmp_path, "credit.csv", CREDIT_CSV), dirs)
    text = result.catalog_entry.read_text()
    # The table itself (the header comment names it too), up to the next table; the
    # number is matched as a whole word, so a date elsewhere cannot trip it.
    section = text.split("\n[privacy_unit]\n")[1].split("\n[", 1)[0]
    assert section.startswith('column = "enterprise_id"')
    assert not re.search(r"\b3\b", section), section
    assert "max_rows" not in tomllib.loads(text)["privacy_unit"]
    assert "# max_rows = ?" in text and "every DP query on this dataset is refused" in text
    dataset = load_entry(result.catalog_entry, dirs[1])
    assert dataset.max_rows_per_unit is None and not dataset.dp_ready
    with pytest.raises(PolicyDenied, match="operator has not set privacy_unit.max_rows") as err:
        DPQuery.compile(plan_for(dataset, [Aggregate(Function.COUNT)], epsilon=1.0))
    assert err.value.rule == "catalog.privacy_unit.max_rows"
    # The operator sets it (uncommenting the line with their own bound): DP is on.
    result.catalog_entry.write_text(text.replace("# max_rows = ?", "max_rows = 4", 1))
    dataset = load_entry(result.catalog_entry, dirs[1])
    assert dataset.max_rows_per_unit == 4
    DPQuery.compile(plan_for(dataset, [Aggregate(Function.COUNT)], epsilon=1.0))


def test_numeric_columns_get_no_data_derived_bounds(tmp_path, dirs):
    result = run(write(tmp_path, "credit.csv", CREDIT_CSV), dirs)
    dataset = load_entry(result.catalog_entry, dirs[1])
    assert all(c.bounds is None for c in dataset.columns.values())
    text = result.catalog_entry.read_text()
    assert "bounds" in text.split("[columns")[0]  # the header comment explains why


def test_defaults_title_to_the_id_and_a_conservative_budget(tmp_path, dirs):
    result = run(write(tmp_path, "credit.csv", CREDIT_CSV), dirs)
    dataset = load_entry(result.catalog_entry, dirs[1])
    assert dataset.title == "credit"
    assert (dataset.budget.epsilon, dataset.budget.delta) == (1.0, 0.0)
    assert str(dt.datetime.now(dt.UTC).date()) in dataset.description


def test_explicit_unit_column_wins_over_the_id_suffix_rule(tmp_path, dirs):
    result = run(write(tmp_path, "credit.csv", CREDIT_CSV), dirs, unit_column="district")
    dataset = load_entry(result.catalog_entry, dirs[1])
    assert dataset.unit_column == "district"
    assert dataset.max_rows_per_unit is None
    assert dataset.columns["enterprise_id"].classification is Classification.UNCLASSIFIED


def test_without_an_id_column_the_first_column_is_the_unit(tmp_path, dirs):
    result = run(write(tmp_path, "people.csv", "person,age\np1,30\np2,40\n"), dirs)
    assert load_entry(result.catalog_entry, dirs[1]).unit_column == "person"


def test_parquet_ingest_keeps_types_including_narrow_ints_and_float32(tmp_path, dirs):
    source = tmp_path / "visits.parquet"
    pl.DataFrame(
        {
            "hospital": ["H1", "H2", "H1"],
            "person_id": [1, 2, 1],
            "age": pl.Series([30, 40, 31], dtype=pl.UInt8),
            "claim": pl.Series([1.5, 2.5, 3.5], dtype=pl.Float32),
            "visit": [dt.date(2024, 1, 1), dt.date(2024, 1, 2), dt.date(2024, 1, 3)],
            "inpatient": [True, False, True],
        }
    ).write_parquet(source)

    result = run(source, dirs, dataset_id="visits")
    dataset = load_entry(result.catalog_entry, dirs[1])
    check_data(dataset)
    assert dataset.unit_column == "person_id"
    assert dataset.max_rows_per_unit is None
    assert [c.type for c in dataset.columns.values()] == [
        ColumnType.STRING,
        ColumnType.INT,
        ColumnType.INT,
        ColumnType.FLOAT,
        ColumnType.DATE,
        ColumnType.BOOL,
    ]
    assert pl.read_parquet(result.parquet).equals(pl.read_parquet(source))


def test_pq_suffix_is_parquet(tmp_path, dirs):
    source = tmp_path / "small.pq"
    pl.DataFrame({"a_id": ["x"]}).write_parquet(source)
    assert run(source, dirs).rows == 1


def test_ingested_entries_load_as_a_catalog(tmp_path, dirs):
    run(write(tmp_path, "credit.csv", CREDIT_CSV), dirs)
    run(write(tmp_path, "people.csv", "person,age\np1,30\n"), dirs, dataset_id="people")
    assert set(load_catalog(*dirs).datasets) == {"credit", "people"}


def test_awkward_strings_are_quoted_by_a_real_toml_writer(tmp_path, dirs):
    result = run(
        write(tmp_path, "credit.csv", CREDIT_CSV),
        dirs,
        title='Credit "v2"\nwith newline',
        provider="Bureau \\ Office",
    )
    dataset = load_entry(result.catalog_entry, dirs[1])
    assert dataset.title == 'Credit "v2"\nwith newline'
    assert dataset.provider == "Bureau \\ Office"


# --- existing datasets ---------------------------------------------------------------


def test_an_existing_dataset_is_not_replaced_without_force(tmp_path, dirs):
    source = write(tmp_path, "credit.csv", CREDIT_CSV)
    run(source, dirs)
    before = snapshot(*dirs)
    with pytest.raises(IngestError, match="already exists.*--force"):
        run(source, dirs)
    assert snapshot(*dirs) == before


def test_an_orphan_parquet_also_blocks_ingest_without_force(tmp_path, dirs):
    (dirs[1] / "finance").mkdir()
    (dirs[1] / "finance" / "credit.parquet").write_bytes(b"precious")
    before = snapshot(*dirs)
    with pytest.raises(IngestError, match="already exists"):
        run(write(tmp_path, "credit.csv", CREDIT_CSV), dirs)
    assert snapshot(*dirs) == before


def test_force_replaces_the_dataset(tmp_path, dirs):
    run(write(tmp_path, "credit.csv", CREDIT_CSV), dirs)
    result = run(write(tmp_path, "new.csv", "enterprise_id,score\nE9,1\n"), dirs, force=True)
    dataset = load_entry(result.catalog_entry, dirs[1])
    check_data(dataset)
    assert list(dataset.columns) == ["enterprise_id", "score"]
    assert pl.read_parquet(result.parquet).height == 1
    assert sorted(p.name for p in dirs[0].iterdir()) == ["credit.toml"]
    assert sorted(p.name for p in (dirs[1] / "finance").iterdir()) == ["credit.parquet"]


# --- refused inputs leave everything as it was --------------------------------------

BAD_CSV = [
    # (file name, contents, expected message, dataset id)
    ("credit.xlsx", CREDIT_CSV, r"unknown file type '\.xlsx'", "credit"),
    ("ragged.csv", "a_id,b,c\n1,2,3\n4,5,6,7\n", r"line 3: 4 fields, but the header has 3", "credit"),
    ("short.csv", "a_id,b,c\n1,2,3\n4,5\n", r"line 3: 2 fields, but the header has 3", "credit"),
    ("blank.csv", "a_id,b\n1,2\n\n3,4\n", r"line 3: a blank line, but the header has 2", "credit"),
    ("empty.csv", "", r"the file is empty", "credit"),
    ("header.csv", "a_id,b\n", r"no data rows", "credit"),
    ("names.csv", "firm_id,tax paid!\nE1,3\n", r"column 2 'tax paid!' is not a valid column name", "credit"),
    ("noname.csv", "firm_id,\nE1,3\n", r"column 2 '' is not a valid column name", "credit"),
    ("dupes.csv", "firm_id,x,x\nE1,1,2\n", r"column 'x' appears more than once", "credit"),
    ("latin1.csv", "firm_id,name\nE1,Caf\xe9\n".encode("latin-1"), r"not UTF-8", "credit"),
    (
        "stamp.csv",
        "firm_id,seen\nE1,2024-01-05 10:00:00\n",
        r"column 'seen' holds timestamps.*cast it to a date",
        "credit",
    ),
    (
        "late.csv",
        "firm_id,n\n" + "".join(f"E{i},{i}\n" for i in range(10_001)) + "E,1.5\n",
        r"could not parse `1\.5`.*first 10000 rows",
        "credit",
    ),
    ("nounit.csv", "firm_id,n\nE1,1\n,2\n", r"privacy unit column 'firm_id' has 1 empty values", "credit"),
    ("credit.csv", CREDIT_CSV, r"dataset id 'Credit Data' must match", "Credit Data"),
    ("credit.csv", CREDIT_CSV, r"dataset id '\.\./escape' must match", "../escape"),
]


@pytest.mark.parametrize(
    ("name", "text", "message", "dataset_id"), BAD_CSV, ids=[f"{b[0]}/{b[3]}" for b in BAD_CSV]
)
def test_a_bad_input_is_refused_and_changes_nothing(tmp_path, dirs, name, text, message, dataset_id):
    run(write(tmp_path, "other.csv", "x_id\n1\n"), dirs, dataset_id="other")  # something to preserve
    before = snapshot(*dirs)
    with pytest.raises(IngestError, match=message):
        run(write(tmp_path, name, text), dirs, dataset_id=dataset_id)
    assert snapshot(*dirs) == before


def test_a_failed_rename_rolls_back_the_new_parquet(tmp_path, dirs, monkeypatch):
    import dataops.ingest as module

    real_replace = module.os.replace
    calls = []

    def replace_then_fail(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the catalog entry, after the Parquet is in place
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(module.os, "replace", replace_then_fail)
    before = snapshot(*dirs)
    with pytest.raises(IngestError, match="cannot write the dataset.*No space left"):
        run(write(tmp_path, "credit.csv", CREDIT_CSV), dirs)
    assert snapshot(*dirs) == before


def test_ingest_errors_are_load_errors(tmp_path, dirs):
    from dataops.errors import LoadError

    assert issubclass(IngestError, LoadError)


def test_a_bad_input_does_not_leave_a_new_zone_directory(tmp_path, dirs):
    before = snapshot(*dirs)
    with pytest.raises(IngestError):
        run(write(tmp_path, "header.csv", "a_id,b\n"), dirs)  # fails after the zone dir is made
    assert snapshot(*dirs) == before
    assert not (dirs[1] / "finance").exists()


def test_a_bad_zone_is_refused(tmp_path, dirs):
    before = snapshot(*dirs)
    with pytest.raises(IngestError, match="zone 'Finance!' must match"):
        ingest(
            write(tmp_path, "credit.csv", CREDIT_CSV),
            dataset_id="credit",
            zone="Finance!",
            catalog_dir=dirs[0],
            sandbox_dir=dirs[1],
        )
    assert snapshot(*dirs) == before


def test_unsupported_parquet_types_name_the_column(tmp_path, dirs):
    source = tmp_path / "nested.parquet"
    pl.DataFrame({"a_id": ["x"], "tags": [["p", "q"]]}).write_parquet(source)
    before = snapshot(*dirs)
    with pytest.raises(IngestError, match=r"column 'tags' has type List\(String\).*cast it to one of"):
        run(source, dirs)
    assert snapshot(*dirs) == before


def test_a_corrupt_parquet_file_is_refused(tmp_path, dirs):
    before = snapshot(*dirs)
    with pytest.raises(IngestError, match="cannot be read"):
        run(write(tmp_path, "broken.parquet", b"not parquet at all"), dirs)
    assert snapshot(*dirs) == before


def test_a_missing_source_or_unknown_unit_column_is_refused(tmp_path, dirs):
    with pytest.raises(IngestError, match="no such file"):
        run(tmp_path / "missing.csv", dirs)
    with pytest.raises(IngestError, match="privacy unit column 'nope' is not in the file"):
        run(write(tmp_path, "credit.csv", CREDIT_CSV), dirs, unit_column="nope")
    assert snapshot(*dirs) == {str(dirs[0]): None, str(dirs[1]): None}


def test_the_written_entry_is_plain_toml_with_the_expected_keys(tmp_path, dirs):
    result = run(write(tmp_path, "credit.csv", CREDIT_CSV), dirs)
    doc = tomllib.loads(result.catalog_entry.read_text())
    assert doc["privacy_unit"] == {"column": "enterprise_id"}
    assert doc["columns"]["tax_paid"] == {"type": "float", "classification": "unclassified"}
