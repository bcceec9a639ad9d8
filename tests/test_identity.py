"""Identity and admission: certificates, revocation, grant expiry, rate limits, deadlines."""

from __future__ import annotations

import datetime as dt
import time

import grpc
import pytest

from conftest import audit_records, write_config
from dataops.certs import issue_consumer, revoke
from dataops.cli import main
from dataops.client import Client, DataopsClientError, count, total
from dataops.engines import dp as dp_engine
from dataops.server import build_server
from dataops.values import PrivacyLoss


def test_an_expired_certificate_is_refused_at_the_handshake(server, pki, tmp_path):
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    files = issue_consumer(
        pki.directory, "city-bank", out_dir=tmp_path / "expired", validity=(past, past + dt.timedelta(days=1))
    )
    with Client(
        f"localhost:{server.port}", cert=files.cert, key=files.key, ca=files.ca_cert, timeout=5
    ) as client:
        with pytest.raises(DataopsClientError) as err:
            client.list_datasets()
    assert err.value.code is grpc.StatusCode.UNAVAILABLE


def test_a_revoked_certificate_is_refused_at_its_next_request_without_a_restart(config, pki, tmp_path):
    # A second certificate for the same consumer: revoking it must not touch the first.
    spare = issue_consumer(pki.directory, "city-bank", out_dir=tmp_path / "spare")
    work_pki = config.tls.ca_cert.parent
    server = build_server(config).start()
    try:
        with Client(f"localhost:{server.port}", cert=spare.cert, key=spare.key, ca=spare.ca_cert) as client:
            client.list_datasets()
            revoke(work_pki, spare.cert)
            with pytest.raises(DataopsClientError) as err:
                client.list_datasets()
        assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
        assert err.value.rule == "certificate.revoked"
        assert audit_records(config)[-1]["rule"] == "certificate.revoked"
        regular = Client.from_directory(
            f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank"
        )
        assert regular.list_datasets()
        regular.close()
    finally:
        server.stop(1.0)
        (work_pki / "ca.crl").unlink(missing_ok=True)  # the session PKI is shared by other tests


def test_a_tampered_crl_refuses_everyone(config, pki, connect):
    client = connect("city-bank")
    crl = config.tls.ca_cert.with_name("ca.crl")
    try:
        crl.write_text("-----BEGIN X509 CRL-----\nnot a crl\n-----END X509 CRL-----\n")
        with pytest.raises(DataopsClientError) as err:
            client.list_datasets()
        assert err.value.rule == "certificate.crl_unavailable"
    finally:
        crl.unlink()
    assert client.list_datasets()


def test_certs_revoke_from_the_shell(config, pki, tmp_path, capsys):
    spare = issue_consumer(pki.directory, "river-bank", out_dir=tmp_path / "spare")
    toml = str(config.paths.catalog.parent / "dataops.toml")
    try:
        assert main(["certs", "revoke", "river-bank", "--cert", str(spare.cert), "-c", toml]) == 0
        assert "revoked" in capsys.readouterr().out
        assert (
            main(["certs", "revoke", "river-bank", "--cert", str(tmp_path / "nope.crt"), "-c", toml]) == 2
        )  # a local file: usage
    finally:
        config.tls.ca_cert.with_name("ca.crl").unlink(missing_ok=True)


def test_an_expired_grant_is_refused(server, connect, config):
    path = config.paths.policies / "river-bank.toml"
    path.write_text(path.read_text().replace("expires = 2027-06-30", "expires = 2020-01-01"))
    deadline = time.monotonic() + 5
    while server.policies.current.get("river-bank").grants["enterprise_credit"].expires.year != 2020:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client = connect("river-bank")
    assert client.list_datasets() == []  # an expired grant is not offered
    with pytest.raises(DataopsClientError) as err:
        client.query("enterprise_credit", aggregates=[count()])
    assert err.value.rule == "grant.expires"


def test_a_consumer_over_its_rate_limit_is_refused_and_others_are_not(tmp_path, sandbox_dir, pki):
    work = tmp_path / "work"
    work.mkdir()
    config = write_config(work, sandbox_dir, pki, rate_per_minute=60, rate_burst=5)
    server = build_server(config).start()
    try:
        greedy = Client.from_directory(f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank")
        outcomes = []
        for _ in range(8):
            try:
                greedy.list_datasets()
                outcomes.append("ok")
            except DataopsClientError as exc:
                outcomes.append(exc)
        assert outcomes[:5] == ["ok"] * 5
        refused = outcomes[5:]
        assert all(e.code is grpc.StatusCode.RESOURCE_EXHAUSTED and e.rule == "limits.rate" for e in refused)
        assert refused[0].quota_violations[0][0] == "consumer:city-bank"
        other = Client.from_directory(
            f"localhost:{server.port}", pki.consumer_dir("river-bank"), "river-bank"
        )
        assert other.list_datasets()
        greedy.close()
        other.close()
        assert [r["decision"] for r in audit_records(config)].count("denied") == 3
    finally:
        server.stop(1.0)


def test_a_query_past_its_deadline_is_cancelled_and_its_reservation_returned(
    server, connect, config, monkeypatch
):
    release = dp_engine.DPQuery.release

    def slow_release(self, calibration):
        time.sleep(1.5)
        return release(self, calibration)

    monkeypatch.setattr(dp_engine.DPQuery, "release", slow_release)
    client = connect("city-bank")
    with pytest.raises(DataopsClientError) as err:
        client.query(
            "enterprise_credit",
            aggregates=[count(), total("penalties")],
            group_by=["district"],
            mode="dp",
            epsilon=1.0,
            timeout=0.5,
        )
    assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 5
    while not audit_records(config) or audit_records(config)[-1]["code"] != "DEADLINE_EXCEEDED":
        assert time.monotonic() < deadline, "the server never recorded the deadline"
        time.sleep(0.05)
    assert server.ledger.spent("city-bank", "enterprise_credit") == PrivacyLoss(0.0, 0.0)
    monkeypatch.setattr(dp_engine.DPQuery, "release", release)
    result = client.query(
        "enterprise_credit",
        aggregates=[count(), total("penalties")],
        group_by=["district"],
        mode="dp",
        epsilon=1.0,
    )
    assert not result.reused  # the abandoned release was never stored


def test_a_stated_purpose_must_be_the_grants_and_is_recorded(connect, config):
    client = connect("city-bank")
    with pytest.raises(DataopsClientError) as err:
        client.query("enterprise_credit", aggregates=[count()], purpose="marketing")
    assert err.value.rule == "grant.purpose"
    assert "marketing" not in err.value.message  # the stated text is not echoed back
    client.query("enterprise_credit", aggregates=[count()], purpose="pre-loan review")
    client.query("enterprise_credit", aggregates=[count()])  # unstated: the grant's purpose
    records = audit_records(config)[-3:]
    assert [r["purpose"] for r in records] == ["marketing", "pre-loan review", "pre-loan review"]
    assert [r["decision"] for r in records] == ["denied", "allowed", "allowed"]
