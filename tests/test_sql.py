"""The SQL interface: SQL text is parsed into the same IR query as its structured twin,
so it is answered the same and passes the same controls; bad SQL is refused naming
the offending token's line and column."""

from __future__ import annotations

import json

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import given, settings
from hypothesis import strategies as st

from dataops import client as dc
from dataops import ir, sql
from dataops.client import DataopsClientError
from dataops.errors import InvalidQuery
from dataops.v1 import query_pb2, query_pb2_grpc
from test_contract import run_grpcurl

DP = {"mode": ir.Mode.DP, "privacy": ir.Privacy(epsilon=0.5)}
UNIT = {"enterprise_credit": "enterprise_id"}.get


def structured(**kwargs) -> ir.Query:
    return ir.Query(**{"dataset": "enterprise_credit", **DP, **kwargs})


# (SQL, its structured twin): the canonical forms must be one and the same.
TWINS = [
    ("SELECT COUNT(*) FROM enterprise_credit", structured(aggregates=(dc.count(),))),
    (
        "select district, count(*) from enterprise_credit group by district",
        structured(group_by=("district",), aggregates=(dc.count(),)),
    ),
    (
        "SELECT district, industry, COUNT(DISTINCT enterprise_id), SUM(tax_paid) AS total, AVG(tax_paid),\n"
        "       MEDIAN(tax_paid), QUANTILE(tax_paid, 0.9),\n"
        "       PERCENTILE_CONT(0.25) WITHIN GROUP (ORDER BY registered_capital)\n"
        "FROM enterprise_credit GROUP BY industry, district",
        structured(
            group_by=("district", "industry"),
            aggregates=(
                dc.count_units(),
                dc.total("tax_paid", alias="total"),
                dc.mean("tax_paid"),
                dc.median("tax_paid"),
                dc.quantile("tax_paid", 0.9),
                dc.quantile("registered_capital", 0.25),
            ),
        ),
    ),
    (
        "SELECT COUNT(*) FROM enterprise_credit WHERE district = 'Dongcheng' AND size_band IN ('small', 'micro') "
        "AND year_founded BETWEEN 1990 AND 2010 AND arrears_months >= 3 AND (penalties <= -0.5)",
        structured(
            aggregates=(dc.count(),),
            filters=(
                ir.Equals("district", "Dongcheng"),
                ir.InSet("size_band", ("small", "micro")),
                ir.Between("year_founded", 1990, 2010),
                ir.Between("arrears_months", low=3),
                ir.Between("penalties", high=-0.5),
            ),
        ),
    ),
    (
        "SELECT e.district, COUNT(*) FROM enterprise_credit AS e WHERE e.flag = TRUE AND day = DATE '2024-02-29' "
        "GROUP BY e.district",
        structured(
            group_by=("district",),
            aggregates=(dc.count(),),
            filters=(ir.Equals("flag", True), ir.Equals("day", "2024-02-29")),
        ),
    ),
]


@pytest.mark.parametrize("text, twin", TWINS, ids=range(len(TWINS)))
def test_sql_parses_into_the_structured_query(text, twin):
    assert sql.parse(text, unit_column=UNIT, **DP).canonical() == twin.canonical()


# (SQL, line, column, what the message says). Columns are 1-based, as editors count.
BAD = [
    ("SELECT COUNT(* FROM t", 1, 16, "Expecting )"),
    ("SELECT COUNT(*)\nFROM enterprise_credit\nWHERE district = 'A' OR size_band = 'small'", 3, 22, "not OR"),
    ("SELECT COUNT(*) FROM t WHERE tax_paid > 10", 1, 39, "not >"),
    ("SELECT MAX(tax_paid) FROM t", 1, 8, "MAX is not supported"),
    ("SELECT COUNT(*) FROM t LIMIT 5", 1, 24, "LIMIT is not supported"),
    ("SELECT COUNT(*) FROM a JOIN b ON a.x = b.x", 1, 24, "JOIN is not supported"),
    ("SELECT district, COUNT(*) FROM t", 1, 8, "'district' is selected but not in GROUP BY"),
    ("SELECT COUNT(*) FROM t GROUP BY district", 1, 33, "must also be selected"),
    ("SELECT SUM(tax_paid * 2) FROM t", 1, 12, "plain column name"),
    ("SELECT COUNT(DISTINCT district) FROM enterprise_credit", 1, 23, "COUNT(DISTINCT enterprise_id)"),
    ("SELECT COUNT(*) FROM t WHERE x = y", 1, 34, "a value must be"),
    ("SELECT COUNT(*)\n  FROM t WHERE s = 'never closed", 2, 20, "never ends"),
    ("DELETE FROM t", 1, 1, "only SELECT"),
    ("SELECT COUNT(*) FROM t; DROP TABLE t", 1, 1, "one SELECT statement"),
    ("SELECT * FROM t", 1, 8, "SELECT *"),
    ("SELECT QUANTILE(tax_paid, 1.5) FROM t", 1, 8, "strictly between 0 and 1"),
    ("SELECT COUNT(*) FROM t WHERE x IN (SELECT 1)", 1, 32, "not a subquery"),
    ("SELECT " + "(" * 5000 + "1" + ")" * 5000 + " FROM t", 1, 1, "nested too deeply"),
]


@pytest.mark.parametrize("text, line, column, says", BAD, ids=range(len(BAD)))
def test_bad_sql_is_refused_at_the_offending_token(text, line, column, says):
    with pytest.raises(InvalidQuery) as caught:
        sql.parse(text, unit_column=UNIT, **DP)
    error = caught.value
    assert error.message.startswith(f"sql.text: line {line}, column {column}: ")
    assert says in error.message
    assert [v.field for v in error.field_violations] == ["sql.text"]
    assert error.rule == "sql"
    token = text.split("\n")[line - 1][column - 1 :]
    assert token  # the position lies inside the text


def test_privacy_errors_name_the_sql_request_fields():
    with pytest.raises(InvalidQuery) as caught:
        sql.parse("SELECT COUNT(*) FROM t", mode=ir.Mode.DP, privacy=ir.Privacy())
    assert [v.field for v in caught.value.field_violations] == ["sql.privacy.epsilon"]


# --- over the real server ---------------------------------------------------------------


def test_a_dp_sql_query_gets_the_release_of_its_structured_twin(connect, config):
    """Same IR, same canonical query: the second form is answered from the first's
    release (free, identical), which only happens when the two are one query."""
    from conftest import audit_records

    client = connect("city-bank")
    first = client.query(
        "enterprise_credit",
        group_by=["district"],
        mode="dp",
        epsilon=0.5,
        aggregates=[dc.count(), dc.mean("tax_paid")],
    )
    second = client.sql(
        "SELECT district, COUNT(*), AVG(tax_paid) FROM enterprise_credit GROUP BY district",
        mode="dp",
        epsilon=0.5,
    )
    assert not first.reused and second.reused
    assert second.frame.equals(first.frame)
    assert second.spend.epsilon == 0
    queries = [r["query"] for r in audit_records(config) if r["method"] == "RunQuery"]
    assert len(queries) == 2 and queries[0] == queries[1]


def outcome(call):
    try:
        result = call()
    except DataopsClientError as error:
        return ("refused", error.code, error.reason, error.metadata.get("rule"), error.metadata.get("column"))
    return ("answered", result.frame.to_dicts(), result.rows_suppressed)


@pytest.mark.parametrize(
    "consumer, text, dataset, kwargs",
    [
        (
            "city-bank",
            "SELECT size_band, COUNT(*), SUM(tax_paid) FROM enterprise_credit "
            "WHERE year_founded >= 2000 GROUP BY size_band",
            "enterprise_credit",
            dict(
                group_by=["size_band"],
                aggregates=[dc.count(), dc.total("tax_paid")],
                filters=[ir.Between("year_founded", low=2000)],
            ),
        ),
        (
            "river-bank",
            "SELECT district, SUM(tax_paid) FROM enterprise_credit GROUP BY district",
            "enterprise_credit",
            dict(group_by=["district"], aggregates=[dc.total("tax_paid")]),
        ),
        (
            "city-bank",
            "SELECT enterprise_id, COUNT(*) FROM enterprise_credit GROUP BY enterprise_id",
            "enterprise_credit",
            dict(group_by=["enterprise_id"], aggregates=[dc.count()]),
        ),
        ("city-bank", "SELECT COUNT(*) FROM medical_claims", "medical_claims", dict(aggregates=[dc.count()])),
    ],
)
def test_an_exact_sql_query_meets_the_same_outcome_as_its_twin(connect, consumer, text, dataset, kwargs):
    """Answers, suppression and refusals (rule and column) do not depend on the form."""
    client = connect(consumer)
    twin = outcome(lambda: client.query(dataset, mode="aggregate", **kwargs))
    assert outcome(lambda: client.sql(text, mode="aggregate")) == twin


def test_a_sql_estimate_is_the_estimate_of_its_twin(connect):
    client = connect("city-bank")
    structured_estimate = client.estimate(
        "enterprise_credit", group_by=["district"], mode="dp", epsilon=0.3, aggregates=[dc.total("tax_paid")]
    )
    sql_estimate = client.estimate_sql(
        "SELECT district, SUM(tax_paid) FROM enterprise_credit GROUP BY district", mode="dp", epsilon=0.3
    )
    assert sql_estimate.spend == structured_estimate.spend
    assert list(sql_estimate.accuracy) == list(structured_estimate.accuracy)


def test_bad_sql_over_the_wire_is_invalid_argument_pointing_at_the_token(connect):
    client = connect("city-bank")
    stub = query_pb2_grpc.QueryServiceStub(client.channel)
    request = query_pb2.RunQueryRequest(
        sql=query_pb2.SqlQuery(
            text="SELECT district, COUNT(*)\nFROM enterprise_credit\nGROUP BY district HAVING COUNT(*) > 5",
            mode=query_pb2.QUERY_MODE_DP,
            privacy=query_pb2.PrivacyParameters(epsilon=1.0),
        )
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.RunQuery(request, timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    kinds = {d.type_url.rsplit(".", 1)[-1]: d for d in status.details}
    kinds["ErrorInfo"].Unpack(info)
    kinds["BadRequest"].Unpack(bad)
    assert (info.reason, info.metadata["rule"]) == ("INVALID_QUERY", "sql")
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("sql.text", "line 3, column 19: HAVING is not supported")
    ]
    assert int(info.metadata["receipt_sequence"]) >= 1  # audited like any other refusal


def test_query_and_sql_together_are_refused(connect):
    client = connect("city-bank")
    stub = query_pb2_grpc.QueryServiceStub(client.channel)
    request = query_pb2.RunQueryRequest(
        query=query_pb2.Query(dataset="enterprise_credit"),
        sql=query_pb2.SqlQuery(
            text="SELECT COUNT(*) FROM enterprise_credit", mode=query_pb2.QUERY_MODE_AGGREGATE
        ),
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.RunQuery(request, timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "set query or sql, not both" in caught.value.details()


def test_count_distinct_names_no_unit_column_of_a_dataset_the_caller_cannot_see(connect):
    """The SQL check that COUNT(DISTINCT c) counts the privacy unit must not become a
    way to read another zone's catalog: there it is the plain unknown-dataset refusal."""
    client = connect("city-bank")  # finance zone; medical_claims is insurance's
    with pytest.raises(DataopsClientError) as caught:
        client.sql("SELECT COUNT(DISTINCT claim_id) FROM medical_claims", mode="aggregate")
    assert caught.value.reason == "UNKNOWN_DATASET"
    assert "person_id" not in str(caught.value)
    with pytest.raises(DataopsClientError) as nowhere:
        client.sql("SELECT COUNT(DISTINCT claim_id) FROM no_such_dataset", mode="aggregate")
    assert str(caught.value).replace("medical_claims", "X") == str(nowhere.value).replace(
        "no_such_dataset", "X"
    )


def test_without_the_visibility_check_the_unit_column_of_another_zone_leaks(server, connect, monkeypatch):
    """The control switched off: a unit lookup straight from the catalog names
    insurance's privacy-unit column to a bank."""
    catalog = server.sandbox.catalog
    monkeypatch.setattr(
        server.sandbox,
        "unit_column_for",
        lambda consumer: lambda dataset_id: catalog.get(dataset_id).unit_column,
    )
    client = connect("city-bank")
    with pytest.raises(DataopsClientError) as caught:
        client.sql("SELECT COUNT(DISTINCT claim_id) FROM medical_claims", mode="aggregate")
    assert "person_id" in str(caught.value)


def test_grpcurl_sends_sql_without_a_deadline(server, pki):
    request = {
        "sql": {
            "text": "SELECT district, COUNT(*) FROM enterprise_credit GROUP BY district",
            "mode": "QUERY_MODE_DP",
            "privacy": {"epsilon": 0.5},
        }
    }
    result = run_grpcurl(
        server, pki, ["-d", json.dumps(request), "dataops.v1.QueryService/RunQuery"], deadline=False
    )
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    assert int(response["result"]["row_count"]) == 10
    assert response["accuracy"][0]["mechanism"] == "discrete_laplace"


def test_grpcurl_shows_where_bad_sql_went_wrong(server, pki):
    request = {
        "sql": {
            "text": "SELECT COUNT(*) FROM enterprise_credit WHERE district <> 'A'",
            "mode": "QUERY_MODE_AGGREGATE",
        }
    }
    result = run_grpcurl(
        server, pki, ["-d", json.dumps(request), "dataops.v1.QueryService/RunQuery"], deadline=False
    )
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr
    assert "line 1, column 55: only =, IN, BETWEEN, >= and <= filters are supported, not <>" in result.stderr


def test_dataops_query_sql_from_the_shell(server, pki, capsys):
    from dataops.cli import main

    conn = pki.cli_args(server.port)
    text = "SELECT size_band, COUNT(*) FROM enterprise_credit WHERE size_band IN ('small', 'micro') GROUP BY size_band"
    assert main(["query", "--sql", text, "--json", *conn]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert sorted(r["size_band"] for r in rows) == ["micro", "small"]
    assert main(["query", "--sql", "SELECT COUNT(*) FROM enterprise_credit WHERE a > 1", *conn]) == 1
    err = capsys.readouterr().err
    assert "INVALID_QUERY" in err and "line 1, column 48" in err
    assert (
        main(["query", "enterprise_credit", "--sql", "SELECT COUNT(*) FROM enterprise_credit", *conn]) == 2
    )  # usage: exit 2
    assert "drop enterprise_credit" in capsys.readouterr().err


WORDS = [
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "AND",
    "OR",
    "IN",
    "BETWEEN",
    "COUNT",
    "SUM",
    "AVG",
    "MEDIAN",
    "QUANTILE",
    "DISTINCT",
    "AS",
    "(",
    ")",
    ",",
    "*",
    "=",
    ">=",
    "<=",
    "'x'",
    "1",
    "0.5",
    "-",
    "enterprise_credit",
    "district",
    "tax_paid",
    "enterprise_id",
    "DATE",
    "TRUE",
    ";",
    "JOIN",
    "\n",
]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(st.sampled_from(WORDS), max_size=30).map(" ".join)))
def test_any_text_is_a_query_or_an_invalid_query(text):
    """Hostile or broken SQL never escapes as anything but the consumer's error."""
    try:
        query = sql.parse(text, unit_column=UNIT, **DP)
    except InvalidQuery as error:
        assert error.message.startswith(("sql.text: line ", "sql.privacy"))
    else:
        assert isinstance(query, ir.Query)


@pytest.mark.parametrize(
    "text, column, says",
    [
        ("SELECT COUNT(*) FROM t WHERE a = 1 AND y BETWEEN 5 AND 1", 40, "low must not exceed high"),
        ("SELECT COUNT(*) FROM t WHERE a = 1 AND y = 1e999", 40, "must be a finite number"),
        ("SELECT COUNT(*) FROM t WHERE y = 99999999999999999999999", 34, "does not fit in a 64-bit integer"),
        (
            "SELECT COUNT(*) FROM t WHERE a = 1 AND s = '" + "x" * 2000 + "'",
            40,
            "the filter's value is longer than 1024",
        ),
    ],
)
def test_the_irs_own_checks_point_at_the_clause_they_refuse(text, column, says):
    with pytest.raises(InvalidQuery) as caught:
        sql.parse(text, mode=ir.Mode.AGGREGATE)
    assert caught.value.message.startswith(f"sql.text: line 1, column {column}: ")
    assert says in caught.value.message


def test_the_modules_examples_hold():
    import doctest

    assert doctest.testmod(sql).failed == 0


def test_a_long_and_chain_is_read_not_refused_as_nesting():
    """Depth is the consumer's choice: WHERE is flattened without recursion (the
    configured max_filters then refuses what is too long, as for structured queries)."""
    text = "SELECT COUNT(*) FROM t WHERE " + " AND ".join(f"c{i} = {i}" for i in range(1500))
    assert len(sql.parse(text, mode=ir.Mode.AGGREGATE).filters) == 1500


def test_an_oversized_text_is_refused_before_parsing():
    text = "SELECT COUNT(*) FROM t WHERE c IN (" + ",".join(["1"] * sql.MAX_SQL_LENGTH) + ")"
    with pytest.raises(InvalidQuery) as caught:
        sql.parse(text, mode=ir.Mode.AGGREGATE)
    assert f"longer than {sql.MAX_SQL_LENGTH} characters" in caught.value.message


def test_a_post_parse_refusal_names_the_parsed_querys_field(connect):
    """As docs/api.md says: query.filters[i] is the i-th WHERE predicate in text order."""
    client = connect("city-bank")
    with pytest.raises(DataopsClientError) as caught:
        client.sql(
            "SELECT COUNT(*) FROM enterprise_credit WHERE size_band = 'small' AND district = 5",
            mode="dp",
            epsilon=0.5,
        )
    assert caught.value.reason == "INVALID_QUERY"
    assert [field for field, _ in caught.value.field_violations] == ["query.filters[1].equals"]
    assert caught.value.metadata["column"] == "district"
