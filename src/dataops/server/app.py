"""Wiring: TLS, health, reflection, interceptors and servicers in one place.

`build_server(config)` loads and checks the catalog and policies (refusing to start
on an operator mistake), starts the audit signer (or connects to the one configured
in `[audit] signer_socket`), opens the audit log against it, reconciles the ledger
with the log, and returns a `DataopsServer` ready to `start()`; `stop()` stops the
signer it started. `dataops serve` and `dataops demo` both go through here, as do the
tests: there is one way to run the service.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dataops._fs import StateLock
from dataops.audit import AuditLog
from dataops.audit.consents import audited_uses
from dataops.audit.receipts import reconcile_ledger
from dataops.audit.signer import SignerClient, SignerProcess, spawn_signer
from dataops.catalog import Catalog, check_data, load_catalog
from dataops.certs import RevocationList
from dataops.config import ServerConfig
from dataops.consent import ConsentStore, consent_location, load_issuers
from dataops.engines.dp import enable_opendp
from dataops.engines.prepared import PreparedStore
from dataops.engines.processes import EngineProcesses
from dataops.engines.subject import SubjectLayouts
from dataops.engines.table import TableEngine
from dataops.ledger import Ledger
from dataops.policy import PolicyStore
from dataops.products import load_products
from dataops.server.interceptors import AuditInterceptor, check_wrappable
from dataops.server.lanes import ScanCosts, ScanLane
from dataops.server.ratelimit import Admission, RateLimiter, SharedRateLimiter, rate_limiter
from dataops.server.servicers import AuditServicer, CatalogServicer, QueryServicer, SubjectServicer
from dataops.service import Sandbox
from dataops.subjects import Evaluator, load_or_create_secret
from dataops.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    subject_pb2,
    subject_pb2_grpc,
)
from dataops.versions import DataVersions, Fingerprints

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name,
    query_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name,
    subject_pb2.DESCRIPTOR.services_by_name["SubjectService"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
)
# Every dataops.v1 service the server registers; each method must be one the audit
# interceptor can wrap (checked at startup, see `check_wrappable`).
SERVICES = tuple(
    service
    for module in (catalog_pb2, query_pb2, subject_pb2, audit_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
)


def audit_path(config: ServerConfig) -> Path:
    return config.state_paths.audit_log


def ledger_path(config: ServerConfig) -> Path:
    return config.state_paths.ledger


def ledger_location(config: ServerConfig) -> Path | str:
    """What `Ledger` opens: the [ledger] url (PostgreSQL, shared by replicas) if set,
    else the SQLite file under [paths] state."""
    return config.ledger.url or ledger_path(config)


@dataclass
class DataopsServer:
    config: ServerConfig
    grpc_server: grpc.Server
    port: int
    sandbox: Sandbox
    policies: PolicyStore
    audit: AuditLog
    ledger: Ledger
    health: health.HealthServicer
    tables: TableEngine  # the exact engine: protects the published tables, answers aggregate queries
    # Identity, admission, audit; holds the request pool, the lanes and the rate limiter,
    # and refuses new requests once stop() begins.
    interceptor: AuditInterceptor
    evaluator: Evaluator | None = None
    signer: SignerClient | None = None
    signer_process: SignerProcess | None = None  # None when the signer runs on its own (another user)
    state_lock: StateLock | None = None  # this server's hold on its state directory

    @property
    def request_pool(self) -> futures.ThreadPoolExecutor | None:
        """dataops.v1 requests' threads."""
        return self.interceptor.pool

    @property
    def scans(self) -> ScanLane | None:
        """The DP queries' admission lane (None: one shared lane)."""
        return self.interceptor.scans

    @property
    def limiter(self) -> RateLimiter | SharedRateLimiter | None:
        """The rate limiter; a shared one holds database connections."""
        return self.interceptor.limiter

    @property
    def target(self) -> str:
        host = self.config.server.host
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.port}"

    def start(self) -> DataopsServer:
        # Protects every table for its data version in the background; an exact
        # query waits for its table (or gets UNAVAILABLE with a retry hint).
        self.tables.start()
        self.grpc_server.start()
        self.policies.start(self.config.server.policy_poll_seconds)
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("dataops serving on %s (mTLS)", self.target)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, drain in-flight requests for `grace` seconds, then close."""
        # First refuse new requests, then say so: a client that sees NOT_SERVING and asks
        # anyway is refused UNAVAILABLE (and audited), never served by a stopping server.
        self.interceptor.stopping.set()
        self.health.enter_graceful_shutdown()
        if self.evaluator is not None:
            self.evaluator.stop_watches()  # watches would otherwise hold the drain for the whole grace
        grace = self.config.server.grace_seconds if grace is None else grace
        self.grpc_server.stop(grace).wait()
        if self.request_pool is not None:
            self.request_pool.shutdown(wait=False)
        self.policies.stop()
        if self.sandbox.prepared is not None:
            self.sandbox.prepared.close()
        self.tables.stop()
        self.sandbox.close()
        if self.evaluator is not None:
            self.evaluator.close()
        self.ledger.close()
        if self.limiter is not None:
            self.limiter.close()
        self.audit.close()  # signs and keeps the last checkpoint: the signer must still be up
        self._stop_signer()
        if self.state_lock is not None:
            self.state_lock.release()  # last: everything that wrote to the state is closed
        log.info("dataops stopped")

    def _stop_signer(self) -> None:
        if self.signer is not None:
            self.signer.close()
        if self.signer_process is not None:
            self.signer_process.stop()

    def serve_until_signal(self) -> None:
        """Block until SIGTERM or SIGINT, then stop cleanly."""
        stopping = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self.policies.poll(settled=True))
        # Wait in slices: the handlers run on the main thread between bytecodes, and an
        # untimed wait was seen not to return after SIGTERM (a replica hung on shutdown).
        while not stopping.wait(1.0):
            pass
        self.stop()


def load_checked_catalog(config: ServerConfig, versions: DataVersions | None = None) -> Catalog:
    catalog = load_catalog(config.paths.catalog, config.paths.sandbox)
    for dataset in catalog.datasets.values():
        check_data(dataset)
    # Every dataset hashed now (its first data version), and two entries over the same
    # bytes refused: they would be one dataset with two budget caps.
    (versions or DataVersions()).check_unique(catalog.datasets.values())
    return catalog


def admission_threads(config: ServerConfig) -> int:
    """gRPC threads: the admitted requests, plus as many again (at least 16) to refuse the rest.

    With lanes, the scans running and queued have threads of their own on top, so they
    can never hold the threads cheap calls need.
    """
    threads = config.limits.max_in_flight + max(16, config.limits.max_in_flight)
    if config.server.lanes:
        threads += config.server.scan_slots + config.server.scan_queue
    return threads


def scan_lane(config: ServerConfig) -> ScanLane | None:
    """The scans' admission lane ([server] scan_*), or None for one shared lane."""
    if not config.server.lanes:
        return None
    return ScanLane(
        config.server.scan_slots,
        config.server.scan_rows_in_flight,
        config.server.scan_queue,
        config.server.scan_queue_seconds,
        config.limits.max_in_flight_per_consumer,
    )


def connect_signer(config: ServerConfig) -> tuple[SignerClient, SignerProcess | None]:
    """The configured signer, or one started now as a child process.

    The server passes the key directory to the child and never opens it: it only
    ever talks to the signer over its socket.
    """
    process = None
    if config.audit.signer_socket is not None:
        socket_path = config.audit.signer_socket
    else:
        process = spawn_signer(config.signer_dir, config.audit.origin)
        socket_path = process.socket_path
    try:
        signer = SignerClient(socket_path)
        if signer.origin != config.audit.origin:
            raise OSError(
                f"the signer at {socket_path} signs for log {signer.origin!r}, not for "
                f"[audit] origin {config.audit.origin!r}"
            )
    except BaseException:
        if process is not None:
            process.stop()
        raise
    log.info(
        "audit checkpoints signed by key id %s (%s)",
        signer.key_id,
        f"signer process {process.process.pid}, key in {config.signer_dir}"
        if process
        else f"signer at {socket_path}",
    )
    return signer, process


def build_server(config: ServerConfig) -> DataopsServer:
    check_wrappable(SERVICES)  # fail closed: no dataops.v1 method is served unaudited
    enable_opendp()  # once, on purpose, here; the DP engine asserts it before any measurement
    versions = DataVersions()  # one per server: DP releases, prepared copies and tables key on it
    catalog = load_checked_catalog(config, versions)
    products = load_products(config.paths.products, catalog)
    issuers = load_issuers(config.paths.consents)
    policies = PolicyStore(
        config.paths.policies, catalog, products=products, settle_seconds=config.server.policy_settle_seconds
    )
    # Before anything writes to the state directory: one server per state (StateLock).
    state_lock = StateLock(config.paths.state)
    try:
        signer, signer_process = connect_signer(config)
    except BaseException:
        state_lock.release()
        raise
    try:
        server = _build(config, catalog, products, issuers, policies, versions, signer, signer_process)
    except BaseException:
        signer.close()
        if signer_process is not None:
            signer_process.stop()
        state_lock.release()
        raise
    server.state_lock = state_lock
    return server


def _build(
    config: ServerConfig,
    catalog: Catalog,
    products: Any,
    issuers: Any,
    policies: PolicyStore,
    versions: DataVersions,
    signer: SignerClient,
    signer_process: SignerProcess | None,
) -> DataopsServer:
    # The log first: it refuses to open if it was truncated or rewritten behind the
    # signer's last checkpoint, and the ledger is then reconciled against it.
    audit = AuditLog(audit_path(config), signer=signer)
    if config.ledger.url is None:
        ledger_path(config).parent.mkdir(parents=True, exist_ok=True)
    try:
        ledger = Ledger(ledger_location(config))
    except BaseException:
        audit.close()
        raise
    if config.audit.reconcile_ledger:
        try:
            reconcile_ledger(ledger, audit)
        except BaseException:
            audit.close()
            ledger.close()
            raise
    # DP reads copies truncated once per data version (state/prepared); build them now,
    # in the background, so the first DP query need not wait for its dataset's copy.
    prepared = PreparedStore(
        config.paths.state,
        versions,
        wait_seconds=config.server.copy_wait_seconds,
        memory_limit_bytes=config.server.copy_memory_limit_mib * 2**20,
    )
    # Tables key on the data version and the catalog terms (keys, bounds) they are cut by.
    tables = table_engine(config, catalog, products.tables, Fingerprints(versions).of, audit.append)
    # DP releases in child processes, off this process's GIL (0: here).
    processes = EngineProcesses(config.server.engine_processes) if config.server.engine_processes else None
    sandbox = Sandbox(
        catalog,
        policies,
        config.limits,
        ledger,
        prepared=prepared,
        engine_workers=config.server.workers,
        versions=versions,
        tables=tables,
        processes=processes,
    )
    layouts = SubjectLayouts(
        config.paths.state,
        products.subjects.values(),
        sandbox.fingerprints,
        memory_limit_bytes=config.server.copy_memory_limit_mib * 2**20,  # past 4M rows, in a child
    )
    # Beside the ledger when it is PostgreSQL: replicas then count a consent's uses together.
    consents = ConsentStore(consent_location(config))
    # Use counts are backed by the (fsynced) audit log: restore any the store lost.
    consents.reconcile(audited_uses(audit_path(config).parent))
    evaluator = Evaluator(
        catalog,
        policies,
        products.subjects,
        issuers,
        consents,
        layouts,
        load_or_create_secret(config.state_paths.subject_secret),
        poll_seconds=config.server.policy_poll_seconds,
        max_watches=max(1, config.limits.max_in_flight // 4),
    )

    limits = config.server.max_message_bytes
    # dataops.v1 requests run on the interceptor's own pool: admission lets at most
    # max_in_flight of them work at once, the other threads only identify, refuse and
    # audit, so a flood is answered instead of queueing (and a request that expires in
    # the queue anyway is still audited). gRPC's default pool below serves only health
    # checks and reflection, so those are answered however busy the service is.
    # DP queries are admitted apart, by their datasets' row counts (dataops.server.lanes).
    interceptor = AuditInterceptor(
        audit,
        policies,
        RevocationList(config.tls.ca_cert, config.paths.state),
        # Shared by the replicas when the ledger is PostgreSQL: N replicas, one rate.
        rate_limiter(config.ledger.url, config.limits.rate_per_minute, config.limits.rate_burst),
        Admission(config.limits.max_in_flight, config.limits.max_in_flight_per_consumer),
        threads=admission_threads(config),
        scans=scan_lane(config),
        scan_cost=ScanCosts(lambda consumer: [view.dataset for view in sandbox.datasets(consumer)]),
    )
    server = grpc.server(
        # Any handler the interceptor does not give a pool of its own (a streaming
        # dataops.v1 handler should set `experimental_thread_pool = interceptor.pool`
        # like the unary ones) would share these threads with health checks.
        futures.ThreadPoolExecutor(max_workers=config.server.workers, thread_name_prefix="grpc-default"),
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", limits),
            ("grpc.max_send_message_length", limits),
        ],
        # No maximum_concurrent_rpcs: gRPC sheds above it before any interceptor runs,
        # leaving no audit record. Our admission caps shed instead, and audit it.
        maximum_concurrent_rpcs=None,
    )
    catalog_pb2_grpc.add_CatalogServiceServicer_to_server(CatalogServicer(sandbox), server)
    query_pb2_grpc.add_QueryServiceServicer_to_server(QueryServicer(sandbox), server)
    subject_pb2_grpc.add_SubjectServiceServicer_to_server(SubjectServicer(evaluator), server)
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(audit), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )

    tls = config.tls
    credentials = grpc.ssl_server_credentials(
        [(tls.server_key.read_bytes(), tls.server_cert.read_bytes())],
        root_certificates=tls.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port(config.server.listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {config.server.listen}")
    prepared.warm(catalog.datasets.values())
    layouts.warm()
    if processes is not None:
        processes.warm()
    return DataopsServer(
        config,
        server,
        port,
        sandbox,
        policies,
        audit,
        ledger,
        health_servicer,
        tables,
        interceptor,
        evaluator=evaluator,
        signer=signer,
        signer_process=signer_process,
    )


def table_engine(config: ServerConfig, catalog: Catalog, tables, data_version, record=None) -> TableEngine:
    """The exact engine over the protected tables kept in `state/tables` (one per data version)."""
    from dataops.tables import TableStore

    return TableEngine(
        catalog,
        tables,
        # Large tables are protected in a child under the serving copies' memory cap.
        TableStore(config.paths.state, memory_limit_bytes=config.server.copy_memory_limit_mib * 2**20),
        data_version,
        record,
        wait_seconds=config.server.table_wait_seconds,
    )
