"""The server configuration, read by `dataops serve` from a `dataops.toml`.

Strict on purpose: an unknown key is an error (a typo must not silently fall back
to a default), and every error names the file, the table and the key.
Relative paths are resolved against the TOML file's directory, so the server
behaves the same whatever directory it is started from.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

from dataops.errors import ConfigError  # a LoadError: operator's file mistake

__all__ = [
    "AuditSection",
    "ConfigError",
    "LedgerSection",
    "Limits",
    "PathsSection",
    "ServerConfig",
    "ServerSection",
    "TlsSection",
    "load_config",
    "parse_listen",
]

# grpc takes message size limits as a signed 32-bit int.
_MAX_MESSAGE_BYTES = 2**31 - 1


def parse_listen(listen: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 hosts in brackets, "[::1]:50051") into host and port.

    >>> parse_listen("[::1]:50051")
    ('::1', 50051)
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(listen)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            raise ValueError(listen)
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(listen)  # an IPv6 address without brackets is ambiguous
    return host, int(port)


@dataclass(frozen=True)
class ServerSection:
    TABLE: ClassVar[str] = "server"

    listen: str = "127.0.0.1:50051"
    workers: int = 8
    max_message_bytes: int = 4 * 1024 * 1024
    grace_seconds: float = 10.0
    policy_poll_seconds: float = 1.0
    # A policy edit that widens access applies once the file's content has stayed the
    # same this long (narrowing edits apply at once): a half-written file is never served.
    policy_settle_seconds: float = 2.0
    # A DP query whose dataset's serving copy is still being built waits this long for it,
    # then gets UNAVAILABLE with a retry hint (dataops.engines.prepared).
    copy_wait_seconds: float = 2.0
    # The address-space cap of the child process that builds a serving copy: its RSS can
    # never pass it, and a build that needs more fails alone, the server serving on.
    copy_memory_limit_mib: int = 4096

    def __post_init__(self) -> None:
        if not isinstance(self.listen, str):
            raise _invalid(self, "listen", 'a "host:port" string')
        try:
            parse_listen(self.listen)
        except ValueError:
            raise _invalid(self, "listen", 'host:port with IPv6 in brackets, e.g. "[::1]:50051"') from None
        _positive_int(self, "workers")
        _positive_int(self, "max_message_bytes", upper=_MAX_MESSAGE_BYTES)
        _seconds(self, "grace_seconds", allow_zero=True)  # 0: stop without draining
        _seconds(self, "policy_poll_seconds", allow_zero=False)
        _seconds(self, "policy_settle_seconds", allow_zero=True)
        _seconds(self, "copy_wait_seconds", allow_zero=True)
        _positive_int(self, "copy_memory_limit_mib")

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


@dataclass(frozen=True)
class PathsSection:
    TABLE: ClassVar[str] = "paths"

    catalog: Path
    policies: Path
    sandbox: Path
    state: Path  # audit log, budget ledger
    products: Path  # table and subject products, one TOML file each
    consents: Path  # issuers.toml: the consent services whose signatures are trusted

    def __post_init__(self) -> None:
        for f in fields(self):
            _path(self, f.name)


@dataclass(frozen=True)
class TlsSection:
    TABLE: ClassVar[str] = "tls"

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def __post_init__(self) -> None:
        for f in fields(self):
            _path(self, f.name)


@dataclass(frozen=True)
class Limits:
    """Query complexity caps; queries beyond them are refused as INVALID_QUERY."""

    TABLE: ClassVar[str] = "limits"

    max_filters: int = 16
    max_group_by: int = 4
    max_aggregates: int = 8
    max_in_values: int = 256
    max_output_rows: int = 10_000
    # Per consumer, over all dataops.v1 RPCs: a token bucket refilled at this rate,
    # holding at most `rate_burst` requests.
    rate_per_minute: int = 600
    rate_burst: int = 60
    # Requests served at once (admitted past identity), overall and per consumer. Beyond
    # either, RESOURCE_EXHAUSTED (rule limits.concurrency), audited. The per-consumer cap
    # stays below [server] workers so one consumer's slow queries leave engine threads
    # for the others.
    max_in_flight: int = 32
    max_in_flight_per_consumer: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            _positive_int(self, f.name)


@dataclass(frozen=True)
class AuditSection:
    """Who signs the audit log's checkpoints, and the ledger check at start."""

    TABLE: ClassVar[str] = "audit"

    # A signer already running (as another OS user, so this server cannot read its
    # key): its Unix socket. Unset: `dataops serve` starts one itself with its key in
    # `signer_dir`.
    signer_socket: Path | None = None
    # The key directory of the signer the server starts (default: `signer` beside
    # dataops.toml — never under [paths] state, which the server process owns).
    signer_dir: Path | None = None
    # The log's name in its checkpoints (C2SP origin); also the signing key's name.
    origin: str = "dataops-audit"
    # Refuse to start when the ledger has spent less than the audit log records.
    # Off only to demonstrate the attack it stops.
    reconcile_ledger: bool = True

    def __post_init__(self) -> None:
        for name in ("signer_socket", "signer_dir"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), Path):
                raise _invalid(self, name, "a path")
        if (
            not isinstance(self.origin, str)
            or not self.origin
            or not self.origin.isprintable()
            or " " in self.origin
        ):
            raise _invalid(self, "origin", "a non-empty name without spaces")
        if not isinstance(self.reconcile_ledger, bool):
            raise _invalid(self, "reconcile_ledger", "true or false")


@dataclass(frozen=True)
class LedgerSection:
    """Where the privacy-budget ledger and the stored releases live."""

    TABLE: ClassVar[str] = "ledger"

    # Unset: a SQLite file under [paths] state, for one server. A PostgreSQL URL in
    # libpq's form ("postgresql://dataops@db.internal/dataops", or over a socket
    # "postgresql:///dataops?host=/run/postgresql"): every server replica behind one
    # address names the same database, and they share budgets atomically. The password
    # goes in ~/.pgpass (or the file PGPASSFILE names), never in this file.
    url: str | None = None

    def __post_init__(self) -> None:
        if self.url is None:
            return
        if not isinstance(self.url, str) or not self.url.startswith(("postgresql://", "postgres://")):
            raise _invalid(self, "url", 'a PostgreSQL URL ("postgresql://host/database")')
        from urllib.parse import parse_qs, urlsplit

        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        except ValueError:
            raise _invalid(self, "url", 'a PostgreSQL URL ("postgresql://host/database")') from None
        if parts.password is not None:
            raise ConfigError(
                f"[{self.TABLE}] url must not hold a password (dataops.toml is no place for a secret): "
                "put it in ~/.pgpass or the file PGPASSFILE names, which libpq reads"
            )
        if not parts.path.strip("/") and "dbname" not in parse_qs(parts.query):
            raise _invalid(self, "url", 'a URL naming the database ("postgresql://host/database")')
        try:
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            raise ConfigError(
                f"[{self.TABLE}] url: a PostgreSQL ledger needs psycopg: pip install 'dataops[server]'"
            ) from None
        try:
            conninfo_to_dict(self.url)  # libpq's own parser: unknown parameters, bad syntax
        except Exception as exc:  # noqa: BLE001 - psycopg raises ProgrammingError subclasses
            raise ConfigError(f"[{self.TABLE}] url is not a valid libpq URL: {exc}") from None


@dataclass(frozen=True)
class StatePaths:
    """Every path the server keeps under `[paths] state`, named in this one place: the
    server, the operator's and reviewer's commands and the demo all read them here."""

    root: Path

    @property
    def audit_dir(self) -> Path:
        """The audit log: its segments, checkpoints and the public key (`dataops audit`)."""
        return self.root / "audit"

    @property
    def audit_log(self) -> Path:
        return self.audit_dir / "audit.jsonl"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger" / "ledger.sqlite3"

    @property
    def consents_dir(self) -> Path:
        """Consent uses and revocations, and the key that hashes subject ids in the log."""
        return self.root / "consents"

    @property
    def consent_store(self) -> Path:
        return self.consents_dir / "consents.sqlite3"

    @property
    def subject_secret(self) -> Path:
        return self.consents_dir / "subject-hmac.key"

    @property
    def consent_service(self) -> Path:
        """The demo's and tests' consent issuer (`dataops consent`): its signing keys."""
        return self.root / "consent-service"

    @property
    def pki(self) -> Path:
        """The default certificate authority and server certificate (`dataops certs init`)."""
        return self.root / "pki"


@dataclass(frozen=True)
class ServerConfig:
    server: ServerSection
    paths: PathsSection
    tls: TlsSection
    limits: Limits
    audit: AuditSection = field(default_factory=AuditSection)
    ledger: LedgerSection = field(default_factory=LedgerSection)

    @property
    def state_paths(self) -> StatePaths:
        return StatePaths(self.paths.state)

    @property
    def signer_dir(self) -> Path:
        return self.audit.signer_dir or self.paths.state.parent / "signer"

    @classmethod
    def default(cls, root: Path) -> ServerConfig:
        """The documented defaults with every path under `root`."""
        paths = _default_paths(Path(root))
        return cls(
            ServerSection(),
            paths,
            _default_tls(paths.state),
            Limits(),
            AuditSection(signer_dir=Path(root) / "signer"),
        )


def load_config(path: Path) -> ServerConfig:
    """Read and validate a dataops.toml; raise ConfigError naming file and key."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = path.resolve().parent
    try:
        return _build(doc, base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _build(doc: dict[str, Any], base: Path) -> ServerConfig:
    sections = (ServerSection, PathsSection, TlsSection, Limits, AuditSection, LedgerSection)
    known = [s.TABLE for s in sections]
    for key, value in doc.items():
        if key not in known:
            what = f"table [{key}]" if isinstance(value, dict) else f"top-level key {key!r}"
            raise ConfigError(f"unknown {what} (expected tables {', '.join(known)})")

    server = ServerSection(**_table(doc, ServerSection))

    defaults = _default_paths(base)
    given = {k: _resolve(PathsSection, k, v, base) for k, v in _table(doc, PathsSection).items()}
    paths = PathsSection(**{**vars(defaults), **given})

    # TLS files live under the state directory unless placed elsewhere explicitly,
    # so moving [paths] state moves the PKI with it.
    tls_defaults = _default_tls(paths.state)
    given = {k: _resolve(TlsSection, k, v, base) for k, v in _table(doc, TlsSection).items()}
    tls = TlsSection(**{**vars(tls_defaults), **given})

    limits = Limits(**_table(doc, Limits))
    audit = dict(_table(doc, AuditSection))
    for key in ("signer_socket", "signer_dir"):
        if key in audit:
            audit[key] = _resolve(AuditSection, key, audit[key], base)
    audit.setdefault("signer_dir", base / "signer")
    ledger = LedgerSection(**_table(doc, LedgerSection))
    return ServerConfig(server, paths, tls, limits, AuditSection(**audit), ledger)


class _Section(Protocol):
    """A section dataclass of dataops.toml: its fields are the keys of table [TABLE]."""

    TABLE: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, Any]]


def _table(doc: dict[str, Any], section: type[_Section]) -> dict[str, Any]:
    table = doc.get(section.TABLE, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{section.TABLE}] must be a table, got {table!r}")
    names = [f.name for f in fields(section)]
    unknown = [key for key in table if key not in names]
    if unknown:
        from dataops._toml import unknown_key

        def hint(key: str) -> str:
            text = unknown_key(key, names)
            return f", {text.split(', ', 1)[1]}" if ", did you mean" in text else ""

        raise ConfigError(
            "; ".join(
                f"[{section.TABLE}] unknown key {key!r}{hint(key)} (expected {', '.join(names)})"
                for key in unknown
            )
        )
    return table


def _resolve(section: type[_Section], key: str, value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"[{section.TABLE}] {key} must be a non-empty path string, got {value!r}")
    return base / Path(value).expanduser()  # an absolute value replaces base


def _default_paths(root: Path) -> PathsSection:
    return PathsSection(
        catalog=root / "catalog",
        policies=root / "policies",
        sandbox=root / "sandbox",
        state=root / "state",
        products=root / "products",
        consents=root / "consents",
    )


def _default_tls(state: Path) -> TlsSection:
    pki = StatePaths(state).pki
    return TlsSection(ca_cert=pki / "ca.crt", server_cert=pki / "server.crt", server_key=pki / "server.key")


def _invalid(section: Any, key: str, expected: str) -> ConfigError:
    return ConfigError(f"[{section.TABLE}] {key} must be {expected}, got {getattr(section, key)!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML true is not 1


def _positive_int(section: Any, key: str, upper: int | None = None) -> None:
    value = getattr(section, key)
    if not _is_int(value) or value < 1:
        raise _invalid(section, key, "a positive integer")
    if upper is not None and value > upper:
        raise _invalid(section, key, f"at most {upper}")


def _seconds(section: Any, key: str, *, allow_zero: bool) -> None:
    value = getattr(section, key)
    ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise _invalid(section, key, "a non-negative number" if allow_zero else "a positive number")
    # TOML "grace_seconds = 10" is an int; store what the field says.
    object.__setattr__(section, key, float(value))


def _path(section: Any, key: str) -> None:
    if not isinstance(getattr(section, key), Path):
        raise _invalid(section, key, "a path")
