"""One server per state directory (`dataops._fs.StateLock`).

A second `dataops serve` on the same `[paths] state` would append its own hash chain
to the first one's audit log and orphan its open reservations; gRPC's SO_REUSEPORT
would even let it share the first one's port. The lock refuses it at start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dataops.audit.signing import load_public_key
from dataops.audit.verify import verify_log
from dataops.client import Client
from dataops.errors import StateInUse
from dataops.server import app as app_module
from dataops.server import build_server

SERVE = (
    "import sys; from pathlib import Path; from dataops.config import load_config;"
    "from dataops.server import build_server;"
    "s = build_server(load_config(Path(sys.argv[1]))).start();"
    "Path(sys.argv[2]).write_text(str(s.port)); s.serve_until_signal()"
)


def test_a_second_server_on_the_same_state_refuses_to_start(config):
    first = build_server(config).start()
    try:
        with pytest.raises(StateInUse, match=rf"another dataops serve \(pid {os.getpid()}\)"):
            build_server(config)
    finally:
        first.stop(grace=1.0)
    again = build_server(config).start()  # stopped: the lock is free again
    again.stop(grace=1.0)
    # The refused server wrote nothing: the log is whole, one chain.
    directory = config.paths.state / "audit"
    assert verify_log(directory, load_public_key(directory / "signing.pub")).ok


def test_a_killed_servers_lock_does_not_outlive_it(config, tmp_path):
    toml = config.paths.state.parent / "dataops.toml"
    port = tmp_path / "port"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(toml), str(port)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not port.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
            time.sleep(0.05)
        with pytest.raises(StateInUse, match=f"pid {proc.pid}"):
            build_server(config)
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean stop: the kernel drops the flock
        proc.wait(timeout=30)
    build_server(config).start().stop(grace=1.0)


def test_switched_off_two_servers_on_one_state_break_the_audit_chain(config, pki, monkeypatch):
    # The control off: both servers start on one state and write one audit log, each
    # with its own sequence numbers and chain. The log no longer verifies.
    class NoLock:
        def __init__(self, state):
            pass

        def release(self):
            pass

    monkeypatch.setattr(app_module, "StateLock", NoLock)
    servers = [build_server(config).start(), build_server(config).start()]
    clients = []
    try:
        for server in servers:
            clients.append(
                Client.from_directory(
                    f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank", witness=False
                )
            )
        for client in clients * 2:
            client.list_datasets()
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.stop(grace=1.0)
    directory = config.paths.state / "audit"
    assert not verify_log(directory, load_public_key(directory / "signing.pub")).ok
