"""Serving copies built out of core: buckets by unit, the bound per bucket, a capped child.

The copy is built by `dataops.engines.build` in a child process under an address-space
cap; a build that fails leaves the server serving exact answers, and DP queries get
UNAVAILABLE with a google.rpc.RetryInfo, as they do while a copy is being built.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import grpc
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from dataops.catalog import Classification, Column, ColumnType, Dataset
from dataops.client import DataopsClientError, count
from dataops.engines import build
from dataops.engines.dp import UNIT_CODE, fixed_column, prepared_column_names
from dataops.engines.prepared import PreparedStore
from dataops.errors import CopyUnavailable
from test_dp_engine import crafted, value

K = 3  # the crafted dataset's rows per unit


@pytest.fixture
def crowd(tmp_path: Path) -> Dataset:
    """60 units with 1..8 rows each, shuffled; `seq` numbers the rows in file order."""
    rng = np.random.default_rng(5)
    uids = np.repeat([f"u{i:03d}" for i in range(60)], rng.integers(1, 9, 60))
    rng.shuffle(uids)
    frame = pl.DataFrame({"uid": uids, "seq": np.arange(len(uids)), "x": rng.uniform(0, 10, len(uids))})
    columns = {
        "seq": Column("seq", ColumnType.INT, Classification.PUBLIC),
        "x": value("x", 0.0, 10.0),
    }
    dataset = crafted(tmp_path, frame, columns, max_rows=K)
    frame.write_parquet(dataset.path, row_group_size=50)  # several row groups: several batches
    return dataset


def first_k(dataset: Dataset) -> pl.DataFrame:
    """What the bound keeps: each unit's first K rows in file order."""
    return pl.read_parquet(dataset.path).filter(pl.int_range(pl.len()).over("uid") < K)


def request(dataset: Dataset, out: Path, rows_per_bucket: int) -> dict:
    return {
        "source": str(dataset.path),
        "output": str(out / "copy"),
        "scratch": str(out / "buckets"),
        "unit": "uid",
        "columns": prepared_column_names(dataset),
        "max_rows_per_unit": K,
        "memory_limit_bytes": 0,
        "rows_per_bucket": rows_per_bucket,
    }


def test_a_unit_never_spans_buckets_and_keeps_its_file_order(
    crowd: Dataset, tmp_path: Path, monkeypatch
) -> None:
    # Batches of 30 rows and a flush every 60: each bucket is several files, in order.
    monkeypatch.setattr(build, "BATCH_ROWS", 30)
    monkeypatch.setattr(build, "flush_rows", lambda buckets: 60)
    files = build.partition(crowd.path, "uid", ["seq", "x"], 7, tmp_path / "b", seed=11)
    assert len(files) == 7 and max(len(parts) for parts in files) > 2
    buckets = [pl.read_parquet(parts) for parts in files]
    assert sum(b.height for b in buckets) == pl.read_parquet(crowd.path).height
    owners: dict[str, int] = {}
    for index, bucket in enumerate(buckets):
        for uid in bucket["uid"].unique():
            assert owners.setdefault(uid, index) == index, f"{uid} is in buckets {owners[uid]} and {index}"
        # File order inside the bucket, so "a unit's first k rows" means what it did.
        assert bucket["seq"].is_sorted()
    assert len(owners) == 60


def test_the_row_bound_is_enforced_bucket_by_bucket(crowd: Dataset, tmp_path: Path) -> None:
    # Many buckets for 270 rows, and parts of at least 100 rows: several parts.
    store = PreparedStore(tmp_path / "state", rows_per_bucket=40, part_rows=100)
    source = store.source(crowd)
    assert store.last_build["buckets"] > 3
    assert len(source.parts) == store.last_build["parts"] > 1
    copy = source.scan().collect()
    expected = first_k(crowd)
    # Exactly the rows the in-plan truncation keeps, and no column but the usable ones.
    assert sorted(copy["seq"]) == sorted(expected["seq"]) and set(copy.columns) == {
        UNIT_CODE,
        "seq",
        "x",
        fixed_column("x"),
    }
    assert copy.group_by(UNIT_CODE).len()["len"].max() == K
    # Dense codes over the whole copy, one per unit.
    codes = (
        expected.join(copy.select("seq", UNIT_CODE), on="seq").group_by("uid").agg(pl.col(UNIT_CODE).unique())
    )
    assert codes[UNIT_CODE].list.len().max() == 1
    assert sorted(codes[UNIT_CODE].list.first()) == list(range(60))
    # Each bucket is its own row groups, and no code is in two of them; a part holds
    # whole buckets, and the parts' codes ascend with their names.
    seen: set[int] = set()
    top = -1
    for part in source.parts:
        parquet = pq.ParquetFile(part)
        part_codes: set[int] = set()
        for group in range(parquet.num_row_groups):
            group_codes = set(parquet.read_row_group(group, columns=[UNIT_CODE]).column(0).to_pylist())
            assert not group_codes & seen
            seen |= group_codes
            part_codes |= group_codes
        assert min(part_codes) > top
        top = max(part_codes)
    assert seen == set(range(60))


def test_switched_off_buckets_by_row_let_a_unit_past_its_bound(
    crowd: Dataset, tmp_path: Path, monkeypatch
) -> None:
    """The control off: rows dealt to buckets by position, not by unit. Each bucket still
    bounds its units to K rows, but a unit spread over buckets keeps K in each, under
    several codes: its contribution is no longer bounded by K."""
    (tmp_path / "on").mkdir()
    build.build(request(crowd, tmp_path / "on", rows_per_bucket=40))
    on = pl.read_parquet(tmp_path / "on" / "copy" / "*.parquet").join(pl.read_parquet(crowd.path), on="seq")
    assert on.group_by("uid").len()["len"].max() == K

    monkeypatch.setattr(build, "buckets_of", lambda units, seed, buckets: np.arange(len(units)) % buckets)
    (tmp_path / "off").mkdir()
    build.build(request(crowd, tmp_path / "off", rows_per_bucket=40))
    off = pl.read_parquet(tmp_path / "off" / "copy" / "*.parquet").join(pl.read_parquet(crowd.path), on="seq")
    assert off.group_by("uid").len()["len"].max() > K


def test_the_build_child_runs_under_its_memory_cap(crowd: Dataset, tmp_path: Path) -> None:
    cap = 64 * 2**20  # below what polars alone allocates: the child cannot even start its work
    capped = PreparedStore(tmp_path / "state", memory_limit_bytes=cap)
    with pytest.raises(CopyUnavailable) as refused:
        capped.source(crowd)
    assert refused.value.reason == "DP_COPY_FAILED" and refused.value.retry_after_seconds >= 1
    assert list((tmp_path / "state" / "prepared").iterdir()) == []  # nothing half-built is left
    # Asked again within the back-off: refused at once, no second build.
    with pytest.raises(CopyUnavailable):
        capped.source(crowd, wait=0)
    # The cap switched off: the same build succeeds, and its peak RSS passes the cap.
    uncapped = PreparedStore(tmp_path / "state", memory_limit_bytes=0)
    assert uncapped.source(crowd).path.exists()
    assert uncapped.last_build["peak_rss_bytes"] > cap


def test_a_flush_holds_enough_rows_that_each_buckets_file_is_not_tiny() -> None:
    assert build.flush_rows(1) == build.FLUSH_ROWS  # small data: as before
    assert build.flush_rows(750) // 750 >= build.FLUSH_ROWS_PER_BUCKET  # 1.5 billion rows
    assert build.flush_rows(4096) == build.MAX_FLUSH_ROWS  # held rows stay bounded


def test_a_build_in_progress_answers_unavailable_at_once(crowd: Dataset, tmp_path: Path, monkeypatch) -> None:
    release = threading.Event()
    original = PreparedStore._run_build

    def held(self, request):
        release.wait(60)
        return original(self, request)

    monkeypatch.setattr(PreparedStore, "_run_build", held)
    store = PreparedStore(tmp_path / "state", wait_seconds=0.1)
    with pytest.raises(CopyUnavailable) as refused:
        store.source(crowd)
    assert refused.value.reason == "DP_COPY_NOT_READY" and refused.value.retry_after_seconds > 0
    release.set()
    assert store.source(crowd, wait=60).path.exists()


# --- over the real server -----------------------------------------------------------------


def dp_count(client):
    return client.query("medical_claims", aggregates=[count()], group_by=["age_band"], mode="dp", epsilon=0.5)


def exact_count(client):
    return client.query("enterprise_credit", aggregates=[count("n")], group_by=["size_band"])


def refused(attempt) -> DataopsClientError:
    with pytest.raises(DataopsClientError) as err:
        attempt()
    return err.value


def test_while_copies_build_dp_is_unavailable_with_a_retry_hint_and_exact_answers_go_on(
    config, pki, monkeypatch
) -> None:
    from dataops.client import Client
    from dataops.server import build_server

    release = threading.Event()
    original = PreparedStore._run_build

    def held(self, request):
        release.wait(120)
        return original(self, request)

    monkeypatch.setattr(PreparedStore, "_run_build", held)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, copy_wait_seconds=0.2))
    server = build_server(config).start()
    try:
        client = Client.from_directory(
            f"localhost:{server.port}", pki.consumer_dir("harbor-insurance"), "harbor-insurance"
        )
        bank = Client.from_directory(f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank")
        err = refused(lambda: dp_count(client))
        assert err.code is grpc.StatusCode.UNAVAILABLE and err.reason == "DP_COPY_NOT_READY"
        assert err.rule == "dp.copy_building" and err.retry_after_seconds and err.retry_after_seconds > 0
        assert "medical_claims" in err.message and err.receipt is not None  # audited like any refusal
        assert exact_count(bank).frame.height > 0  # exact answers do not wait for DP copies
        release.set()
        assert server.sandbox.prepared.wait_ready(server.sandbox.catalog.datasets.values(), timeout=120)
        assert dp_count(client).frame["age_band"].len() == 6
        client.close()
        bank.close()
    finally:
        release.set()
        server.stop(grace=1.0)


def test_a_build_that_fails_leaves_the_server_up_and_dp_clearly_refused(config, pki) -> None:
    from dataops.client import Client
    from dataops.server import build_server

    config = dataclasses.replace(config, server=dataclasses.replace(config.server, copy_memory_limit_mib=64))
    server = build_server(config).start()
    try:
        catalog = server.sandbox.catalog
        assert not server.sandbox.prepared.wait_ready(catalog.datasets.values(), timeout=120)
        client = Client.from_directory(
            f"localhost:{server.port}", pki.consumer_dir("harbor-insurance"), "harbor-insurance"
        )
        bank = Client.from_directory(f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank")
        err = refused(lambda: dp_count(client))
        assert err.code is grpc.StatusCode.UNAVAILABLE and err.reason == "DP_COPY_FAILED"
        assert err.rule == "dp.copy_failed" and err.retry_after_seconds >= 1
        assert exact_count(bank).frame.height > 0
        # Nothing half-built was left for a later start to trust.
        assert [p.name for p in (config.paths.state / "prepared").iterdir()] == []
        client.close()
        bank.close()
    finally:
        server.stop(grace=1.0)
