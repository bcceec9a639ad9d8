"""The sandbox service over a real loopback server with real mTLS."""

from __future__ import annotations

import time

import grpc
import pytest

from conftest import audit_records
from dataops.client import Client, DataopsClientError, count, count_units, mean, total
from dataops.ir import Between, Equals, InSet
from dataops.v1 import query_pb2, query_pb2_grpc


def test_a_consumer_lists_only_the_datasets_of_its_zone(connect):
    assert [d.id for d in connect("city-bank").list_datasets()] == ["enterprise_credit"]
    assert [d.id for d in connect("harbor-insurance").list_datasets()] == ["medical_claims"]


def test_describe_shows_columns_classifications_the_grant_and_its_tables(connect):
    description = connect("city-bank").describe("enterprise_credit")
    columns = {c.name: c for c in description.columns}
    assert description.dataset.privacy_unit == "enterprise_id"
    assert description.grant.purpose == "pre-loan review"
    assert description.grant.expires == "2027-12-31"
    assert list(description.grant.tables) == ["enterprises_by_district_industry_size"]
    assert [t.id for t in description.tables] == ["enterprises_by_district_industry_size"]
    assert list(columns["enterprise_id"].allowed_uses) == []  # identifiers are never usable
    assert len(columns["district"].allowed_uses) == 2  # DP mode's column grant
    assert "Dongcheng" in columns["district"].public_keys


def test_a_finance_consumer_cannot_describe_or_query_insurance_data(connect):
    client = connect("city-bank")
    for attempt in (
        lambda: client.describe("medical_claims"),
        lambda: client.query("medical_claims", aggregates=[count()]),
    ):
        with pytest.raises(DataopsClientError) as err:
            attempt()
        assert err.value.code is grpc.StatusCode.NOT_FOUND
        assert err.value.reason == "UNKNOWN_DATASET"
    # Another zone's dataset and a dataset that exists nowhere look exactly alike.
    with pytest.raises(DataopsClientError) as missing:
        client.query("no_such_dataset", aggregates=[count()])
    assert missing.value.message.replace("no_such_dataset", "X") == err.value.message.replace(
        "medical_claims", "X"
    )


@pytest.mark.parametrize(
    "query",
    [
        dict(aggregates=[count()], group_by=["enterprise_id"]),
        dict(aggregates=[count()], filters=[Equals("enterprise_id", "91990000MA0000001X")]),
        dict(aggregates=[count()], group_by=["name"]),
    ],
)
def test_grouping_or_filtering_on_an_identifier_is_policy_denied(connect, query):
    with pytest.raises(DataopsClientError) as err:
        connect("city-bank").query("enterprise_credit", **query)
    assert err.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert err.value.reason == "POLICY_DENIED"
    assert err.value.rule == "identifier"
    assert err.value.column in ("enterprise_id", "name")


def test_a_column_outside_the_grant_is_denied_naming_rule_and_column(connect):
    # Exact mode: no table river-bank may read holds tax paid.
    with pytest.raises(DataopsClientError) as err:
        connect("river-bank").query("enterprise_credit", aggregates=[total("tax_paid")])
    assert (err.value.reason, err.value.rule, err.value.column) == (
        "POLICY_DENIED",
        "table.coverage",
        "tax_paid",
    )
    # DP mode: the column grant decides.
    with pytest.raises(DataopsClientError) as err:
        connect("harbor-insurance").query(
            "medical_claims", aggregates=[count()], group_by=["visit_date"], mode="dp", epsilon=1.0
        )
    assert (err.value.reason, err.value.rule, err.value.column) == (
        "POLICY_DENIED",
        "grant.columns.visit_date",
        "visit_date",
    )


def test_grouped_query_returns_exact_aggregates_of_the_released_cells(connect, sandbox_dir):
    import polars as pl

    result = connect("city-bank").query(
        "enterprise_credit",
        aggregates=[count(), count_units(), total("tax_paid"), mean("tax_paid")],
        group_by=["size_band"],
    )
    raw = (
        pl.read_parquet(sandbox_dir / "finance/enterprise_credit.parquet")
        .group_by("size_band")
        .agg(pl.len().alias("n"), pl.col("tax_paid").sum().alias("s"))
    )
    truth = {row[0]: row[1:] for row in raw.iter_rows()}
    assert result.frame.height > 0 and result.frame.height + result.rows_suppressed == 4
    for band, n, units, s, m in result.frame.iter_rows():
        assert n == units == truth[band][0]  # one row per enterprise
        assert s == pytest.approx(truth[band][1]) and m == pytest.approx(truth[band][1] / n)
    assert result.receipt.sequence > 0


def test_small_cells_are_never_returned_and_only_counted(connect, sandbox_dir):
    import polars as pl

    result = connect("city-bank").query(
        "enterprise_credit", aggregates=[count_units("n")], group_by=["district", "industry"]
    )
    truth = (
        pl.read_parquet(sandbox_dir / "finance/enterprise_credit.parquet")
        .group_by("district", "industry")
        .agg(pl.len().alias("n"))
    )
    small = truth.filter(pl.col("n") < 10)
    assert small.height > 0, "the demo data must contain small groups"
    assert result.frame["n"].min() >= 10
    assert result.frame.height + result.rows_suppressed == 100  # the public key grid
    released = set(zip(result.frame["district"], result.frame["industry"]))
    assert not released & set(zip(small["district"], small["industry"]))


def test_filters_select_keys_and_a_range_is_left_to_dp_mode(connect):
    client = connect("city-bank")
    everything = client.query("enterprise_credit", aggregates=[count()]).frame["count"][0]
    micro = client.query(
        "enterprise_credit", aggregates=[count()], filters=[Equals("size_band", "micro")]
    ).frame["count"][0]
    central = client.query(
        "enterprise_credit", aggregates=[count()], filters=[InSet("district", ("Dongcheng", "Xicheng"))]
    ).frame["count"][0]
    assert 0 < micro < everything and 0 < central < everything
    with pytest.raises(DataopsClientError) as err:
        client.query("enterprise_credit", aggregates=[count()], filters=[Between("year_founded", 2015, None)])
    assert (err.value.rule, err.value.column) == ("table.coverage", "year_founded")
    recent = client.query(
        "enterprise_credit",
        aggregates=[count()],
        filters=[Between("year_founded", 2015, None)],
        mode="dp",
        epsilon=0.5,
    )
    assert recent.frame.height == 1


def test_a_filter_value_of_the_wrong_type_is_an_invalid_query_with_a_field_violation(connect):
    for mode, filters in (("aggregate", [Equals("district", 3)]), ("dp", [Equals("year_founded", "2000")])):
        with pytest.raises(DataopsClientError) as err:
            connect("city-bank").query(
                "enterprise_credit",
                aggregates=[count()],
                filters=filters,
                mode=mode,
                epsilon=1.0 if mode == "dp" else None,
            )
        assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.reason == "INVALID_QUERY"
        assert err.value.field_violations[0][0] == "query.filters[0].equals"


def test_an_exact_quantile_is_refused(connect):
    from dataops.client import median

    with pytest.raises(DataopsClientError) as err:
        connect("city-bank").query("enterprise_credit", aggregates=[median("tax_paid")])
    assert err.value.rule == "aggregate-mode.quantile"


def test_a_consumer_without_a_policy_is_refused(connect):
    with pytest.raises(DataopsClientError) as err:
        connect("ghost").list_datasets()
    assert err.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert err.value.reason == "UNKNOWN_CONSUMER"


def test_no_certificate_or_a_foreign_ca_is_refused_at_the_handshake(server, pki):
    ca = (pki.directory / "ca.crt").read_bytes()
    no_cert = grpc.secure_channel(f"localhost:{server.port}", grpc.ssl_channel_credentials(ca))
    outsider = pki.outsider / "consumers" / "city-bank"
    foreign = Client(
        f"localhost:{server.port}",
        cert=outsider / "city-bank.crt",
        key=outsider / "city-bank.key",
        ca=pki.directory / "ca.crt",
        timeout=5,
    )
    with pytest.raises(grpc.RpcError) as err:
        query_pb2_grpc.QueryServiceStub(no_cert).GetBudget(query_pb2.GetBudgetRequest(), timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(DataopsClientError) as err2:
        foreign.list_datasets()
    assert err2.value.code is grpc.StatusCode.UNAVAILABLE
    no_cert.close()
    foreign.close()


def test_a_malformed_request_is_invalid_and_audited(server, pki, config):
    consumer = pki.consumer_dir("city-bank")
    credentials = grpc.ssl_channel_credentials(
        (consumer / "ca.crt").read_bytes(),
        (consumer / "city-bank.key").read_bytes(),
        (consumer / "city-bank.crt").read_bytes(),
    )
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
        raw = channel.unary_unary("/dataops.v1.QueryService/RunQuery")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff", timeout=5)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    last = audit_records(config)[-1]
    assert (last["method"], last["decision"], last["consumer"]) == ("RunQuery", "invalid", "city-bank")


def test_every_rpc_leaves_exactly_one_audit_record_and_each_receipt_is_in_it(connect, config):
    client = connect("city-bank")
    receipts = []
    client.list_datasets()
    receipts.append(client.describe("enterprise_credit").receipt)
    receipts.append(client.query("enterprise_credit", aggregates=[count()]).receipt)
    for attempt in (
        lambda: client.query("enterprise_credit", aggregates=[count()], group_by=["enterprise_id"]),
        lambda: client.query("medical_claims", aggregates=[count()]),
    ):
        with pytest.raises(DataopsClientError) as err:
            attempt()
        receipts.append((int(err.value.metadata["receipt_sequence"]), err.value.metadata["receipt_hash"]))
    # The server's own records of each table's protection come first (or in between).
    records = [r for r in audit_records(config) if r["method"] != "ProtectTable"]
    assert len(records) == 5 and all(b["seq"] > a["seq"] for a, b in zip(records, records[1:]))
    assert [r["decision"] for r in records] == ["allowed", "allowed", "allowed", "denied", "denied"]
    assert records[3]["rule"] == "identifier" and records[3]["column"] == "enterprise_id"
    assert records[2]["rows_returned"] == 1 and records[2]["rows_suppressed"] == 0
    assert all(r["policy_version"] == records[0]["policy_version"] for r in records)
    by_seq = {r["seq"]: r["hash"] for r in records}
    for receipt in receipts:
        seq, digest = (receipt.sequence, receipt.hash) if hasattr(receipt, "hash") else receipt
        assert by_seq[seq] == digest


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_an_invalid_policy_edit_denies_its_consumer_and_a_narrowing_edit_applies_at_once(
    server, connect, config
):
    client = connect("city-bank")
    other = connect("river-bank")
    path = config.paths.policies / "city-bank.toml"
    good = path.read_text()
    # The operator tries to grant the identifier column: refused at load, and the
    # consumer is denied until fixed (its previous version is not kept serving).
    path.write_text(
        good.replace(
            'district = ["dimension", "filter"]',
            'district = ["dimension", "filter"]\nenterprise_id = ["dimension"]',
        )
    )
    _wait_for(lambda: server.policies.last_error is not None)
    assert "enterprise_id" in server.policies.last_error and "identifier" in server.policies.last_error
    with pytest.raises(DataopsClientError) as err:
        client.query("enterprise_credit", aggregates=[count()], group_by=["district"])
    assert err.value.rule == "consumer.policy_invalid"
    assert "enterprise_id" not in err.value.message  # the operator's error stays with the operator
    assert other.list_datasets()  # no other consumer is touched
    # A valid edit narrowing the grant takes effect without a restart.
    path.write_text(good.replace('industry = ["dimension", "filter"]', ""))
    _wait_for(lambda: server.policies.last_error is None)
    assert client.query("enterprise_credit", aggregates=[count()], group_by=["district"]).frame.height == 10
    with pytest.raises(DataopsClientError) as err:
        client.query("enterprise_credit", aggregates=[count()], group_by=["industry"], mode="dp", epsilon=1.0)
    assert err.value.rule == "grant.columns.industry"


def test_a_revoked_consumer_is_refused_without_a_restart(server, connect, config):
    client = connect("river-bank")
    client.list_datasets()
    path = config.paths.policies / "river-bank.toml"
    path.write_text(path.read_text().replace("revoked = false", "revoked = true"))
    _wait_for(lambda: server.policies.current.get("river-bank").revoked)
    with pytest.raises(DataopsClientError) as err:
        client.list_datasets()
    assert err.value.rule == "consumer.revoked"
