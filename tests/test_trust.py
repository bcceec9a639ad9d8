"""Trust boundaries at the door: identity from the certificate, revocation that fails closed.

Each control is also switched off on the running server (parameter `control="off"`),
and the same attack is then shown to succeed: the pair proves the control is what
stops it.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dataops import certs
from dataops.certs import consumer_identity_from_auth_context, issue_consumer, revoke
from dataops.client import Client, DataopsClientError
from dataops.server import build_server, interceptors

from conftest import Pki, audit_records, write_config

ON_OFF = pytest.mark.parametrize("control", ["on", "off"])


# -- hostile certificates, signed by the platform CA itself ------------------------

def _hostile(pki: Pki, out: Path, common_names: list[str], san_uris: list[str] | None) -> tuple[Path, Path]:
    """A client certificate our CA really signed, with the subject and SAN an attacker asked for."""
    ca_key = serialization.load_pem_private_key((pki.directory / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((pki.directory / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if san_uris is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in san_uris]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out / "hostile.key", out / "hostile.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


HOSTILE = {
    # name: (common names, SAN URIs, the rule that refuses it)
    "nul-in-cn": (["city-bank\x00x"], ["dataops:consumer:city-bank"], "identity.common_name"),
    "two-cns": (["city-bank", "mallory"], ["dataops:consumer:city-bank"], "identity.common_name"),
    "no-san": (["city-bank"], None, "identity.san"),
    "san-names-another": (["city-bank"], ["dataops:consumer:river-bank"], "identity.san"),
    "two-consumer-sans": (["city-bank"], ["dataops:consumer:city-bank", "dataops:consumer:river-bank"],
                          "identity.san"),
}


@ON_OFF
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_certificate_naming_no_single_consumer_is_refused_and_audited(server, config, pki, tmp_path,
                                                                       monkeypatch, case, control):
    """Attack: a CA-signed certificate whose grpc summary reads "city-bank" (first CN,
    cut at NUL) but which does not name city-bank alone, served as city-bank."""
    cns, sans, rule = HOSTILE[case]
    if control == "off":  # the old path: grpc's x509_common_name
        monkeypatch.setattr(interceptors, "certificate_identity", consumer_identity_from_auth_context)
    key, cert = _hostile(pki, tmp_path / "hostile", cns, sans)
    with Client(f"localhost:{server.port}", cert=cert, key=key, ca=pki.directory / "ca.crt", timeout=10) as client:
        if control == "off":
            assert [d.id for d in client.list_datasets()] == ["enterprise_credit"]  # city-bank's view
            assert audit_records(config)[-1]["consumer"] == "city-bank"
            return
        with pytest.raises(DataopsClientError) as err:
            client.list_datasets()
    assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert err.value.rule == rule
    record = audit_records(config)[-1]
    assert (record["consumer"], record["decision"], record["rule"]) == (None, "denied", rule)


def test_a_certificate_issued_by_the_cli_names_its_consumer_in_cn_and_san(pki):
    cert = x509.load_pem_x509_certificate((pki.consumer_dir("city-bank") / "city-bank.crt").read_bytes())
    assert certs.consumer_identity_from_certificate(cert.public_bytes(serialization.Encoding.PEM)) == "city-bank"
    assert certs.consumer_identity_from_certificate(cert.public_bytes(serialization.Encoding.DER)) == "city-bank"


# -- revocation fails closed ---------------------------------------------------------

@pytest.fixture
def own_pki(pki, tmp_path) -> Pki:
    """A copy of the session PKI: these tests write CRLs into it."""
    copy = tmp_path / "pki"
    shutil.copytree(pki.directory, copy)
    return Pki(copy, pki.outsider)


@pytest.fixture
def own_config(own_pki, sandbox_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    return write_config(work, sandbox_dir, own_pki)


def _client(server, files) -> Client:
    return Client(f"localhost:{server.port}", cert=files.cert, key=files.key, ca=files.ca_cert, timeout=10)


def _served(client: Client) -> str:
    try:
        client.list_datasets()
        return "served"
    except DataopsClientError as exc:
        assert exc.code is grpc.StatusCode.UNAUTHENTICATED, exc
        return exc.rule


@ON_OFF
def test_deleting_the_crl_refuses_everyone_instead_of_unrevoking(own_config, own_pki, tmp_path, monkeypatch,
                                                                 control):
    """Attack: delete ca.crl, and a revoked certificate is served again."""
    if control == "off":
        monkeypatch.setattr(certs.RevocationList, "fail_closed", False)
    stolen = issue_consumer(own_pki.directory, "city-bank", out_dir=tmp_path / "stolen")
    regular = issue_consumer(own_pki.directory, "river-bank", out_dir=tmp_path / "regular")
    server = build_server(own_config).start()
    try:
        with _client(server, stolen) as thief, _client(server, regular) as bank:
            revoke(own_pki.directory, stolen.cert)
            assert _served(thief) == "certificate.revoked"
            (own_pki.directory / "ca.crl").unlink()
            if control == "off":
                assert _served(thief) == "served"
                return
            assert _served(thief) == "certificate.crl_unavailable"
            assert _served(bank) == "certificate.crl_unavailable"  # fail closed: everyone
            assert audit_records(own_config)[-1]["rule"] == "certificate.crl_unavailable"
            # The operator's next revocation restores a CRL with a rising number; what
            # was revoked before stays revoked although the new CRL forgot it.
            spare = issue_consumer(own_pki.directory, "harbor-insurance", out_dir=tmp_path / "spare")
            revoke(own_pki.directory, spare.cert)
            assert _served(bank) == "served"
            assert _served(thief) == "certificate.revoked"
    finally:
        server.stop(1.0)


@ON_OFF
def test_an_older_validly_signed_crl_does_not_unrevoke(own_config, own_pki, tmp_path, monkeypatch, control):
    """Attack: put back yesterday's CRL (signed by the CA, from before a revocation)."""
    if control == "off":
        monkeypatch.setattr(certs.RevocationList, "fail_closed", False)
    first = issue_consumer(own_pki.directory, "city-bank", out_dir=tmp_path / "first")
    second = issue_consumer(own_pki.directory, "city-bank", out_dir=tmp_path / "second")
    regular = issue_consumer(own_pki.directory, "river-bank", out_dir=tmp_path / "regular")
    crl = own_pki.directory / "ca.crl"
    server = build_server(own_config).start()
    try:
        with _client(server, second) as thief, _client(server, regular) as bank:
            revoke(own_pki.directory, first.cert)
            old = crl.read_bytes()
            assert _served(thief) == "served"  # the server has now seen the first CRL
            revoke(own_pki.directory, second.cert)
            assert _served(thief) == "certificate.revoked"
            crl.write_bytes(old)  # validly signed, but older
            if control == "off":
                assert _served(thief) == "served"
                return
            assert _served(thief) == "certificate.revoked"
            assert _served(bank) == "served"  # the rest keep working on the remembered set
    finally:
        server.stop(1.0)
    # The remembered set survives a restart: the old CRL is still refused.
    server = build_server(own_config).start()
    try:
        with _client(server, second) as thief, _client(server, regular) as bank:
            assert _served(thief) == "certificate.revoked"
            assert _served(bank) == "served"
            crl.unlink()
            assert _served(bank) == "certificate.crl_unavailable"
    finally:
        server.stop(1.0)
    state = own_config.paths.state / certs.REVOCATION_STATE
    serials = {x509.load_pem_x509_certificate(f.cert.read_bytes()).serial_number for f in (first, second)}
    assert serials <= set(__import__("json").loads(state.read_text())["serials"])


def test_each_crl_the_cli_writes_has_a_rising_number(own_pki, tmp_path):
    numbers = []
    for i in range(3):
        spare = issue_consumer(own_pki.directory, "city-bank", out_dir=tmp_path / f"spare{i}")
        path = revoke(own_pki.directory, spare.cert)
        numbers.append(certs._crl_number(x509.load_pem_x509_crl(path.read_bytes())))
    assert numbers == sorted(set(numbers)) and numbers[0] > 0
