"""The consumer's shell: connection from a profile or the environment, one RPC per question,
accuracy and spend in every output, exit codes as documented, messages a person can read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, audit_records
from dataops.cli import main, parse_literal
from dataops.values import PrivacyLoss


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def conn(server, pki):
    return pki.cli_args(server.port)


@pytest.fixture
def no_profile(monkeypatch, tmp_path):
    """No DATAOPS_* from the caller's shell and no ~/.config/dataops profile."""
    for name in list(os.environ):
        if name.startswith("DATAOPS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def test_version_and_the_documented_exit_codes_in_help(capsys, no_profile):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("dataops ")
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "0 success" in out and "1 refused" in out and "2 usage" in out
    code, out, _ = run(capsys, "query", "--help")
    assert code == 0 and "exit codes" in out and "DATAOPS_TARGET" in out
    code, _, err = run(capsys, "query", "enterprise_credit", "--epsilon", "abc")
    assert code == 2 and "invalid float value: 'abc'" in err
    code, _, err = run(capsys, "query", "enterprise_credit")
    assert code == 2 and "no cert, key, ca" in err and "DATAOPS_CERT" in err


def test_one_question_is_one_rpc_and_one_audit_record(config, conn, capsys, no_profile):
    before = len(audit_records(config))
    code, out, _ = run(
        capsys,
        "query",
        "enterprise_credit",
        "-g",
        "size_band",
        "-a",
        "count",
        "--range",
        "year_founded=2000:",
        "--eq",
        "size_band=small",
        "--mode",
        "dp",
        "--epsilon",
        "0.5",
        *conn,
    )
    assert code == 0 and "small" in out
    records = audit_records(config)[before:]
    # No DescribeDataset first: the filter values were typed from their literals.
    assert [r["method"] for r in records] == ["RunQuery"]
    filters = json.loads(records[0]["query"])["filters"]
    assert {"column": "year_founded", "low": 2000} in filters  # an int, as the column is


def test_dp_output_shows_accuracy_and_spend_in_table_and_json(conn, capsys, no_profile):
    dp = ["--mode", "dp", "--epsilon", "0.5", "-g", "size_band", "-a", "count", "-a", "mean:tax_paid"]
    code, out, _ = run(capsys, "query", "enterprise_credit", *dp, *conn)
    assert code == 0
    assert "spent epsilon 0.5 (remaining 4.5)" in out
    assert "accuracy: count ±" in out and "at 95%" in out and "mean_tax_paid ±" in out
    code, out, _ = run(capsys, "query", "enterprise_credit", *dp, "--json", *conn)
    doc = json.loads(out)
    assert doc["reused"] is True and doc["spend"]["epsilon"] == 0.0  # the same release again, nothing spent
    assert {a["column"] for a in doc["accuracy"]} == {"count", "mean_tax_paid"}
    count, mean = sorted(doc["accuracy"], key=lambda a: a["column"])
    assert count["half_width_95"] > 0 and count["mechanism"] and mean["noise_scale"] > 0
    # A mean's half-width has no closed form: null in JSON (NaN is not JSON), never a bare NaN.
    assert mean["half_width_95"] is None and "NaN" not in out
    assert doc["columns"] == ["size_band", "count", "mean_tax_paid"] and len(doc["rows"]) == 4
    assert doc["receipt"]["sequence"] > 0 and len(doc["receipt"]["hash"]) == 64


def test_estimate_spends_nothing_and_budget_shows_what_is_left(server, conn, capsys, no_profile):
    code, out, _ = run(
        capsys, "estimate", "enterprise_credit", "--mode", "dp", "--epsilon", "0.7", "-g", "size_band", *conn
    )
    assert code == 0 and "would spend epsilon 0.7 of 5 remaining" in out and "count" in out
    code, out, _ = run(
        capsys,
        "estimate",
        "enterprise_credit",
        "--mode",
        "dp",
        "--epsilon",
        "0.7",
        "-g",
        "size_band",
        "--json",
        *conn,
    )
    assert json.loads(out)["spend"]["epsilon"] == pytest.approx(0.7)
    assert server.ledger.spent("city-bank", "enterprise_credit") == PrivacyLoss(0.0, 0.0)
    run(capsys, "query", "enterprise_credit", "--mode", "dp", "--epsilon", "1.25", *conn)
    code, out, _ = run(capsys, "budget", "--json", *conn)
    [budget] = json.loads(out)
    assert code == 0 and budget["dataset_id"] == "enterprise_credit"
    assert (budget["epsilon_spent"], budget["epsilon_remaining"]) == (
        pytest.approx(1.25),
        pytest.approx(3.75),
    )
    code, out, _ = run(capsys, "budget", "--dataset", "enterprise_credit", *conn)
    assert code == 0 and "enterprise_credit" in out and "3.75" in out


def test_connection_from_profile_then_environment_then_flags(
    server, pki, tmp_path, capsys, monkeypatch, no_profile
):
    d = pki.consumer_dir("city-bank")
    profile = tmp_path / "xdg" / "dataops" / "profile.toml"
    profile.parent.mkdir(parents=True)
    # Paths in a profile are relative to the profile file.
    for name in ("city-bank.crt", "city-bank.key", "ca.crt"):
        (profile.parent / name).write_bytes((d / name).read_bytes())
    profile.write_text(
        f'target = "localhost:{server.port}"\ncert = "city-bank.crt"\nkey = "city-bank.key"\nca = "ca.crt"\n'
    )
    code, out, _ = run(capsys, "datasets")
    assert code == 0 and "enterprise_credit" in out

    monkeypatch.setenv("DATAOPS_TARGET", "localhost:1")  # the environment beats the profile
    code, _, err = run(capsys, "datasets")
    assert code == 1 and "cannot be reached" in err and "UNAVAILABLE None" not in err
    code, out, _ = run(capsys, "datasets", "--target", f"localhost:{server.port}")  # a flag beats both
    assert code == 0 and "enterprise_credit" in out

    profile.write_text('targt = "x"\n')
    code, _, err = run(capsys, "datasets")
    assert code == 2 and "targt: unknown key, did you mean 'target'?" in err


@pytest.mark.parametrize(
    "argv,code,expect,absent",
    [
        # A string where the column is an int: the server refuses; the hint says how to quote.
        (
            ["--eq", "year_founded=abc", "--mode", "dp", "--epsilon", "1"],
            1,
            "quote a string",
            "invalid literal",
        ),
        (["-a", "sum"], 2, "--agg 'sum': expected one of", "Traceback"),
        (["-a", "quantile:x:tax_paid"], 2, "expected one of", "could not convert"),
        (["--range", "year_founded=2000"], 2, "expected COLUMN=LOW:HIGH", "Traceback"),
        (["--mode", "dp"], 2, "needs epsilon or target_half_width", "Traceback"),
        (["-g", "enterprise_id"], 1, "refused: PERMISSION_DENIED POLICY_DENIED rule=identifier", "None"),
    ],
)
def test_every_failure_reads_as_a_sentence(conn, capsys, no_profile, argv, code, expect, absent):
    got, out, err = run(capsys, "query", "enterprise_credit", *argv, *conn)
    assert (got, expect in err, absent in err + out) == (code, True, False), err


def test_a_refusal_names_its_audit_receipt(config, conn, capsys, no_profile):
    code, _, err = run(capsys, "query", "medical_claims", *conn)
    last = audit_records(config)[-1]
    assert code == 1 and "UNKNOWN_DATASET" in err
    assert f"audit receipt #{last['seq']} {last['hash'][:12]}" in err


def test_literals_are_typed_as_written():
    assert [
        parse_literal(t)
        for t in (
            "2000",
            "-3",
            "1.5",
            "1e3",
            "true",
            "False",
            '"2000"',
            "'x'",
            "0101",
            "small",
            "2024-01-31",
            "nan",
        )
    ] == [2000, -3, 1.5, 1000.0, True, False, "2000", "x", "0101", "small", "2024-01-31", "nan"]


def test_a_closed_pipe_ends_quietly(config, connect, tmp_path):
    client = connect("city-bank")
    for _ in range(150):  # enough JSON lines to overflow a pipe buffer
        client.list_datasets()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dataops.cli",
            "audit",
            "show",
            "--json",
            "-c",
            str(config.paths.catalog.parent / "dataops.toml"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert err == "", err
