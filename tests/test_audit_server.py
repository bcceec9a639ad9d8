"""The audit trail of a real server: every request leaves a record a reviewer can verify."""

from __future__ import annotations

import os

import grpc
import pytest

from conftest import audit_records
from dataops.audit import find_receipt, load_public_key, verify_log
from dataops.client import DataopsClientError, count, count_units, mean
from test_audit_verify import run_audit


def _config_file(config) -> str:
    return str(config.paths.catalog.parent / "dataops.toml")


def _refusal_receipt(attempt) -> tuple[int, str]:
    with pytest.raises(DataopsClientError) as err:
        attempt()
    return int(err.value.metadata["receipt_sequence"]), err.value.metadata["receipt_hash"]


def test_a_served_session_verifies_and_every_receipt_is_in_the_log(server, connect, pki, config, capsys):
    bank, insurer = connect("city-bank"), connect("harbor-insurance")
    receipts = [
        (r.sequence, r.hash)
        for r in (
            bank.describe("enterprise_credit").receipt,
            bank.query(
                "enterprise_credit",
                aggregates=[count_units("enterprises"), mean("tax_paid")],
                group_by=["size_band"],
            ).receipt,
            insurer.query("medical_claims", aggregates=[count()]).receipt,
        )
    ]
    receipts.append(
        _refusal_receipt(
            lambda: bank.query("enterprise_credit", aggregates=[count()], group_by=["enterprise_id"])
        )
    )
    receipts.append(_refusal_receipt(lambda: insurer.query("enterprise_credit", aggregates=[count()])))
    consumer = pki.consumer_dir("river-bank")
    credentials = grpc.ssl_channel_credentials(
        (consumer / "ca.crt").read_bytes(),
        (consumer / "river-bank.key").read_bytes(),
        (consumer / "river-bank.crt").read_bytes(),
    )
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
        with pytest.raises(grpc.RpcError) as malformed:
            channel.unary_unary("/dataops.v1.QueryService/RunQuery")(b"\xff\xff", timeout=5)
    assert malformed.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    server.stop(grace=1.0)  # the checkpoint at close signs the whole session

    code, out, _ = run_audit(capsys, "verify", "-c", _config_file(config))
    assert code == 0 and out.startswith("OK: 6 records, 1 signed checkpoints (signed up to seq 6)")
    audit_dir = config.paths.state / "audit"
    key = load_public_key(audit_dir / "signing.pub")
    for sequence, digest in receipts:
        check = find_receipt(audit_dir, sequence, digest, key)
        assert check.status == "verified", check.message
    decisions = [r["decision"] for r in audit_records(config)]
    assert decisions == ["allowed", "allowed", "allowed", "denied", "denied", "invalid"]
    code, out, _ = run_audit(
        capsys, "receipt", str(receipts[3][0]), receipts[3][1], "-c", _config_file(config)
    )
    assert code == 0 and "covered by checkpoint #1" in out


def test_when_the_audit_log_cannot_be_written_nothing_is_released(server, connect, config):
    client = connect("city-bank")
    client.list_datasets()
    before = audit_records(config)
    audit = server.audit
    with audit._cond:  # swap in a disk that is always full
        real_fd, audit._fd = audit._fd, os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(DataopsClientError) as err:
            client.query("enterprise_credit", aggregates=[count()])
        assert err.value.code is grpc.StatusCode.UNAVAILABLE
        assert "nothing was released" in err.value.message
        assert "receipt_sequence" not in err.value.metadata
        assert audit_records(config) == before
    finally:
        with audit._cond:
            os.close(audit._fd)
            audit._fd = real_fd
    result = client.query("enterprise_credit", aggregates=[count()])  # the disk is back: so is the service
    assert result.receipt.sequence == before[-1]["seq"] + 1
    server.stop(grace=1.0)
    assert verify_log(config.paths.state / "audit", audit.public_key).ok
