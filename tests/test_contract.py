"""The wire contract: generated code is current, buf lint passes, stock tools work."""

from __future__ import annotations

import json
import re
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
        assert (tmp_path / "dataops/v1" / name).read_bytes() == (
            REPO / "src/dataops/v1" / name
        ).read_bytes(), f"src/dataops/v1/{name} is stale: run `python scripts/gen_proto.py`"


def test_buf_lint_standard_and_comments_passes():
    result = subprocess.run([tool("buf"), "lint"], cwd=REPO / "proto", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = (REPO / "proto/buf.yaml").read_text()
    assert "STANDARD" in rules and "COMMENTS" in rules


def copy_of_the_contract(tmp_path: Path) -> Path:
    copy = tmp_path / "proto"
    shutil.copytree(REPO / "proto", copy)
    return copy


def test_buf_lint_refuses_a_field_without_a_comment(tmp_path):
    """The COMMENTS rule is live: one uncommented field in our contract fails the lint."""
    proto = copy_of_the_contract(tmp_path)
    path = proto / "dataops/v1/query.proto"
    text = path.read_text()
    commented = "  // The dataset's id (`Dataset.id`).\n  string dataset = 1;\n"
    assert commented in text
    path.write_text(text.replace(commented, "  string dataset = 1;\n"))
    result = subprocess.run([tool("buf"), "lint"], cwd=proto, capture_output=True, text=True)
    assert result.returncode != 0
    assert 'Field "dataset" should have a non-empty comment' in result.stdout + result.stderr


# The last released contract, checked in so that a fresh clone without git tags can
# still compare against it: `buf build -o proto/releases/v0.1.0.binpb` at release.
LAST_RELEASE = REPO / "proto/releases/v0.1.0.binpb"


def buf_breaking(proto: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("buf"), "breaking", "--against", str(LAST_RELEASE)], cwd=proto, capture_output=True, text=True
    )


def test_the_contract_is_not_broken_since_the_last_release():
    result = buf_breaking(REPO / "proto")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("edit", ["renumber a field", "remove a field", "change a field's type"])
def test_buf_breaking_catches_an_incompatible_change(tmp_path, edit):
    proto = copy_of_the_contract(tmp_path)
    path = proto / "dataops/v1/query.proto"
    text = path.read_text()
    line = "  uint64 sequence = 1;\n"
    assert line in text
    replacement = {
        "renumber a field": "  uint64 sequence = 99;\n",
        "remove a field": "",
        "change a field's type": "  string sequence = 1;\n",
    }[edit]
    path.write_text(text.replace(line, replacement))
    result = buf_breaking(proto)
    assert result.returncode != 0, f"{edit} passed buf breaking"
    assert "sequence" in result.stdout + result.stderr


def test_buf_breaking_allows_an_additive_change(tmp_path):
    proto = copy_of_the_contract(tmp_path)
    path = proto / "dataops/v1/query.proto"
    path.write_text(
        path.read_text() + "\n// Added is new.\nmessage Added {\n  // A new field.\n  string note = 1;\n}\n"
    )
    assert buf_breaking(proto).returncode == 0


VENDORED = ["google/rpc/status.proto", "google/rpc/error_details.proto", "google/rpc/code.proto"]


def test_the_googleapis_protos_a_client_needs_are_vendored():
    """A client in any language decodes grpc-status-details-bin from proto/ alone: the
    vendored files build, and define the very messages the server packs (the Python
    side's googleapis-common-protos), field for field."""
    from google.rpc import code_pb2, error_details_pb2, status_pb2

    result = subprocess.run(
        [tool("buf"), "build", "-o", "-#format=json"], cwd=REPO / "proto", capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    image = {f["name"]: f for f in json.loads(result.stdout)["file"]}
    assert set(VENDORED) <= set(image)

    def collect(messages, prefix: str, into: dict) -> dict:
        """Every message of a buf image file (nested ones too) -> its fields."""
        for m in messages:
            into[prefix + m["name"]] = {
                (f["name"], f["number"], TYPES[f["type"]], f.get("label") == "LABEL_REPEATED")
                for f in m.get("field", [])
            }
            collect(m.get("nestedType", []), prefix + m["name"] + ".", into)
        return into

    def walk(descriptor, prefix: str, into: dict) -> dict:
        """The same for a Python descriptor the server packs."""
        into[prefix + descriptor.name] = {
            (f.name, f.number, f.type, f.is_repeated) for f in descriptor.fields
        }
        for nested in descriptor.nested_types:
            walk(nested, prefix + descriptor.name + ".", into)
        return into

    for name, module in zip(VENDORED, (status_pb2, error_details_pb2, code_pb2)):
        vendored = collect(image[name].get("messageType", []), "", {})
        served: dict = {}
        for descriptor in module.DESCRIPTOR.message_types_by_name.values():
            walk(descriptor, "", served)
        assert vendored == served, name
    codes = {v["name"]: v.get("number", 0) for v in image["google/rpc/code.proto"]["enumType"][0]["value"]}
    assert codes == dict(code_pb2.Code.items())


TYPES = {
    name: number
    for number, name in enumerate(
        [
            "",
            "TYPE_DOUBLE",
            "TYPE_FLOAT",
            "TYPE_INT64",
            "TYPE_UINT64",
            "TYPE_INT32",
            "TYPE_FIXED64",
            "TYPE_FIXED32",
            "TYPE_BOOL",
            "TYPE_STRING",
            "TYPE_GROUP",
            "TYPE_MESSAGE",
            "TYPE_BYTES",
            "TYPE_UINT32",
            "TYPE_ENUM",
            "TYPE_SFIXED32",
            "TYPE_SFIXED64",
            "TYPE_SINT32",
            "TYPE_SINT64",
        ]
    )
    if name
}


def test_python_code_is_generated_for_our_contract_only(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    gen_proto.generate(tmp_path)
    generated = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*.py")}
    assert generated == {"dataops"}  # no google/rpc shadowing googleapis-common-protos


def test_every_reason_the_server_sends_is_in_the_contract():
    """errors.proto's ErrorReason is the list a client programs against: it must match."""
    import dataops.server.app  # noqa: F401  (imports every module that defines errors)
    from dataops.errors import RequestError
    from dataops.v1 import errors_pb2

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    sent = {RequestError.reason} | {cls.reason for cls in subclasses(RequestError)} | {"INTERNAL"}
    documented = {name.removeprefix("ERROR_REASON_") for name in errors_pb2.ErrorReason.keys()} - {
        "UNSPECIFIED"
    }
    assert sent == documented


def run_grpcurl(
    server, pki, args: list[str], consumer: str | None = "city-bank", *, deadline: bool = True
) -> subprocess.CompletedProcess:
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
    assert {
        "dataops.v1.CatalogService",
        "dataops.v1.QueryService",
        "dataops.v1.SubjectService",
        "dataops.v1.AuditService",
        "grpc.health.v1.Health",
    } <= services


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
            [
                tool("grpcurl"),
                "-cacert",
                str(pki.directory / "ca.crt"),
                "-cert",
                str(d / "city-bank.crt"),
                "-key",
                str(d / "city-bank.key"),
                "-max-time",
                "10",
                f"localhost:{server.port}",
                "list",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode != 0
    assert "dataops.v1" not in result.stdout


DP_QUERY = {
    "query": {
        "dataset": "enterprise_credit",
        "mode": "QUERY_MODE_DP",
        "groupBy": ["district"],
        "aggregates": [{"function": "AGGREGATE_FUNCTION_COUNT"}],
        "privacy": {"epsilon": 0.5},
    }
}


def test_grpcurl_runs_a_query_without_a_deadline(server, pki):
    """Stock clients send no deadline by default; the answer must still come back."""
    result = run_grpcurl(
        server, pki, ["-d", json.dumps(DP_QUERY), "dataops.v1.QueryService/RunQuery"], deadline=False
    )
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    # grpcurl prints the proto field names.
    assert int(response["result"]["row_count"]) == 10
    assert int(response["receipt"]["sequence"]) >= 1


def test_grpcurl_estimates_without_a_deadline(server, pki):
    result = run_grpcurl(
        server, pki, ["-d", json.dumps(DP_QUERY), "dataops.v1.QueryService/EstimateQuery"], deadline=False
    )
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
    infos = [
        error_details_pb2.ErrorInfo() for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)
    ]
    for info, detail in zip(
        infos, [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    ):
        detail.Unpack(info)
    assert [i.reason for i in infos] == ["INTERNAL"]
    assert int(infos[0].metadata["receipt_sequence"]) >= 1
    assert "a bug" not in status.message  # the exception text stays in the server's log


@pytest.mark.parametrize(
    "remaining, expected_none", [(None, True), (9.2e9, True), (float("inf"), True), (5.0, False)]
)
def test_no_deadline_is_recognised_whatever_grpc_reports(remaining, expected_none):
    from dataops.server.interceptors import client_deadline

    assert (client_deadline(remaining) is None) is expected_none


def test_describe_dataset_states_the_tables_dominance_rule(connect):
    client = connect("city-bank")
    description = client.describe("enterprise_credit")
    # products/enterprises_by_district_industry_size.toml: dominance_n = 2, dominance_percent = 85.0
    (table,) = description.tables
    assert (table.rules.dominance_n, table.rules.dominance_percent) == (2, 85.0)
    assert description.grant.dominance is None  # deprecated on the grant: the rules are the table's


def documented_tokens(message: str, field: str) -> set[str]:
    """The backticked tokens in the comment above `field` of `message` in query.proto."""
    text = (REPO / "proto/dataops/v1/query.proto").read_text()
    body = text.split(f"message {message} {{", 1)[1].split("\n}", 1)[0]
    comment = body.split(f" {field} = ", 1)[0].rsplit(";\n", 1)[-1]
    return set(re.findall(r"`([^`]+)`", comment))


def test_output_names_and_mechanisms_are_the_documented_ones(connect):
    from dataops import client as dc

    client = connect("city-bank")
    result = client.query(
        "enterprise_credit",
        group_by=["district"],
        mode="dp",
        epsilon=1.0,
        aggregates=[
            dc.count(),
            dc.count_units(),
            dc.total("tax_paid"),
            dc.mean("tax_paid"),
            dc.median("tax_paid"),
            dc.quantile("tax_paid", 0.05),
        ],
    )
    names = ["count", "count_units", "sum_tax_paid", "mean_tax_paid", "q50_tax_paid", "q05_tax_paid"]
    assert result.frame.columns == ["district", *names]
    # Every default name above is spelt out in the contract's comments.
    text = (REPO / "proto/dataops/v1/query.proto").read_text()
    for name in (
        "`count`",
        "`count_units`",
        "`sum_<column>`",
        "`mean_<column>`",
        "`q50_tax_paid`",
        "`q05_tax_paid`",
    ):
        assert name in text
    mechanisms = {name: a.mechanism for name, a in result.accuracy.items()}
    assert mechanisms == {
        "count": "discrete_laplace",
        "count_units": "discrete_laplace",
        "sum_tax_paid": "discrete_laplace",
        "mean_tax_paid": "discrete_laplace",
        "q50_tax_paid": "exponential",
        "q05_tax_paid": "exponential",
    }
    assert set(mechanisms.values()) <= documented_tokens("AggregateAccuracy", "mechanism")


def test_grpcurl_works_from_proto_alone_and_decodes_error_details(server, pki):
    """Without reflection: the .proto files of proto/ are all a stock client needs,
    including the vendored google/rpc ones that name the error details."""
    protos = [
        "-import-path",
        str(REPO / "proto"),
        "-proto",
        "dataops/v1/catalog.proto",
        "-proto",
        "dataops/v1/query.proto",
        "-proto",
        "google/rpc/error_details.proto",
    ]
    listed = run_grpcurl(
        server, pki, [*protos, "-d", "{}", "dataops.v1.CatalogService/ListDatasets"], deadline=False
    )
    assert listed.returncode == 0, listed.stderr
    assert [d["id"] for d in json.loads(listed.stdout)["datasets"]] == ["enterprise_credit"]
    refused = run_grpcurl(
        server,
        pki,
        [*protos, "-d", '{"dataset_id": "medical_claims"}', "dataops.v1.CatalogService/DescribeDataset"],
        deadline=False,
    )
    assert refused.returncode != 0
    assert "NotFound" in refused.stderr
    (detail,) = [json.loads(line.split("\t", 1)[1]) for line in refused.stderr.splitlines() if "\t{" in line]
    assert detail["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert (detail["reason"], detail["metadata"]["rule"]) == ("UNKNOWN_DATASET", "dataset.unknown")


# --- SubjectService and AuditService from grpcurl (no deadline) ----------------------


@pytest.fixture
def config(config):
    """The conftest work directory, with a trusted consent issuer (`dataops consent init`)."""
    from dataops.consent_service import ConsentService

    ConsentService(config.paths.state / "consent-service", config.paths.consents).init()
    return config


@pytest.fixture
def consents(config):
    from dataops.consent_service import ConsentService

    return ConsentService(config.paths.state / "consent-service", config.paths.consents)


@pytest.fixture
def subjects(config) -> list[str]:
    import polars as pl

    return pl.read_parquet(config.paths.sandbox / "finance/enterprise_credit.parquet")["enterprise_id"][
        :4
    ].to_list()


def subject_item(product: str, subject: str, consent: bytes) -> dict:
    import base64

    # proto3 JSON carries `bytes` as base64.
    return {"product_id": product, "subject_id": subject, "consent": base64.b64encode(consent).decode()}


def review(consents, subject: str, **terms) -> bytes:
    return consents.issue(
        subject=subject,
        consumer="city-bank",
        products=["pre_loan_review"],
        purpose="pre-loan review",
        **terms,
    )


def error_infos(stderr: str) -> list[dict]:
    """The google.rpc.ErrorInfo details grpcurl prints after a failed call, one JSON per line."""
    details = [json.loads(line.split("\t", 1)[1]) for line in stderr.splitlines() if "\t{" in line]
    return [d for d in details if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"]


PRE_LOAN_OUTPUTS = {"penalties_band", "arrears_months_band", "tax_band", "grade_points", "grade"}


@pytest.mark.parametrize("deadline", [False, True], ids=["no deadline", "deadline"])
def test_grpcurl_evaluates_a_subject_under_a_valid_consent_with_or_without_a_deadline(
    server, pki, consents, subjects, deadline
):
    request = {"item": subject_item("pre_loan_review", subjects[0], review(consents, subjects[0]))}
    result = run_grpcurl(
        server, pki, ["-d", json.dumps(request), "dataops.v1.SubjectService/Evaluate"], deadline=deadline
    )
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    evaluation = response["evaluation"]
    assert evaluation["product_id"] == "pre_loan_review" and evaluation["consent_id"].startswith("cst-")
    assert {o["name"] for o in evaluation["outputs"]} == PRE_LOAN_OUTPUTS
    assert all(set(o) - {"name"} for o in evaluation["outputs"])  # each output carries a value
    assert len(evaluation["outputs_hash"]) == 64
    assert int(response["receipt"]["sequence"]) >= 1 and len(response["receipt"]["hash"]) == 64


@pytest.mark.parametrize("bad", ["expired", "another consumer's", "no consent"])
def test_grpcurl_sees_consent_invalid_in_the_refusals_error_info(server, pki, consents, subjects, bad):
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    artefact = {
        "expired": lambda: review(
            consents, subjects[1], not_before=now - dt.timedelta(days=2), not_after=now - dt.timedelta(days=1)
        ),
        "another consumer's": lambda: consents.issue(
            subject=subjects[1],
            consumer="river-bank",
            products=["pre_loan_review"],
            purpose="pre-loan review",
        ),
        "no consent": lambda: b"",
    }[bad]()
    request = {"item": subject_item("pre_loan_review", subjects[1], artefact)}
    result = run_grpcurl(
        server, pki, ["-d", json.dumps(request), "dataops.v1.SubjectService/Evaluate"], deadline=False
    )
    assert result.returncode != 0 and not result.stdout.strip()
    assert "PermissionDenied" in result.stderr
    (info,) = error_infos(result.stderr)
    assert info["reason"] == "CONSENT_INVALID"
    assert info["metadata"]["rule"].startswith("consent.")


@pytest.mark.parametrize("deadline", [False, True], ids=["no deadline", "deadline"])
def test_grpcurl_evaluates_a_batch_item_by_item(server, pki, consents, subjects, deadline):
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    items = [
        subject_item("pre_loan_review", subjects[0], review(consents, subjects[0])),
        subject_item(
            "pre_loan_review",
            subjects[1],
            review(
                consents,
                subjects[1],
                not_before=now - dt.timedelta(days=2),
                not_after=now - dt.timedelta(days=1),
            ),
        ),
        subject_item("pre_loan_review", subjects[2], review(consents, subjects[2])),
    ]
    result = run_grpcurl(
        server,
        pki,
        ["-d", json.dumps({"items": items}), "dataops.v1.SubjectService/EvaluateBatch"],
        deadline=deadline,
    )
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    results = response["results"]
    # proto3 JSON leaves out the zero index of the first result.
    assert [r.get("index", 0) for r in results] == [0, 1, 2]
    assert [sorted(set(r) - {"index"}) for r in results] == [["evaluation"], ["error"], ["evaluation"]]
    assert {o["name"] for o in results[0]["evaluation"]["outputs"]} == PRE_LOAN_OUTPUTS
    assert (results[1]["error"]["reason"], results[1]["error"]["metadata"]["rule"]) == (
        "CONSENT_INVALID",
        "consent.expired",
    )
    assert results[0]["evaluation"]["consent_id"] != results[2]["evaluation"]["consent_id"]
    assert int(response["receipt"]["sequence"]) >= 1


def test_grpcurl_watches_a_subject_until_its_consent_is_revoked(server, pki, config, consents, subjects):
    """The server stream: the first evaluation arrives at once; revoking the consent ends
    that subject's watch with the refusal, and with it the stream (grpcurl exits 0)."""
    from dataops.consent import ConsentStore, Fetch, store_path

    artefact = consents.issue(
        subject=subjects[3],
        consumer="city-bank",
        products=["credit_monitoring"],
        purpose="post-loan monitoring",
        fetch=Fetch("periodic", "day", 10),
    )
    request = {"items": [subject_item("credit_monitoring", subjects[3], artefact)]}
    d = pki.consumer_dir("city-bank")
    # No -max-time: no deadline. The watchdog and communicate's timeout bound the test instead.
    process = subprocess.Popen(
        [
            tool("grpcurl"),
            "-cacert",
            str(pki.directory / "ca.crt"),
            "-cert",
            str(d / "city-bank.crt"),
            "-key",
            str(d / "city-bank.key"),
            "-d",
            json.dumps(request),
            f"localhost:{server.port}",
            "dataops.v1.SubjectService/Watch",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    import threading

    watchdog = threading.Timer(30, process.kill)  # a silent stream fails the test instead of hanging it
    watchdog.start()
    try:
        lines = []
        for line in process.stdout:  # grpcurl prints each message as indented JSON, closed by "}"
            lines.append(line)
            if line == "}\n":
                break
        first = json.loads("".join(lines))
        evaluation = first["evaluation"]
        assert evaluation["product_id"] == "credit_monitoring"
        assert {o["name"] for o in evaluation["outputs"]} == {
            "penalties_band",
            "arrears_months_band",
            "watch_grade_points",
            "watch_grade",
        }
        assert int(first["receipt"]["sequence"]) >= 1
        assert ConsentStore(store_path(config.paths.state)).revoke(evaluation["consent_id"])
        rest, stderr = process.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    (ended,) = [json.loads(m if m.endswith("}") else m + "}") for m in rest.strip().split("\n}\n")]
    assert (ended["ended"]["reason"], ended["ended"]["metadata"]["rule"]) == (
        "CONSENT_INVALID",
        "consent.revoked",
    )
    assert "evaluation" not in ended


def checkpoint_from_grpcurl(server, pki, key):
    from dataops.audit.note import parse_checkpoint

    result = run_grpcurl(server, pki, ["-d", "{}", "dataops.v1.AuditService/GetCheckpoint"], deadline=False)
    assert result.returncode == 0, result.stderr
    return parse_checkpoint(json.loads(result.stdout)["checkpoint"], key)  # raises unless signed by `key`


def test_grpcurl_gets_a_signed_checkpoint_that_grows_and_a_consistency_proof_that_verifies(
    server, pki, config
):
    import base64

    from dataops.audit import load_public_key
    from dataops.audit.merkle import ProofError, verify_consistency

    key = load_public_key(config.signer_dir / "signing.pub")  # the operator's key, out of band
    assert (
        run_grpcurl(
            server, pki, ["-d", "{}", "dataops.v1.CatalogService/ListDatasets"], deadline=False
        ).returncode
        == 0
    )
    first = checkpoint_from_grpcurl(server, pki, key)
    assert first.size >= 1 and first.origin == "dataops-audit"
    assert (
        run_grpcurl(
            server, pki, ["-d", "{}", "dataops.v1.CatalogService/ListDatasets"], deadline=False
        ).returncode
        == 0
    )
    second = checkpoint_from_grpcurl(server, pki, key)
    assert second.size > first.size  # the calls in between were logged and signed

    request = {"first_size": first.size, "second_size": second.size}
    result = run_grpcurl(
        server,
        pki,
        ["-d", json.dumps(request), "dataops.v1.AuditService/GetConsistencyProof"],
        deadline=False,
    )
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    proof = [base64.b64decode(p) for p in response["proof"]]
    assert proof and int(response["receipt"]["sequence"]) > second.size
    verify_consistency(first.size, second.size, first.root, second.root, proof)
    # The check is real: a rewritten first tree does not verify against the same proof.
    with pytest.raises(ProofError):
        verify_consistency(first.size, second.size, bytes(32), second.root, proof)

    beyond = run_grpcurl(
        server,
        pki,
        [
            "-d",
            json.dumps({"first_size": second.size, "second_size": first.size}),
            "dataops.v1.AuditService/GetConsistencyProof",
        ],
        deadline=False,
    )
    assert beyond.returncode != 0
    (info,) = error_infos(beyond.stderr)
    assert (info["reason"], info["metadata"]["rule"]) == ("INVALID_QUERY", "audit.consistency")


def test_grpcurl_calls_the_audit_service_with_a_deadline(server, pki, config):
    """The same two audit RPCs with grpcurl's -max-time set (a client deadline)."""
    import base64

    from dataops.audit import load_public_key
    from dataops.audit.merkle import verify_consistency
    from dataops.audit.note import parse_checkpoint

    key = load_public_key(config.signer_dir / "signing.pub")
    run_grpcurl(server, pki, ["-d", "{}", "dataops.v1.CatalogService/ListDatasets"])  # a log to sign
    first = run_grpcurl(server, pki, ["-d", "{}", "dataops.v1.AuditService/GetCheckpoint"])
    assert first.returncode == 0, first.stderr
    run_grpcurl(server, pki, ["-d", "{}", "dataops.v1.CatalogService/ListDatasets"])
    second = run_grpcurl(server, pki, ["-d", "{}", "dataops.v1.AuditService/GetCheckpoint"])
    assert second.returncode == 0, second.stderr
    a = parse_checkpoint(json.loads(first.stdout)["checkpoint"], key)
    b = parse_checkpoint(json.loads(second.stdout)["checkpoint"], key)
    assert b.size > a.size
    proof = run_grpcurl(
        server,
        pki,
        [
            "-d",
            json.dumps({"first_size": a.size, "second_size": b.size}),
            "dataops.v1.AuditService/GetConsistencyProof",
        ],
    )
    assert proof.returncode == 0, proof.stderr
    path = [base64.b64decode(h) for h in json.loads(proof.stdout).get("proof", [])]
    verify_consistency(a.size, b.size, a.root, b.root, path)  # raises ProofError if it does not hold
