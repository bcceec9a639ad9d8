"""Large tables are protected in a memory-capped child process, exactly as in the server.

Past `store.CHILD_ROWS` rows `TableStore` runs `python -m dataops.tables.build`: the
child loads the same catalog entry and product file, protects, stores, and exits, so
the build's memory goes with it and a build past its cap fails alone. These tests lower
the threshold so the shipped products over the tests' data take that path.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

import dataops.tables as tables_module
from dataops.catalog import load_catalog
from dataops.engines.children import BuildFailed
from dataops.products import load_products
from dataops.tables import TableStore, audit_table
from dataops.tables import store as store_module

REPO = Path(__file__).resolve().parent.parent
PRODUCT = "enterprises_by_district_size"


@pytest.fixture(scope="module")
def setting(sandbox_dir):
    catalog = load_catalog(REPO / "catalog", sandbox_dir)
    return catalog, load_products(REPO / "products", catalog)


def fresh(monkeypatch) -> None:
    """As in a new server process: nothing built in this one to reuse."""
    monkeypatch.setattr(store_module, "_SHARED", type(store_module._SHARED)())


def test_a_child_protects_the_same_table_as_the_server_would(setting, tmp_path, monkeypatch) -> None:
    catalog, products = setting
    product, dataset = products.tables[PRODUCT], catalog.get("enterprise_credit")
    fresh(monkeypatch)
    here = TableStore(tmp_path / "here").get(product, dataset, "v1")
    fresh(monkeypatch)

    def not_here(*args, **kwargs):
        raise AssertionError("protected in the server process")

    monkeypatch.setattr(tables_module, "protect", not_here)  # the child has its own, untouched
    store = TableStore(tmp_path / "child", child_rows=0)
    there = store.get(product, dataset, "v1")
    assert there.fingerprint == here.fingerprint and there.cells.equals(here.cells)
    assert audit_table(there).passed
    assert store.directory(product, "v1").is_dir()


def test_a_child_past_its_memory_cap_fails_alone_and_stores_nothing(setting, tmp_path, monkeypatch) -> None:
    catalog, products = setting
    product, dataset = products.tables[PRODUCT], catalog.get("enterprise_credit")
    fresh(monkeypatch)
    store = TableStore(tmp_path / "state", memory_limit_bytes=64 * 2**20, child_rows=0)
    with pytest.raises(BuildFailed, match="memory limit 0.06 GiB"):
        store.get(product, dataset, "v1")
    assert not store.directory(product, "v1").exists()
    assert os.getpid() > 0  # this process is still here to say so, and builds under a real cap
    assert TableStore(tmp_path / "state", child_rows=0).get(product, dataset, "v1").data_version == "v1"


def test_a_child_refuses_a_product_other_than_the_one_asked_for(setting, tmp_path, monkeypatch) -> None:
    """The product file changed after the server loaded it: the child says so and stores nothing."""
    catalog, products = setting
    product, dataset = products.tables[PRODUCT], catalog.get("enterprise_credit")
    rules = dataclasses.replace(product.rules, min_units=product.rules.min_units + 1)
    edited = dataclasses.replace(product, rules=rules)  # what the server holds; the file says otherwise
    fresh(monkeypatch)
    store = TableStore(tmp_path / "state", child_rows=0)
    with pytest.raises(BuildFailed, match="changed since the server loaded it"):
        store.get(edited, dataset, "v1")
    assert not store.directory(edited, "v1").exists()


def test_small_or_hand_made_datasets_stay_in_process(setting, tmp_path) -> None:
    catalog, products = setting
    product, dataset = products.tables[PRODUCT], catalog.get("enterprise_credit")
    assert not TableStore(tmp_path)._in_child(product, dataset)
    assert TableStore(tmp_path, child_rows=0)._in_child(product, dataset)
    made = dataclasses.replace(dataset, sandbox=None)
    assert not TableStore(tmp_path, child_rows=0)._in_child(product, made)


def test_the_server_serves_a_table_protected_in_a_child(tmp_path, sandbox_dir, pki, monkeypatch) -> None:
    """Over the real mTLS server: the table comes from the child, is audited and answers."""
    from conftest import audit_records, write_config
    from dataops.client import Client, count
    from dataops.server import build_server

    (tmp_path / "work").mkdir()
    config = write_config(tmp_path / "work", sandbox_dir, pki, tables=False)  # protect afresh
    (config.paths.products / "claims_by_demography_diagnosis.toml").unlink()  # the finance tables suffice
    (config.paths.policies / "harbor-insurance.toml").unlink()
    fresh(monkeypatch)
    monkeypatch.setattr(store_module, "CHILD_ROWS", 0)

    def not_here(*args, **kwargs):
        raise AssertionError("protected in the server process")

    monkeypatch.setattr(tables_module, "protect", not_here)
    server = build_server(config).start()
    try:
        with Client.from_directory(
            f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank"
        ) as c:
            answer = c.query("enterprise_credit", aggregates=[count()], group_by=["district"])
    finally:
        server.stop(1.0)
    assert answer.table.num_rows > 0 and answer.receipt.sequence > 0
    protections = {r["table"] for r in audit_records(config) if r["method"] == "ProtectTable"}
    assert PRODUCT in protections
