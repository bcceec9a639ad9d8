"""`verify` detects every kind of tampering with only the public key, and names the place."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit_support import open_log, signer_for
from dataops.audit import AuditLog, canonical, find_receipt, record_hash, verify_log
from dataops.audit.commands import add_audit_parser
from dataops.audit.note import key_id, sign_checkpoint
from dataops.audit.sample import sample_records


def make_log(directory: Path, n: int = 12, every: int = 4, **kwargs) -> AuditLog:
    kwargs.setdefault("fsync", False)  # durability is tested in test_audit_log; speed matters here
    log = open_log(directory, checkpoint_every=every, **kwargs)
    for record in sample_records(n):
        log.append(record)
    log.close()
    return log


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(lines))


def rechain(records: list[dict], start: int) -> list[dict]:
    """What an attacker without the key can do: recompute every hash and prev from `start` on."""
    for i in range(start, len(records)):
        if i:
            records[i]["prev"] = records[i - 1]["hash"]
        records[i]["hash"] = record_hash(records[i])
    return records


def as_lines(records: list[dict]) -> list[str]:
    return [canonical(r).decode() + "\n" for r in records]


def run_audit(capsys, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="dataops")
    add_audit_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def log(tmp_path) -> AuditLog:
    return make_log(tmp_path)


def test_an_untouched_log_verifies(log, tmp_path, capsys):
    result = verify_log(tmp_path, log.public_key)
    assert result.ok and result.records == 12 and result.signed_size == 12 and not result.notes
    code, out, _ = run_audit(capsys, "verify", "--log-dir", str(tmp_path))
    assert code == 0 and out.startswith("OK: 12 records, 3 signed checkpoints") and log.key_id in out


def _edit_one_byte(lines):
    lines[4] = lines[4].replace('"consumer":"', '"consumer":"X', 1)


def _delete_line(lines):
    del lines[4]


def _insert_forged_line(lines):
    records = [json.loads(line) for line in lines[:5]]
    forged = {**records[4], "consumer": "nobody", "seq": 6, "prev": records[4]["hash"]}
    forged["hash"] = record_hash(forged)
    lines.insert(5, canonical(forged).decode() + "\n")


def _swap_lines(lines):
    lines[4], lines[5] = lines[5], lines[4]


def _truncate_behind_checkpoint(lines):
    del lines[10:]


def _rewrite_and_rechain(lines):
    records = [json.loads(line) for line in lines]
    records[4]["decision"] = "allowed"
    records[4]["epsilon_spent"] = 0.0
    records[4]["consumer"] = "nobody"
    lines[:] = as_lines(rechain(records, 4))


def _edit_and_rehash_one(lines):
    record = json.loads(lines[4])
    record["consumer"] = "nobody"
    record["hash"] = record_hash(record)
    lines[4] = canonical(record).decode() + "\n"


def _old_format_line(lines):
    lines.append('{"consumer":"city-bank","method":"ListDatasets"}\n')


def _garbage_line(lines):
    lines[6] = "this is not json\n"


@pytest.mark.parametrize(
    "tamper,kind,place,words",
    [
        (_edit_one_byte, "edited", "audit.jsonl line 5, seq 5", "hash mismatch"),
        (_delete_line, "missing", "audit.jsonl line 5, seq 6", "expected seq 5"),
        (_insert_forged_line, "inserted", "audit.jsonl line 7, seq 6", "inserted"),
        (_swap_lines, "missing", "audit.jsonl line 5, seq 6", "reordered"),
        (_truncate_behind_checkpoint, "truncated", "audit.jsonl line 11", "records 11..12 were removed"),
        (_rewrite_and_rechain, "rewritten", "audit.jsonl line 8, seq 8", "checkpoint #2"),
        (_edit_and_rehash_one, "chain", "audit.jsonl line 6, seq 6", "seq 5 at audit.jsonl line 5"),
        (_old_format_line, "format", "audit.jsonl line 13", "not a chained audit record"),
        (_garbage_line, "format", "audit.jsonl line 7", "not valid JSON"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_tampering_with_records_is_found_and_placed(log, tmp_path, capsys, tamper, kind, place, words):
    path = tmp_path / "audit.jsonl"
    lines = read_lines(path)
    tamper(lines)
    write_lines(path, lines)
    result = verify_log(tmp_path, log.public_key)
    assert not result.ok
    first = result.problems[0]
    assert first.kind == kind
    assert str(first.place) == place
    assert words in first.reason
    code, out, _ = run_audit(capsys, "verify", "--log-dir", str(tmp_path))
    assert code == 1 and out.startswith(f"TAMPERED: {place}")


def _edit_note(line: str, edit) -> str:
    entry = json.loads(line)
    entry["note"] = edit(entry["note"])
    return json.dumps(entry) + "\n"


def test_a_corrupted_checkpoint_signature_is_found(log, tmp_path, capsys):
    path = tmp_path / "checkpoints.jsonl"
    lines = read_lines(path)

    def flip(note):  # one character of the signature itself (after the 4-byte key hash)
        text, signature = note.rsplit(" ", 1)
        return text + " " + signature[:8] + ("A" if signature[8] != "A" else "B") + signature[9:]

    lines[1] = _edit_note(lines[1], flip)
    write_lines(path, lines)
    result = verify_log(tmp_path, log.public_key)
    assert [(p.kind, str(p.place)) for p in result.problems] == [
        ("signature", "checkpoints.jsonl line 2, checkpoint #2")
    ]
    assert result.signed_size == 4  # only the checkpoint before the bad one is trusted
    code, out, _ = run_audit(capsys, "verify", "--log-dir", str(tmp_path))
    assert code == 1 and "checkpoints.jsonl line 2, checkpoint #2: the signature" in out


def test_a_checkpoint_moved_to_a_shorter_log_fails_its_signature(log, tmp_path):
    path = tmp_path / "checkpoints.jsonl"
    lines = read_lines(path)
    lines[2] = _edit_note(lines[2], lambda note: note.replace("\n12\n", "\n10\n", 1))  # hide records 11, 12
    write_lines(path, lines)
    assert verify_log(tmp_path, log.public_key).problems[0].kind == "signature"


def test_a_deleted_middle_checkpoint_changes_nothing_the_later_one_covers_it(log, tmp_path):
    path = tmp_path / "checkpoints.jsonl"
    lines = read_lines(path)
    del lines[1]
    write_lines(path, lines)
    result = verify_log(tmp_path, log.public_key)
    assert result.ok and result.signed_size == 12


def test_the_wrong_public_key_fails_every_checkpoint(log, tmp_path, capsys):
    other = Ed25519PrivateKey.generate().public_key()
    result = verify_log(tmp_path, other)
    assert result.problems[0].kind == "key"
    assert str(result.problems[0].place) == "checkpoints.jsonl line 1, checkpoint #1"
    assert key_id(other) in result.problems[0].reason
    from dataops.audit.signing import public_key_pem

    key_file = tmp_path.parent / "other.pub"
    key_file.write_bytes(public_key_pem(other))
    code, out, _ = run_audit(capsys, "verify", "--log-dir", str(tmp_path), "--public-key", str(key_file))
    assert code == 1 and "not signed by the public key given" in out


def test_a_log_without_any_checkpoint_does_not_verify(tmp_path):
    log = make_log(tmp_path, n=3, every=10)
    (tmp_path / "checkpoints.jsonl").unlink()
    assert verify_log(tmp_path, log.public_key).problems[0].kind == "unsigned"


def test_a_torn_last_line_is_a_note_not_tampering(log, tmp_path, capsys):
    with (tmp_path / "audit.jsonl").open("a") as f:
        f.write('{"consumer":"city-bank","meth')
    result = verify_log(tmp_path, log.public_key)
    assert result.ok and result.records == 12
    assert "audit.jsonl line 13: torn last line" in result.notes[0]
    code, out, _ = run_audit(capsys, "verify", "--log-dir", str(tmp_path))
    assert code == 0 and "note: audit.jsonl line 13: torn last line" in out


def test_records_after_the_last_kept_checkpoint_are_reported(tmp_path):
    log = open_log(tmp_path, checkpoint_every=4)
    receipts = [log.append(r) for r in sample_records(6)]
    result = verify_log(tmp_path, log.public_key)
    assert result.ok and result.signed_size == 4
    assert "records 5..6 come after the last checkpoint kept" in result.notes[0]
    assert find_receipt(tmp_path, 6, receipts[5].hash, log.public_key).status == "unsigned"
    log.close()
    assert find_receipt(tmp_path, 6, receipts[5].hash, log.public_key).status == "verified"


def test_tampering_inside_a_rotated_segment_names_that_segment(tmp_path):
    log = make_log(tmp_path, n=30, every=1000, segment_bytes=3000)
    segment = tmp_path / "audit-000002.jsonl"
    lines = read_lines(segment)
    lines[1] = lines[1].replace('"decision":"', '"decision":"x', 1)
    write_lines(segment, lines)
    problem = verify_log(tmp_path, log.public_key).problems[0]
    assert problem.kind == "edited" and str(problem.place).startswith("audit-000002.jsonl line 2, seq ")


def test_a_deleted_rotated_segment_is_a_gap(tmp_path):
    log = make_log(tmp_path, n=30, every=1000, segment_bytes=3000)
    (tmp_path / "audit-000002.jsonl").unlink()
    problem = verify_log(tmp_path, log.public_key).problems[0]
    assert problem.kind == "missing" and str(problem.place).startswith("audit-000003.jsonl line 1")


def _steal_key_and_rewrite(tmp_path: Path, records_kept: int | None = None, edit: bool = True):
    """The attack measured on the old log: whoever holds the signing key rewrites history
    (hides a DP release) or truncates it, and re-signs everything from scratch."""
    records = [json.loads(line) for line in read_lines(tmp_path / "audit.jsonl")]
    if edit:
        records[1].update(decision="denied", epsilon_spent=0.0, consumer="nobody")
    records = records[:records_kept] if records_kept is not None else records
    write_lines(tmp_path / "audit.jsonl", as_lines(rechain(records, 0)))
    (tmp_path / "checkpoints.jsonl").unlink()
    stolen = signer_for(tmp_path)
    (stolen.directory / "last-checkpoint").unlink()  # a fresh signer with the same key
    AuditLog(tmp_path / "audit.jsonl", signer=type(stolen)(stolen.directory), checkpoint_seconds=None).close()


def _witness_file(tmp_path: Path, log: AuditLog) -> Path:
    """What a client keeps: the newest checkpoint it verified, a bare note (Client(checkpoint_file=…))."""
    held = tmp_path.parent / f"{tmp_path.name}-client-checkpoint"
    held.write_text(log.last_checkpoint.note)
    return held


@pytest.mark.parametrize("attack", ["rewrite", "truncate", "rollback"])
def test_a_witness_checkpoint_catches_a_host_that_resigned_its_history(tmp_path, capsys, attack):
    log = make_log(tmp_path, n=8, every=4)
    held = _witness_file(tmp_path, log)
    if attack == "rewrite":
        _steal_key_and_rewrite(tmp_path)
    elif attack == "truncate":  # the unsigned tail, and the last checkpoint with its records
        _steal_key_and_rewrite(tmp_path, records_kept=6, edit=False)
    else:  # back to an earlier state, re-signed
        _steal_key_and_rewrite(tmp_path, records_kept=3)
    assert verify_log(tmp_path, log.public_key).ok  # the control off: the host's own checkpoints agree
    result = verify_log(tmp_path, log.public_key, held=[held])
    assert not result.ok
    assert result.problems[0].kind == ("rewritten" if attack == "rewrite" else "truncated")
    assert "held checkpoint #1" in result.problems[0].reason
    code, out, _ = run_audit(capsys, "verify", "--log-dir", str(tmp_path), "--witness", str(held))
    assert code == 1 and out.startswith("TAMPERED")


def test_a_copy_of_checkpoints_jsonl_is_a_witness_too(tmp_path):
    log = make_log(tmp_path, n=8, every=4)
    held = tmp_path.parent / f"{tmp_path.name}-held.jsonl"
    shutil.copy(tmp_path / "checkpoints.jsonl", held)
    _steal_key_and_rewrite(tmp_path)
    result = verify_log(tmp_path, log.public_key, held=[held])
    assert result.problems[0].kind == "rewritten" and "held checkpoint #1" in result.problems[0].reason


def test_a_forged_witness_checkpoint_is_not_trusted(tmp_path):
    log = make_log(tmp_path, n=8, every=4)
    forged = tmp_path.parent / f"{tmp_path.name}-forged"
    other = Ed25519PrivateKey.generate()
    forged.write_text(sign_checkpoint(other, log.origin, 100, b"\x00" * 32, "t", "").note)
    result = verify_log(tmp_path, log.public_key, held=[forged])
    assert result.problems[0].kind == "key"


def test_receipts_are_found_only_when_they_match(log, tmp_path, capsys):
    records = [json.loads(line) for line in read_lines(tmp_path / "audit.jsonl")]
    seventh = records[6]
    check = find_receipt(tmp_path, 7, seventh["hash"], log.public_key)
    assert check.status == "verified"
    assert "audit.jsonl line 7, seq 7" in check.message and "checkpoint #2" in check.message
    assert find_receipt(tmp_path, 7, records[5]["hash"], log.public_key).status == "mismatch"
    assert find_receipt(tmp_path, 99, seventh["hash"], log.public_key).status == "missing"
    code, out, _ = run_audit(capsys, "receipt", "7", seventh["hash"][:12], "--log-dir", str(tmp_path))
    assert code == 0 and out.startswith("FOUND: receipt #7")
    code, out, _ = run_audit(capsys, "receipt", "7", records[5]["hash"], "--log-dir", str(tmp_path))
    assert code == 1 and "NOT VERIFIED" in out


def test_a_receipt_in_a_tampered_log_is_not_confirmed(log, tmp_path):
    path = tmp_path / "audit.jsonl"
    lines = read_lines(path)
    first = json.loads(lines[0])
    _edit_one_byte(lines)
    write_lines(path, lines)
    assert find_receipt(tmp_path, 1, first["hash"], log.public_key).status == "tampered"


def test_usage_and_io_errors_exit_2(tmp_path, capsys):
    code, _, err = run_audit(capsys, "verify", "--log-dir", str(tmp_path / "nowhere"))
    assert code == 2 and "not a directory" in err
    code, _, err = run_audit(capsys, "verify", "--log-dir", str(tmp_path))
    assert code == 2 and "no public key" in err
    make_log(tmp_path, n=2)
    bad_key = tmp_path.parent / "bad.pem"
    bad_key.write_text("not a key")
    code, _, err = run_audit(capsys, "verify", "--log-dir", str(tmp_path), "--public-key", str(bad_key))
    assert code == 2 and "not a PEM public key" in err
    code, _, err = run_audit(capsys, "receipt", "1", "abc", "--log-dir", str(tmp_path))
    assert code == 2 and "at least 12 hex digits" in err
    code, _, err = run_audit(capsys, "verify", "-c", str(tmp_path / "missing.toml"))
    assert code == 2 and "missing.toml" in err


def test_public_key_command_writes_the_signing_key(log, tmp_path, capsys):
    out_file = tmp_path.parent / "reviewer.pub"
    code, out, _ = run_audit(capsys, "public-key", "--log-dir", str(tmp_path), "--out", str(out_file))
    assert code == 0 and log.key_id in out
    assert out_file.read_bytes() == (tmp_path / "signing.pub").read_bytes()
    code, _, _ = run_audit(capsys, "verify", "--log-dir", str(tmp_path), "--public-key", str(out_file))
    assert code == 0
