"""The dev PKI: certificates that really work for mutual TLS, and refusals that protect keys."""

from __future__ import annotations

import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dataops.certs import (
    CertificateError,
    consumer_identity_from_auth_context,
    init_authority,
    issue_consumer,
)

WHOAMI = "/dataops.test.Echo/WhoAmI"


def _identity(request: bytes) -> bytes:
    return request


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    consumer = consumer_identity_from_auth_context(context.auth_context())
    if consumer is None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "no consumer identity")
    return consumer.encode()


@pytest.fixture
def authority(tmp_path: Path):
    return init_authority(tmp_path / "pki")


@pytest.fixture
def mtls_port(authority):
    """A real grpc server that requires client certificates from our CA."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(
        _whoami, request_deserializer=_identity, response_serializer=_identity
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("dataops.test.Echo", {"WhoAmI": handler}),)
    )
    credentials = grpc.ssl_server_credentials(
        [(authority.server_key.read_bytes(), authority.server_cert.read_bytes())],
        root_certificates=authority.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield port
    server.stop(None)


def _call(target: str, ca: Path, key: Path | None = None, cert: Path | None = None) -> str:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    # No proxy from the environment may sit between the test and its own server.
    with grpc.secure_channel(target, credentials, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = channel.unary_unary(WHOAMI, request_serializer=_identity, response_deserializer=_identity)
        return stub(b"", timeout=10).decode()


def test_consumer_certificate_authenticates_over_mtls_and_carries_its_name(tmp_path, authority, mtls_port):
    bank = issue_consumer(authority.ca_cert.parent, "city-bank")
    # The consumer's directory alone is enough to connect: key, cert and CA.
    assert {p.name for p in bank.key.parent.iterdir()} == {"city-bank.key", "city-bank.crt", "ca.crt"}

    assert _call(f"127.0.0.1:{mtls_port}", bank.ca_cert, bank.key, bank.cert) == "city-bank"
    # The server certificate names both the IP and the DNS name.
    assert _call(f"localhost:{mtls_port}", bank.ca_cert, bank.key, bank.cert) == "city-bank"


def test_client_certificate_from_another_ca_is_refused(tmp_path, authority, mtls_port):
    rogue = init_authority(tmp_path / "rogue")
    impostor = issue_consumer(rogue.ca_cert.parent, "city-bank")
    with pytest.raises(grpc.RpcError) as refused:
        # Trusts our server, but presents a certificate our CA never signed.
        _call(f"127.0.0.1:{mtls_port}", authority.ca_cert, impostor.key, impostor.cert)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_is_refused(authority, mtls_port):
    with pytest.raises(grpc.RpcError) as refused:
        _call(f"127.0.0.1:{mtls_port}", authority.ca_cert)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_certificate_cannot_pose_as_a_consumer(authority, mtls_port):
    with pytest.raises(grpc.RpcError) as refused:
        _call(f"127.0.0.1:{mtls_port}", authority.ca_cert, authority.server_key, authority.server_cert)
    # Refused in the handshake: its extended key usage is serverAuth only.
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificates_say_what_they_are_for(authority):
    ca = x509.load_pem_x509_certificate(authority.ca_cert.read_bytes())
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dataops platform CA"
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0

    server = x509.load_pem_x509_certificate(authority.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    bank = issue_consumer(authority.ca_cert.parent, "city-bank")
    client = x509.load_pem_x509_certificate(bank.cert.read_bytes())
    san = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["dataops:consumer:city-bank"]
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert client.not_valid_before_utc < client.not_valid_after_utc <= ca.not_valid_after_utc


def test_private_keys_are_created_owner_only(tmp_path, authority):
    bank = issue_consumer(authority.ca_cert.parent, "city-bank", out_dir=tmp_path / "bank")
    for key in (authority.ca_key, authority.server_key, bank.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_init_refuses_to_replace_an_existing_authority(authority):
    before = authority.ca_key.read_bytes()
    with pytest.raises(CertificateError, match="already exists"):
        init_authority(authority.ca_cert.parent)
    assert authority.ca_key.read_bytes() == before

    replaced = init_authority(authority.ca_cert.parent, force=True)
    assert replaced.ca_key.read_bytes() != before
    assert stat.S_IMODE(replaced.ca_key.stat().st_mode) == 0o600


def test_issue_refuses_to_replace_a_consumer_key_unless_forced(authority):
    directory = authority.ca_cert.parent
    bank = issue_consumer(directory, "city-bank")
    first_key = bank.key.read_bytes()
    with pytest.raises(CertificateError, match="already exists"):
        issue_consumer(directory, "city-bank")
    assert bank.key.read_bytes() == first_key

    issue_consumer(directory, "city-bank", force=True)
    assert bank.key.read_bytes() != first_key


@pytest.mark.parametrize(
    "name",
    ["", "City-Bank", "-bank", ".bank", "bank/../../etc", "bank\n", "a" * 64, "银行", "bank name", "ca"],
)
def test_bad_consumer_names_are_rejected(authority, name):
    with pytest.raises(CertificateError, match="consumer name"):
        issue_consumer(authority.ca_cert.parent, name)


def test_consumer_files_may_not_overwrite_the_authority(authority):
    with pytest.raises(CertificateError, match="overwrite"):
        issue_consumer(authority.ca_cert.parent, "server", out_dir=authority.ca_cert.parent)


def test_issue_without_an_authority_says_so(tmp_path):
    with pytest.raises(CertificateError, match="no certificate authority"):
        issue_consumer(tmp_path, "city-bank")


def test_identity_comes_from_exactly_one_valid_common_name():
    assert consumer_identity_from_auth_context({"x509_common_name": [b"city-bank"]}) == "city-bank"
    assert consumer_identity_from_auth_context({}) is None
    assert consumer_identity_from_auth_context({"transport_security_type": [b"insecure"]}) is None
    assert consumer_identity_from_auth_context({"x509_common_name": [b"a", b"b"]}) is None
    assert consumer_identity_from_auth_context({"x509_common_name": [b"\xff"]}) is None
    assert consumer_identity_from_auth_context({"x509_common_name": [b"dataops server"]}) is None
