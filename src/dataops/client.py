"""The Python client for consumers.

    from dataops.client import Client, count, mean, total
    from dataops.ir import Equals

    with Client("localhost:50051", cert="city-bank.crt", key="city-bank.key", ca="ca.crt") as client:
        for dataset in client.list_datasets():
            print(dataset.id, dataset.title)
        result = client.query(
            "enterprise_credit",
            aggregates=[count(), mean("tax_paid")],
            group_by=["district"],
            filters=[Equals("size_band", "small")],
        )
        print(result.frame, result.rows_suppressed)

Server errors are raised as `DataopsClientError`, carrying the status code, the
`ErrorInfo` reason and metadata (rule, column, receipt) and any field violations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import grpc
import polars as pl
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from dataops import ir, wire
from dataops.v1 import catalog_pb2, catalog_pb2_grpc, query_pb2, query_pb2_grpc


class DataopsClientError(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        quota_violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(f"{code.name} {reason or ''}: {message}".replace("  ", " "))
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.field_violations = tuple(field_violations)
        self.quota_violations = tuple(quota_violations)

    @property
    def rule(self) -> str | None:
        return self.metadata.get("rule")

    @property
    def column(self) -> str | None:
        return self.metadata.get("column")

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "DataopsClientError":
        status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
        reason, metadata, fields, quotas = None, {}, [], []
        for detail in status.details if status else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields = [(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                detail.Unpack(quota)
                quotas = [(v.subject, v.description) for v in quota.violations]
        return cls(error.code(), error.details() or "", reason, metadata, fields, quotas)


@dataclass(frozen=True)
class Receipt:
    sequence: int
    hash: str


@dataclass(frozen=True)
class QueryResult:
    frame: pl.DataFrame
    rows_suppressed: int
    accuracy: dict[str, query_pb2.AggregateAccuracy]
    spend: query_pb2.Spend | None
    receipt: Receipt
    reused: bool = False


@dataclass(frozen=True)
class DatasetDescription:
    dataset: catalog_pb2.Dataset
    columns: list[catalog_pb2.Column]
    grant: catalog_pb2.Grant
    receipt: Receipt = field(default=Receipt(0, ""))


def count(alias: str = "") -> ir.Aggregate:
    return ir.Aggregate(ir.Function.COUNT, alias=alias)


def count_units(alias: str = "") -> ir.Aggregate:
    return ir.Aggregate(ir.Function.COUNT_UNITS, alias=alias)


def total(column: str, alias: str = "") -> ir.Aggregate:
    return ir.Aggregate(ir.Function.SUM, column, alias=alias)


def mean(column: str, alias: str = "") -> ir.Aggregate:
    return ir.Aggregate(ir.Function.MEAN, column, alias=alias)


def quantile(column: str, q: float, alias: str = "") -> ir.Aggregate:
    return ir.Aggregate(ir.Function.QUANTILE, column, q, alias=alias)


def median(column: str, alias: str = "") -> ir.Aggregate:
    return quantile(column, 0.5, alias)


def _receipt(message: Any) -> Receipt:
    return Receipt(message.receipt.sequence, message.receipt.hash)


class Client:
    def __init__(
        self,
        target: str,
        *,
        cert: str | Path,
        key: str | Path,
        ca: str | Path,
        server_name: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(ca).read_bytes(),
            private_key=Path(key).read_bytes(),
            certificate_chain=Path(cert).read_bytes(),
        )
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self.channel = grpc.secure_channel(target, credentials, options=options)
        self.timeout = timeout
        # The receipt of the most recent successful call (refusals carry theirs in the error).
        self.last_receipt: Receipt | None = None
        self._catalog = catalog_pb2_grpc.CatalogServiceStub(self.channel)
        self._query = query_pb2_grpc.QueryServiceStub(self.channel)

    @classmethod
    def from_directory(cls, target: str, directory: str | Path, consumer: str, **kwargs: Any) -> "Client":
        """Connect with the files `dataops certs issue CONSUMER` wrote into `directory`."""
        d = Path(directory)
        return cls(target, cert=d / f"{consumer}.crt", key=d / f"{consumer}.key", ca=d / "ca.crt", **kwargs)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            response = method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            raise DataopsClientError.from_rpc_error(error) from None
        self.last_receipt = _receipt(response)
        return response

    def list_datasets(self) -> list[catalog_pb2.Dataset]:
        return list(self._call(self._catalog.ListDatasets, catalog_pb2.ListDatasetsRequest()).datasets)

    def describe(self, dataset_id: str) -> DatasetDescription:
        response = self._call(
            self._catalog.DescribeDataset, catalog_pb2.DescribeDatasetRequest(dataset_id=dataset_id)
        )
        return DatasetDescription(response.dataset, list(response.columns), response.grant, _receipt(response))

    @staticmethod
    def build(
        dataset: str,
        *,
        aggregates: Iterable[ir.Aggregate],
        group_by: Iterable[str] = (),
        filters: Iterable[ir.Filter] = (),
        mode: str | ir.Mode = ir.Mode.AGGREGATE,
        epsilon: float | None = None,
        delta: float = 0.0,
        target_half_width: float | None = None,
        purpose: str = "",
    ) -> ir.Query:
        mode = ir.Mode(mode)
        privacy = None
        if mode is ir.Mode.DP:
            privacy = ir.Privacy(epsilon=epsilon, delta=delta, target_half_width=target_half_width)
        return ir.Query(
            dataset=dataset,
            aggregates=tuple(aggregates),
            filters=tuple(filters),
            group_by=tuple(group_by),
            mode=mode,
            privacy=privacy,
            purpose=purpose,
        )

    def run(self, query: ir.Query, *, timeout: float | None = None) -> QueryResult:
        return self._result(self._call(
            self._query.RunQuery, query_pb2.RunQueryRequest(query=wire.query_to_proto(query)), timeout
        ))

    @staticmethod
    def sql_request(
        text: str,
        *,
        mode: str | ir.Mode = ir.Mode.AGGREGATE,
        epsilon: float | None = None,
        delta: float = 0.0,
        target_half_width: float | None = None,
        purpose: str = "",
    ) -> query_pb2.SqlQuery:
        """A SqlQuery message; the server parses the text (see docs/api.md, "SQL")."""
        mode = ir.Mode(mode)
        message = query_pb2.SqlQuery(text=text, mode=wire.MODE_TO_PROTO[mode], purpose=purpose)
        if mode is ir.Mode.DP:
            message.privacy.CopyFrom(query_pb2.PrivacyParameters(
                epsilon=epsilon or 0.0, delta=delta, target_half_width=target_half_width or 0.0))
        return message

    def sql(self, text: str, *, timeout: float | None = None, **kwargs: Any) -> QueryResult:
        """Run one SQL SELECT, e.g. `client.sql("SELECT district, COUNT(*) FROM enterprise_credit
        GROUP BY district", mode="dp", epsilon=0.5)`: the answer its structured twin gets."""
        request = query_pb2.RunQueryRequest(sql=self.sql_request(text, **kwargs))
        return self._result(self._call(self._query.RunQuery, request, timeout))

    def estimate_sql(self, text: str, *, timeout: float | None = None, **kwargs: Any) -> query_pb2.EstimateQueryResponse:
        request = query_pb2.EstimateQueryRequest(sql=self.sql_request(text, **kwargs))
        return self._call(self._query.EstimateQuery, request, timeout)

    @staticmethod
    def _result(response: query_pb2.RunQueryResponse) -> QueryResult:
        table = wire.table_from_ipc(response.result.ipc_stream)
        return QueryResult(
            frame=pl.from_arrow(table),
            rows_suppressed=response.rows_suppressed,
            accuracy={a.column: a for a in response.accuracy},
            spend=response.spend if response.HasField("spend") else None,
            receipt=_receipt(response),
            reused=response.reused,
        )

    def query(self, dataset: str, **kwargs: Any) -> QueryResult:
        timeout = kwargs.pop("timeout", None)
        return self.run(self.build(dataset, **kwargs), timeout=timeout)

    def estimate(self, dataset: str, **kwargs: Any) -> query_pb2.EstimateQueryResponse:
        query = self.build(dataset, **kwargs)
        return self._call(
            self._query.EstimateQuery, query_pb2.EstimateQueryRequest(query=wire.query_to_proto(query))
        )

    def budgets(self, dataset_id: str = "") -> list[query_pb2.DatasetBudget]:
        return list(self._call(self._query.GetBudget, query_pb2.GetBudgetRequest(dataset_id=dataset_id)).budgets)
