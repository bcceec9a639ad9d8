"""The audit log as the server writes it: chain, checkpoints, rotation, recovery, fail-closed."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from dataops.audit import GENESIS, AuditLog, AuditUnavailable, record_hash, verify_log
from dataops.audit.log import segment_paths
from dataops.audit.sample import sample_records


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_records(directory: Path) -> list[dict]:
    return [r for segment in segment_paths(directory / "audit.jsonl") for r in lines(segment)]


def fill(log: AuditLog, n: int, seed: int = 0) -> list:
    return [log.append(record) for record in sample_records(n, seed=seed)]


def test_records_chain_and_each_receipt_names_its_record(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None)
    receipts = fill(log, 5)
    log.close()
    records = lines(tmp_path / "audit.jsonl")
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(records, records[1:]))
    assert all(record_hash(r) == r["hash"] for r in records)
    assert [(r.sequence, r.hash) for r in receipts] == [(r["seq"], r["hash"]) for r in records]


def test_the_signing_key_is_private_and_its_public_half_is_published(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None)
    log.close()
    assert stat.S_IMODE((tmp_path / "signing.key").stat().st_mode) == 0o600
    assert (tmp_path / "signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None)  # the same key on reopen
    assert again.key_id == log.key_id
    again.close()


def test_checkpoints_every_n_records_and_at_close_chain_to_each_other(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", checkpoint_every=4, checkpoint_seconds=None)
    fill(log, 10)
    assert [c["size"] for c in lines(tmp_path / "checkpoints.jsonl")] == [4, 8]
    log.close()
    checkpoints = lines(tmp_path / "checkpoints.jsonl")
    assert [c["size"] for c in checkpoints] == [4, 8, 10]
    assert [c["checkpoint"] for c in checkpoints] == [1, 2, 3]
    assert checkpoints[0]["prev"] == GENESIS and checkpoints[1]["prev"] != GENESIS
    assert checkpoints[-1]["head"] == log.head.hash
    assert {c["key_id"] for c in checkpoints} == {log.key_id}
    assert verify_log(tmp_path, log.public_key).ok


def test_a_timer_checkpoints_only_when_records_were_added(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=0.05)
    fill(log, 3)
    deadline = time.monotonic() + 5
    while not (tmp_path / "checkpoints.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # several more ticks with nothing new
    assert [c["size"] for c in lines(tmp_path / "checkpoints.jsonl")] == [3]
    log.close()
    assert len(lines(tmp_path / "checkpoints.jsonl")) == 1  # close adds nothing: head already signed


def test_rotation_keeps_one_verifiable_chain_across_segments(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None, segment_bytes=4000)
    fill(log, 40)
    log.close()
    segments = segment_paths(tmp_path / "audit.jsonl")
    assert [p.name for p in segments[:2]] == ["audit-000001.jsonl", "audit-000002.jsonl"]
    assert segments[-1].name == "audit.jsonl" and len(segments) >= 4
    sizes = {c["size"] for c in lines(tmp_path / "checkpoints.jsonl")}
    for segment in segments[:-1]:  # every rotated segment ends at a signed checkpoint
        assert lines(segment)[-1]["seq"] in sizes
    assert [r["seq"] for r in all_records(tmp_path)] == list(range(1, 41))
    result = verify_log(tmp_path, log.public_key)
    assert result.ok and result.records == 40


def test_a_restart_continues_the_chain_from_the_last_segment(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None, segment_bytes=3000)
    fill(log, 12)
    log.close()
    # As if the server stopped right after a rotation: the active segment is empty.
    (tmp_path / "audit.jsonl").write_bytes(b"")
    reopened = AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None, segment_bytes=3000)
    assert reopened.head == log.head
    receipt = reopened.append({"consumer": "city-bank", "method": "ListDatasets"})
    reopened.close()
    assert receipt.sequence == 13
    assert all_records(tmp_path)[-1]["prev"] == log.head.hash
    assert verify_log(tmp_path, log.public_key).ok


def test_a_restart_drops_a_torn_last_line_and_reuses_its_seq(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None)
    fill(log, 3)
    log.close()
    with (tmp_path / "audit.jsonl").open("ab") as f:
        f.write(b'{"consumer":"city-bank","seq":4,"pre')  # the crash cut this write short
    reopened = AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None)
    assert reopened.append({"method": "ListDatasets"}).sequence == 4
    reopened.close()
    assert verify_log(tmp_path, log.public_key).ok


def test_reopening_refuses_a_log_altered_after_its_last_checkpoint(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", checkpoint_every=5, checkpoint_seconds=None)
    fill(log, 7)
    log._stop.set()  # simulate a crash: no checkpoint at close for records 6 and 7
    os.close(log._fd)
    path = tmp_path / "audit.jsonl"
    records = lines(path)
    forged = {**records[5], "consumer": "someone-else"}  # rewrite record 6 and re-hash it
    forged["hash"] = record_hash(forged)
    records[5] = forged
    path.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records))
    with pytest.raises(AuditUnavailable, match="dataops audit verify"):
        AuditLog(path, checkpoint_seconds=None)


def test_reopening_refuses_a_log_shorter_than_its_last_checkpoint(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None)
    fill(log, 4)
    log.close()
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(AuditUnavailable, match="ends at seq 3 but checkpoint #1 signed 4"):
        AuditLog(path, checkpoint_seconds=None)


def test_a_failed_write_raises_audit_unavailable_and_leaves_the_chain_intact(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None)
    fill(log, 2)
    head = log.head
    real_fd = log._fd
    log._fd = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
    try:
        with pytest.raises(AuditUnavailable, match="could not be written"):
            log.append({"method": "RunQuery"})
        assert log.head == head
    finally:
        os.close(log._fd)
        log._fd = real_fd
    assert log.append({"method": "RunQuery"}).sequence == 3
    log.close()
    assert verify_log(tmp_path, log.public_key).ok


def test_an_unsynced_line_is_removed_when_fsync_fails(tmp_path, monkeypatch):
    log = AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None)
    fill(log, 2)
    size = (tmp_path / "audit.jsonl").stat().st_size

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("dataops.audit.log.os.fsync", failing_fsync)
    with pytest.raises(AuditUnavailable):
        log.append({"method": "RunQuery"})
    monkeypatch.undo()
    assert (tmp_path / "audit.jsonl").stat().st_size == size  # no record without a receipt
    assert log.append({"method": "RunQuery"}).sequence == 3
    log.close()


def test_append_after_close_is_unavailable(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None)
    log.close()
    log.close()  # idempotent
    with pytest.raises(AuditUnavailable):
        log.append({"method": "RunQuery"})


def test_concurrent_appends_make_one_chain(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", checkpoint_every=25, checkpoint_seconds=0.01, segment_bytes=20_000,
                   fsync=False)
    records = list(sample_records(400))

    def worker(part):
        for record in part:
            log.append(record)

    threads = [threading.Thread(target=worker, args=(records[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    result = verify_log(tmp_path, log.public_key)
    assert result.ok and result.records == 400 and result.signed_size == 400


def test_a_lost_or_replaced_signing_key_is_refused_not_silently_renewed(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None)
    fill(log, 2)
    log.close()
    key = (tmp_path / "signing.key").read_bytes()
    (tmp_path / "signing.key").unlink()
    with pytest.raises(AuditUnavailable, match="signing.key is missing"):
        AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None)
    assert not (tmp_path / "signing.key").exists()
    other = tmp_path / "other"
    AuditLog(other / "audit.jsonl", checkpoint_seconds=None).close()
    (tmp_path / "signing.key").write_bytes((other / "signing.key").read_bytes())
    (tmp_path / "signing.key").chmod(0o600)
    with pytest.raises(AuditUnavailable, match="is not the key that signed"):
        AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None)
    (tmp_path / "signing.key").write_bytes(key)
    AuditLog(tmp_path / "audit.jsonl", checkpoint_seconds=None).close()
