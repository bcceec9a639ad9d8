"""The wire contract: generated code is current, buf lint passes, stock tools work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is installed by the project's test extra"
    return path


def test_generated_code_is_current(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    gen_proto.generate(tmp_path)
    fresh = sorted(p.name for p in (tmp_path / "dataops" / "v1").iterdir() if p.is_file())
    committed = sorted(p.name for p in (REPO / "src/dataops/v1").iterdir() if p.is_file())
    assert fresh == committed
    for name in fresh:
        assert (tmp_path / "dataops/v1" / name).read_bytes() == (REPO / "src/dataops/v1" / name).read_bytes(), (
            f"src/dataops/v1/{name} is stale: run `python scripts/gen_proto.py`")


def test_buf_lint_standard_passes():
    result = subprocess.run([tool("buf"), "lint"], cwd=REPO / "proto", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STANDARD" in (REPO / "proto/buf.yaml").read_text()


def run_grpcurl(server, pki, args: list[str], consumer: str | None = "city-bank") -> subprocess.CompletedProcess:
    flags = ["-cacert", str(pki.directory / "ca.crt"), "-max-time", "10"]
    if consumer:
        d = pki.consumer_dir(consumer)
        flags += ["-cert", str(d / f"{consumer}.crt"), "-key", str(d / f"{consumer}.key")]
    *options, verb = args
    command = [tool("grpcurl"), *flags, *options, f"localhost:{server.port}", *([verb] if verb else [])]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def test_grpcurl_lists_services_through_reflection(server, pki):
    result = run_grpcurl(server, pki, ["list"])
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {"dataops.v1.CatalogService", "dataops.v1.QueryService", "grpc.health.v1.Health"} <= services


def test_grpcurl_calls_the_health_check(server, pki):
    result = run_grpcurl(server, pki, ["grpc.health.v1.Health/Check"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "SERVING"


def test_grpcurl_lists_the_consumers_datasets(server, pki):
    result = run_grpcurl(server, pki, ["-d", "{}", "dataops.v1.CatalogService/ListDatasets"])
    assert result.returncode == 0, result.stderr
    datasets = json.loads(result.stdout)["datasets"]
    assert [d["id"] for d in datasets] == ["enterprise_credit"]


@pytest.mark.parametrize("who", ["no certificate", "another CA"])
def test_grpcurl_without_a_trusted_certificate_is_refused(server, pki, who):
    if who == "no certificate":
        result = run_grpcurl(server, pki, ["list"], consumer=None)
    else:
        d = pki.outsider / "consumers" / "city-bank"
        result = subprocess.run(
            [tool("grpcurl"), "-cacert", str(pki.directory / "ca.crt"), "-cert", str(d / "city-bank.crt"),
             "-key", str(d / "city-bank.key"), "-max-time", "10", f"localhost:{server.port}", "list"],
            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "dataops.v1" not in result.stdout
