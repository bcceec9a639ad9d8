"""The reviewer's reading of the log: filters that match or say why not, full cells, the
attempted query of a malformed request, typed exports, and a report that charts caps,
volume, denials per consumer and errors, and stops at the first tamper break."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit_support import open_log
from conftest import audit_records
from dataops.audit import AuditLog
from dataops.audit.sample import sample_records
from dataops.audit.signer import LocalSigner
from dataops.cli import main
from dataops.client import DataopsClientError
from dataops.v1 import query_pb2
from test_audit_report import Page
from test_audit_verify import read_lines, write_lines


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def toml_of(config) -> str:
    return str(config.paths.catalog.parent / "dataops.toml")


@pytest.fixture
def busy(server, config, connect):
    """A real log: allowed, denied and DP requests from two consumers."""
    city, river = connect("city-bank"), connect("river-bank")
    city.list_datasets()
    city.query("enterprise_credit", aggregates=["count"], group_by=["size_band"])
    city.query("enterprise_credit", aggregates=["count"], mode="dp", epsilon=1.5)
    for attempt in (
        lambda: city.query("enterprise_credit", aggregates=["count"], group_by=["enterprise_id"]),
        lambda: river.query("enterprise_credit", aggregates=["sum(tax_paid)"]),
        lambda: city.query("enterprise_credit", aggregates=["quantile(tax_paid, 0.5)"]),
    ):
        with pytest.raises(DataopsClientError):
            attempt()
    return config


def test_show_matches_methods_in_any_case_and_prints_cells_in_full(busy, capsys):
    code, out, _ = run(capsys, "audit", "show", "-c", toml_of(busy), "--method", "runquery")
    assert code == 0 and out.strip().endswith("5 records")
    code, out, _ = run(capsys, "audit", "show", "-c", toml_of(busy), "--reason", "policy_denied")
    # The deciding rules in full, never cut with an ellipsis.
    assert "table.coverage" in out and "aggregate-mode.quantile" in out and "…" not in out
    assert out.strip().endswith("3 records")


def test_a_filter_that_matches_nothing_says_which_values_exist(busy, capsys):
    code, out, err = run(capsys, "audit", "show", "-c", toml_of(busy), "--consumer", "City-Bank")
    assert code == 0 and "0 records" in out
    assert "no record has consumer 'City-Bank'; consumers in the log: city-bank, river-bank" in err
    code, _, err = run(capsys, "audit", "show", "-c", toml_of(busy), "--method", "RunQuerys")
    assert "methods in the log: ListDatasets, RunQuery" in err
    code, _, err = run(
        capsys, "audit", "show", "-c", toml_of(busy), "--consumer", "river-bank", "--decision", "allowed"
    )
    assert "each filter matches some of the 6 records, but no record matches them all" in err


def _raw_run(server, pki, payload: bytes) -> grpc.RpcError:
    d = pki.consumer_dir("city-bank")
    credentials = grpc.ssl_channel_credentials(
        (d / "ca.crt").read_bytes(), (d / "city-bank.key").read_bytes(), (d / "city-bank.crt").read_bytes()
    )
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
        call = channel.unary_unary(
            "/dataops.v1.QueryService/RunQuery", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as err:
            call(payload, timeout=30)
    return err.value


def test_a_malformed_query_is_recorded_as_attempted(server, config, pki):
    no_aggregates = query_pb2.RunQueryRequest(
        query=query_pb2.Query(dataset="enterprise_credit", group_by=["size_band"])
    )
    assert _raw_run(server, pki, no_aggregates.SerializeToString()).code() == grpc.StatusCode.INVALID_ARGUMENT
    record = audit_records(config)[-1]
    assert record["decision"] == "invalid"
    assert json.loads(record["query"]) == {
        "attempted": {"query": {"dataset": "enterprise_credit", "group_by": ["size_band"]}}
    }

    # Over a limit: recorded, but bounded.
    huge = query_pb2.Query(
        dataset="enterprise_credit",
        mode=query_pb2.QUERY_MODE_AGGREGATE,
        aggregates=[query_pb2.Aggregate(function=query_pb2.AGGREGATE_FUNCTION_COUNT)],
    )
    for i in range(5000):
        huge.filters.add(column=f"c{i}", equals=query_pb2.Equals(value=query_pb2.Value(int_value=i)))
    _raw_run(server, pki, query_pb2.RunQueryRequest(query=huge).SerializeToString())
    record = audit_records(config)[-1]
    assert record["rule"] == "limits.max_filters" and len(record["query"]) <= 2048
    assert json.loads(record["query"])["attempted_chars"] > 100_000

    _raw_run(server, pki, b"\xff\xff\xff not protobuf")
    record = audit_records(config)[-1]
    assert record["rule"] == "wire"
    assert json.loads(record["query"]) == {
        "unparsed_hex": b"\xff\xff\xff not protobuf".hex(),
        "unparsed_bytes": 16,
    }


def test_the_parquet_export_is_typed(busy, tmp_path, capsys, server):
    out = tmp_path / "log.parquet"
    server.stop(grace=0.5)  # a checkpoint is signed at shutdown
    code, _, err = run(
        capsys, "audit", "export", "-c", toml_of(busy), "--format", "parquet", "--out", str(out)
    )
    assert code == 0, err
    schema = pq.read_schema(out)
    assert schema.field("time").type == pa.timestamp("us", tz="UTC")
    assert schema.field("seq").type == pa.int64() and schema.field("epsilon_spent").type == pa.float64()
    table = pq.read_table(out)
    first = table.column("time")[0].as_py()
    assert first.tzinfo is not None and first.isoformat() == audit_records(busy)[0]["time"]
    assert run(capsys, "audit", "verify-export", str(out))[0] == 0
    # An edited timestamp is caught like any other edited column.
    times = table.column("time").to_pylist()
    times[2] = times[2] + dt.timedelta(hours=1)
    edited = table.set_column(
        table.schema.get_field_index("time"), "time", pa.array(times, pa.timestamp("us", "UTC"))
    )
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), out)
    code, out_text, _ = run(capsys, "audit", "verify-export", str(out))
    assert code == 1 and "column 'time'" in out_text


def _report(capsys, config, tmp_path, *extra):
    out = tmp_path / "report.html"
    code, _, err = run(capsys, "audit", "report", "-c", toml_of(config), "--out", str(out), *extra)
    page = Page()
    html = out.read_text()
    page.feed(html)
    return code, html, page


class Marks(Page):
    """Page, plus the dashed cap lines inside charts."""

    def handle_starttag(self, tag, attrs):
        super().handle_starttag(tag, attrs)
        if self._chart and tag == "line" and dict(attrs).get("class") == "cap":
            self.charts[self._chart].append(("cap", dict(attrs)))


def test_the_report_draws_caps_volume_denials_per_consumer_and_errors(busy, tmp_path, capsys):
    log = AuditLog(
        busy.paths.state / "audit" / "audit.jsonl",  # the server's own signer, in-process
        signer=LocalSigner(busy.signer_dir, busy.audit.origin),
    )
    # An internal error as the interceptor records it (no real bug to trigger one with).
    log.append(
        {
            "time": dt.datetime.now(dt.UTC).isoformat(),
            "consumer": "city-bank",
            "method": "RunQuery",
            "dataset": "enterprise_credit",
            "decision": "error",
            "code": "INTERNAL",
            "reason": "INTERNAL",
        }
    )
    log.close()
    records = audit_records(busy)
    out = tmp_path / "report.html"
    assert run(capsys, "audit", "report", "-c", toml_of(busy), "--out", str(out))[0] == 0
    page = Marks()
    page.feed(out.read_text())

    caps = {a["data-series"]: float(a["data-cap"]) for tag, a in page.charts["budget"] if tag == "cap"}
    assert caps == {"city-bank · enterprise_credit": 5.0}  # the grant's epsilon in policies/city-bank.toml

    volume = Counter()
    for _, a in page.charts["volume"]:
        volume[a["data-part"]] += int(a["data-value"])
    assert volume == Counter(r["decision"] for r in records)

    per_consumer = Counter()
    for _, a in page.charts["denials-by-consumer"]:
        per_consumer[a["data-label"]] += int(a["data-value"])
    assert per_consumer == Counter(r["consumer"] for r in records if r["decision"] in ("denied", "invalid"))
    assert per_consumer == {"city-bank": 2, "river-bank": 1}

    assert [a["data-label"] for _, a in page.charts["errors"]] == ["RunQuery"]
    assert "errors" in page.sections and "INTERNAL" in "".join(page.text)


def test_the_report_charts_nothing_past_the_first_break(tmp_path, capsys):
    directory = tmp_path / "audit"
    log = open_log(directory, checkpoint_every=10, fsync=False)
    records = list(sample_records(60))
    for record in records:
        log.append(record)
    log.close()
    path = directory / "audit.jsonl"
    lines = read_lines(path)
    write_lines(path, lines[:29] + lines[30:])  # seq 30 deleted: seq 1..29 still chain
    out = tmp_path / "report.html"
    code, _, _ = run(capsys, "audit", "report", "--log-dir", str(directory), "--out", str(out))
    assert code == 1
    page = Page()
    html = out.read_text()
    page.feed(html)
    assert 'data-last-seq="29"' in html
    volume = sum(int(a["data-value"]) for _, a in page.charts["volume"])
    assert volume == 29
    queries = sum(int(float(a["data-value"])) for _, a in page.charts["queries"])
    assert queries == sum(1 for r in records[:29] if r["method"] == "RunQuery")
    spent = sum(float(a["data-total"]) for tag, a in page.charts["budget"] if tag == "polyline")
    assert spent == pytest.approx(sum(r["epsilon_spent"] for r in records[:29]))
