"""Exact answers as lookups in published, protected tables, over the real server.

The released cells are read from the table the server protected (`TableStore`, inside
the sandbox); the values are checked against a direct polars computation on the raw
data, and what the consumer sees is checked against the released cells only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from functools import partial
from pathlib import Path

import grpc
import polars as pl
import pytest

from conftest import audit_records
from dataops.client import DataopsClientError, count, count_units, mean, total
from dataops.ir import Equals, InSet

CREDIT = "enterprise_credit"
TABLE = "enterprises_by_district_industry_size"
DIMS = ("district", "industry", "size_band")


@pytest.fixture(scope="module")
def raw(sandbox_dir: Path) -> pl.DataFrame:
    return pl.read_parquet(sandbox_dir / "finance/enterprise_credit.parquet")


def protected(server, table_id: str = TABLE):
    """The protected table the server answers from (read inside the sandbox, as the operator can)."""
    return server.tables.index(table_id).protected


def released_cells(server, table_id: str = TABLE) -> dict[tuple, dict]:
    """Cell key (None = margin) -> its released measures; suppressed cells are absent."""
    cells = protected(server, table_id).cells
    dims = list(server.tables.tables[table_id].dimensions)
    out = {}
    for row in cells.filter(pl.col("status") == "released").iter_rows(named=True):
        out[tuple(row[d] for d in dims)] = row
    return out


def refused(attempt) -> DataopsClientError:
    with pytest.raises(DataopsClientError) as err:
        attempt()
    return err.value


QUERIES = [
    dict(group_by=["district", "industry"], filters=[]),
    dict(group_by=["size_band"], filters=[]),
    dict(group_by=["industry"], filters=[InSet("district", ("Dongcheng", "Xicheng", "Nanhu"))]),
    dict(
        group_by=["district"],
        filters=[Equals("size_band", "micro"), InSet("industry", ("Catering", "Logistics"))],
    ),
    dict(group_by=[], filters=[InSet("size_band", ("micro", "small"))]),
    dict(group_by=["district", "industry", "size_band"], filters=[]),
]


@pytest.mark.parametrize("shape", QUERIES, ids=lambda q: "+".join(q["group_by"]) or "total")
def test_lookups_equal_a_polars_computation_over_exactly_the_released_cells(connect, server, raw, shape):
    client = connect("city-bank")
    result = client.query(
        CREDIT,
        aggregates=[count("n"), count_units("units"), total("tax_paid", "tax"), mean("tax_paid", "avg")],
        **shape,
    )
    cells = released_cells(server)
    product = server.tables.tables[TABLE]
    selected = {f.column: ((f.value,) if isinstance(f, Equals) else f.values) for f in shape["filters"]}
    group_by = shape["group_by"]
    grid = list(itertools.product(*(selected.get(d, product.keys_of(d)) for d in group_by)))
    expected = {}
    for key in grid:
        fixed = dict(zip(group_by, key))
        needed = itertools.product(*((fixed[d],) if d in fixed else selected.get(d, (None,)) for d in DIMS))
        if all(cell in cells for cell in needed):  # every cell it needs is released
            where = pl.lit(True)
            for d in DIMS:
                if d in fixed:
                    where &= pl.col(d) == fixed[d]
                elif d in selected:
                    where &= pl.col(d).is_in(list(selected[d]))
            rows = raw.filter(where)
            expected[key] = (
                rows.height,
                rows["enterprise_id"].n_unique(),
                rows["tax_paid"].sum(),
                rows["tax_paid"].mean(),
            )
    got = {tuple(r[: len(group_by)]): r[len(group_by) :] for r in result.frame.iter_rows()}
    assert set(got) == set(expected)
    for key, (n, units, tax, avg) in expected.items():
        assert got[key][0] == n and got[key][1] == units
        assert got[key][2] == pytest.approx(tax) and got[key][3] == pytest.approx(avg)
    assert result.rows_suppressed == len(grid) - len(expected)
    assert result.frame.columns == [*group_by, "n", "units", "tax", "avg"]


def test_a_row_needing_one_suppressed_cell_is_not_returned(connect, server):
    cells = released_cells(server)
    suppressed = protected(server).cells.filter(
        (pl.col("status") != "released") & pl.all_horizontal(pl.col(d).is_not_null() for d in DIMS)
    )
    district, industry, size = suppressed.row(0)[:3]
    client = connect("city-bank")
    alone = client.query(
        CREDIT,
        aggregates=[count("n")],
        filters=[Equals("district", district), Equals("industry", industry), Equals("size_band", size)],
    )
    assert alone.frame.height == 0 and alone.rows_suppressed == 1
    others = tuple(i for i in server.tables.tables[TABLE].keys_of("industry") if (district, i, size) in cells)
    combined = client.query(
        CREDIT,
        aggregates=[count("n")],
        filters=[
            Equals("district", district),
            Equals("size_band", size),
            InSet("industry", (*others, industry)),
        ],
    )
    assert combined.frame.height == 0 and combined.rows_suppressed == 1


def test_an_uncovered_query_is_refused_naming_the_column_and_pointing_to_dp(connect):
    client = connect("city-bank")
    for query, column in [
        (dict(aggregates=[count()], group_by=["year_founded"]), "year_founded"),
        (dict(aggregates=[total("registered_capital")]), "registered_capital"),
        (dict(aggregates=[count()], filters=[Equals("penalties", 0)]), "penalties"),
    ]:
        err = refused(partial(client.query, CREDIT, **query))
        assert (err.code, err.reason, err.rule, err.column) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "POLICY_DENIED",
            "table.coverage",
            column,
        )
        assert "DP mode" in err.message
    # The same question in DP mode is answered.
    assert client.query(CREDIT, aggregates=[count()], group_by=["year_founded"], mode="dp", epsilon=0.5)


def test_a_key_outside_the_public_key_set_is_an_invalid_query(connect):
    err = refused(
        lambda: connect("city-bank").query(
            CREDIT, aggregates=[count()], filters=[Equals("industry", "Astrology")]
        )
    )
    assert (err.code, err.rule, err.column) == (grpc.StatusCode.INVALID_ARGUMENT, "table.key", "industry")


def test_describe_lists_the_tables_the_consumer_may_read(connect):
    description = connect("city-bank").describe(CREDIT)
    assert list(description.grant.tables) == [TABLE]
    (table,) = description.tables
    assert table.id == TABLE and [d.column for d in table.dimensions] == list(DIMS)
    assert "Gaoxin" in table.dimensions[0].keys
    assert [m.name for m in table.measures] == ["count", "count_units", "sum_tax_paid", "mean_tax_paid"]
    assert table.rules.min_units == 10 and table.rules.dominance_n == 2 and table.rules.p_percent == 10.0
    river = connect("river-bank").describe(CREDIT)
    assert [t.id for t in river.tables] == ["enterprises_by_district_size"]


def test_each_protection_is_audited_with_table_data_version_and_fingerprint(tmp_path, sandbox_dir, pki):
    from conftest import write_config
    from dataops.client import Client
    from dataops.server import build_server

    (tmp_path / "work").mkdir()
    config = write_config(tmp_path / "work", sandbox_dir, pki, tables=False)  # protect afresh
    (config.paths.products / "claims_by_demography_diagnosis.toml").unlink()  # the finance tables suffice
    (config.paths.policies / "harbor-insurance.toml").unlink()
    server = build_server(config).start()
    try:
        with Client.from_directory(
            f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank"
        ) as c:
            c.query(CREDIT, aggregates=[count()])
        table = protected(server)
        version = server.sandbox.fingerprints.of(server.sandbox.catalog.get(CREDIT))
    finally:
        server.stop(1.0)
    records = audit_records(config)
    protections = {r["table"]: r for r in records if r["method"] == "ProtectTable"}
    assert set(protections) == {TABLE, "enterprises_by_district_size"}
    assert protections[TABLE]["fingerprint"] == table.fingerprint
    assert protections[TABLE]["data_version"] == version
    assert protections[TABLE]["cells_primary"] == table.report.primary
    run = [r for r in records if r["method"] == "RunQuery"][-1]
    assert (run["table"], run["table_fingerprint"], run["decision"]) == (TABLE, table.fingerprint, "allowed")
    assert run["seq"] > protections[TABLE]["seq"]  # recorded before it was served
    # A restart reads the stored table back: it was protected once, and is recorded once.
    server = build_server(config).start()
    try:
        server.tables.index(TABLE)
    finally:
        server.stop(1.0)
    assert len([r for r in audit_records(config) if r["method"] == "ProtectTable"]) == 2


def test_a_query_waits_for_its_table_and_then_gets_unavailable_with_a_retry_hint(config):
    from dataops.client import Client
    from dataops.server import build_server

    server = build_server(config)
    release = threading.Event()
    real = server.tables.store

    class SlowStore:  # a protection that has not finished yet
        def get(self, *args):
            release.wait(30)
            return real.get(*args)

    server.tables.store = SlowStore()
    server.start()
    try:
        pki_dir = Path(str(config.tls.ca_cert)).parent
        with Client.from_directory(
            f"localhost:{server.port}", pki_dir / "consumers" / "city-bank", "city-bank", timeout=1.5
        ) as client:
            err = refused(lambda: client.query(CREDIT, aggregates=[count()]))
            assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "TABLE_NOT_READY")
            assert int(err.metadata["retry_after_seconds"]) > 0
            # The same hint as a google.rpc.RetryInfo, which stock gRPC retry helpers read.
            assert err.retry_after_seconds == int(err.metadata["retry_after_seconds"])
            release.set()
            assert client.query(CREDIT, aggregates=[count()], timeout=30).frame["count"][0] > 0
    finally:
        release.set()
        server.stop(1.0)


def test_policy_explain_says_which_table_covers_a_query_as_the_server_decides(connect, config, capsys):
    from dataops.cli import main

    client = connect("city-bank")
    cases = [
        (
            ["-g", "district", "-a", "sum:tax_paid"],
            dict(group_by=["district"], aggregates=[total("tax_paid")]),
        ),
        (["-g", "year_founded"], dict(group_by=["year_founded"], aggregates=[count()])),
        (
            ["--eq", "industry=Astrology"],
            dict(filters=[Equals("industry", "Astrology")], aggregates=[count()]),
        ),
        (["-g", "enterprise_id"], dict(group_by=["enterprise_id"], aggregates=[count()])),
    ]
    for argv, query in cases:
        code = main(
            [
                "policy",
                "explain",
                "-c",
                str(config.paths.catalog.parent / "dataops.toml"),
                "--consumer",
                "city-bank",
                CREDIT,
                *argv,
            ]
        )
        out = capsys.readouterr().out
        try:
            client.query(CREDIT, **query)
        except DataopsClientError as exc:
            assert code == 1 and f"by rule {exc.rule!r}" in out, out
        else:
            assert code == 0 and f"answered from table {TABLE!r}" in out, out


def test_tables_show_prints_the_protection_result(server, config, capsys):
    from dataops.cli import main

    assert main(["tables", "show", TABLE, "-c", str(config.paths.catalog.parent / "dataops.toml")]) == 0
    out = capsys.readouterr().out
    report = protected(server).report
    assert f"table {TABLE}" in out and f"primary {report.primary}, secondary {report.secondary}" in out
    assert "audit" in out.lower()
    assert main(["tables", "show", "nope", "-c", str(config.paths.catalog.parent / "dataops.toml")]) != 0


# --- side channels ------------------------------------------------------------------


def _publish_zeros(monkeypatch, server):
    """Control off: empty cells are published as zeros (and not hidden by the engine)."""
    from dataops.engines import table as table_engine

    index = server.tables.index(TABLE)
    cube = index.protected.confidential.cube
    empty = pl.Series(cube.rows == 0)
    cells = index.protected.cells.with_columns(
        *[
            pl.when(empty).then(pl.lit(0, pl.Int64)).otherwise(pl.col(c)).alias(c)
            for c in ("count", "count_units")
        ],
        pl.when(empty).then(pl.lit(0.0)).otherwise(pl.col("sum_tax_paid")).alias("sum_tax_paid"),
        pl.when(empty).then(pl.lit("released")).otherwise(pl.col("status")).alias("status"),
    )
    monkeypatch.setattr(table_engine.TableIndex, "_hide_empty", staticmethod(lambda values, counts: values))
    fresh = table_engine.TableIndex(
        index.product,
        server.sandbox.catalog.get(CREDIT),
        dataclasses.replace(index.protected, cells=cells),
        index.data_version,
    )
    server.tables._indexes[TABLE] = fresh


@pytest.mark.parametrize("control", ["on", "off"])
def test_a_suppressed_cell_and_an_empty_cell_look_the_same_in_every_output(
    connect, server, raw, monkeypatch, control
):
    """Attack: tell a small (suppressed) cell from an empty one, from the rows returned,
    `rows_suppressed`, or the message. Control: empty cells are suppressed like small
    ones (the frequency rule counts zero units) and never returned."""
    truth = raw.group_by(DIMS).agg(pl.len().alias("n"))
    present = {tuple(r[:3]): r[3] for r in truth.iter_rows()}
    product = server.tables.tables[TABLE]
    grid = list(itertools.product(*(product.keys_of(d) for d in DIMS)))
    empty = next(k for k in grid if k not in present)
    small = next(k for k, n in present.items() if 0 < n < 10)
    if control == "off":
        _publish_zeros(monkeypatch, server)
    client = connect("city-bank")
    outputs = {}
    for name, key in (("empty", empty), ("small", small)):
        r = client.query(
            CREDIT,
            aggregates=[count("n"), total("tax_paid")],
            filters=[Equals(d, v) for d, v in zip(DIMS, key)],
        )
        outputs[name] = (r.frame.to_dicts(), r.rows_suppressed, r.frame.schema)
    grouped = client.query(CREDIT, aggregates=[count("n")], group_by=list(DIMS)).frame
    keys = set(grouped.select(DIMS).iter_rows())
    if control == "on":
        assert outputs["empty"] == outputs["small"]
        assert outputs["empty"][:2] == ([], 1)
        assert empty not in keys and small not in keys
    else:  # the empty cell comes back as a zero: it is told apart from the small one
        assert outputs["empty"][0] == [{"n": 0, "sum_tax_paid": 0.0}] and outputs["small"][0] == []
        assert empty in keys


def test_mean_is_answered_only_from_a_released_sum_and_count(connect, server, config):
    """A grant cannot get a sum as MEAN x COUNT unless the table publishes that sum:
    MEAN is covered only by a table holding SUM and COUNT, and computed from them."""
    from dataops.engines.table import cover
    from dataops.ir import Aggregate, Function, Query

    product = server.tables.tables["enterprises_by_district_size"]
    no_sum = dataclasses.replace(
        product, measures=tuple(m for m in product.measures if m.function is not Function.SUM)
    )
    grant = server.policies.current.get("river-bank").grants[CREDIT]
    query = Query(CREDIT, (Aggregate(Function.MEAN, "penalties"),), group_by=("district",))
    assert cover(query, grant, {product.id: product}).table == product.id
    with pytest.raises(Exception) as err:
        cover(query, grant, {product.id: no_sum})
    assert err.value.rule == "table.coverage" and "needs the table's sum and count" in err.value.message
    # Through the server: the mean equals the released sum over the released count.
    result = connect("river-bank").query(
        CREDIT,
        aggregates=[count("n"), total("penalties", "s"), mean("penalties", "m")],
        group_by=["district"],
    )
    for n, s, m in result.frame.select("n", "s", "m").iter_rows():
        assert m == pytest.approx(s / n)


def test_an_exact_answer_reads_no_data(server, monkeypatch):
    """The answer is computed from the index alone: no Parquet is opened per request
    (the latency, flat in the data size, is measured in benchmarks/bench_exact.py)."""
    from dataops.engines._base import Plan
    from dataops.engines.table import cover
    from dataops.ir import Aggregate, Function, Query

    grant = server.policies.current.get("city-bank").grants[CREDIT]
    query = Query(
        CREDIT,
        (Aggregate(Function.COUNT), Aggregate(Function.MEAN, "tax_paid")),
        filters=(InSet("size_band", ("micro", "small")),),
        group_by=("district", "industry"),
    )
    plan = Plan(
        query, server.sandbox.catalog.get(CREDIT), grant, coverage=cover(query, grant, server.tables.tables)
    )
    expected = server.tables.release(plan).table

    def no_reading(*args, **kwargs):
        raise AssertionError("an exact answer read the data")

    for name in ("scan_parquet", "read_parquet"):
        monkeypatch.setattr(pl, name, no_reading)
    assert server.tables.release(plan).table.equals(expected) and expected.num_rows > 0


def test_a_new_data_version_is_protected_and_served_once_ready(tmp_path, sandbox_dir, pki, protected_tables):
    """The tables follow the data: a changed dataset file is a new data version, protected
    in the background (and audited) while the previous version keeps answering."""
    import shutil
    import time

    from conftest import write_config
    from dataops.client import Client
    from dataops.server import build_server

    sandbox = tmp_path / "sandbox"
    shutil.copytree(sandbox_dir, sandbox)
    (tmp_path / "work").mkdir()
    config = write_config(tmp_path / "work", sandbox, pki, tables=protected_tables)
    server = build_server(config)
    server.tables.poll_seconds = 0.2
    server.start()
    try:
        with Client.from_directory(
            f"localhost:{server.port}", pki.consumer_dir("river-bank"), "river-bank"
        ) as client:
            before = client.query(CREDIT, aggregates=[count("n")]).frame["n"][0]
            path = sandbox / "finance" / "enterprise_credit.parquet"
            pl.read_parquet(path).head(before - 100).write_parquet(path)  # the provider's new delivery
            deadline = time.monotonic() + 120
            while client.query(CREDIT, aggregates=[count("n")]).frame["n"][0] == before:
                assert time.monotonic() < deadline, "the new data version was never served"
                time.sleep(0.2)
            assert client.query(CREDIT, aggregates=[count("n")]).frame["n"][0] == before - 100
    finally:
        server.stop(1.0)
    records = audit_records(config)
    # The first version came protected (the session's store); the new one was protected here.
    assert (
        len(
            [
                r
                for r in records
                if r["method"] == "ProtectTable" and r["table"] == "enterprises_by_district_size"
            ]
        )
        == 1
    )
    assert len({r["table_fingerprint"] for r in records if r["method"] == "RunQuery"}) == 2


@contextlib.contextmanager
def served_with_store(config, pki, get):
    """A real server whose table store builds each table with `get(real_get, *args)`
    (the stored table, altered or delayed); yields (server, river-bank's client)."""
    from dataops.client import Client
    from dataops.server import build_server

    server = build_server(config)
    real = server.tables.store

    class Store:
        def directory(self, *args):
            return real.directory(*args)

        def get(self, *args):
            return get(real.get, *args)

    server.tables.store = Store()
    server.start()
    try:
        with Client.from_directory(
            f"localhost:{server.port}", pki.consumer_dir("river-bank"), "river-bank"
        ) as client:
            yield server, client
    finally:
        server.stop(1.0)


@pytest.mark.parametrize("control", ["on", "off"])
def test_a_table_that_fails_its_lp_audit_is_never_served(config, pki, monkeypatch, control):
    """Attack surface: a protection whose audit found a derivable cell. Control: the engine
    refuses to serve any table whose LP audit did not pass (queries get UNAVAILABLE)."""
    from dataops.engines import table as table_engine

    def failed_audit(get, *args):  # the stored table, as if its audit had found a derivable cell
        table = get(*args)
        failed = dataclasses.replace(table.report.audit, passed=False)
        return dataclasses.replace(table, report=dataclasses.replace(table.report, audit=failed))

    if control == "off":  # serve whatever the audit said
        monkeypatch.setattr(table_engine, "audit_passed", lambda protected: True)
    with served_with_store(config, pki, failed_audit) as (_, c):
        if control == "on":
            err = refused(lambda: c.query(CREDIT, aggregates=[count()]))
            assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "TABLE_NOT_READY")
        else:
            assert c.query(CREDIT, aggregates=[count()]).frame.height == 1


def test_describe_lists_a_tables_structural_zeros(connect):
    description = connect("harbor-insurance").describe("medical_claims")
    (table,) = [t for t in description.tables if t.id == "claims_by_demography_diagnosis"]
    assert table.rules.structural_zeros == (
        {"sex": ("M",), "diagnosis_group": ("Pregnancy",)},
        {"age_band": ("0-17", "45-59", "60-74", "75+"), "diagnosis_group": ("Pregnancy",)},
    )


@pytest.mark.parametrize("control", ["on", "off"])
def test_a_query_during_a_long_protection_is_told_to_retry_not_held(config, pki, control):
    """Attack surface: exact queries sent while a large table is being protected (at 100M
    rows, minutes) each hold a worker for as long as they wait. Control: a query waits
    at most [server] table_wait_seconds, then gets UNAVAILABLE TABLE_NOT_READY with a
    retry hint. Off (the old two-minute wait), the same query is held until the build
    ends."""
    wait = 0.2 if control == "on" else 120.0
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, table_wait_seconds=wait))
    building = threading.Event()  # set: the slow build may finish

    def slow_build(get, *args):  # the stored table, as if protecting it took minutes
        building.wait(60)
        return get(*args)

    try:
        with served_with_store(config, pki, slow_build) as (server, c):
            if control == "on":
                err = refused(lambda: c.query(CREDIT, aggregates=[count()]))
                assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "TABLE_NOT_READY")
                assert err.retry_after_seconds == 5 and "retry in 5 seconds" in str(err)
                assert not building.is_set()  # refused while the build was still running
                building.set()
                assert server.tables.wait_ready(timeout=60)
            else:
                threading.Timer(2.0, building.set).start()
            # Once the table is served (or, without the control, after waiting for it) the
            # same query is answered.
            assert c.query(CREDIT, aggregates=[count()]).frame.height == 1
    finally:
        building.set()  # whatever failed: the build thread must not wait out its minute
