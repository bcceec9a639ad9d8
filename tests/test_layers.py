"""The layers keep to their side of the seams docs/architecture.md draws.

The domain (errors, the request flow, the engines, the audit record) knows nothing
of gRPC or of the generated protobuf code; only `dataops.server`, the two
translators (`wire`, `subject_wire`) and the client do. And the code every domain
error crosses the wire as is the contract: the table below is what clients were
promised (docs/api.md), so moving the mapping must not change one entry.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grpc
import pytest

import dataops.server.app  # noqa: F401  (imports every module that defines errors)
from dataops.errors import Kind, RequestError
from dataops.server.status import STATUS_CODES, status_code

SRC = Path(__file__).resolve().parents[1] / "src" / "dataops"

# Allowed to speak gRPC / protobuf: the transport and its translators, the client,
# the audit receipts and witness (they fill and read proto receipts).
TRANSPORT = {
    "server",
    "v1",
    "wire.py",
    "subject_wire.py",
    "client.py",
    "cli.py",
    "demo",
    "audit/receipts.py",
    "audit/witness.py",
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _domain_modules() -> list[Path]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in TRANSPORT or rel.split("/", 1)[0] in TRANSPORT:
            continue
        out.append(path)
    return out


@pytest.mark.parametrize("path", _domain_modules(), ids=lambda p: p.relative_to(SRC).as_posix())
def test_the_domain_imports_no_transport(path):
    transport = {
        name
        for name in _imports(path)
        if name.split(".")[0] in ("grpc", "grpc_status")
        or name.startswith(("dataops.v1", "dataops.server", "google.rpc"))
        or name in ("dataops.wire", "dataops.subject_wire")
    }
    assert not transport, f"{path.relative_to(SRC)} imports {sorted(transport)}"


def test_the_layer_check_sees_an_import_of_grpc(tmp_path):
    """The check above can fail: a module importing grpc is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from __future__ import annotations\nimport grpc\nfrom dataops.wire import table_to_ipc\n")
    assert {"grpc", "dataops.wire"} <= _imports(bad)


# reason → canonical code, as the server sent them before kinds existed.
WIRE_CODES = {
    "INVALID_QUERY": "INVALID_ARGUMENT",
    "UNKNOWN_DATASET": "NOT_FOUND",
    "POLICY_DENIED": "PERMISSION_DENIED",
    "UNKNOWN_CONSUMER": "PERMISSION_DENIED",
    "UNAUTHENTICATED": "UNAUTHENTICATED",
    "OUTPUT_CONTROL": "FAILED_PRECONDITION",
    "BUDGET_EXHAUSTED": "RESOURCE_EXHAUSTED",
    "LIMIT_EXCEEDED": "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED": "DEADLINE_EXCEEDED",
    "DATASET_UNAVAILABLE": "FAILED_PRECONDITION",
    "TABLE_NOT_READY": "UNAVAILABLE",
    "SERVER_STOPPING": "UNAVAILABLE",
    "CONSENT_INVALID": "PERMISSION_DENIED",
    # Added after kinds: a DP serving copy being built, or whose build failed.
    "DP_COPY_NOT_READY": "UNAVAILABLE",
    "DP_COPY_FAILED": "UNAVAILABLE",
    # Replicas' shared rate limits out of reach (`[ledger] url`): refused, not unlimited.
    "LIMITS_UNAVAILABLE": "UNAVAILABLE",
}


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_domain_error_crosses_the_wire_with_its_promised_code():
    errors = [RequestError, *_subclasses(RequestError)]
    sent = {}
    for cls in errors:
        error = cls.__new__(cls)  # the kind is a class attribute; no message needed
        sent.setdefault(cls.reason, set()).add(status_code(error).name)
    assert sent == {reason: {code} for reason, code in WIRE_CODES.items() if reason in sent}
    assert set(sent) == set(WIRE_CODES)


def test_every_kind_has_a_status_code_and_invalid_is_only_invalid_argument():
    assert set(STATUS_CODES) == set(Kind)
    assert [k for k, code in STATUS_CODES.items() if code is grpc.StatusCode.INVALID_ARGUMENT] == [
        Kind.INVALID
    ]
