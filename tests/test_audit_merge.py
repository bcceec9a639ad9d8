"""`dataops audit merge`: several replicas' audit logs, each verified on its own, read as one."""

from __future__ import annotations

from pathlib import Path

from dataops.audit import AuditLog
from dataops.audit.log import record_spend
from dataops.audit.merge import merge_logs
from dataops.audit.sample import sample_records
from dataops.audit.signer import LocalSigner
from dataops.audit.signing import load_public_key
from test_audit_verify import read_lines, run_audit, write_lines


def replica_log(directory: Path, origin: str, records: list[dict]) -> Path:
    log = AuditLog(
        directory / "audit.jsonl",
        signer=LocalSigner(directory.with_name(directory.name + "-signer"), origin),
        fsync=False,
        checkpoint_every=4,
        checkpoint_seconds=None,
    )
    for record in records:
        log.append(record)
    log.close()
    return directory


def two_replicas(tmp_path: Path, origins=("dataops-a", "dataops-b")) -> tuple[Path, Path, list[dict]]:
    records = list(sample_records(24))
    a = replica_log(tmp_path / "a", origins[0], records[0::2])  # the load balancer alternates
    b = replica_log(tmp_path / "b", origins[1], records[1::2])
    return a, b, records


def test_each_log_verifies_on_its_own_and_the_merged_view_interleaves_them_by_time(tmp_path, capsys):
    a, b, records = two_replicas(tmp_path)
    merged = merge_logs([a, b], [load_public_key(a / "signing.pub"), load_public_key(b / "signing.pub")])
    assert merged.ok and [name for name, _ in merged.verifications] == ["dataops-a", "dataops-b"]
    assert [r["time"] for _, r in merged.records] == sorted(r["time"] for r in records)
    assert [name for name, _ in merged.records][:4] == ["dataops-a", "dataops-b", "dataops-a", "dataops-b"]
    # Each record keeps its own log's seq: its proof is in that log.
    assert [r["seq"] for name, r in merged.records if name == "dataops-b"] == list(range(1, 13))
    expected: dict = {}
    for record in records:
        if (found := record_spend(record)) is not None:
            eps, delta = expected.get(found[0], (0, 0))
            expected[found[0]] = (eps + found[1], delta + found[2])
    assert expected and merged.spend == expected

    code, out, err = run_audit(capsys, "merge", str(a), str(b))
    assert code == 0, err
    assert "24 records from 2 logs" in out and "all replicas: epsilon" in out
    assert "dataops-a: OK: 12 records" in err and "dataops-b: OK: 12 records" in err


def test_a_tampered_replica_log_stops_the_merge(tmp_path, capsys):
    a, b, _ = two_replicas(tmp_path)
    lines = read_lines(b / "audit.jsonl")
    write_lines(b / "audit.jsonl", lines[:3] + [lines[3].replace('"allowed"', '"denied"', 1)] + lines[4:])
    code, out, err = run_audit(capsys, "merge", str(a), str(b))
    assert code == 1
    assert "dataops-a: OK" in err and "dataops-b: TAMPERED" in err and "not merged" in err
    assert out == ""


def test_replicas_must_have_their_own_origin(tmp_path, capsys):
    a, b, _ = two_replicas(tmp_path, origins=("dataops-audit", "dataops-audit"))
    code, _, err = run_audit(capsys, "merge", str(a), str(b))
    assert code == 2 and "own [audit] origin" in err


def test_a_key_per_directory_or_none(tmp_path, capsys):
    a, b, _ = two_replicas(tmp_path)
    code, _, err = run_audit(capsys, "merge", str(a), str(b), "--public-key", str(a / "signing.pub"))
    assert code == 2 and "one --public-key per directory" in err
    # b's log checked with a's key: every checkpoint fails its signature.
    code, _, err = run_audit(
        capsys,
        "merge",
        str(a),
        str(b),
        "--public-key",
        str(a / "signing.pub"),
        "--public-key",
        str(a / "signing.pub"),
    )
    assert code == 1 and "dataops-a: OK" in err and "TAMPERED" in err
