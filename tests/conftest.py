"""Shared fixtures: small demo data, a PKI, and a real server over loopback mTLS."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataops.certs import init_authority, issue_consumer
from dataops.client import Client
from dataops.config import ServerConfig, load_config
from dataops.demo.generate import generate
from dataops.engines.dp import enable_opendp

# Tests build DP queries in-process as the server does, so the process enables OpenDP's
# features as the server does at start (tests/test_dp_engine.py checks the engine refuses otherwise).
enable_opendp()

REPO = Path(__file__).resolve().parent.parent
CONSUMERS = ("city-bank", "river-bank", "harbor-insurance", "ghost")  # ghost: valid cert, no policy


@pytest.fixture(scope="session")
def sandbox_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sandbox = tmp_path_factory.mktemp("data") / "sandbox"
    generate(sandbox, enterprises=20_000, claims=100_000)
    return sandbox


@dataclass(frozen=True)
class Pki:
    directory: Path
    outsider: Path  # a CA the platform never trusted

    def consumer_dir(self, consumer: str) -> Path:
        return self.directory / "consumers" / consumer

    def cli_args(self, port: int, consumer: str = "city-bank") -> list[str]:
        """The `dataops` consumer commands' connection flags for `consumer`."""
        d = self.consumer_dir(consumer)
        return [
            "--target",
            f"localhost:{port}",
            "--cert",
            str(d / f"{consumer}.crt"),
            "--key",
            str(d / f"{consumer}.key"),
            "--ca",
            str(d / "ca.crt"),
        ]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    init_authority(root / "platform")
    for consumer in CONSUMERS:
        issue_consumer(root / "platform", consumer)
    init_authority(root / "outsider")
    issue_consumer(root / "outsider", "city-bank")
    return Pki(root / "platform", root / "outsider")


# A `state/tables` holding every repo table product protected for the session's data.
_PROTECTED: list[Path] = []


def protected_tables_for(sandbox: Path, pki: Pki) -> Path:
    """Every table product protected once per session: a `state/tables` to copy.

    Protection is the expensive step (an LP audit); a server would redo it for each
    test's fresh state directory. The store keys tables by product and data version
    (the data file's and catalog entry's content), so a server reads these exactly as
    if it had built them itself (and, having not built them, audits no protection);
    a test that changed its data or catalog finds no match and protects its own.
    """
    if not _PROTECTED:
        from dataops.catalog import load_catalog
        from dataops.products import load_products
        from dataops.tables import TableStore
        from dataops.versions import Fingerprints

        work = Path(tempfile.mkdtemp(prefix="dataops-tables-"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)
        config = write_config(work, sandbox, pki, tables=False)
        catalog = load_catalog(config.paths.catalog, config.paths.sandbox)
        store, fingerprints = TableStore(config.paths.state), Fingerprints()
        for product in load_products(config.paths.products, catalog).tables.values():
            dataset = catalog.get(product.dataset)
            store.get(product, dataset, fingerprints.of(dataset))
        _PROTECTED.append(config.paths.state / "tables")
    return _PROTECTED[0]


def write_config(
    root: Path,
    sandbox: Path,
    pki: Pki,
    extra: str = "",
    *,
    rate_per_minute: int = 6_000_000,
    rate_burst: int = 1_000_000,
    max_in_flight: int = 64,
    max_in_flight_per_consumer: int = 64,
    tables: Path | bool = True,
    server: str = "",
) -> ServerConfig:
    """A work directory with copies of the repo's catalog, policies and table products.

    `tables`: True copies in the tables already protected for this sandbox's data
    (`protected_tables_for`), so the server need not protect them again; a path copies
    that `state/tables`; False leaves the server to protect them itself.
    `server`: more lines of [server] (lanes, scan_slots, ...).
    """
    for name in ("catalog", "policies", "products"):
        shutil.copytree(REPO / name, root / name, dirs_exist_ok=True)
    if tables is True:
        tables = protected_tables_for(sandbox, pki)
    if tables:
        shutil.copytree(tables, root / "state" / "tables")
    (root / "dataops.toml").write_text(
        f"""
[server]
listen = "127.0.0.1:0"
workers = 4
# A loaded machine may take several seconds to start the build child of a DP copy: the
# tests' queries wait for it (the tests of the UNAVAILABLE answer set their own wait).
# The same for a table being protected.
copy_wait_seconds = 120.0
table_wait_seconds = 120.0
grace_seconds = 2.0
policy_poll_seconds = 0.1
{server}

[paths]
catalog = "catalog"
policies = "policies"
sandbox = {json.dumps(str(sandbox))}
state = "state"

[tls]
ca_cert = {json.dumps(str(pki.directory / "ca.crt"))}
server_cert = {json.dumps(str(pki.directory / "server.crt"))}
server_key = {json.dumps(str(pki.directory / "server.key"))}

[limits]
rate_per_minute = {rate_per_minute}
rate_burst = {rate_burst}
max_in_flight = {max_in_flight}
max_in_flight_per_consumer = {max_in_flight_per_consumer}
{extra}
"""
    )
    return load_config(root / "dataops.toml")


@pytest.fixture(scope="session")
def protected_tables(sandbox_dir: Path, pki: Pki) -> Path:
    """The session's tables, protected once (`protected_tables_for`)."""
    return protected_tables_for(sandbox_dir, pki)


@pytest.fixture
def config(tmp_path: Path, sandbox_dir: Path, pki: Pki, protected_tables: Path) -> ServerConfig:
    work = tmp_path / "work"
    work.mkdir()
    return write_config(work, sandbox_dir, pki, tables=protected_tables)


@pytest.fixture
def server(config: ServerConfig) -> Iterator:
    from dataops.server import build_server

    running = build_server(config).start()
    yield running
    running.stop(grace=1.0)


@pytest.fixture
def connect(server, pki: Pki) -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def make(consumer: str, **kwargs) -> Client:
        client = Client.from_directory(
            f"localhost:{server.port}", pki.consumer_dir(consumer), consumer, **kwargs
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session (`pg_support`: from the test extra's
    wheel, or Debian's package; as `nobody` when the tests run as root)."""
    from pg_support import PostgresCluster

    cluster = PostgresCluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(postgres) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL."""
    return postgres.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_at(request, tmp_path: Path) -> Path | str:
    """Where a fresh ledger lives: a SQLite file, or a database on the session's
    PostgreSQL. Tests that take it check the same behaviour on both stores."""
    if request.param == "sqlite":
        return tmp_path / "ledger.db"
    return request.getfixturevalue("postgres").new_database()


def audit_records(config: ServerConfig) -> list[dict]:
    path = config.paths.state / "audit" / "audit.jsonl"
    # Split on b"\n" only: str.splitlines() also splits at U+2028, which records may hold.
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line] if path.exists() else []
