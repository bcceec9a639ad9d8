"""Protected tables, attacked: what a consumer holding every released cell can derive.

The attacker here is the tests' own, independent of `dataops.tables.audit`: it reads
only the released cells DataFrame, rebuilds the table's additive relations from the
dimension columns (null = all values), and runs scipy's linprog and an exact
linear-algebra reconstruction over them.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.linalg import null_space
from scipy.optimize import linprog

from dataops._toml import read_toml
from dataops.catalog import load_catalog
from dataops.errors import ProductError
from dataops.products import load_products
from dataops.products.table import load_table_product
from dataops.tables import TableStore, audit_table, protect, summary
from dataops.tables import store as store_module

REPO = Path(__file__).resolve().parent.parent

ENTERPRISES = """
kind = "table"
id = "enterprises"
dataset = "enterprise_credit"
title = "Enterprises and tax paid by district, industry and size"
dimensions = ["district", "industry", "size_band"]
[[measures]]
function = "count"
[[measures]]
function = "sum"
column = "tax_paid"
[[measures]]
function = "mean"
column = "tax_paid"
[rules]
min_units = 5
dominance_n = 2
dominance_percent = 85.0
p_percent = 10.0
"""


def write_product(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def catalog(sandbox_dir):
    return load_catalog(REPO / "catalog", sandbox_dir)


@pytest.fixture(scope="module")
def enterprises(catalog, tmp_path_factory):
    path = write_product(tmp_path_factory.mktemp("products"), "enterprises", ENTERPRISES)
    return load_table_product(read_toml(path, ProductError), path, catalog)


@pytest.fixture(scope="module")
def protected(enterprises, catalog):
    return protect(enterprises, catalog.get("enterprise_credit"), data_version="test")


@pytest.fixture(scope="module")
def unprotected(enterprises, catalog):
    return protect(enterprises, catalog.get("enterprise_credit"), data_version="test", secondary=False)


@pytest.fixture(scope="module")
def data(catalog):
    return pl.read_parquet(catalog.get("enterprise_credit").path)


# -- the independent attacker ------------------------------------------------------


def relations(cells: pl.DataFrame, dims: tuple[str, ...]) -> list[tuple[int, list[int]]]:
    """(parent row, child rows) for every sub-total of the released table, from its
    dimension columns alone."""
    keys = [tuple(r) for r in cells.select(dims).iter_rows()]
    index = {k: i for i, k in enumerate(keys)}
    out = []
    for i, key in enumerate(keys):
        for j, value in enumerate(key):
            if value is None:
                children = [
                    index[k]
                    for k in keys
                    if k[j] is not None and all(k[x] == key[x] for x in range(len(dims)) if x != j)
                ]
                out.append((i, children))
    return out


def attacker_system(cells: pl.DataFrame, dims, measure: str, unit: float = 1.0):
    """A x = b over the suppressed cells of `measure` (in `unit`s, so the LP is well
    scaled), released cells as constants."""
    values = cells[measure].to_numpy() / unit
    hidden = np.flatnonzero(cells[measure].is_null().to_numpy())
    position = {c: p for p, c in enumerate(hidden)}
    rows, b = [], []
    for parent, children in relations(cells, dims):
        coef = np.zeros(len(hidden))
        rhs = 0.0
        for cell, sign in [(parent, -1.0)] + [(c, 1.0) for c in children]:
            if cell in position:
                coef[position[cell]] += sign
            else:
                rhs -= sign * values[cell]
        if coef.any():
            rows.append(coef)
            b.append(rhs)
    return hidden, np.array(rows), np.array(b)


def attacker_interval(A, b, i, upper_per_var=None):
    n = A.shape[1]
    bounds = [(0, upper_per_var)] * n
    c = np.zeros(n)
    c[i] = 1
    lo = linprog(c, A_eq=A, b_eq=b, bounds=bounds, method="highs")
    hi = linprog(-c, A_eq=A, b_eq=b, bounds=bounds, method="highs")
    assert lo.status == 0
    return lo.fun, (-hi.fun if hi.status == 0 else np.inf)


def truth(data: pl.DataFrame, cell: dict) -> tuple[int, float]:
    selected = (
        data.filter(*[pl.col(d) == v for d, v in cell.items() if v is not None])
        if any(v is not None for v in cell.values())
        else data
    )
    return selected.height, float(selected["tax_paid"].sum())


# -- the tests -----------------------------------------------------------------------


def test_released_cells_equal_a_direct_group_by(protected, data, enterprises):
    cells = protected.cells
    dims = enterprises.dimensions
    assert cells.height == 11 * 11 * 5  # every cell and every sub-total, empty ones too
    for kept in itertools.chain.from_iterable(itertools.combinations(dims, r) for r in range(4)):
        margin = [d for d in dims if d not in kept]
        direct = (
            data.group_by(list(kept)).agg(
                pl.len().alias("direct_count"), pl.col("tax_paid").sum().alias("direct_sum")
            )
            if kept
            else data.select(pl.len().alias("direct_count"), pl.col("tax_paid").sum().alias("direct_sum"))
        )
        level = cells.filter(
            *[pl.col(d).is_null() for d in margin],
            *[pl.col(d).is_not_null() for d in kept],
            pl.col("status") == "released",
        )
        joined = level.join(direct, on=list(kept), how="left") if kept else level.join(direct, how="cross")
        assert joined["count"].to_list() == joined["direct_count"].to_list()
        assert np.allclose(joined["sum_tax_paid"], joined["direct_sum"], rtol=1e-9)
        assert np.allclose(joined["mean_tax_paid"], joined["direct_sum"] / joined["direct_count"])
    assert (cells.filter(pl.col("status") == "released")["count"] >= 5).all()


def test_empty_and_small_cells_look_the_same(protected, data):
    cells = protected.cells
    base = cells.filter(pl.all_horizontal(pl.col(["district", "industry", "size_band"]).is_not_null()))
    counts = data.group_by("district", "industry", "size_band").len()
    joined = base.join(counts, on=["district", "industry", "size_band"], how="left")
    empty = joined.filter(pl.col("len").is_null())
    small = joined.filter(pl.col("len").is_between(1, 2))
    assert empty.height and small.height
    measures = ["count", "sum_tax_paid", "mean_tax_paid"]
    for frame in (empty, small):
        assert frame.select(pl.col(measures).is_null().all()).row(0) == (True, True, True)
        assert set(frame["status"]) == {"primary"}


def test_without_secondary_suppression_the_audit_fails_and_differencing_recovers_a_cell(
    unprotected, data, enterprises
):
    verdict = audit_table(unprotected)
    assert not verdict.passed and not unprotected.report.audit.passed
    cells = unprotected.cells
    dims = enterprises.dimensions
    counts = cells["count"].to_list()
    sums = cells["sum_tax_paid"].to_list()
    recovered = 0
    for parent, children in relations(cells, dims):
        hidden = [c for c in children if counts[c] is None]
        if counts[parent] is None or len(hidden) != 1:
            continue
        cell = dict(zip(dims, cells.row(hidden[0])[: len(dims)]))
        count = counts[parent] - sum(counts[c] for c in children if c != hidden[0])
        tax = sums[parent] - sum(sums[c] for c in children if c != hidden[0])
        true_count, true_tax = truth(data, cell)
        assert count == true_count and tax == pytest.approx(true_tax, rel=1e-9, abs=1e-6)
        recovered += 1
    assert recovered > 10  # margin minus cells gives suppressed cells away, exactly


def test_with_secondary_suppression_no_cell_is_derivable(protected, enterprises, data):
    assert protected.report.audit.passed and audit_table(protected).passed
    cells = protected.cells
    dims = enterprises.dimensions
    # No lonely suppressed cell in any relation: differencing has nothing to subtract.
    status = cells["status"].to_list()
    for parent, children in relations(cells, dims):
        assert sum(status[c] != "released" for c in [parent, *children]) != 1
    for measure, per_row in (("count", 1.0), ("sum_tax_paid", 5e7)):
        hidden, A, b = attacker_system(cells, dims, measure, per_row)
        # Linear reconstruction: a cell is determined by the released marginals iff its
        # unit vector lies in the row space, i.e. the null space has no zero there.
        N = null_space(A)
        assert (np.abs(N).max(axis=1) > 1e-9).all(), f"{measure}: some cell is determined"
        # Bounded LP reconstruction over a sample of cells: never an exact value.
        rng = np.random.default_rng(1)
        for i in rng.choice(len(hidden), min(25, len(hidden)), replace=False):
            lo, hi = attacker_interval(A, b, i)
            assert (hi - lo) * per_row >= 1.0, (measure, hidden[i], lo, hi)


def test_no_single_enterprise_is_recovered(protected, enterprises, data):
    cells = protected.cells
    single = [
        i
        for i, row in enumerate(cells.select(enterprises.dimensions).iter_rows())
        if truth(data, dict(zip(enterprises.dimensions, row)))[0] == 1
    ]
    assert single
    hidden, A, b = attacker_system(cells, enterprises.dimensions, "sum_tax_paid", 1e6)
    position = {c: p for p, c in enumerate(hidden)}
    for cell in single:
        assert cell in position  # a one-enterprise cell is never released
        lo, hi = attacker_interval(A, b, position[cell])
        assert (hi - lo) * 1e6 > 1.0


def dominated_cell(cells: pl.DataFrame):
    return cells.with_row_index("i").filter(
        pl.col("district") == "Binhai", pl.col("industry") == "Finance", pl.col("size_band").is_null()
    )


def test_dominance_cannot_be_undone_through_margins(protected, unprotected, enterprises, data):
    binhai_finance = data.filter(pl.col("district") == "Binhai", pl.col("industry") == "Finance")
    top2 = binhai_finance["tax_paid"].top_k(2).sum()
    total = binhai_finance["tax_paid"].sum()
    assert top2 > 0.85 * total  # two groups hold nearly all of the cell
    for table in (protected, unprotected):
        row = dominated_cell(table.cells)
        assert row["status"].item() == "primary" and row["sum_tax_paid"].item() is None
    # Without secondary suppression the district's margin minus its other industries
    # gives the dominated total away exactly.
    cells = unprotected.cells
    district = cells.filter(pl.col("district") == "Binhai", pl.col("size_band").is_null())
    margin = district.filter(pl.col("industry").is_null())["sum_tax_paid"].item()
    others = district.filter(pl.col("industry").is_not_null(), pl.col("industry") != "Finance")
    if margin is not None and others["sum_tax_paid"].null_count() == 0:
        assert margin - others["sum_tax_paid"].sum() == pytest.approx(total, rel=1e-9)
    else:  # the attacker LP pins it anyway
        hidden, A, b = attacker_system(cells, enterprises.dimensions, "sum_tax_paid", 1e6)
        i = list(hidden).index(dominated_cell(cells)["i"].item())
        lo, hi = attacker_interval(A, b, i)
        assert (hi - lo) * 1e6 < 0.01 * total
    # With it, the attacker's interval is wide enough that the two groups' share
    # cannot be seen to exceed 85%: sdcTable's protection level both ways.
    hidden, A, b = attacker_system(protected.cells, enterprises.dimensions, "sum_tax_paid", 1e6)
    i = list(hidden).index(dominated_cell(protected.cells)["i"].item())
    lo, hi = attacker_interval(A, b, i)
    lo, hi = lo * 1e6, hi * 1e6
    level = 100 / 85 * top2 - total
    assert hi >= total + level - 1e-3 * total and lo <= max(0.0, total - level) + 1e-3 * total


def test_group_attribute_rule_hides_a_homogeneous_groups_category(tmp_path):
    """In district "Hexi" 90% of patients have the same diagnosis: released, its cell
    beside the district total says so of nearly everyone there."""
    rng = np.random.default_rng(7)
    rows = []
    for i, district in enumerate(["North", "South", "Hexi"]):
        for p in range(60):
            diagnosis = rng.choice(["Mental", "Injury", "Other"])
            if district == "Hexi":  # 54 of 60: 90%
                diagnosis = "Injury" if p < 3 else "Other" if p < 6 else "Mental"
            rows.append((f"P{i}{p:03d}", district, str(diagnosis), float(rng.uniform(100, 900))))
    frame = pl.DataFrame(rows, schema=["person_id", "district", "diagnosis", "amount"], orient="row")
    sandbox = tmp_path / "sandbox"
    (sandbox / "x").mkdir(parents=True)
    frame.write_parquet(sandbox / "x" / "visits.parquet")
    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "visits.toml").write_text("""
id = "visits"
zone = "insurance"
title = "Visits"
provider = "test"
location = "x/visits.parquet"
[privacy_unit]
column = "person_id"
max_rows = 1
[budget]
epsilon = 1.0
[columns.person_id]
type = "string"
classification = "identifier"
[columns.district]
type = "string"
classification = "public"
keys = ["North", "South", "Hexi"]
[columns.diagnosis]
type = "string"
classification = "sensitive"
keys = ["Mental", "Injury", "Other"]
[columns.amount]
type = "float"
classification = "sensitive"
bounds = [0.0, 1000.0]
""")
    catalog = load_catalog(tmp_path / "catalog", sandbox)
    path = write_product(
        tmp_path / "products",
        "by_diagnosis",
        """
kind = "table"
id = "by_diagnosis"
dataset = "visits"
title = "Visits by district and diagnosis"
dimensions = ["district", "diagnosis"]
[[measures]]
function = "count"
[rules]
min_units = 3
sensitive_dimensions = ["diagnosis"]
group_attribute_percent = 90.0
""",
    )
    product = load_table_product(read_toml(path, ProductError), path, catalog)
    dataset = catalog.get("visits")

    def hexi(table):
        c = table.cells.filter(pl.col("district") == "Hexi")
        return (
            c.filter(pl.col("diagnosis") == "Mental")["count"].item(),
            c.filter(pl.col("diagnosis").is_null())["count"].item(),
        )

    off = protect(product, dataset, group_attribute=False)
    mental, everyone = hexi(off)
    assert everyone == 60 and mental == 54  # disclosed: 90% of Hexi have a mental diagnosis
    assert off.report.audit.passed  # no other rule objects

    on = protect(product, dataset)
    assert on.report.audit.passed and on.report.primary_by_rule["group_attribute"] >= 1
    mental, everyone = hexi(on)
    assert mental is None
    hidden, A, b = attacker_system(on.cells, product.dimensions, "count")
    row = on.cells.with_row_index("i").filter(pl.col("district") == "Hexi", pl.col("diagnosis") == "Mental")
    lo, _ = attacker_interval(A, b, list(hidden).index(row["i"].item()))
    total = everyone if everyone is not None else 60
    assert lo < 0.9 * total  # the attacker cannot tell that 90% of Hexi share it


def test_units_spanning_cells_are_counted_once_per_margin(catalog):
    claims = catalog.get("medical_claims")
    data = pl.read_parquet(claims.path)
    from dataops.tables.cube import build_cube

    path = Path("claims_small.toml")
    doc_text = """
kind = "table"
id = "claims_small"
dataset = "medical_claims"
title = "Claims by visit type"
dimensions = ["visit_type"]
[[measures]]
function = "count"
[rules]
min_units = 5
"""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = write_product(Path(d), "claims_small", doc_text)
        product = load_table_product(read_toml(path, ProductError), path, catalog)
        cube = build_cube(product, claims, pl.scan_parquet(claims.path))
    persons = data["person_id"].n_unique()
    assert cube.units[-1] == persons  # the margin: every person once
    assert cube.units[:-1].sum() > persons  # the cells: a person with two visit types twice
    assert list(cube.units[:-1]) == [
        data.filter(pl.col("visit_type") == v)["person_id"].n_unique() for v in product.keys[0]
    ]


@pytest.mark.parametrize(
    "rows_per_bucket, spill",
    [(None, False), (30_000, False), (30_000, True)],
    ids=["one-piece", "bucketed", "spilled"],
)
def test_cube_equals_direct_polars_in_every_cell_of_every_margin(catalog, rows_per_bucket, spill, tmp_path):
    """The cube's reduction (units as dense codes, one packed integer key per grouping) is
    held to a direct polars group-by per margin on the raw rows, with string unit ids:
    five dimensions, a person's claims spanning cells, every one of the 2^5 margins.
    Bucketed, the 100k rows are reduced in 4 pieces by unit and merged: the same cube,
    whether each piece is a filtered scan or split out to disk first (and removed after)."""
    from dataops.tables.cube import build_cube

    claims = catalog.get("medical_claims")
    dims = ["age_band", "sex", "district", "diagnosis_group", "visit_type"]
    doc_text = f"""
kind = "table"
id = "claims_five"
dataset = "medical_claims"
title = "Claims by five dimensions"
dimensions = {dims!r}
[[measures]]
function = "count"
[[measures]]
function = "sum"
column = "amount"
[rules]
min_units = 5
dominance_n = 3
dominance_percent = 85.0
""".replace("'", '"')
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = write_product(Path(d), "claims_five", doc_text)
        product = load_table_product(read_toml(path, ProductError), path, catalog)
    kwargs: dict = {} if rows_per_bucket is None else {"rows_per_bucket": rows_per_bucket}
    if spill:
        kwargs["scratch"] = tmp_path / "scratch"
    # The dataset's own file (no source given): the one a spilled build splits.
    cube = build_cube(product, claims, **kwargs)
    if spill:
        assert (tmp_path / "scratch").is_dir() and not list((tmp_path / "scratch").iterdir())
    data = pl.read_parquet(claims.path).with_columns(pl.col("amount").fill_null(0.0))
    codes = [
        pl.col(name).replace_strict(list(keys), list(range(len(keys))), default=None).alias(f"c{j}")
        for j, (name, keys) in enumerate(zip(dims, product.keys))
    ]
    coded = data.select("person_id", "amount", *codes)
    inside = coded.filter(pl.all_horizontal([pl.col(f"c{j}").is_not_null() for j in range(len(dims))]))
    assert cube.rows_outside == coded.height - inside.height
    per_unit = inside.group_by(["person_id", *[f"c{j}" for j in range(len(dims))]]).len()
    assert per_unit["person_id"].n_unique() < per_unit.height  # units do span cells
    shape = cube.shape
    rows = np.zeros(cube.n_cells, np.int64)
    units = np.zeros(cube.n_cells, np.int64)
    sums = np.zeros(cube.n_cells)
    top = np.zeros((cube.n_cells, 3))
    for r in range(len(dims) + 1):
        for kept in itertools.combinations(range(len(dims)), r):
            keys = [f"c{j}" for j in kept]
            margin = [pl.lit(shape[j] - 1).alias(f"c{j}") for j in range(len(dims)) if j not in kept]
            unit_totals = inside.group_by([*keys, "person_id"]).agg(
                pl.len().alias("n"), pl.col("amount").sum()
            )
            grouped = (unit_totals.group_by(keys) if keys else unit_totals.group_by(pl.lit(0))).agg(
                pl.col("n").sum(),
                pl.len().alias("units"),
                pl.col("amount").sum(),
                pl.col("amount").top_k(3).alias("top"),
            )
            grouped = grouped.with_columns(*margin)
            at = np.ravel_multi_index(tuple(grouped[f"c{j}"].to_numpy() for j in range(len(dims))), shape)
            rows[at] = grouped["n"].to_numpy()
            units[at] = grouped["units"].to_numpy()
            sums[at] = grouped["amount"].to_numpy()
            for i, values in zip(at, grouped["top"].to_list(), strict=True):
                top[i, : len(values)] = sorted(values, reverse=True)
    assert np.array_equal(cube.rows, rows) and np.array_equal(cube.units, units)
    assert cube.units[-1] == data["person_id"].n_unique()
    # Float sums are equal up to the order of addition, which neither side fixes.
    assert np.allclose(cube.sums["amount"], sums, rtol=1e-12, atol=1e-9)
    assert np.allclose(cube.top["amount"], top, rtol=1e-12, atol=1e-9)
    assert cube.top["amount"][:, 0].max() > 0
    # Largest first, as primary suppression reads them (the p% rule's x1 and x2).
    assert (np.diff(cube.top["amount"], axis=1) <= 0).all()


def test_store_builds_once_per_data_version_and_reads_back(enterprises, catalog, tmp_path):
    dataset = catalog.get("enterprise_credit")
    store = TableStore(tmp_path / "state")
    first = store.get(enterprises, dataset, "v1")
    assert store.get(enterprises, dataset, "v1") is first
    store_module._SHARED.clear()  # as in a new process: read back from disk
    again = TableStore(tmp_path / "state").get(enterprises, dataset, "v1")
    assert again.fingerprint == first.fingerprint and again.cells.equals(first.cells)
    assert audit_table(again).passed
    assert "LP audit passed" in summary(again) and "secondary" in summary(again)
    assert len(list((tmp_path / "state" / "tables" / "enterprises").iterdir())) == 1
    # A fresh state directory in the same process reuses the build (same spec, same
    # data version) and stores it there too; another data version is a new build.
    other = TableStore(tmp_path / "other")
    assert other.get(enterprises, dataset, "v1") is again
    assert (tmp_path / "other" / "tables" / "enterprises").is_dir()
    v2 = other.get(enterprises, dataset, "v2")
    assert v2 is not again and v2.data_version == "v2"


BAD = [
    ('dimensions = ["enterprise_id"]', "dimensions[0]", "identifier"),
    ('dimensions = ["year_founded", "si_headcount"]', "dimensions[1]", "neither a public key set nor bins"),
    ('dimensions = ["nope"]', "dimensions[0]", "not a column"),
]


@pytest.mark.parametrize("line, key, words", BAD)
def test_validation_names_file_and_key(catalog, tmp_path, line, key, words):
    text = ENTERPRISES.replace('dimensions = ["district", "industry", "size_band"]', line)
    path = write_product(tmp_path, "enterprises", text)
    with pytest.raises(ProductError) as err:
        load_table_product(read_toml(path, ProductError), path, catalog)
    assert str(path) in str(err.value) and key in str(err.value) and words in str(err.value)


@pytest.mark.parametrize(
    "old, new, key, words",
    [
        (
            'column = "tax_paid"\n[[measures]]',
            'column = "name"\n[[measures]]',
            "measures[1].column",
            "identifier",
        ),
        ('id = "enterprises"', 'id = "other"', "id", "file name stem"),
        ("min_units = 5", "min_units = 2", "rules.min_units", ">= 3"),
        ("p_percent = 10.0", "p_percent = 10.0\nk_percent = 3", "rules.k_percent", "unknown key"),
        ('dataset = "enterprise_credit"', 'dataset = "medical_claims"\n', "dimensions[1]", "not a column"),
    ],
)
def test_validation_errors(catalog, tmp_path, old, new, key, words):
    path = write_product(tmp_path, "enterprises", ENTERPRISES.replace(old, new, 1))
    with pytest.raises(ProductError) as err:
        load_table_product(read_toml(path, ProductError), path, catalog)
    assert str(path) in str(err.value) and key in str(err.value) and words in str(err.value), err.value


def test_count_units_refused_where_units_span_cells(catalog, tmp_path):
    path = write_product(
        tmp_path,
        "claims",
        """
kind = "table"
id = "claims"
dataset = "medical_claims"
title = "Claims"
dimensions = ["visit_type"]
[[measures]]
function = "count_units"
[rules]
min_units = 5
""",
    )
    with pytest.raises(ProductError, match=r"measures\[0\].function: count_units is not additive"):
        load_table_product(read_toml(path, ProductError), path, catalog)


def test_products_loader_dispatches_table_files(catalog, tmp_path):
    write_product(tmp_path, "enterprises", ENTERPRISES)
    products = load_products(tmp_path, catalog)
    assert list(products.tables) == ["enterprises"]
    assert products.tables["enterprises"].keys_of("size_band") == ("micro", "small", "medium", "large")


def test_the_audit_checks_hypercube_witnesses_and_a_false_one_proves_nothing(protected, unprotected):
    """Secondary suppression hands the LP audit its hypercubes as candidate witnesses.
    The audit must check each against every constraint: a forged "cube" that moves a
    primary cell alone (its released margins unchanged) must not make a failing
    pattern pass, while the real cubes of the protected table prove it."""
    from dataops.tables.audit import lp_audit
    from dataops.tables.hypercube import Cubes

    c = unprotected.confidential
    relations = c.cube.relations()
    primary = np.flatnonzero(c.suppressed)
    corners = 2 ** len(c.cube.shape)
    forged = Cubes(np.repeat(primary[:, None], corners, axis=1), np.ones((len(primary), corners)))
    assert not lp_audit(c.requirements, relations, c.suppressed).passed
    assert not lp_audit(c.requirements, relations, c.suppressed, hints=forged).passed

    real = protected.confidential
    assert real.cubes is not None and len(real.cubes.cells)
    assert lp_audit(real.requirements, real.cube.relations(), real.suppressed, hints=real.cubes).passed


def test_cubes_through_one_dimensional_margins_still_pass_the_audit(enterprises, catalog, monkeypatch):
    """The switch for sparse five-dimensional tables (off for the published ones): cubes
    through one-dimensional margins for what lower cubes leave open. Whatever it
    suppresses, the pattern released must be one the LP audit proves."""
    import dataops.tables.secondary as secondary

    monkeypatch.setattr(secondary, "THROUGH_MARGINS", True)
    table = protect(enterprises, catalog.get("enterprise_credit"), data_version="test")
    assert table.report.audit.passed and audit_table(table).passed
    assert table.report.secondary > 0


@pytest.mark.parametrize(
    "edges",
    [
        (1950.0, 1990.0, 2027.0),  # the catalog's kind: whole years
        (0.0, 1e5, 1e6, 1e7),  # past six digits, where a `:g` label read "1e+06"
        (1234567.0, 1234568.0, 1234569.0),  # seven significant digits: `:g` gave one label for all
        (0.5, 0.25, 1e-7),  # fractions, in full
    ],
)
def test_a_tables_bin_labels_are_exact_distinct_and_the_dp_engines(catalog, tmp_path, edges):
    """One spelling of a bin in every answer: a protected table's cell key and a DP
    release's group are the same string, and two bins never share one."""
    from dataclasses import replace

    from dataops.catalog import Catalog
    from dataops.engines.dp import _dimension

    dataset = catalog.get("enterprise_credit")
    column = replace(dataset.columns["year_founded"], bins=tuple(sorted(edges)))
    binned = replace(dataset, columns={**dataset.columns, "year_founded": column})
    text = ENTERPRISES.replace('["district", "industry", "size_band"]', '["year_founded", "size_band"]')
    path = write_product(tmp_path, "enterprises", text)
    product = load_table_product(
        read_toml(path, ProductError), path, Catalog({**catalog.datasets, binned.id: binned})
    )
    labels = product.keys_of("year_founded")
    assert labels == _dimension(binned, "year_founded").key_set
    assert len(set(labels)) == len(labels) == len(edges) - 1
    for label, (low, high) in zip(labels, itertools.pairwise(sorted(edges)), strict=True):
        bounds = [float(x) for x in label.strip("[)").split(", ")]
        assert bounds == [low, high]  # the label names its edges exactly
