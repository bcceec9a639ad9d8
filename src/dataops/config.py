"""The server configuration, read by `dataops serve` from a `dataops.toml`.

Strict on purpose: an unknown key is an error (a typo must not silently fall back
to a default), and every error names the file and the key (`dataops.toml:
server.workers: must be an integer >= 1, got 0`). It is read with the same typed
readers as the catalog, policies and products (`dataops._toml.Table`); the section
dataclasses are the values read, checked when they are read.
Relative paths are resolved against the TOML file's directory, so the server
behaves the same whatever directory it is started from.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from dataops._toml import Table, read_toml
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
    # An exact query whose table is still being protected waits this long for it, then
    # gets UNAVAILABLE with a retry hint: a 100M-row table takes minutes, and a query
    # waiting all that time would hold a worker (dataops.engines.table).
    table_wait_seconds: float = 2.0
    # The address-space cap of the child processes that build a serving copy, and past 4M
    # rows a protected table or a subject layout: their RSS can never pass it, and a build
    # that needs more fails alone, the server serving on.
    copy_memory_limit_mib: int = 4096
    # Admission lanes (dataops.server.lanes): cheap calls (metadata, estimates, budgets,
    # exact answers, which are table lookups) and scans (DP RunQuery) wait apart, so
    # cheap calls never queue behind scans. false: one shared lane, every call counted
    # by [limits] max_in_flight alone (as before lanes; to measure what lanes buy).
    lanes: bool = True
    # DP queries running at once; at most `workers` (each runs on an engine thread).
    # Unset in the file: 4, or `workers` if fewer.
    scan_slots: int = 4
    # Estimated rows (the datasets' Parquet row counts) the running scans may read at
    # once: several small scans run together, a larger one than this runs alone.
    scan_rows_in_flight: int = 50_000_000
    # DP queries that may wait for the lane; beyond it RESOURCE_EXHAUSTED at once
    # (0: a scan that does not fit is refused at once).
    scan_queue: int = 16
    # The longest a DP query waits for the lane (or its client's deadline, if sooner);
    # then RESOURCE_EXHAUSTED (rule limits.scan_lane), audited.
    scan_queue_seconds: float = 10.0
    # Child processes that run DP releases (dataops.engines.processes): the Python half of
    # a release off the server's GIL. 0: releases run in the server process.
    engine_processes: int = 0

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


@dataclass(frozen=True)
class TlsSection:
    TABLE: ClassVar[str] = "tls"

    ca_cert: Path
    server_cert: Path
    server_key: Path


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
    doc = read_toml(path, ConfigError)
    base = path.resolve().parent
    known = [s.TABLE for s in _SECTIONS]
    for key, value in doc.data.items():
        if key not in known:
            if isinstance(value, dict):
                raise doc.fail(key, f"unknown table [{key}] (expected tables {', '.join(known)})")
            raise doc.fail(key, f"unknown top-level key (settings go in the tables {', '.join(known)})")

    server = _server(_section(doc, ServerSection.TABLE))
    paths = _paths(_section(doc, PathsSection.TABLE), base)
    tls = _tls(_section(doc, TlsSection.TABLE), base, paths.state)
    limits = _limits(_section(doc, Limits.TABLE))
    audit = _audit(_section(doc, AuditSection.TABLE), base)
    ledger = _ledger(_section(doc, LedgerSection.TABLE))
    return ServerConfig(server, paths, tls, limits, audit, ledger)


_SECTIONS = (ServerSection, PathsSection, TlsSection, Limits, AuditSection, LedgerSection)


def _section(doc: Table, name: str) -> Table:
    """Table [name] (empty when absent: every key then takes its default)."""
    return doc.table(name, required=False) or Table({}, doc.path, f"{name}.", ConfigError)


def _done(table: Table, section: type) -> None:
    """Every key not read is an error, listed with the keys the section takes."""
    table.reject_unknown([f.name for f in fields(section)])


def _path(table: Table, key: str, default: Path, base: Path) -> Path:
    value = table.string(key, None)
    return default if value is None else base / Path(value).expanduser()  # an absolute value replaces base


def _seconds(table: Table, key: str, default: float, *, positive: bool) -> float:
    value = table.number(key, default, minimum=0.0)
    if positive and value == 0:
        raise table.fail(key, "must be a number of seconds > 0, got 0")
    return value


def _server(t: Table) -> ServerSection:
    d = ServerSection()
    listen = t.string("listen", d.listen)
    try:
        parse_listen(listen)
    except ValueError:
        raise t.fail(
            "listen", f'must be host:port with IPv6 in brackets, e.g. "[::1]:50051", got {listen!r}'
        ) from None
    section = ServerSection(
        listen=listen,
        workers=t.integer("workers", d.workers, minimum=1),
        max_message_bytes=t.integer(
            "max_message_bytes", d.max_message_bytes, minimum=1, maximum=_MAX_MESSAGE_BYTES
        ),
        grace_seconds=_seconds(t, "grace_seconds", d.grace_seconds, positive=False),  # 0: no draining
        policy_poll_seconds=_seconds(t, "policy_poll_seconds", d.policy_poll_seconds, positive=True),
        policy_settle_seconds=_seconds(t, "policy_settle_seconds", d.policy_settle_seconds, positive=False),
        copy_wait_seconds=_seconds(t, "copy_wait_seconds", d.copy_wait_seconds, positive=False),
        table_wait_seconds=_seconds(t, "table_wait_seconds", d.table_wait_seconds, positive=False),
        copy_memory_limit_mib=t.integer("copy_memory_limit_mib", d.copy_memory_limit_mib, minimum=1),
        engine_processes=t.integer("engine_processes", d.engine_processes, minimum=0, maximum=64),
        **_lanes(t, d),
    )
    _done(t, ServerSection)
    return section


def _lanes(t: Table, d: ServerSection) -> dict:
    workers = t.integer("workers", d.workers, minimum=1)
    slots = t.integer("scan_slots", min(d.scan_slots, workers), minimum=1)
    if slots > workers:
        raise t.fail("scan_slots", f"must be at most workers ({workers}): each scan takes an engine thread")
    return dict(
        lanes=t.boolean("lanes", d.lanes),
        scan_slots=slots,
        scan_rows_in_flight=t.integer("scan_rows_in_flight", d.scan_rows_in_flight, minimum=1),
        scan_queue=t.integer("scan_queue", d.scan_queue, minimum=0),
        scan_queue_seconds=_seconds(t, "scan_queue_seconds", d.scan_queue_seconds, positive=False),
    )


def _paths(t: Table, base: Path) -> PathsSection:
    defaults = vars(_default_paths(base))
    section = PathsSection(**{k: _path(t, k, v, base) for k, v in defaults.items()})
    _done(t, PathsSection)
    return section


def _tls(t: Table, base: Path, state: Path) -> TlsSection:
    # TLS files live under the state directory unless placed elsewhere explicitly,
    # so moving [paths] state moves the PKI with it.
    defaults = vars(_default_tls(state))
    section = TlsSection(**{k: _path(t, k, v, base) for k, v in defaults.items()})
    _done(t, TlsSection)
    return section


_LIMITS = Limits()  # the defaults


def _limits(t: Table) -> Limits:
    section = Limits(
        **{f.name: t.integer(f.name, getattr(_LIMITS, f.name), minimum=1) for f in fields(Limits)}
    )
    _done(t, Limits)
    return section


def _audit(t: Table, base: Path) -> AuditSection:
    socket = t.string("signer_socket", None)
    signer_dir = _path(t, "signer_dir", base / "signer", base)
    origin = t.string("origin", AuditSection.origin)
    if not origin.isprintable() or " " in origin:
        raise t.fail("origin", f"must be a name without spaces, got {origin!r}")
    section = AuditSection(
        signer_socket=None if socket is None else base / Path(socket).expanduser(),
        signer_dir=signer_dir,
        origin=origin,
        reconcile_ledger=t.boolean("reconcile_ledger", AuditSection.reconcile_ledger),
    )
    _done(t, AuditSection)
    return section


def _ledger(t: Table) -> LedgerSection:
    url = t.string("url", None)
    _done(t, LedgerSection)
    if url is not None:
        _check_postgres_url(t, url)
    return LedgerSection(url)


def _check_postgres_url(t: Table, url: str) -> None:
    """A libpq URL naming a database, without a password. The URL is never echoed back:
    a mistake in it may sit next to a secret."""
    from urllib.parse import parse_qs, urlsplit

    expected = 'must be a PostgreSQL URL ("postgresql://host/database")'
    if not url.startswith(("postgresql://", "postgres://")):
        raise t.fail("url", expected)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise t.fail("url", f"{expected}: its port is not a number") from None
    if parts.password is not None:
        raise t.fail(
            "url",
            "must not hold a password (dataops.toml is no place for a secret): "
            "put it in ~/.pgpass or the file PGPASSFILE names, which libpq reads",
        )
    if not parts.path.strip("/") and "dbname" not in parse_qs(parts.query):
        raise t.fail("url", 'must be a URL naming the database ("postgresql://host/database")')
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise t.fail("url", "a PostgreSQL ledger needs psycopg: pip install 'dataops[server]'") from None
    try:
        conninfo_to_dict(url)  # libpq's own parser: unknown parameters, bad syntax
    except Exception as exc:  # noqa: BLE001 - psycopg raises ProgrammingError subclasses
        raise t.fail("url", f"is not a valid libpq URL: {exc}") from None


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
