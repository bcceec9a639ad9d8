"""A client we did not write in Python: Node.js with @grpc/grpc-js, given only proto/,
the server address and the certificates, calls every RPC without a deadline, decodes
refusals from the error trailer and reads the Arrow results (tests/node/client.mjs).

Node and npm are required (CI and the dev machine have them): if they are missing
this test fails, it does not skip. Dependencies come from tests/node/package-lock.json
through `npm ci`, into a cache directory keyed by the lock file, once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import REPO

NODE_DIR = REPO / "tests" / "node"


def node_tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "node and npm are needed for the Node.js client test (apt-get install nodejs npm)"
    return node, npm


@pytest.fixture(scope="session")
def node_client() -> tuple[str, Path]:
    """(node, the client script inside a directory whose node_modules `npm ci` filled)."""
    node, npm = node_tools()
    lock = (NODE_DIR / "package-lock.json").read_bytes()
    key = hashlib.sha256(lock + (NODE_DIR / "package.json").read_bytes()).hexdigest()[:16]
    root = Path(os.environ.get("DATAOPS_NODE_CACHE", Path.home() / ".cache" / "dataops-node"))
    try:
        (root / key).mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home (some CI runners): the temporary directory will do
        root = Path(tempfile.gettempdir()) / "dataops-node"
        (root / key).mkdir(parents=True, exist_ok=True)
    cache = root / key
    done = cache / ".installed"
    if not done.exists():
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(NODE_DIR / name, cache / name)
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=cache, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stdout + result.stderr
        done.write_text(key)
    # The script is copied every run (ES modules resolve packages next to the script).
    shutil.copy2(NODE_DIR / "client.mjs", cache / "client.mjs")
    return node, cache / "client.mjs"


@pytest.fixture
def config(config):
    """The conftest work directory, with a trusted consent issuer (`dataops consent init`)."""
    from dataops.consent_service import ConsentService

    ConsentService(config.paths.state / "consent-service", config.paths.consents).init()
    return config


SUBJECT_PRODUCTS = {"pre_loan_review": "pre-loan review", "credit_monitoring": "post-loan monitoring"}


@pytest.fixture
def subject_items(config, tmp_path) -> Path:
    """Signed consents for city-bank, as the consent service issues them, in the file
    client.mjs reads (each artefact base64): one good, one expired, a batch of both, a watch."""
    import base64
    import datetime as dt

    import polars as pl

    from dataops.consent import Fetch
    from dataops.consent_service import ConsentService

    service = ConsentService(config.paths.state / "consent-service", config.paths.consents)
    ids = pl.read_parquet(config.paths.sandbox / "finance/enterprise_credit.parquet")["enterprise_id"][
        :4
    ].to_list()
    now = dt.datetime.now(dt.UTC)

    def item(product, subject, **terms):
        artefact = service.issue(
            subject=subject,
            consumer="city-bank",
            products=[product],
            purpose=SUBJECT_PRODUCTS[product],
            **terms,
        )
        return {"product_id": product, "subject_id": subject, "consent": base64.b64encode(artefact).decode()}

    expired = dict(not_before=now - dt.timedelta(days=2), not_after=now - dt.timedelta(days=1))
    items = {
        "evaluate": item("pre_loan_review", ids[0]),
        "refused": item("pre_loan_review", ids[1], **expired),
        "batch": [item("pre_loan_review", ids[2]), item("pre_loan_review", ids[1], **expired)],
        "watch": [item("credit_monitoring", ids[3], fetch=Fetch("periodic", "day", 10))],
    }
    path = tmp_path / "subjects.json"
    path.write_text(json.dumps(items))
    return path


@pytest.fixture
def report(node_client, server, pki, subject_items) -> dict:
    node, script = node_client
    d = pki.consumer_dir("city-bank")
    command = [
        node,
        str(script),
        "--proto",
        str(REPO / "proto"),
        "--subjects",
        str(subject_items),
        # An IP target: the server certificate names localhost, hence the override.
        "--target",
        f"127.0.0.1:{server.port}",
        "--server-name",
        "localhost",
        "--ca",
        str(d / "ca.crt"),
        "--cert",
        str(d / "city-bank.crt"),
        "--key",
        str(d / "city-bank.key"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_node_calls_every_rpc_of_the_catalog_and_query_services(report):
    ours = {rpc for rpc in report["rpcs"] if rpc.split("/")[0] in ("CatalogService", "QueryService")}
    assert ours == {
        "CatalogService/ListDatasets",
        "CatalogService/DescribeDataset",
        "QueryService/RunQuery",
        "QueryService/EstimateQuery",
        "QueryService/GetBudget",
    }
    assert ours <= set(report["called"])


def test_node_calls_every_rpc_of_every_service(report):
    assert {rpc.split("/")[0] for rpc in report["rpcs"]} == {
        "CatalogService",
        "QueryService",
        "SubjectService",
        "AuditService",
    }
    assert set(report["rpcs"]) == set(report["called"])


PRE_LOAN_OUTPUTS = {"penalties_band", "arrears_months_band", "tax_band", "grade_points", "grade"}


def test_node_evaluates_a_subject_and_reads_consent_invalid_from_a_refusal(report):
    evaluated = report["evaluate"]
    assert "error" not in evaluated, evaluated
    assert {o["name"] for o in evaluated["evaluation"]["outputs"]} == PRE_LOAN_OUTPUTS
    # oneofs: true names the member set; it is one of the declared value kinds.
    assert {o["value"] for o in evaluated["evaluation"]["outputs"]} <= {
        "int_value",
        "double_value",
        "bool_value",
        "band",
    }
    assert evaluated["evaluation"]["consent_id"].startswith("cst-")
    assert int(evaluated["receipt"]["sequence"]) >= 1
    refused = report["evaluate_refused"]["error"]
    assert (refused["code"], refused["reason"], refused["metadata"]["rule"]) == (
        "PERMISSION_DENIED",
        "CONSENT_INVALID",
        "consent.expired",
    )


def test_node_reads_a_batch_item_by_item(report):
    batch = report["evaluate_batch"]
    assert "error" not in batch, batch
    assert [(r["index"], r["result"]) for r in batch["results"]] == [(0, "evaluation"), (1, "error")]
    first, second = batch["results"]
    assert {o["name"] for o in first["evaluation"]["outputs"]} == PRE_LOAN_OUTPUTS
    assert (second["error"]["reason"], second["error"]["metadata"]["rule"]) == (
        "CONSENT_INVALID",
        "consent.expired",
    )
    assert int(batch["receipt"]["sequence"]) >= 1


def test_node_reads_the_first_message_of_a_watch_then_cancels(report):
    watch = report["watch"]
    first = watch["first"]
    assert (first["index"], first["update"]) == (0, "evaluation")
    assert first["evaluation"]["product_id"] == "credit_monitoring"
    assert {o["name"] for o in first["evaluation"]["outputs"]} == {
        "penalties_band",
        "arrears_months_band",
        "watch_grade_points",
        "watch_grade",
    }
    assert int(first["receipt"]["sequence"]) >= 1
    assert watch["closed"] == "CANCELLED"  # the client ended the stream, not the server


def test_node_checkpoints_grow_and_the_consistency_proof_verifies(report, config):
    import base64

    from dataops.audit import load_public_key
    from dataops.audit.merkle import ProofError, verify_consistency
    from dataops.audit.note import parse_checkpoint

    key = load_public_key(config.signer_dir / "signing.pub")
    first, second = (parse_checkpoint(c["checkpoint"], key) for c in report["checkpoints"])
    assert 1 <= first.size < second.size
    proof = [base64.b64decode(p) for p in report["consistency"]["proof"]]
    verify_consistency(first.size, second.size, first.root, second.root, proof)
    with pytest.raises(ProofError):
        verify_consistency(first.size, second.size, first.root, bytes(32), proof)


def test_node_discovers_the_dataset_and_the_grant(report):
    assert report["list_datasets"]["ids"] == ["enterprise_credit"]
    assert int(report["list_datasets"]["receipt"]["sequence"]) >= 1  # uint64 as a string
    described = report["describe"]
    assert described["privacy_unit"] == "enterprise_id"
    assert described["max_rows_per_unit"] == "1"  # int64 as a string (longs: String)
    columns = {c["name"]: c for c in described["columns"]}
    assert columns["enterprise_id"]["classification"] == "CLASSIFICATION_IDENTIFIER"  # enums: String
    assert columns["district"]["allowed_uses"] == ["COLUMN_USE_DIMENSION", "COLUMN_USE_FILTER"]
    # Exact answers come from the published tables the grant names, with their rules.
    assert described["grant"]["tables"] == ["enterprises_by_district_industry_size"]
    rules = described["tables"][0]["rules"]
    assert (rules["dominance_n"], rules["dominance_percent"]) == ("2", 85)
    assert described["grant"]["modes"] == ["QUERY_MODE_AGGREGATE", "QUERY_MODE_DP"]


def test_node_decodes_a_refusal_from_the_error_trailer(report):
    other = report["describe_other_zone"]["error"]
    assert other["code"] == "NOT_FOUND"
    assert (other["reason"], other["domain"]) == ("UNKNOWN_DATASET", "dataops.v1")
    assert other["metadata"]["rule"] == "dataset.unknown"
    assert int(other["metadata"]["receipt_sequence"]) >= 1 and len(other["metadata"]["receipt_hash"]) == 64
    denied = report["run_denied"]["error"]
    assert (denied["code"], denied["reason"], denied["metadata"]["rule"]) == (
        "PERMISSION_DENIED",
        "POLICY_DENIED",
        "identifier",
    )
    bad = report["run_bad_sql"]["error"]
    assert (bad["code"], bad["reason"]) == ("INVALID_ARGUMENT", "INVALID_QUERY")
    assert bad["field_violations"] == [
        {
            "field": "sql.text",
            "description": "line 3, column 22: only =, IN, BETWEEN, >= and <= filters are supported, not OR",
        }
    ]


def test_node_reads_the_arrow_result_of_a_dp_query_without_a_deadline(report):
    run = report["run"]
    assert "error" not in run, run
    table = run["table"]
    assert table["row_count"] == "10" and table["num_rows"] == 10
    assert table["schema"] == [
        {"name": "district", "type": "LargeUtf8"},
        {"name": "count", "type": "Int64"},
        {"name": "mean_tax_paid", "type": "Float64"},
    ]
    # The documented int64 handling: Int64 columns arrive as BigInt.
    assert table["js_types"] == {"district": "string", "count": "bigint", "mean_tax_paid": "number"}
    assert all(int(row["count"]) >= 0 for row in table["rows"])
    assert [a["mechanism"] for a in run["accuracy"]] == ["discrete_laplace", "discrete_laplace"]
    assert run["spend"]["epsilon"] == pytest.approx(0.5)
    assert report["estimate"]["spend"]["epsilon"] == pytest.approx(0.5)


def test_node_sql_gets_the_release_of_its_structured_twin(report):
    assert report["run_sql"]["reused"] is True
    assert report["run_sql"]["table"]["rows"] == report["run"]["table"]["rows"]


def test_node_reads_an_exact_answer_and_the_budget(report):
    exact = report["run_exact"]
    assert "error" not in exact, exact
    assert [f["name"] for f in exact["table"]["schema"]] == ["size_band", "count_units"]
    assert int(exact["rows_suppressed"]) >= 0
    (budget,) = report["budget"]["budgets"]
    assert budget["dataset_id"] == "enterprise_credit"
    assert budget["epsilon_spent"] == pytest.approx(0.5)  # the SQL twin was reused for free


SQL_IN_THE_EXAMPLE = '"SELECT district, COUNT(*), AVG(tax_paid) FROM enterprise_credit GROUP BY district"'


def docs_example(node_client, server, pki, sql: str | None = None) -> subprocess.CompletedProcess:
    """docs/api.md's Node.js example, with only the paths and the address filled in."""
    import re

    node, script = node_client
    d = pki.consumer_dir("city-bank")
    (example,) = re.findall(r"```js\n(.*?)```", (REPO / "docs/api.md").read_text(), re.S)
    for placeholder, value in [
        ('"path/to/dataops/proto"', REPO / "proto"),
        ('"ca.crt"', d / "ca.crt"),
        ('"me.key"', d / "city-bank.key"),
        ('"me.crt"', d / "city-bank.crt"),
        ('"127.0.0.1:50051"', f"127.0.0.1:{server.port}"),
        (SQL_IN_THE_EXAMPLE, sql),
    ]:
        assert placeholder in example
        if value is not None:
            example = example.replace(placeholder, json.dumps(str(value)))
    path = script.parent / "docs_example.mjs"
    path.write_text(example)
    return subprocess.run([node, str(path)], capture_output=True, text=True, timeout=120)


def test_the_node_example_in_docs_api_md_runs_as_written(node_client, server, pki):
    result = docs_example(node_client, server, pki)
    assert result.returncode == 0 and not result.stderr, result.stderr
    lines = result.stdout.splitlines()
    districts = [line.split()[0] for line in lines[:10]]
    assert districts == sorted(districts) and len(set(districts)) == 10
    assert all(int(line.split()[1]) >= 0 for line in lines[:10])


def test_the_node_example_in_docs_api_md_decodes_a_refusal(node_client, server, pki):
    result = docs_example(
        node_client,
        server,
        pki,
        sql="SELECT enterprise_id, COUNT(*) FROM enterprise_credit GROUP BY enterprise_id",
    )
    assert result.stderr.startswith("PERMISSION_DENIED POLICY_DENIED identifier "), result.stderr
