"""dataops.toml: the documented example loads, and every mistake is named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataops.config import ConfigError, Limits, ServerConfig, ServerSection, load_config, parse_listen

REPO_ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dataops.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_documented_example_is_exactly_the_defaults():
    config = load_config(REPO_ROOT / "dataops.toml")
    assert config == ServerConfig.default(REPO_ROOT)


def test_an_empty_file_means_all_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == ServerConfig.default(tmp_path)


def test_defaults(tmp_path):
    config = ServerConfig.default(tmp_path)
    assert config.server == ServerSection("127.0.0.1:50051", 8, 4 * 1024 * 1024, 10.0, 1.0)
    assert config.limits == Limits(16, 4, 8, 256, 10_000)
    assert config.paths.state == tmp_path / "state"
    assert config.tls.server_key == tmp_path / "state" / "pki" / "server.key"


def test_relative_paths_resolve_against_the_files_directory(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    monkeypatch.chdir(tmp_path)  # somewhere else: the working directory must not matter
    config = load_config(write(conf_dir, '[paths]\ncatalog = "../data/catalog"\nsandbox = "/srv/sandbox"\n'))
    assert config.paths.catalog == conf_dir / "../data/catalog"
    assert config.paths.sandbox == Path("/srv/sandbox")
    assert config.paths.policies == conf_dir / "policies"


def test_tls_files_follow_the_state_directory_unless_given(tmp_path):
    config = load_config(write(tmp_path, '[paths]\nstate = "/var/lib/dataops"\n[tls]\nca_cert = "ca.pem"\n'))
    assert config.tls.server_cert == Path("/var/lib/dataops/pki/server.crt")
    assert config.tls.ca_cert == tmp_path / "ca.pem"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[server]\nwokers = 8\n",
            "server.wokers: unknown key, did you mean 'workers'? Expected one of: listen, workers,",
        ),
        ("[limits]\nmax_joins = 1\n", "limits.max_joins: unknown key"),
        ("[ledger]\npath = 'ledger.db'\n", "ledger.path: unknown key. Expected one of: url."),
        ("[database]\nurl = 'x'\n", "database: unknown table [database] (expected tables server, paths,"),
        ("listen = '0.0.0.0:1'\n", "listen: unknown top-level key (settings go in the tables server,"),
    ],
)
def test_unknown_keys_are_errors_naming_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert str(error.value).startswith(f"{tmp_path / 'dataops.toml'}: ")
    assert message in str(error.value)


def test_every_unknown_key_of_a_table_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, "[server]\nwokers = 8\nlisten_on = 'x'\n"))
    assert "server.wokers: unknown key" in str(error.value) and "server.listen_on: unknown key" in str(
        error.value
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nworkers = "x"\n', "server.workers: must be an integer >= 1, got 'x'"),
        ("[server]\nworkers = 0\n", "server.workers: must be an integer >= 1, got 0"),
        ("[server]\nworkers = true\n", "server.workers: must be an integer >= 1, got True"),
        ("[server]\nworkers = 2.0\n", "server.workers: must be an integer >= 1, got 2.0"),
        (
            "[server]\nmax_message_bytes = 4294967296\n",
            "server.max_message_bytes: must be an integer from 1 to 2147483647, got 4294967296",
        ),
        ("[server]\ngrace_seconds = -1\n", "server.grace_seconds: must be >= 0.0, got -1"),
        (
            "[server]\npolicy_poll_seconds = 0\n",
            "server.policy_poll_seconds: must be a number of seconds > 0",
        ),
        (
            "[server]\npolicy_poll_seconds = nan\n",
            "server.policy_poll_seconds: must be a finite number, got nan",
        ),
        ("[server]\nlisten = 50051\n", "server.listen: must be a non-empty string, got 50051"),
        ('[server]\nlisten = "localhost"\n', "server.listen: must be host:port"),
        ('[server]\nlisten = "::1:50051"\n', "server.listen: must be host:port"),
        ('[server]\nlisten = "127.0.0.1:65536"\n', "server.listen: must be host:port"),
        ("[paths]\ncatalog = 3\n", "paths.catalog: must be a non-empty string, got 3"),
        ('[tls]\nserver_key = ""\n', "tls.server_key: must be a non-empty string"),
        ("[limits]\nmax_filters = -1\n", "limits.max_filters: must be an integer >= 1, got -1"),
        ('server = "fast"\n', "server: must be a table, got 'fast'"),
        ('[audit]\norigin = "two words"\n', "audit.origin: must be a name without spaces"),
        ("[audit]\nreconcile_ledger = 0\n", "audit.reconcile_ledger: must be true or false, got 0"),
        ('[ledger]\nurl = "mysql://db/dataops"\n', "ledger.url: must be a PostgreSQL URL"),
        ("[ledger]\nurl = 5\n", "ledger.url: must be a non-empty string, got 5"),
        ('[ledger]\nurl = "postgresql://db"\n', "ledger.url: must be a URL naming the database"),
        ('[ledger]\nurl = "postgresql://db:port/dataops"\n', "ledger.url: must be a PostgreSQL URL"),
        (
            '[ledger]\nurl = "postgresql://dataops:hunter2@db/dataops"\n',
            "ledger.url: must not hold a password",
        ),
        (
            '[ledger]\nurl = "postgresql://db/dataops?sslmod=require"\n',
            "ledger.url: is not a valid libpq URL",
        ),
    ],
)
def test_bad_values_are_errors_naming_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert str(error.value).startswith(f"{tmp_path / 'dataops.toml'}: ")
    assert message in str(error.value)


def test_a_bad_ledger_url_is_never_echoed_back(tmp_path):
    """A mistake in the URL may sit next to a secret in it: the message names the key only."""
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, '[ledger]\nurl = "postgresql://dataops:hunter2@db:port/dataops"\n'))
    assert "ledger.url" in str(error.value) and "hunter2" not in str(error.value)


def test_the_ledger_is_sqlite_under_state_unless_a_postgresql_url_is_given(tmp_path):
    from dataops.server.app import ledger_location

    assert (
        ledger_location(load_config(write(tmp_path, ""))) == tmp_path / "state" / "ledger" / "ledger.sqlite3"
    )
    url = "postgresql://dataops@db.internal:5433/dataops?sslmode=verify-full"
    config = load_config(write(tmp_path, f'[ledger]\nurl = "{url}"\n'))
    assert config.ledger.url == url and ledger_location(config) == url
    socket = "postgresql:///dataops?host=/run/postgresql"
    assert load_config(write(tmp_path, f'[ledger]\nurl = "{socket}"\n')).ledger.url == socket


def test_integer_seconds_are_accepted_as_floats(tmp_path):
    config = load_config(write(tmp_path, "[server]\ngrace_seconds = 0\npolicy_poll_seconds = 2\n"))
    assert config.server.grace_seconds == 0.0 and isinstance(config.server.grace_seconds, float)
    assert config.server.policy_poll_seconds == 2.0


def test_unreadable_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="dataops.toml: cannot be read"):
        load_config(tmp_path / "dataops.toml")
    with pytest.raises(ConfigError, match="dataops.toml: not valid TOML"):
        load_config(write(tmp_path, "[server\n"))


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [("127.0.0.1:50051", "127.0.0.1", 50051), ("[::1]:0", "::1", 0), ("localhost:8443", "localhost", 8443)],
)
def test_listen_addresses(listen, host, port):
    assert parse_listen(listen) == (host, port)
    section = ServerSection(listen=listen)
    assert (section.host, section.port) == (host, port)
