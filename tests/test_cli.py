"""The command line as operators and consumers use it."""

from __future__ import annotations

import pytest

from dataops.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_policy_check_reports_every_consumer(config, capsys):
    code, out, _ = run(capsys, "policy", "check", "-c", str(config.paths.catalog.parent / "dataops.toml"))
    assert code == 0
    assert "city-bank" in out and "harbor-insurance" in out and "3 policies valid" in out


def test_policy_check_fails_on_a_bad_policy_with_the_file_and_key(config, capsys):
    path = config.paths.policies / "river-bank.toml"
    path.write_text(
        path.read_text().replace('tables = ["enterprises_by_district_size"]', 'tables = ["typo"]')
    )
    code, _, err = run(capsys, "policy", "check", "-c", str(config.paths.catalog.parent / "dataops.toml"))
    assert code == 1
    assert "river-bank.toml" in err and "grants[0].tables[0]" in err


@pytest.mark.parametrize(
    "argv,expect_code,expect",
    [
        (
            ["--consumer", "city-bank", "enterprise_credit", "-g", "district", "-a", "sum:tax_paid"],
            0,
            "ALLOWED",
        ),
        (["--consumer", "city-bank", "enterprise_credit", "-g", "enterprise_id"], 1, "rule 'identifier'"),
        (["--consumer", "river-bank", "enterprise_credit", "-a", "sum:tax_paid"], 1, "rule 'table.coverage'"),
        (
            [
                "--consumer",
                "city-bank",
                "enterprise_credit",
                "-a",
                "median:tax_paid",
                "--mode",
                "dp",
                "--epsilon",
                "1",
                "-g",
                "enterprise_id",
            ],
            1,
            "rule 'identifier'",
        ),
        (
            ["--consumer", "river-bank", "enterprise_credit", "--mode", "dp", "--epsilon", "1"],
            1,
            "rule 'grant.modes'",
        ),
        (["--consumer", "city-bank", "medical_claims"], 1, "rule 'dataset.unknown'"),
        (["--consumer", "city-bank", "enterprise_credit", "--date", "2028-01-01"], 1, "rule 'grant.expires'"),
        (["--consumer", "nobody", "enterprise_credit"], 1, "rule 'consumer.unknown'"),
    ],
)
def test_policy_explain_names_the_deciding_rule(config, capsys, argv, expect_code, expect):
    code, out, _ = run(
        capsys, "policy", "explain", "-c", str(config.paths.catalog.parent / "dataops.toml"), *argv
    )
    assert code == expect_code
    assert expect in out


def test_query_and_datasets_from_the_shell(server, pki, capsys):
    conn = pki.cli_args(server.port)
    code, out, _ = run(capsys, "datasets", *conn)
    assert code == 0 and "enterprise_credit" in out
    code, out, _ = run(
        capsys,
        "query",
        "enterprise_credit",
        "-g",
        "size_band",
        "-a",
        "count",
        "-a",
        "mean:tax_paid",
        "--in",
        "district=Dongcheng,Xicheng",
        "--in",
        "size_band=small,micro",
        *conn,
    )
    assert code == 0
    assert "small" in out and "micro" in out and "large" not in out and "receipt #" in out
    code, _, err = run(capsys, "query", "enterprise_credit", "-g", "enterprise_id", *conn)
    assert code == 1 and "POLICY_DENIED" in err and "rule=identifier" in err


def test_ingest_from_the_shell_leaves_columns_unusable(config, tmp_path, capsys):
    source = tmp_path / "loans.csv"
    source.write_text("loan_id,district,amount\nL1,Dongcheng,100.5\nL2,Xicheng,200\n")
    toml = str(config.paths.catalog.parent / "dataops.toml")
    code, out, _ = run(capsys, "ingest", str(source), "--dataset", "loans", "--zone", "finance", "-c", toml)
    assert code == 0 and "unclassified" in out
    assert (config.paths.catalog / "loans.toml").exists()
    code, _, err = run(
        capsys, "ingest", str(tmp_path / "missing.csv"), "--dataset", "other", "--zone", "finance", "-c", toml
    )
    assert code == 2 and "missing.csv" in err  # a local file the command names: usage
    assert not (config.paths.catalog / "other.toml").exists()
