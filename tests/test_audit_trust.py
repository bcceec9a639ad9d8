"""The audit log's trust boundaries through the real server: a signer the server cannot
read, receipts every client checks, and a ledger bound to the log.

Each control is also switched off to show the attack it stops then works.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import stat
import sys
import threading
from pathlib import Path

import grpc
import pytest

from dataops.audit import canonical, record_hash, verify_log
from dataops.audit.note import parse_checkpoint
from dataops.audit.receipts import LedgerBehindLog
from dataops.client import AuditVerificationError, Client, DataopsClientError, count
from dataops.server import build_server
from dataops.server.app import ledger_path
from test_audit_verify import run_audit
from test_dp_service import dp_query

_opened: list[str] | None = None  # paths the server process opens, while a test watches


def _watch_opens(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_watch_opens)  # audit hooks cannot be removed; this one only records while asked


def _client(server, pki, consumer: str = "city-bank", **kwargs) -> Client:
    return Client.from_directory(f"localhost:{server.port}", pki.consumer_dir(consumer), consumer, **kwargs)


def _public_key_file(config) -> Path:
    """The operator's out-of-band copy of the signer's public key."""
    return config.signer_dir / "signing.pub"


def test_the_server_process_never_opens_the_signing_key(config, pki):
    global _opened
    signer_dir = config.signer_dir.resolve()
    assert not signer_dir.is_relative_to(config.paths.state.resolve())  # not under the server's state
    _opened = []
    try:
        server = build_server(config).start()
        try:
            with _client(server, pki) as client:
                client.list_datasets()
                client.query("enterprise_credit", aggregates=[count()], group_by=["size_band"])
        finally:
            server.stop(grace=1.0)
    finally:
        seen, _opened = _opened, None
    assert seen, "the audit hook saw no file opens at all"
    assert not [p for p in seen if Path(p).resolve().is_relative_to(signer_dir)]
    # The signer ran as another process, with its key private to it.
    assert server.signer_process.process.pid != os.getpid()
    assert stat.S_IMODE(signer_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((signer_dir / "signing.key").stat().st_mode) == 0o600
    key = (signer_dir / "signing.key").read_bytes()  # (the test reads it; the server never did)
    assert not [p for p in config.paths.state.rglob("*") if p.is_file() and p.read_bytes() == key]
    assert server.signer_process.process.poll() is not None  # stopped with the server


def test_every_response_proves_its_record_and_the_client_keeps_the_checkpoint(config, pki, capsys, tmp_path):
    held = tmp_path / "city-bank.checkpoint"
    server = build_server(config).start()
    try:
        with _client(server, pki, audit_public_key=_public_key_file(config), checkpoint_file=held) as client:
            for _ in range(3):
                client.list_datasets()
            first = client.checkpoint
            client.query("enterprise_credit", aggregates=[count()], group_by=["size_band"])
            proof = client.consistency_proof(first.size, client.checkpoint.size)  # an audited RPC
            assert proof and client.audit_checkpoint()
            assert client.last_receipt.sequence == 6
    finally:
        server.stop(grace=1.0)
    kept = parse_checkpoint(held.read_text(), None)
    assert kept.size >= 5
    records = [
        json.loads(line) for line in (config.paths.state / "audit" / "audit.jsonl").read_bytes().splitlines()
    ]
    assert [r["method"] for r in records[-2:]] == ["GetConsistencyProof", "GetCheckpoint"]
    code, out, _ = run_audit(
        capsys,
        "verify",
        "-c",
        str(config.paths.catalog.parent / "dataops.toml"),
        "--public-key",
        str(_public_key_file(config)),
        "--witness",
        str(held),
    )
    assert code == 0 and out.startswith("OK: 6 records")


def _roll_back(config, keep: int, *, rewrite: bool = False) -> None:
    """The host's attack with the signer's key and state in hand: cut or rewrite history, re-sign."""
    audit = config.paths.state / "audit"
    records = [json.loads(line) for line in (audit / "audit.jsonl").read_bytes().splitlines()][:keep]
    if rewrite:
        records[0]["consumer"] = "nobody"
        for i, record in enumerate(records):
            if i:
                record["prev"] = records[i - 1]["hash"]
            record["hash"] = record_hash(record)
    (audit / "audit.jsonl").write_bytes(b"".join(canonical(r) + b"\n" for r in records))
    (audit / "checkpoints.jsonl").unlink()
    (config.signer_dir / "last-checkpoint").unlink()  # the signer's anchor, forgotten


@pytest.mark.parametrize("attack", ["truncate", "rewrite"])
def test_a_client_holding_a_checkpoint_catches_a_rolled_back_or_rewritten_log(config, pki, tmp_path, attack):
    held = tmp_path / "held.checkpoint"
    server = build_server(config).start()
    try:
        with _client(server, pki, audit_public_key=_public_key_file(config), checkpoint_file=held) as client:
            for _ in range(6):
                client.list_datasets()
    finally:
        server.stop(grace=1.0)
    _roll_back(config, 3 if attack == "truncate" else 6, rewrite=attack == "rewrite")
    server = build_server(config).start()  # the log re-signed from scratch: the host alone cannot tell
    try:
        with _client(server, pki, witness=False) as blind:  # the control off: no witness, no alarm
            blind.list_datasets()
        with _client(server, pki, audit_public_key=_public_key_file(config), checkpoint_file=held) as client:
            with pytest.raises(
                AuditVerificationError, match="not consistent with the checkpoint this client holds"
            ):
                client.list_datasets()
    finally:
        server.stop(grace=1.0)


def test_a_server_restarted_on_a_truncated_log_is_refused_by_the_signers_anchor(config, pki):
    server = build_server(config).start()
    with _client(server, pki) as client:
        for _ in range(5):
            client.list_datasets()
    server.stop(grace=1.0)
    path = config.paths.state / "audit" / "audit.jsonl"
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:3]))
    (config.paths.state / "audit" / "checkpoints.jsonl").unlink()  # drop the checkpoints with the records
    with pytest.raises(OSError, match="the signer signed 5 records"):
        build_server(config)


def _offline_reset(config) -> None:
    """Spend set to 0 and releases deleted while the server is down: a fresh ledger."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{ledger_path(config)}{suffix}").unlink(missing_ok=True)


def test_an_offline_ledger_reset_is_refused_at_start(config, pki):
    server = build_server(config).start()
    with _client(server, pki) as client:
        dp_query(client, 4.0)
    server.stop(grace=1.0)
    _offline_reset(config)
    with pytest.raises(
        LedgerBehindLog,
        match="city-bank/enterprise_credit.*behind the audit log|behind the audit "
        "log.*city-bank/enterprise_credit",
    ):
        build_server(config)


def test_without_reconciliation_the_reset_budget_is_spendable_again(config, pki):
    server = build_server(config).start()
    with _client(server, pki) as client:
        dp_query(client, 4.0)
        with pytest.raises(DataopsClientError) as err:
            dp_query(client, 2.0, year=2000)
        assert err.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    server.stop(grace=1.0)
    _offline_reset(config)
    unreconciled = dataclasses.replace(
        config, audit=dataclasses.replace(config.audit, reconcile_ledger=False)
    )
    server = build_server(unreconciled).start()
    try:
        with _client(server, pki) as client:
            assert dp_query(client, 2.0, year=2000).spend.epsilon == pytest.approx(2.0)  # the attack works
    finally:
        server.stop(grace=1.0)
    assert verify_log(config.paths.state / "audit", server.audit.public_key).ok


def test_a_ledger_ahead_of_the_log_is_served(config, pki):
    # The ledger may be ahead (a debit whose audit append failed stays spent): never refused for that.
    server = build_server(config).start()
    with _client(server, pki) as client:
        dp_query(client, 1.0)
    server.stop(grace=1.0)
    with sqlite3.connect(ledger_path(config)) as db:
        db.execute("UPDATE reservations SET epsilon = epsilon * 2")
        db.execute("UPDATE grant_spend SET epsilon = epsilon * 2")
    build_server(config).start().stop(grace=0.5)


def test_without_the_signer_nothing_is_released_and_the_records_stay(config, pki):
    server = build_server(config).start()
    try:
        with _client(server, pki) as client:
            client.list_datasets()
            server.signer_process.stop()  # the signer is gone: no checkpoint can cover a new record
            with pytest.raises(DataopsClientError) as err:
                client.query("enterprise_credit", aggregates=[count()], group_by=["size_band"])
            assert (
                err.value.code is grpc.StatusCode.UNAVAILABLE and "nothing was released" in err.value.message
            )
    finally:
        server.stop(grace=1.0)
    # The refused request's record was written (durable, unsigned): a restart signs it.
    records = [
        json.loads(line) for line in (config.paths.state / "audit" / "audit.jsonl").read_bytes().splitlines()
    ]
    assert [r["method"] for r in records] == ["ListDatasets", "RunQuery"]
    build_server(config).start().stop(grace=0.5)
    assert verify_log(config.paths.state / "audit", server.audit.public_key).signed_size == 2


def test_a_signer_failing_in_an_unexpected_way_refuses_requests_without_hanging_the_server(
    config, pki, monkeypatch
):
    # Seen under a benchmark: a signer answer without a checkpoint raised KeyError in the
    # group commit's leader, and every later request, and the server's stop, waited for ever.
    server = build_server(config).start()
    try:
        with _client(server, pki, timeout=20.0) as client:
            client.list_datasets()
            real = server.audit.signer.sign

            def broken(*args):
                raise KeyError("checkpoint")

            monkeypatch.setattr(server.audit.signer, "sign", broken)
            for _ in range(3):  # each refused; none waits for a leader that never comes
                with pytest.raises(DataopsClientError) as err:
                    client.list_datasets()
                assert err.value.code is grpc.StatusCode.UNAVAILABLE
                assert "nothing was released" in err.value.message
            monkeypatch.setattr(server.audit.signer, "sign", real)
            client.list_datasets()
    finally:
        # In a thread: with the bug the stop itself never returned (close waits for the batch).
        stopping = threading.Thread(target=server.stop, kwargs={"grace": 1.0}, daemon=True)
        stopping.start()
        stopping.join(30)
        assert not stopping.is_alive(), "the server's stop hung on the audit log's group commit"
    assert verify_log(config.paths.state / "audit", server.audit.public_key).ok


def test_a_consistency_proof_request_out_of_range_is_refused_and_audited(server, connect, config):
    client = connect("city-bank")
    client.list_datasets()
    with pytest.raises(DataopsClientError) as err:
        client.consistency_proof(5, 10**6)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and err.value.rule == "audit.consistency"
    last = json.loads((config.paths.state / "audit" / "audit.jsonl").read_bytes().splitlines()[-1])
    assert (last["method"], last["decision"], last["rule"]) == (
        "GetConsistencyProof",
        "invalid",
        "audit.consistency",
    )


def test_verify_with_the_config_checks_the_signers_anchor_against_a_stolen_key_rewrite(config, pki, capsys):
    # The measured attack: the key copied, history rewritten to hide a DP release and
    # re-signed, checkpoints.jsonl replaced. Only the signer's own state still knows.
    from cryptography.hazmat.primitives import serialization

    from dataops.audit.merkle import Tree, leaf_hash
    from dataops.audit.note import sign_checkpoint

    server = build_server(config).start()
    with _client(server, pki) as client:
        client.list_datasets()
        dp_query(client, 1.0)
        client.list_datasets()
    server.stop(grace=1.0)
    audit = config.paths.state / "audit"
    records = [json.loads(line) for line in (audit / "audit.jsonl").read_bytes().splitlines()]
    records[1].update(method="ListDatasets", dataset=None, epsilon_spent=0.0, mode=None, query=None)
    tree = Tree()
    for i, record in enumerate(records):
        if i:
            record["prev"] = records[i - 1]["hash"]
        record["hash"] = record_hash(record)
        tree.append(leaf_hash(canonical(record)))
    (audit / "audit.jsonl").write_bytes(b"".join(canonical(r) + b"\n" for r in records))
    stolen = serialization.load_pem_private_key((config.signer_dir / "signing.key").read_bytes(), None)
    forged = sign_checkpoint(
        stolen, config.audit.origin, len(records), tree.root(), "2026-01-01T00:00:00+00:00", ""
    )
    (audit / "checkpoints.jsonl").write_text(json.dumps({"size": len(records), "note": forged.note}) + "\n")
    key = str(_public_key_file(config))
    code, out, _ = run_audit(capsys, "verify", "--log-dir", str(audit), "--public-key", key)
    assert code == 0  # the control off: the log and its (re-signed) checkpoints agree
    code, out, err = run_audit(
        capsys, "verify", "-c", str(config.paths.catalog.parent / "dataops.toml"), "--public-key", key
    )
    assert code == 1 and "rewritten" in out and "signer's last checkpoint" in err
    with pytest.raises(OSError, match="rewritten"):
        build_server(config)  # nor will the server serve it


def test_one_client_answered_concurrently_stays_a_consistent_witness(server, pki, config):
    from concurrent.futures import ThreadPoolExecutor

    with _client(server, pki, audit_public_key=_public_key_file(config)) as client:
        with ThreadPoolExecutor(8) as pool:
            receipts = list(pool.map(lambda _: (client.list_datasets(), client.last_receipt)[1], range(40)))
        assert client.checkpoint.size >= max(r.sequence for r in receipts)
    records = [
        json.loads(line) for line in (config.paths.state / "audit" / "audit.jsonl").read_bytes().splitlines()
    ]
    assert sum(r["method"] == "ListDatasets" for r in records) == 40  # every answer checked, none refused


def test_plain_node_recomputes_a_served_log(config, pki):
    # Issue 10: recomputing the hashes of a real log in JavaScript as docs/audit.md says.
    import shutil
    import subprocess

    server = build_server(config).start()
    try:
        with _client(server, pki) as client:
            client.list_datasets()
            client.query("enterprise_credit", aggregates=[count()], group_by=["size_band"])
            dp_query(client, 0.1)
            with pytest.raises(DataopsClientError):
                client.query("enterprise_credit", aggregates=[count()], group_by=["enterprise_id"])
            client.budgets()
    finally:
        server.stop(grace=1.0)
    audit = config.paths.state / "audit"
    run = subprocess.run(
        [
            shutil.which("node"),
            str(Path(__file__).parent / "js" / "audit_log.mjs"),
            str(audit / "audit.jsonl"),
            str(audit / "checkpoints.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and run.stdout.startswith("OK 5 records, root of 5 matches"), (
        run.stdout + run.stderr
    )


def test_refusals_carry_their_proof_and_a_witness_checks_them(config, pki, tmp_path):
    held = tmp_path / "held.checkpoint"
    server = build_server(config).start()
    try:
        with _client(server, pki, audit_public_key=_public_key_file(config), checkpoint_file=held) as client:
            client.list_datasets()
            with pytest.raises(DataopsClientError) as err:
                client.query("enterprise_credit", aggregates=[count()], group_by=["enterprise_id"])
            assert err.value.reason == "POLICY_DENIED"
            assert parse_checkpoint(err.value.metadata["receipt_checkpoint"], None).size >= 2
            assert client.checkpoint.size == int(
                err.value.metadata["receipt_tree_size"]
            )  # adopted from the refusal
    finally:
        server.stop(grace=1.0)
    _roll_back(config, 1)
    server = build_server(config).start()
    try:
        with _client(server, pki, audit_public_key=_public_key_file(config), checkpoint_file=held) as client:
            with pytest.raises(AuditVerificationError):  # even a refusal gives the rollback away
                client.query("enterprise_credit", aggregates=[count()], group_by=["enterprise_id"])
    finally:
        server.stop(grace=1.0)
