"""The Python client as a consumer installs and uses it: light, plain results, one exception family."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tomllib

import pyarrow as pa
import pytest
from google.protobuf.message import Message

from conftest import REPO, audit_records
from dataops.client import (
    Budget,
    ConnectionFailed,
    DataopsClientError,
    Estimate,
    InvalidRequest,
    QueryResult,
    count,
    mean,
    median,
    parse_aggregate,
    total,
)

# What the server needs and a client must not: importing any of them from the client is a regression.
SERVER_ONLY = ("opendp", "polars", "numpy", "grpc_health", "grpc_reflection", "tomli_w", "pandas", "sqlglot")


@pytest.mark.parametrize(
    "spec,expect",
    [
        ("count", count()),
        ("count()", count()),
        ("sum:tax_paid", total("tax_paid")),
        ("sum(tax_paid)", total("tax_paid")),
        ("mean(tax_paid)", mean("tax_paid")),
        ("mean:tax_paid", mean("tax_paid")),
        ("median(tax_paid)", median("tax_paid")),
        ("quantile(tax_paid, 0.9)", parse_aggregate("quantile:0.9:tax_paid")),
        ("mean(tax_paid) as avg_tax", mean("tax_paid", alias="avg_tax")),
    ],
)
def test_aggregate_shorthands(spec, expect):
    assert parse_aggregate(spec) == expect


@pytest.mark.parametrize("bad", ["sum", "avg(tax_paid)", "quantile(tax_paid, x)", "quantile(tax_paid, 2)", 3])
def test_a_bad_shorthand_is_a_client_error(bad):
    with pytest.raises(DataopsClientError) as err:
        parse_aggregate(bad)
    assert isinstance(err.value, InvalidRequest) and err.value.code.name == "INVALID_ARGUMENT"


def test_shorthands_answer_like_the_helpers(connect):
    client = connect("city-bank")
    by_string = client.query(
        "enterprise_credit", aggregates=["count", "mean(tax_paid)"], group_by=["size_band"]
    )
    by_helper = client.query(
        "enterprise_credit", aggregates=[count(), mean("tax_paid")], group_by=["size_band"]
    )
    assert by_string.table.equals(by_helper.table)


def test_results_are_arrow_and_dataclasses_not_protobuf(connect, server):
    client = connect("city-bank")
    result = client.query(
        "enterprise_credit", aggregates=["count"], group_by=["size_band"], mode="dp", epsilon=0.5
    )
    assert isinstance(result, QueryResult) and isinstance(result.table, pa.Table)
    assert result.to_polars().height == result.table.num_rows == 4
    for value in (result.spend, *result.accuracy.values(), result.receipt):
        assert dataclasses.is_dataclass(value) and not isinstance(value, Message)
    [budget] = client.budgets()
    assert isinstance(budget, Budget) and budget.epsilon_remaining == pytest.approx(4.5)
    estimate = client.estimate("enterprise_credit", aggregates=["count"], mode="dp", epsilon=1.0)
    assert isinstance(estimate, Estimate) and estimate.spend.epsilon == pytest.approx(1.0)
    described = client.describe("enterprise_credit")
    assert not isinstance(described.grant, Message) and "dp" in described.grant.modes
    columns = {c.name: c for c in described.columns}
    assert (
        columns["tax_paid"].allowed_uses == ("measure",)
        and columns["enterprise_id"].classification == "identifier"
    )
    assert all(not isinstance(d, Message) for d in client.list_datasets())


def test_to_pandas_without_pandas_says_how_to_get_it(connect, monkeypatch):
    result = connect("city-bank").query("enterprise_credit", aggregates=["count"])
    monkeypatch.setitem(sys.modules, "pandas", None)  # as on an install without pandas
    with pytest.raises(ImportError, match=r"dataops\[pandas\]"):
        result.to_pandas()


def test_every_failure_is_one_exception_family(connect, config, tmp_path):
    client = connect("city-bank")
    before = len(audit_records(config))
    with pytest.raises(InvalidRequest) as err:  # checked here, never sent
        client.query("enterprise_credit", aggregates=["count"], mode="dp")
    assert "epsilon" in err.value.field_violations[0][0]
    with pytest.raises(InvalidRequest):
        client.query("enterprise_credit", aggregates=[], group_by=["size_band"])
    with pytest.raises(InvalidRequest):
        client.query("enterprise_credit", aggregates=["count"], mode="sql")
    assert len(audit_records(config)) == before  # nothing reached the server
    with pytest.raises(DataopsClientError) as err:
        client.query("enterprise_credit", aggregates=["count"], group_by=["enterprise_id"])
    assert err.value.reason == "POLICY_DENIED" and err.value.receipt.sequence == before + 1
    from dataops.client import Client

    with pytest.raises(DataopsClientError) as err:
        Client(
            "localhost:1", cert=tmp_path / "missing.crt", key=tmp_path / "k", ca=tmp_path / "missing-ca.crt"
        )
    assert "cannot read the CA certificate" in err.value.message and "missing-ca.crt" in err.value.message
    pki = config.tls.ca_cert.parent
    with Client.from_directory("localhost:1", pki / "consumers" / "city-bank", "city-bank", timeout=5) as c:
        with pytest.raises(ConnectionFailed) as err:
            c.list_datasets()
    assert "cannot be reached" in str(err.value) and "None" not in str(err.value)


def test_the_base_install_is_the_client():
    """pyproject: the base dependencies are the client's; the server stack is the `server` extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0] for d in project["dependencies"]}
    assert names == {
        "grpcio",
        "grpcio-status",
        "googleapis-common-protos",
        "protobuf",
        "pyarrow",
        "cryptography",
    }
    server = " ".join(project["optional-dependencies"]["server"])
    assert "opendp" in server and "dataops[server]" in project["optional-dependencies"]["test"]


CLIENT_SCRIPT = """
import json, sys
{blocker}
from dataops.client import Client
from dataops.cli import main
target, directory = sys.argv[1], sys.argv[2]
with Client.from_directory(target, directory, "city-bank") as client:
    result = client.query("enterprise_credit", aggregates=["count"], group_by=["size_band"])
    try:
        result.to_polars()
        polars = "available"
    except ImportError as exc:
        polars = str(exc)
    [budget] = client.budgets()
print(json.dumps({{"rows": result.table.num_rows, "polars": polars, "budget": budget.epsilon_total}}))
sys.stdout.flush()
code = main(["query", "enterprise_credit", "-g", "size_band", "--target", target,
             "--cert", directory + "/city-bank.crt", "--key", directory + "/city-bank.key",
             "--ca", directory + "/ca.crt", "--json"])
sys.exit(code)
"""

BLOCKER = f"""
import importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_ONLY!r}:
            raise ImportError("server-only package imported by the client: " + name)
sys.meta_path.insert(0, _Block())
"""


def _client_run(python: str, server, pki, blocker: str, env: dict) -> dict:
    proc = subprocess.run(
        [
            python,
            "-c",
            CLIENT_SCRIPT.format(blocker=blocker),
            f"localhost:{server.port}",
            str(pki.consumer_dir("city-bank")),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    first, rest = proc.stdout.split("\n", 1)
    # The CLI's --json answer: the same released cells (size bands) as the client's.
    assert len(json.loads(rest)["rows"]) == json.loads(first)["rows"] > 0
    return json.loads(first)


def test_the_client_imports_nothing_of_the_server_stack(server, pki):
    """Fast guard, in this venv: the client and the consumer CLI run with server packages blocked."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = _client_run(sys.executable, server, pki, BLOCKER, env)
    assert out["rows"] > 0 and "dataops[polars]" in out["polars"] and out["budget"] == 5.0


@pytest.mark.slow  # a real venv and a real install: about a minute
def test_a_fresh_venv_with_only_the_client_connects(server, pki, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", str(REPO)], capture_output=True, text=True, timeout=1200
    )
    assert install.returncode == 0, install.stderr
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    )
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "dataops" in installed and not installed & {"opendp", "polars", "numpy", "pandas"}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = _client_run(python, server, pki, "", env)
    assert out["rows"] > 0 and "dataops[polars]" in out["polars"]
    cli = subprocess.run([str(venv / "bin" / "dataops"), "demo"], capture_output=True, text=True, env=env)
    assert cli.returncode == 2 and "dataops[server]" in cli.stderr
    # A reviewer reads the log with the light install too.
    show = subprocess.run(
        [
            str(venv / "bin" / "dataops"),
            "audit",
            "show",
            "--log-dir",
            str(server.config.paths.state / "audit"),
            "--method",
            "runquery",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert show.returncode == 0 and "RunQuery" in show.stdout, show.stderr


def test_answers_and_refusals_carry_the_one_receipt_type_with_its_proof(connect, config):
    """One `Receipt` (dataops.values): the log makes it, the client reads it back whole."""
    from dataops.audit import Receipt as LogReceipt
    from dataops.audit.merkle import leaf_hash, verify_inclusion
    from dataops.audit.note import parse_checkpoint
    from dataops.client import Receipt

    assert Receipt is LogReceipt
    client = connect("city-bank")
    answered = client.query("enterprise_credit", aggregates=["count"], group_by=["size_band"]).receipt
    with pytest.raises(DataopsClientError) as err:
        client.query("enterprise_credit", aggregates=["count"], group_by=["enterprise_id"])
    refused = err.value.receipt
    records = {r["seq"]: r for r in audit_records(config)}
    for receipt in (answered, refused):
        assert isinstance(receipt, Receipt) and dataclasses.is_dataclass(receipt)
        assert records[receipt.sequence]["hash"] == receipt.hash
        assert (
            json.loads(receipt.record)["hash"] == receipt.hash and receipt.leaf_index == receipt.sequence - 1
        )
        checkpoint = parse_checkpoint(receipt.checkpoint, None)
        assert receipt.tree_size == checkpoint.size
        verify_inclusion(  # raises if the record is not in the signed tree
            receipt.leaf_index,
            checkpoint.size,
            leaf_hash(receipt.record),
            list(receipt.inclusion_path),
            checkpoint.root,
        )
    # The second call told the server which checkpoint this client held: the proof came along.
    assert refused.consistency_from == answered.tree_size
