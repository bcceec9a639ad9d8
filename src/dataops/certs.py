"""A small development PKI for mutual TLS between consumers and the dataops server.

One self-signed CA signs the server certificate and one client certificate per
consumer. The server trusts only this CA, so the consumer a verified client
certificate names *is* the consumer's identity: policies are keyed by it. The server
reads that name from the certificate's own bytes: exactly one common name and a
`dataops:consumer:<name>` URI in its subjectAltName (`consumer_identity_from_certificate`).

Keys are EC P-256 signed with SHA-256 because every gRPC TLS stack accepts them
(Ed25519 certificates are not universally supported). Private keys are stored
unencrypted because grpc loads them unattended; they are created 0600.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

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
    san: list[x509.GeneralName] = [x509.DNSName(name) for name in server_names]
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
        ca_key,
        ca_cert,
        server_key,
        SERVER_COMMON_NAME,
        san,
        ExtendedKeyUsageOID.SERVER_AUTH,
        not_before,
        not_after,
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
        ca_key,
        ca_cert,
        key,
        consumer,
        san,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before,
        not_after,
    )

    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private_key(files.key, key)
    _write_certificate(files.cert, cert)
    files.ca_cert.write_bytes(ca_pem)
    return files


def consumer_identity_from_auth_context(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """The consumer name grpc's `context.auth_context()` reports, or None.

    Not an identity to trust on its own: grpc reports the *first* common name only and
    cuts it at a NUL byte, so `CN=city-bank\\0x`, or two CNs, reach us here as a clean
    "city-bank". The server uses `consumer_identity_from_certificate` instead; this is
    kept for tools that only need a display name.
    """
    values = auth_context.get("x509_common_name") or []
    if len(values) != 1:
        return None
    try:
        name = values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name if _CONSUMER_NAME.fullmatch(name) else None


class IdentityError(Exception):
    """A verified certificate does not name exactly one consumer; `rule` says why."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


# Certificates whose identity is remembered (about 1-2 KiB of key each): far more than
# the platform issues, so a live certificate is parsed once, not on every request.
IDENTITY_CACHE_SIZE = 1024


def consumer_identity_from_certificate(pem: bytes) -> str:
    """The consumer a verified peer certificate (PEM or DER) names; see `parse_consumer_identity`.

    Remembered per certificate (its exact bytes, at most IDENTITY_CACHE_SIZE of them):
    parsing is a tenth of a small request's time, and what a certificate names is a
    function of its bytes alone. Whether it may be used now is not, and is never
    cached here: the TLS handshake verifies the CA's signature and validity on every
    connection, and `RevocationList.check` runs on every request. A certificate that
    names no single consumer raises every time (refusals are not remembered).
    """
    return _certificate_identity(bytes(pem))


@functools.lru_cache(maxsize=IDENTITY_CACHE_SIZE)
def _certificate_identity(pem: bytes) -> str:
    return parse_consumer_identity(pem)


def parse_consumer_identity(pem: bytes) -> str:
    """The consumer a verified peer certificate (PEM or DER) names, parsed by `cryptography`.

    The TLS handshake proved our CA signed it; this decides *whom* it names, from the
    certificate's own bytes rather than grpc's summary of it:

    * exactly one common name in the subject, printable, no NUL, a valid consumer
      name (grpc would silently take the first of two, or the part before a NUL);
    * a subjectAltName with exactly one `dataops:consumer:` URI, naming the same
      consumer (the typed form `issue_consumer` writes; a CN alone is ambiguous).

    Raises IdentityError naming the failed rule; the caller refuses the request.
    """
    try:
        cert = (
            x509.load_pem_x509_certificate(pem)
            if pem.lstrip().startswith(b"-----")
            else x509.load_der_x509_certificate(pem)
        )
    except ValueError:
        raise IdentityError("the client certificate cannot be parsed", "identity.certificate") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise IdentityError(
            f"the client certificate has {len(names)} common names, not one", "identity.common_name"
        )
    name = names[0].value
    # isprintable() refuses NUL and every control character; the pattern refuses the rest.
    if not isinstance(name, str) or not name.isprintable() or not _CONSUMER_NAME.fullmatch(name):
        raise IdentityError(
            "the client certificate's common name is not a consumer name", "identity.common_name"
        )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError(
            "the client certificate has no subjectAltName naming its consumer", "identity.san"
        ) from None
    uris = [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(CONSUMER_URI_PREFIX)
    ]
    if uris != [CONSUMER_URI_PREFIX + name]:
        raise IdentityError(
            "the client certificate's subjectAltName does not name the consumer of its "
            "common name (exactly one dataops:consumer: URI)",
            "identity.san",
        )
    return name


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - _CLOCK_SKEW, now + dt.timedelta(days=days)


def _key_usage(**enabled: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    flags.update(enabled)
    return x509.KeyUsage(**flags)


# The CA key types that can sign a CRL (an X25519 or X448 key cannot). Not DSA: gRPC's
# TLS (BoringSSL) has no DSA, so a DSA CA never served a handshake here, and cryptography
# 51 deprecates the type (naming it warns on every command's stderr).
_SIGNING_KEYS = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)


def _sign_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    san: Sequence[x509.GeneralName],
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
#
# Revocation must fail closed, since whoever can touch files can otherwise un-revoke:
# the server remembers what it has accepted (`revocations.json` in its state
# directory: the highest CRL number and every serial ever revoked). Once a CRL has been
# accepted, a missing or unreadable one refuses everyone; a CRL whose number does not
# rise is refused and the remembered serials stay revoked; the set only grows.

CRL_NAME = "ca.crl"
REVOCATION_STATE = "revocations.json"


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL's number (RFC 5280 5.2.3); a CRL without one counts as number 0."""
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def revoke(directory: Path, certificate: Path) -> Path:
    """Add `certificate`'s serial to the CA's CRL (created on first use); returns the CRL path.

    Each CRL carries a number above its predecessor's and above the current time in
    microseconds, so it rises even when the old `ca.crl` was lost or deleted (servers
    refuse a CRL whose number does not rise).
    """

    directory = Path(directory)
    ca_key, ca_cert, _ = _load_authority(directory)
    try:
        cert = x509.load_pem_x509_certificate(Path(certificate).read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateError(f"{certificate}: not a readable PEM certificate ({exc})") from None
    if cert.issuer != ca_cert.subject:
        raise CertificateError(f"{certificate} was not issued by the CA in {directory}")
    path = directory / CRL_NAME
    now = dt.datetime.now(dt.UTC)
    serials = {cert.serial_number}
    number = time.time_ns() // 1000
    if path.exists():
        try:
            old = x509.load_pem_x509_crl(path.read_bytes())
        except ValueError as exc:
            raise CertificateError(
                f"{path} is not a readable CRL ({exc}); restore it from a backup "
                "(replacing it would un-revoke what it lists)"
            ) from None
        serials.update(entry.serial_number for entry in old)
        number = max(number, _crl_number(old) + 1)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=30))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
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
    """The revoked serials: what `ca.crl` lists now plus everything accepted before.

    `check(pem)` returns None for a certificate in good standing, otherwise the rule
    that refuses it: `certificate.revoked`, or `certificate.crl_unavailable` for
    everyone while the CRL is missing (after one was seen), unreadable, or not signed
    by the CA. `state_dir` holds the remembered set; without it (tools, old callers)
    nothing is remembered across restarts.
    """

    # The control itself; tests switch it off to show the attacks it stops (False: a
    # missing CRL revokes nothing and any validly signed CRL replaces the set).
    fail_closed = True

    def __init__(self, ca_cert_path: Path, state_dir: Path | None = None) -> None:

        self.ca_cert_path = Path(ca_cert_path)
        self.path = self.ca_cert_path.with_name(CRL_NAME)
        self.state_path = Path(state_dir) / REVOCATION_STATE if state_dir is not None else None
        self._lock = threading.Lock()
        self._digest: bytes | None = None  # the CRL content last examined (by hash, never mtime)
        self._broken: str | None = None
        self._by_pem: dict[bytes, int] = {}
        self.number, self._serials, self.seen = self._load_state()
        self._reload()  # at start: a CRL that is there is accepted (and remembered) or refused now

    # -- the remembered set -------------------------------------------------------

    def _load_state(self) -> tuple[int, frozenset[int], bool]:

        if self.state_path is None or not self.state_path.exists():
            return 0, frozenset(), False
        try:
            doc = json.loads(self.state_path.read_text())
            return int(doc["crl_number"]), frozenset(int(s) for s in doc["serials"]), True
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A damaged memory of revocations cannot be trusted to be complete.
            raise CertificateError(
                f"{self.state_path}: unreadable revocation state ({exc}); restore it "
                "from a backup (deleting it forgets revocations)"
            ) from None

    def _save_state(self) -> None:

        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        with open(tmp, "w") as out:
            json.dump({"crl_number": self.number, "serials": sorted(self._serials)}, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.state_path)

    # -- reading ca.crl -----------------------------------------------------------

    def _refuse_everyone(self, why: str) -> None:

        if self._broken != why:
            log.error("%s: %s; refusing every certificate", self.path, why)
        self._broken = why

    def _reload(self) -> None:

        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self._digest = None
            if not self.fail_closed:
                self._serials, self._broken = frozenset(), None
            elif self.seen:
                self._refuse_everyone("the CRL is missing although one was accepted before")
            else:
                self._broken = None  # no CRL was ever issued: nothing is revoked
            return
        except OSError as exc:
            self._digest = None
            self._refuse_everyone(f"the CRL cannot be read ({exc.strerror})")
            return
        digest = hashlib.sha256(raw).digest()
        if digest == self._digest:
            return
        self._digest = digest
        try:
            ca = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
            crl = x509.load_pem_x509_crl(raw)
            issuer_key = ca.public_key()
            if (
                crl.issuer != ca.subject
                or not isinstance(issuer_key, _SIGNING_KEYS)
                or not crl.is_signature_valid(issuer_key)
            ):
                raise ValueError("its signature does not verify against the CA")
        except (OSError, ValueError) as exc:
            self._refuse_everyone(f"the CRL is invalid ({exc})")
            return
        self._broken = None
        number = _crl_number(crl)
        serials = frozenset(entry.serial_number for entry in crl)
        if not self.fail_closed:
            self.number, self._serials = number, serials
            return
        if self.seen and number <= self.number:
            if number < self.number or not serials <= self._serials:
                # An older CRL (or a second one with the same number) would un-revoke:
                # refuse it; the remembered serials stay revoked.
                log.error(
                    "%s: CRL number %d does not rise above %d; refused, the newer revocations stay",
                    self.path,
                    number,
                    self.number,
                )
            return
        # Union, not replace: a serial once revoked stays revoked.
        self.number, self._serials, self.seen = number, self._serials | serials, True
        self._save_state()

    def check(self, pem: bytes) -> str | None:
        with self._lock:
            self._reload()
            if self._broken is not None:
                return "certificate.crl_unavailable"
            serials = self._serials
        serial = self._by_pem.get(pem)
        if serial is None:
            serial = x509.load_pem_x509_certificate(pem).serial_number
            if len(self._by_pem) > 10_000:
                self._by_pem.clear()
            self._by_pem[pem] = serial
        return "certificate.revoked" if serial in serials else None

    def is_revoked(self, pem: bytes) -> bool:
        return self.check(pem) is not None


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
        raise CertificateError(
            f"no certificate authority in {directory} (create one with `dataops certs init`)"
        )
    revocations = RevocationList(ca_path)
    now = dt.datetime.now(dt.UTC)
    found = [("ca", ca_path), ("server", directory / "server.crt")]
    found += [
        ("consumer", p) for p in sorted((directory / "consumers").glob("*/*.crt")) if p.name != "ca.crt"
    ]
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
        out.append(
            CertificateInfo(
                role,
                str(common[0].value) if common else "",
                status,
                cert.not_valid_after_utc.isoformat(),
                names,
                str(path),
            )
        )
    return out
