"""A small development PKI for mutual TLS between consumers and the dataops server.

One self-signed CA signs the server certificate and one client certificate per
consumer. The server trusts only this CA, so the common name of a verified client
certificate *is* the consumer's identity: policies are keyed by it.

Keys are EC P-256 signed with SHA-256 because every gRPC TLS stack accepts them
(Ed25519 certificates are not universally supported). Private keys are stored
unencrypted because grpc loads them unattended; they are created 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_COMMON_NAME = "dataops platform CA"
SERVER_COMMON_NAME = "dataops server"
CONSUMER_URI_PREFIX = "dataops:consumer:"

# fullmatch, not "^...$": "$" also matches before a trailing newline.
_CONSUMER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# Backdate certificates so a peer whose clock is slightly behind still accepts them.
_CLOCK_SKEW = dt.timedelta(minutes=1)


class CertificateError(Exception):
    """A certificate operation was refused or failed; the message is for the operator."""


@dataclass(frozen=True)
class AuthorityFiles:
    ca_key: Path
    ca_cert: Path
    server_key: Path
    server_cert: Path


@dataclass(frozen=True)
class ConsumerFiles:
    consumer: str
    key: Path
    cert: Path
    ca_cert: Path  # a copy of the CA certificate, so the consumer has all three files


def init_authority(
    directory: Path,
    *,
    server_names: Iterable[str] = ("localhost",),
    server_ips: Iterable[str] = ("127.0.0.1", "::1"),
    days: int = 825,
    force: bool = False,
) -> AuthorityFiles:
    """Create a CA and a server certificate signed by it in `directory`."""
    directory = Path(directory)
    files = AuthorityFiles(
        ca_key=directory / "ca.key",
        ca_cert=directory / "ca.crt",
        server_key=directory / "server.key",
        server_cert=directory / "server.crt",
    )
    existing = [p for p in (files.ca_key, files.server_key) if p.exists()]
    if existing and not force:
        raise CertificateError(
            f"{existing[0]} already exists; refusing to replace the certificate authority "
            "(every consumer certificate it issued would stop working). "
            "Run `dataops certs init --force` to replace it anyway."
        )
    san = [x509.DNSName(name) for name in server_names]
    for ip in server_ips:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise CertificateError(f"server IP {ip!r} is not an IP address") from None
    if not san:
        raise CertificateError("the server certificate needs at least one DNS name or IP address")
    if days < 1:
        raise CertificateError(f"days must be at least 1, got {days}")

    not_before, not_after = _validity(days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(CA_COMMON_NAME)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # pathlen 0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _sign_leaf(
        ca_key, ca_cert, server_key, SERVER_COMMON_NAME, san,
        ExtendedKeyUsageOID.SERVER_AUTH, not_before, not_after,
    )

    # 0700 so the CA key is not even listable by others (applies only if we create it).
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private_key(files.ca_key, ca_key)
    _write_certificate(files.ca_cert, ca_cert)
    _write_private_key(files.server_key, server_key)
    _write_certificate(files.server_cert, server_cert)
    return files


def issue_consumer(
    directory: Path,
    consumer: str,
    *,
    out_dir: Path | None = None,
    days: int = 365,
    force: bool = False,
    validity: tuple[dt.datetime, dt.datetime] | None = None,
) -> ConsumerFiles:
    """Issue a client certificate for `consumer` from the CA in `directory`.

    `validity` overrides (not_before, not_after); tests use it to make expired certificates.
    """
    directory = Path(directory)
    if not isinstance(consumer, str) or not _CONSUMER_NAME.fullmatch(consumer):
        raise CertificateError(
            f"invalid consumer name {consumer!r}: use 1-63 characters from lowercase letters, "
            "digits, '.', '_' and '-', starting with a letter or digit"
        )
    if consumer == "ca":
        # "<consumer>.crt" would collide with the copied "ca.crt".
        raise CertificateError("consumer name 'ca' is reserved")
    ca_key, ca_cert, ca_pem = _load_authority(directory)

    target = Path(out_dir) if out_dir is not None else directory / "consumers" / consumer
    files = ConsumerFiles(
        consumer=consumer,
        key=target / f"{consumer}.key",
        cert=target / f"{consumer}.crt",
        ca_cert=target / "ca.crt",
    )
    authority = {(directory / n).resolve() for n in ("ca.key", "ca.crt", "server.key", "server.crt")}
    if {files.key.resolve(), files.cert.resolve()} & authority:
        raise CertificateError(f"consumer {consumer!r} would overwrite the authority's own files in {target}")
    if files.key.exists() and not force:
        raise CertificateError(
            f"{files.key} already exists; refusing to replace consumer {consumer!r}'s key. "
            f"Run `dataops certs issue {consumer} --force` to reissue."
        )
    if days < 1:
        raise CertificateError(f"days must be at least 1, got {days}")

    not_before, not_after = validity or _validity(days)
    # A certificate outliving its issuer fails verification anyway; cap it honestly.
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    if not_after <= not_before:
        raise CertificateError(f"the certificate authority in {directory} has expired")
    key = ec.generate_private_key(ec.SECP256R1())
    # The URI SAN carries the identity in a typed, unambiguous form for tools that ignore CNs.
    san = [x509.UniformResourceIdentifier(CONSUMER_URI_PREFIX + consumer)]
    cert = _sign_leaf(
        ca_key, ca_cert, key, consumer, san,
        ExtendedKeyUsageOID.CLIENT_AUTH, not_before, not_after,
    )

    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private_key(files.key, key)
    _write_certificate(files.cert, cert)
    files.ca_cert.write_bytes(ca_pem)
    return files


def consumer_identity_from_auth_context(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """The consumer name from grpc's `context.auth_context()`, or None if there is none.

    Only meaningful on a server that requires client certificates from our CA:
    then the common name has been verified by the TLS handshake.
    """
    values = auth_context.get("x509_common_name") or []
    # An ambiguous identity is no identity: never guess which name a policy should match.
    if len(values) != 1:
        return None
    try:
        name = values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
    # Anything our CA could not have issued to a consumer (e.g. the server's own
    # certificate, "dataops server") is not a consumer identity.
    return name if _CONSUMER_NAME.fullmatch(name) else None


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    return now - _CLOCK_SKEW, now + dt.timedelta(days=days)


def _key_usage(**enabled: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
        False,
    )
    flags.update(enabled)
    return x509.KeyUsage(**flags)


def _sign_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    san: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # ECDHE key exchange only needs the key to sign the handshake.
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _load_authority(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, bytes]:
    try:
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
        ca_pem = (directory / "ca.crt").read_bytes()
        cert = x509.load_pem_x509_certificate(ca_pem)
    except FileNotFoundError as exc:
        raise CertificateError(
            f"no certificate authority in {directory}: {exc.filename} is missing "
            "(create one with `dataops certs init`)"
        ) from None
    except ValueError as exc:
        raise CertificateError(f"cannot load the certificate authority in {directory}: {exc}") from None
    point = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or (
        key.public_key().public_bytes(*point) != cert.public_key().public_bytes(*point)
    ):
        raise CertificateError(f"{directory / 'ca.key'} does not belong to {directory / 'ca.crt'}")
    return key, cert, ca_pem


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Callers have already refused unless force=True. Remove the old file and create
    # exclusively: the key is 0600 from its first byte (no chmod race), and we never
    # write into a file or symlink someone else prepared.
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def _write_certificate(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# --- revocation -------------------------------------------------------------
#
# grpcio's Python credentials take no CRL, so the server checks each request's peer
# certificate against a CRL signed by the platform CA (`ca.crl` beside `ca.crt`).
# A revoked certificate is refused at its next request, without a restart.

CRL_NAME = "ca.crl"


def revoke(directory: Path, certificate: Path) -> Path:
    """Add `certificate`'s serial to the CA's CRL (created on first use); returns the CRL path."""
    directory = Path(directory)
    ca_key, ca_cert, _ = _load_authority(directory)
    try:
        cert = x509.load_pem_x509_certificate(Path(certificate).read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateError(f"{certificate}: not a readable PEM certificate ({exc})") from None
    if cert.issuer != ca_cert.subject:
        raise CertificateError(f"{certificate} was not issued by the CA in {directory}")
    path = directory / CRL_NAME
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=30))
    )
    serials = {cert.serial_number}
    if path.exists():
        old = x509.load_pem_x509_crl(path.read_bytes())
        for entry in old:
            serials.add(entry.serial_number)
    for serial in sorted(serials):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)
    return path


class RevocationList:
    """The revoked serials from `ca.crl`, reloaded when the file changes.

    A CRL whose signature does not verify against the CA is an operator error: it is
    refused and every certificate is treated as revoked until it is fixed (fail closed).
    """

    def __init__(self, ca_cert_path: Path) -> None:
        self.ca_cert_path = Path(ca_cert_path)
        self.path = self.ca_cert_path.with_name(CRL_NAME)
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        self._broken = False
        self._by_pem: dict[bytes, int] = {}

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._serials, self._broken = None, frozenset(), False
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            ca = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
            crl = x509.load_pem_x509_crl(self.path.read_bytes())
            if not crl.is_signature_valid(ca.public_key()):
                raise ValueError("signature does not verify against the CA")
        except (OSError, ValueError) as exc:
            import logging

            logging.getLogger(__name__).error("%s is invalid (%s): refusing every certificate", self.path, exc)
            self._broken = True
            return
        self._serials = frozenset(entry.serial_number for entry in crl)
        self._broken = False

    def is_revoked(self, pem: bytes) -> bool:
        self._reload()
        if self._broken:
            return True
        serial = self._by_pem.get(pem)
        if serial is None:
            serial = x509.load_pem_x509_certificate(pem).serial_number
            if len(self._by_pem) > 10_000:
                self._by_pem.clear()
            self._by_pem[pem] = serial
        return serial in self._serials


# --- listing ----------------------------------------------------------------


@dataclass(frozen=True)
class CertificateInfo:
    role: str  # ca | server | consumer
    name: str  # the common name
    status: str  # valid | expired | not yet valid | revoked
    expires: str  # ISO 8601, UTC
    names: tuple[str, ...]  # subject alternative names (DNS, IP, URI)
    path: str


def list_certificates(directory: Path) -> list[CertificateInfo]:
    """The CA, the server certificate and every consumer certificate under `directory`."""
    directory = Path(directory)
    ca_path = directory / "ca.crt"
    if not ca_path.exists():
        raise CertificateError(f"no certificate authority in {directory} (create one with `dataops certs init`)")
    revocations = RevocationList(ca_path)
    now = dt.datetime.now(dt.timezone.utc)
    found = [("ca", ca_path), ("server", directory / "server.crt")]
    found += [("consumer", p) for p in sorted((directory / "consumers").glob("*/*.crt")) if p.name != "ca.crt"]
    out = []
    for role, path in found:
        if not path.exists():
            continue
        pem = path.read_bytes()
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise CertificateError(f"{path}: not a PEM certificate ({exc})") from None
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = tuple(str(v.value) for v in san)
        except x509.ExtensionNotFound:
            names = ()
        if role == "consumer" and revocations.is_revoked(pem):
            status = "revoked"
        elif now > cert.not_valid_after_utc:
            status = "expired"
        elif now < cert.not_valid_before_utc:
            status = "not yet valid"
        else:
            status = "valid"
        common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        out.append(CertificateInfo(role, str(common[0].value) if common else "", status,
                                   cert.not_valid_after_utc.isoformat(), names, str(path)))
    return out
