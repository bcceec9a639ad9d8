"""The operator's tools: a working directory from nothing, certificates for the names clients
use, a check that finds everything `serve` would refuse (all at once), explain with budgets."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib

import polars as pl
import pytest

from conftest import REPO
from dataops.cli import main
from dataops.client import Client, DataopsClientError
from dataops.config import load_config
from dataops.errors import CatalogError
from dataops.server import build_server


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def toml_of(config) -> str:
    return str(config.paths.catalog.parent / "dataops.toml")


def test_certs_init_in_an_empty_directory_covers_the_names_clients_use(
    tmp_path, sandbox_dir, capsys, monkeypatch
):
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)  # no dataops.toml here: the PKI goes to ./state/pki
    code, out, err = run(capsys, "certs", "init", "--server-name", "sandbox.example", "--ip", "10.1.2.3")
    assert code == 0, err
    assert "sandbox.example" in out and (work / "state" / "pki" / "server.crt").exists()
    code, _, err = run(capsys, "certs", "init")
    assert code == 2 and "--force" in err and "force=True" not in err
    code, _, _ = run(capsys, "certs", "issue", "city-bank")
    assert code == 0
    code, out, _ = run(capsys, "certs", "list", "--json")
    names = {e["role"]: e["names"] for e in json.loads(out)}
    assert "sandbox.example" in names["server"] and "10.1.2.3" in names["server"]

    pki = work / "state" / "pki"
    for name in ("catalog", "policies", "products"):
        shutil.copytree(REPO / name, work / name)
    (work / "dataops.toml").write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n[paths]\nsandbox = {json.dumps(str(sandbox_dir))}\n'
    )
    server = build_server(load_config(work / "dataops.toml")).start()
    try:
        d = pki / "consumers" / "city-bank"
        files = {"cert": d / "city-bank.crt", "key": d / "city-bank.key", "ca": d / "ca.crt"}
        # README's target: the certificate verifies for sandbox.example (here routed to loopback).
        with Client(f"127.0.0.1:{server.port}", server_name="sandbox.example", **files) as client:
            assert [d.id for d in client.list_datasets()] == ["enterprise_credit"]
        with Client(f"127.0.0.1:{server.port}", server_name="other.example", timeout=5, **files) as client:
            with pytest.raises(DataopsClientError) as err:
                client.list_datasets()
            assert err.value.reason == "CONNECTION"
    finally:
        server.stop(grace=0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_listens_where_told(config, pki):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dataops.cli",
            "serve",
            "-c",
            toml_of(config),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert f"serving on 127.0.0.1:{port}" in line, proc.stderr.read() if proc.poll() is not None else line
        with Client.from_directory(f"localhost:{port}", pki.consumer_dir("city-bank"), "city-bank") as client:
            assert client.list_datasets()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        assert code == 0, proc.stderr.read()
    code = main(["serve", "-c", toml_of(config), "--listen", "nowhere"])
    assert code == 2


def test_init_scaffolds_a_directory_that_serve_runs(tmp_path, capsys):
    work = tmp_path / "site"
    code, out, err = run(capsys, "init", str(work), "--server-name", "sandbox.example")
    assert code == 0, err
    for name in ("catalog", "policies", "products", "sandbox", "state/pki/ca.crt", "dataops.toml"):
        assert (work / name).exists(), name
    code, out, _ = run(capsys, "policy", "check", "-c", str(work / "dataops.toml"))
    assert code == 0 and "0 policies valid" in out
    # The examples, copied into place over real data, are served as they are.
    (work / "catalog" / "loans.toml").write_text((work / "catalog" / "loans.toml.example").read_text())
    (work / "policies" / "city-bank.toml").write_text(
        (work / "policies" / "city-bank.toml.example").read_text()
    )
    (work / "products" / "loans_by_district.toml").write_text(
        (work / "products" / "loans_by_district.toml.example").read_text()
    )
    pl.DataFrame(
        {
            "loan_id": [f"L{i}" for i in range(200)],
            "district": ["north", "south"] * 100,
            "amount": [float(i) for i in range(200)],
        }
    ).write_parquet(work / "sandbox" / "loans.parquet")
    code, out, err = run(capsys, "policy", "check", "-c", str(work / "dataops.toml"))
    assert code == 0 and "1 policies valid against 1 catalog entries" in out, err
    assert run(capsys, "certs", "issue", "city-bank", "-c", str(work / "dataops.toml"))[0] == 0
    text = (work / "dataops.toml").read_text().replace('listen = "127.0.0.1:50051"', 'listen = "127.0.0.1:0"')
    (work / "dataops.toml").write_text(text)
    server = build_server(load_config(work / "dataops.toml")).start()
    try:
        d = work / "state" / "pki" / "consumers" / "city-bank"
        code, out, err = run(
            capsys,
            "query",
            "loans",
            "-g",
            "district",
            "-a",
            "count",
            "-a",
            "mean(amount)",
            "--target",
            f"localhost:{server.port}",
            "--cert",
            str(d / "city-bank.crt"),
            "--key",
            str(d / "city-bank.key"),
            "--ca",
            str(d / "ca.crt"),
        )
        assert code == 0 and "north" in out and "south" in out, err
    finally:
        server.stop(grace=0.5)
    code, _, err = run(capsys, "init", str(work))
    assert code == 2 and "already exists" in err


def test_policy_check_reports_every_error_at_once(config, capsys):
    catalog, policies = config.paths.catalog, config.paths.policies
    # 1. a policy key misspelt; 2. another policy with an unknown key; 3. a catalog entry whose
    # Parquet file is missing; 4. a declared type the data does not have.
    city = policies / "city-bank.toml"
    city.write_text(city.read_text().replace("tables = [", "tabels = ["))
    river = policies / "river-bank.toml"
    river.write_text(river.read_text().replace("revoked = false", "revoked = false\nrevokd = true"))
    # 5. two bad grants in one file: both are reported.
    harbor = policies / "harbor-insurance.toml"
    harbor.write_text(
        harbor.read_text()
        + (
            '\n[[grants]]\ndataset = "enterprise_credit"\npurpose = "x"\nexpires = 2027-01-01\nmodes = ["dp"]\n'
            'functions = ["count"]\nmin_group_size = 10\n[grants.budget]\nepsilon = 1.0\n[grants.columns]\n'
            '\n[[grants]]\ndataset = "medical_claims"\npurpose = "y"\nexpires = 2027-01-01\nmodes = ["dp"]\n'
            'functions = ["count"]\nmin_group_size = 2\n[grants.budget]\nepsilon = 1.0\n[grants.columns]\n'
        )
    )
    medical = catalog / "medical_claims.toml"
    medical.write_text(
        medical.read_text().replace(
            'location = "insurance/medical_claims.parquet"', 'location = "moved/medical_claims.parquet"'
        )
    )
    credit = catalog / "enterprise_credit.toml"
    text = credit.read_text()
    assert '[columns.tax_paid]\ntype = "float"' in text
    credit.write_text(text.replace('[columns.tax_paid]\ntype = "float"', '[columns.tax_paid]\ntype = "int"'))

    code, _, err = run(capsys, "policy", "check", "-c", toml_of(config))
    assert code == 1
    assert "city-bank.toml: grants[0].tabels: unknown key, did you mean 'tables'?" in err
    assert "tables: is required" not in err
    assert "river-bank.toml: revokd: unknown key, did you mean 'revoked'?" in err
    assert re.search(
        r"harbor-insurance.toml: grants\[1\].dataset: 'enterprise_credit' is in zone 'finance'", err
    )
    assert (
        "harbor-insurance.toml: grants[2].min_group_size: protection rules now belong to table products"
        in err
    )
    assert re.search(r"medical_claims.toml: location: .*moved/medical_claims.parquet does not exist", err)
    assert "enterprise_credit.toml: columns.tax_paid.type: catalog says int, the data has Float64" in err
    # `serve` agrees that this configuration cannot start.
    with pytest.raises(CatalogError):
        build_server(config)


def test_explain_counts_the_budget_that_is_left(server, config, connect, capsys):
    client = connect("city-bank")
    client.query("enterprise_credit", aggregates=["count"], mode="dp", epsilon=3.4)  # 1.6 of 5 left
    explain = [
        "policy",
        "explain",
        "-c",
        toml_of(config),
        "--consumer",
        "city-bank",
        "enterprise_credit",
        "--mode",
        "dp",
    ]
    code, out, _ = run(capsys, *explain, "--epsilon", "100")
    assert code == 1 and "DENIED  BUDGET_EXHAUSTED by rule 'budget.grant'" in out and "epsilon 1.6 " in out
    code, out, _ = run(capsys, *explain, "--epsilon", "2")
    assert code == 1 and "BUDGET_EXHAUSTED" in out
    code, out, _ = run(capsys, *explain, "--epsilon", "1.5")
    assert code == 0 and "ALLOWED" in out and "costs epsilon 1.5; the grant has epsilon 1.6 left" in out
    # The ledger's totals next to the limits: the grant's and the dataset's (all consumers).
    code, out, _ = run(capsys, "budget", "show", "-c", toml_of(config), "--json")
    rows = {(r["consumer"], r["dataset"]): r for r in json.loads(out)}
    assert code == 0 and rows[("city-bank", "enterprise_credit")]["epsilon_spent"] == pytest.approx(3.4)
    assert rows[("(all consumers)", "enterprise_credit")]["epsilon_spent"] == pytest.approx(3.4)
    assert rows[("city-bank", "enterprise_credit")]["epsilon_total"] == 5.0


def test_certs_list_shows_revocation(config, tmp_path, capsys):
    pki_dir = tmp_path / "pki"
    assert run(capsys, "certs", "init", "--dir", str(pki_dir))[0] == 0
    for name in ("alpha", "beta"):
        assert run(capsys, "certs", "issue", name, "--dir", str(pki_dir))[0] == 0
    assert run(capsys, "certs", "revoke", "beta", "--dir", str(pki_dir))[0] == 0
    code, out, _ = run(capsys, "certs", "list", "--dir", str(pki_dir), "--json")
    status = {e["name"]: e["status"] for e in json.loads(out)}
    assert status == {
        "dataops platform CA": "valid",
        "dataops server": "valid",
        "alpha": "valid",
        "beta": "revoked",
    }
    code, out, _ = run(capsys, "certs", "list", "--dir", str(pki_dir))
    assert code == 0 and re.search(r"consumer\s+beta\s+revoked", out)


def _toml_as_json(path):
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value.isoformat() if isinstance(value, dt.date) else value

    return plain(tomllib.loads(path.read_text()))


@pytest.mark.parametrize("kind,directory", [("policy", "policies"), ("catalog", "catalog")])
def test_the_json_schema_accepts_our_files_and_rejects_a_typo(kind, directory, capsys):
    import jsonschema

    code, out, _ = run(capsys, "policy", "schema", kind)
    schema = json.loads(out)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    files = sorted((REPO / directory).glob("*.toml"))
    assert files
    for path in files:
        doc = _toml_as_json(path)
        assert not list(validator.iter_errors(doc)), path
        if kind == "policy":
            doc["grants"][0]["functionz"] = doc["grants"][0].pop("functions")
        else:
            doc["privacy_unit"]["max_row"] = doc["privacy_unit"].pop("max_rows")
        messages = [e.message for e in validator.iter_errors(doc)]
        assert any("functionz" in m or "max_row'" in m for m in messages), messages
