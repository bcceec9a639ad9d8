"""The audit log as the server writes it: tree, chain, checkpoints, rotation, recovery, fail-closed."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from audit_support import open_log, signer_for
from dataops.audit import GENESIS, AuditUnavailable, record_hash, verify_log
from dataops.audit.log import AuditLog, segment_paths
from dataops.audit.merkle import leaf_hash, verify_inclusion
from dataops.audit.note import parse_checkpoint
from dataops.audit.sample import sample_records
from dataops.audit.signer import LocalSigner, SignerClient, SignerError, _handle


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_records(directory: Path) -> list[dict]:
    return [r for segment in segment_paths(directory / "audit.jsonl") for r in lines(segment)]


def fill(log: AuditLog, n: int, seed: int = 0) -> list:
    return [log.append(record) for record in sample_records(n, seed=seed)]


def test_records_chain_and_each_receipt_names_its_record(tmp_path):
    log = open_log(tmp_path, checkpoint_seconds=None)
    receipts = fill(log, 5)
    log.close()
    records = lines(tmp_path / "audit.jsonl")
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(records, records[1:]))
    assert all(record_hash(r) == r["hash"] for r in records)
    assert [(r.sequence, r.hash) for r in receipts] == [(r["seq"], r["hash"]) for r in records]


def test_the_signing_key_lives_with_the_signer_not_beside_the_log(tmp_path):
    log = open_log(tmp_path)
    log.close()
    signer_dir = tmp_path.with_name(tmp_path.name + "-signer")
    assert not list(tmp_path.glob("*.key"))  # nothing in the log's directory can sign
    assert stat.S_IMODE(signer_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((signer_dir / "signing.key").stat().st_mode) == 0o600
    assert (tmp_path / "signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = open_log(tmp_path)  # the same key on reopen
    assert again.key_id == log.key_id
    again.close()


def test_every_receipt_proves_its_record_is_in_a_signed_checkpoint(tmp_path):
    log = open_log(tmp_path)
    receipts = fill(log, 9)
    for receipt in receipts:
        checkpoint = parse_checkpoint(receipt.checkpoint, log.public_key)  # the operator's key alone
        assert checkpoint.size == receipt.tree_size >= receipt.sequence
        verify_inclusion(
            receipt.leaf_index,
            receipt.tree_size,
            leaf_hash(receipt.record),
            receipt.inclusion_path,
            checkpoint.root,
        )
        assert json.loads(receipt.record)["hash"] == receipt.hash
    log.close()


def test_checkpoints_are_kept_every_n_records_and_at_close(tmp_path):
    log = open_log(tmp_path, checkpoint_every=4)
    fill(log, 10)
    assert [c["size"] for c in lines(tmp_path / "checkpoints.jsonl")] == [4, 8]
    log.close()
    checkpoints = lines(tmp_path / "checkpoints.jsonl")
    assert [c["size"] for c in checkpoints] == [4, 8, 10]
    notes = [parse_checkpoint(c["note"], log.public_key) for c in checkpoints]
    assert [n.size for n in notes] == [4, 8, 10]
    assert notes[-1].root == log.tree.root()
    assert verify_log(tmp_path, log.public_key).ok


def test_under_load_a_checkpoint_is_kept_at_least_every_checkpoint_seconds(tmp_path):
    log = open_log(tmp_path, checkpoint_seconds=0.05)
    fill(log, 2)
    time.sleep(0.1)
    fill(log, 1)  # the first batch after the interval keeps its checkpoint
    assert [c["size"] for c in lines(tmp_path / "checkpoints.jsonl")] == [3]
    log.close()
    assert len(lines(tmp_path / "checkpoints.jsonl")) == 1  # close adds nothing: head already kept


def test_rotation_keeps_one_verifiable_chain_across_segments(tmp_path):
    log = open_log(tmp_path, checkpoint_seconds=None, segment_bytes=4000)
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
    log = open_log(tmp_path, checkpoint_seconds=None, segment_bytes=3000)
    fill(log, 12)
    log.close()
    # As if the server stopped right after a rotation: the active segment is empty.
    (tmp_path / "audit.jsonl").write_bytes(b"")
    reopened = open_log(tmp_path, checkpoint_seconds=None, segment_bytes=3000)
    assert reopened.head == log.head
    receipt = reopened.append({"consumer": "city-bank", "method": "ListDatasets"})
    reopened.close()
    assert receipt.sequence == 13
    assert all_records(tmp_path)[-1]["prev"] == log.head.hash
    assert verify_log(tmp_path, log.public_key).ok


def test_a_restart_drops_a_torn_last_line_and_reuses_its_seq(tmp_path):
    log = open_log(tmp_path, checkpoint_seconds=None)
    fill(log, 3)
    log.close()
    with (tmp_path / "audit.jsonl").open("ab") as f:
        f.write(b'{"consumer":"city-bank","seq":4,"pre')  # the crash cut this write short
    reopened = open_log(tmp_path, checkpoint_seconds=None)
    assert reopened.append({"method": "ListDatasets"}).sequence == 4
    reopened.close()
    assert verify_log(tmp_path, log.public_key).ok


def _rechained(records: list[dict], start: int) -> str:
    for i in range(start, len(records)):
        if i:
            records[i]["prev"] = records[i - 1]["hash"]
        records[i]["hash"] = record_hash(records[i])
    from dataops.audit import canonical

    return "".join(canonical(r).decode() + "\n" for r in records)


def test_reopening_refuses_a_log_rewritten_while_the_server_was_down(tmp_path):
    log = open_log(tmp_path, checkpoint_every=5)
    fill(log, 7)
    log.close()
    path = tmp_path / "audit.jsonl"
    records = lines(path)
    records[5]["consumer"] = "someone-else"  # rewrite record 6 and re-chain: no key needed
    path.write_text(_rechained(records, 5))
    with pytest.raises(AuditUnavailable, match="do not hash to the root the signer signed.*rewritten"):
        open_log(tmp_path, checkpoint_every=5)


def test_reopening_refuses_a_truncated_tail_even_with_the_checkpoints_dropped(tmp_path):
    # The attack measured on the old log: cut the last records and the last checkpoints
    # with them. checkpoints.jsonl then looks complete; the signer still knows better.
    log = open_log(tmp_path, checkpoint_every=4)
    fill(log, 10)
    log.close()
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:8]))
    kept = (tmp_path / "checkpoints.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "checkpoints.jsonl").write_text("".join(kept[:2]))  # sizes 4 and 8 remain
    with pytest.raises(AuditUnavailable, match="ends at seq 8 but the signer signed 10 records"):
        open_log(tmp_path, checkpoint_every=4)


def test_without_the_signers_anchor_the_truncation_goes_unnoticed(tmp_path):
    # The control switched off: a signer that forgot what it signed (its state file
    # removed) is what the old log amounted to, and the same truncation is accepted.
    log = open_log(tmp_path, checkpoint_every=4)
    fill(log, 10)
    log.close()
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:8]))
    (tmp_path / "checkpoints.jsonl").unlink()
    (tmp_path.with_name(tmp_path.name + "-signer") / "last-checkpoint").unlink()
    reopened = open_log(tmp_path, checkpoint_every=4)
    assert reopened.head.sequence == 8
    reopened.close()


def test_the_signer_signs_only_trees_that_extend_the_last_one_it_signed(tmp_path):
    log = open_log(tmp_path)
    fill(log, 5)
    log.close()
    signer = signer_for(tmp_path)
    assert parse_checkpoint(signer.last_checkpoint(), signer.public_key).size == 5
    with pytest.raises(SignerError, match="does not extend"):
        signer.sign(3, log.tree.root(3), "", [])  # a rollback
    with pytest.raises(SignerError, match="does not extend"):
        signer.sign(6, b"\x00" * 32, "", [])  # another history


def test_a_failed_write_raises_audit_unavailable_and_leaves_the_chain_intact(tmp_path):
    log = open_log(tmp_path, checkpoint_seconds=None)
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
    log = open_log(tmp_path, checkpoint_seconds=None)
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


class _Breaks:
    """A signer that raises what no signer should (a bug, a malformed answer) while `broken`."""

    def __init__(self, real: LocalSigner) -> None:
        self.real, self.broken = real, False
        self.origin, self.key_id, self.public_key = real.origin, real.key_id, real.public_key

    def last_checkpoint(self):
        return self.real.last_checkpoint()

    def sign(self, *args):
        if self.broken:
            raise KeyError("checkpoint")
        return self.real.sign(*args)


def _append_within(log: AuditLog, seconds: float = 10.0):
    """log.append in a thread: (receipt or exception); fails the test if it hangs."""
    out: list = []

    def run():
        try:
            out.append(log.append({"method": "RunQuery"}))
        except Exception as exc:  # returned for the test to inspect
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "append hung: a failed group commit left no leader"
    return out[0]


def test_an_unexpected_signer_failure_fails_its_batch_and_the_next_append_leads(tmp_path):
    # The group commit's leader must always hand over: an exception of a type the log did
    # not expect used to leave it "flushing" for ever, and every later append waited.
    signer = _Breaks(signer_for(tmp_path))
    log = open_log(tmp_path, signer=signer)
    fill(log, 2)
    signer.broken = True
    failed = _append_within(log)
    assert isinstance(failed, AuditUnavailable) and "could not sign" in str(failed)
    assert isinstance(_append_within(log), AuditUnavailable)  # still broken: refused, not hung
    signer.broken = False
    assert _append_within(log).sequence == 5  # durable, unsigned records are signed by the next batch
    log.close()
    assert verify_log(tmp_path, log.public_key).signed_size == 5


def test_a_signer_that_cannot_save_its_state_answers_an_error_not_a_checkpoint(tmp_path, monkeypatch):
    # Seen: the signer's directory removed under it; saving raised FileNotFoundError,
    # which ended its connection thread instead of answering.
    signer = signer_for(tmp_path)
    log = open_log(tmp_path, signer=signer)
    fill(log, 1)
    anchor = signer.last_checkpoint()

    def gone(checkpoint):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(signer, "_save", gone)
    root = base64.b64encode(log.tree.root(1)).decode()  # a tree the signer would sign
    answer = _handle(signer, {"op": "sign", "size": 1, "root": root, "ledger": "", "proof": []})
    assert set(answer) == {"error"} and "could not save its state" in answer["error"]
    assert signer.last_checkpoint() == anchor  # a checkpoint not saved is not taken as the anchor
    log.close()


def test_a_signer_answer_without_a_checkpoint_is_a_signer_error(tmp_path):
    real = signer_for(tmp_path)
    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve():  # a hello as a signer gives it, then an object without a checkpoint
        conn, _ = listener.accept()
        with conn, conn.makefile("rwb") as stream:
            stream.readline()
            stream.write(json.dumps(real.hello()).encode() + b"\n")
            stream.flush()
            stream.readline()
            stream.write(b"{}\n")
            stream.flush()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = SignerClient(path)
    with pytest.raises(SignerError, match="without a 'checkpoint'"):
        client.sign(1, b"\x00" * 32, "", [])
    client.close()
    listener.close()
    thread.join(5)


def test_append_after_close_is_unavailable(tmp_path):
    log = open_log(tmp_path, checkpoint_seconds=None)
    log.close()
    log.close()  # idempotent
    with pytest.raises(AuditUnavailable):
        log.append({"method": "RunQuery"})


def test_concurrent_appends_make_one_chain(tmp_path):
    log = open_log(tmp_path, checkpoint_every=25, checkpoint_seconds=0.01, segment_bytes=20_000, fsync=False)
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


def test_concurrent_appends_share_fsyncs(tmp_path, monkeypatch):
    calls = []
    real = os.fsync

    def counting_fsync(fd):
        calls.append(fd)
        time.sleep(0.002)  # a slow disk: batches form behind it
        real(fd)

    monkeypatch.setattr("dataops.audit.log.os.fsync", counting_fsync)
    log = open_log(tmp_path, checkpoint_every=10**6)
    records = list(sample_records(400))
    threads = [
        threading.Thread(target=lambda part=records[i::16]: [log.append(r) for r in part]) for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert verify_log(tmp_path, log.public_key).records == 400
    assert len(calls) < 200  # one fsync per batch, not per record


def test_a_log_signed_by_another_key_is_refused(tmp_path):
    log = open_log(tmp_path)
    fill(log, 2)
    log.close()
    stranger = LocalSigner(tmp_path.parent / f"{tmp_path.name}-stranger")
    with pytest.raises(AuditUnavailable, match="is not one the signer"):
        open_log(tmp_path, signer=stranger)
