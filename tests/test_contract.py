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


def run_grpcurl(server, pki, args: list[str], consumer: str | None = "city-bank", *,
                deadline: bool = True) -> subprocess.CompletedProcess:
    # grpcurl sends a deadline only with -max-time; without it the call has none.
    flags = ["-cacert", str(pki.directory / "ca.crt"), *(["-max-time", "10"] if deadline else [])]
    if consumer:
        d = pki.consumer_dir(consumer)
        flags += ["-cert", str(d / f"{consumer}.crt"), "-key", str(d / f"{consumer}.key")]
    *options, verb = args
    command = [tool("grpcurl"), *flags, *options, f"localhost:{server.port}", *([verb] if verb else [])]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


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


DP_QUERY = {
    "query": {
        "dataset": "enterprise_credit", "mode": "QUERY_MODE_DP", "groupBy": ["district"],
        "aggregates": [{"function": "AGGREGATE_FUNCTION_COUNT"}],
        "privacy": {"epsilon": 0.5},
    }
}


def test_grpcurl_runs_a_query_without_a_deadline(server, pki):
    """Stock clients send no deadline by default; the answer must still come back."""
    result = run_grpcurl(server, pki, ["-d", json.dumps(DP_QUERY), "dataops.v1.QueryService/RunQuery"],
                         deadline=False)
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    # grpcurl prints the proto field names.
    assert int(response["result"]["row_count"]) == 10
    assert int(response["receipt"]["sequence"]) >= 1


def test_grpcurl_estimates_without_a_deadline(server, pki):
    result = run_grpcurl(server, pki, ["-d", json.dumps(DP_QUERY), "dataops.v1.QueryService/EstimateQuery"],
                         deadline=False)
    assert result.returncode == 0, result.stderr
    assert float(json.loads(result.stdout)["spend"]["epsilon"]) > 0


def test_an_internal_error_carries_error_info_with_its_receipt(server, connect, monkeypatch):
    import grpc
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from dataops.v1 import catalog_pb2, catalog_pb2_grpc

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug, not the consumer's fault")

    monkeypatch.setattr(server.sandbox, "datasets", broken)
    client = connect("city-bank")
    stub = catalog_pb2_grpc.CatalogServiceStub(client.channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListDatasets(catalog_pb2.ListDatasetsRequest(), timeout=10)
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    status = rpc_status.from_call(caught.value)
    infos = [error_details_pb2.ErrorInfo() for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    for info, detail in zip(infos, [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]):
        detail.Unpack(info)
    assert [i.reason for i in infos] == ["INTERNAL"]
    assert int(infos[0].metadata["receipt_sequence"]) >= 1
    assert "a bug" not in status.message  # the exception text stays in the server's log


@pytest.mark.parametrize("remaining, expected_none", [(None, True), (9.2e9, True), (float("inf"), True), (5.0, False)])
def test_no_deadline_is_recognised_whatever_grpc_reports(remaining, expected_none):
    from dataops.server.interceptors import client_deadline

    assert (client_deadline(remaining) is None) is expected_none
