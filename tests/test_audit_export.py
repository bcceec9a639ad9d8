"""Exports verify on their own; `show` filters records for people."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataops.audit.export import export_log, verify_export
from dataops.audit.sample import sample_records
from test_audit_verify import make_log, read_lines, run_audit, write_lines


@pytest.fixture
def log(tmp_path):
    directory = tmp_path / "audit"
    directory.mkdir()
    return make_log(directory, n=60, every=20)


def test_a_csv_export_verifies_with_the_key_the_reviewer_holds(log, tmp_path, capsys):
    out = tmp_path / "audit.csv"
    code, stdout, _ = run_audit(capsys, "export", "--log-dir", str(log.directory), "--out", str(out))
    assert code == 0 and "exported records 1..60" in stdout
    reviewer_key = tmp_path / "reviewer.pub"
    run_audit(capsys, "public-key", "--log-dir", str(log.directory), "--out", str(reviewer_key))
    (log.directory / "audit.jsonl").unlink()  # the export stands on its own
    code, stdout, _ = run_audit(capsys, "verify-export", str(out), "--public-key", str(reviewer_key))
    assert code == 0 and stdout.startswith("OK: 60 records, seq 1..60, end signed by checkpoint #3")
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["seq"]) for r in rows] == list(range(1, 61))
    assert rows[0]["consumer"] and json.loads(rows[0]["record"])["hash"] == rows[0]["hash"]


def test_a_range_is_extended_to_the_next_checkpoint(log, tmp_path, capsys):
    out = tmp_path / "part.csv"
    code, stdout, err = run_audit(
        capsys,
        "export",
        "--log-dir",
        str(log.directory),
        "--out",
        str(out),
        "--from-seq",
        "15",
        "--to-seq",
        "33",
    )
    assert code == 0 and "exported records 15..40" in stdout and "extended the range to seq 40" in err
    result = verify_export(out, log.public_key)
    assert result.ok and result.rows == 26


def _edit_csv(out: Path, row: int, column: str, value: str) -> None:
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    rows[row][header.index(column)] = value
    with out.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.mark.parametrize(
    "column,value,kind,words",
    [
        ("consumer", "someone-else", "edited", "column 'consumer' says 'someone-else'"),
        ("epsilon_spent", "0.0001", "edited", "column 'epsilon_spent'"),
        ("record", '{"seq":5}', "edited", "hash mismatch"),
    ],
)
def test_an_edited_csv_row_fails_and_is_placed(log, tmp_path, capsys, column, value, kind, words):
    out = tmp_path / "audit.csv"
    export_log(log.directory, out, log.public_key)
    _edit_csv(out, 5, column, value)
    result = verify_export(out, log.public_key)
    assert not result.ok
    assert result.problems[0].kind == kind and str(result.problems[0].place) == "audit.csv line 6, seq 5"
    assert words in result.problems[0].reason
    code, stdout, _ = run_audit(capsys, "verify-export", str(out))
    assert code == 1 and stdout.startswith("TAMPERED: audit.csv line 6, seq 5")


def test_deleting_rows_from_an_export_is_found(log, tmp_path):
    out = tmp_path / "audit.csv"
    export_log(log.directory, out, log.public_key)
    lines = read_lines(out)
    write_lines(out, lines[:10] + lines[11:])
    assert verify_export(out, log.public_key).problems[0].kind == "missing"
    write_lines(out, lines[:-1])  # the last row: the end no longer meets the checkpoint
    assert verify_export(out, log.public_key).problems[0].kind == "truncated"


def test_a_parquet_export_carries_its_checkpoint_and_detects_edits(log, tmp_path):
    out = tmp_path / "audit.parquet"
    export_log(log.directory, out, log.public_key, fmt="parquet")
    out.with_name(out.name + ".checkpoint.json").unlink()  # the embedded copy is enough
    result = verify_export(out, log.public_key)
    assert result.ok and result.rows == 60
    table = pq.read_table(out)
    assert table.schema.field("epsilon_spent").type == pa.float64() and table.num_rows == 60
    rows = table.to_pylist()
    rows[7]["rows_suppressed"] = (rows[7]["rows_suppressed"] or 0) + 1
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out)
    problem = verify_export(out, log.public_key).problems[0]
    assert problem.kind == "edited" and str(problem.place) == "audit.parquet row 8, seq 8"


def test_an_export_signed_by_another_key_fails(log, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = tmp_path / "audit.csv"
    export_log(log.directory, out, log.public_key)
    assert verify_export(out, Ed25519PrivateKey.generate().public_key()).problems[0].kind == "key"


def test_export_refuses_a_tampered_log_and_unsigned_ranges(tmp_path, capsys):
    from audit_support import open_log

    directory = tmp_path / "audit"
    log = open_log(directory, checkpoint_every=10)
    for record in sample_records(5):
        log.append(record)
    code, _, err = run_audit(capsys, "export", "--log-dir", str(directory), "--out", str(tmp_path / "x.csv"))
    assert code == 2 and "does not verify" in err  # no checkpoint yet: nothing signed to export
    log.checkpoint()
    for record in sample_records(3, seed=1):
        log.append(record)
    code, _, err = run_audit(
        capsys, "export", "--log-dir", str(directory), "--out", str(tmp_path / "x.csv"), "--to-seq", "7"
    )
    assert code == 2 and "no signed checkpoint covers seq 7" in err
    log.close()
    lines = read_lines(directory / "audit.jsonl")
    write_lines(directory / "audit.jsonl", lines[:2] + lines[3:])
    code, _, err = run_audit(capsys, "export", "--log-dir", str(directory), "--out", str(tmp_path / "x.csv"))
    assert code == 2 and "refusing to export" in err and "audit.jsonl line 3" in err


# --- show -------------------------------------------------------------------------


def _show(capsys, log, *argv) -> list[dict]:
    code, out, _ = run_audit(capsys, "show", "--log-dir", str(log.directory), "--json", *argv)
    assert code == 0
    return [json.loads(line) for line in out.splitlines()]


def test_show_filters_by_consumer_dataset_decision_reason_and_time(log, capsys):
    everything = _show(capsys, log)
    assert [r["seq"] for r in everything] == list(range(1, 61))
    bank = _show(capsys, log, "--consumer", "river-bank")
    assert bank and all(r["consumer"] == "river-bank" for r in bank)
    assert len(bank) == sum(r["consumer"] == "river-bank" for r in everything)
    claims = _show(capsys, log, "--dataset", "medical_claims", "--decision", "allowed")
    assert claims and all(r["dataset"] == "medical_claims" and r["decision"] == "allowed" for r in claims)
    refused = [r for r in everything if r["reason"]]
    reason = refused[0]["reason"]
    by_reason = _show(capsys, log, "--reason", reason.lower())
    assert [r["seq"] for r in by_reason] == [r["seq"] for r in refused if r["reason"] == reason]
    since, until = everything[10]["time"], everything[20]["time"]
    window = _show(capsys, log, "--since", since, "--until", until)
    assert [r["seq"] for r in window] == list(range(11, 21))
    assert _show(capsys, log, "--since", "2025-03-04") == []  # a date alone is midnight UTC
    assert [r["seq"] for r in _show(capsys, log, "--limit", "3")] == [58, 59, 60]


def test_show_prints_a_readable_table(log, capsys):
    code, out, _ = run_audit(capsys, "show", "--log-dir", str(log.directory), "--decision", "denied")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:6] == ["seq", "time", "consumer", "method", "dataset", "decision"]
    assert lines[-1].endswith("records") and all("denied" in line for line in lines[1:-1])
    code, _, err = run_audit(capsys, "show", "--log-dir", str(log.directory), "--since", "yesterday")
    assert code == 2 and "not an ISO date" in err
