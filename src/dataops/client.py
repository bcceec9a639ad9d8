"""The Python client for consumers.

    from dataops.client import Client
    from dataops.ir import Equals

    with Client("localhost:50051", cert="city-bank.crt", key="city-bank.key", ca="ca.crt") as client:
        for dataset in client.list_datasets():
            print(dataset.id, dataset.title)
        result = client.query(
            "enterprise_credit",
            aggregates=["count", "mean(tax_paid)"],      # or [count(), mean("tax_paid")]
            group_by=["district"],
            filters=[Equals("size_band", "small")],
        )
        print(result.to_polars(), result.rows_suppressed)   # or .table (Arrow), .to_pandas()

The client installs without the server's stack: `pip install dataops` needs only
grpcio, protobuf, pyarrow and the googleapis status types. `to_polars()` needs
`dataops[polars]`, `to_pandas()` needs `dataops[pandas]`; either says so if missing.

Every failure is a `DataopsClientError` (or a subclass): the server's refusals carry
the status code, the `ErrorInfo` reason and metadata (rule, column, receipt) and any
field violations; checks made here before sending (`InvalidRequest`) and a server
that cannot be reached (`ConnectionFailed`) look the same way. Results are plain
dataclasses, not protobuf messages.

Every client is a witness of the audit log (`dataops.audit.witness`): it checks each
response's receipt — the inclusion proof against a checkpoint signed with the
operator's key (`audit_public_key`) and consistency with the newest checkpoint it has
seen (kept in `checkpoint_file` if given) — and raises `AuditVerificationError` when
the log was rolled back, truncated or rewritten.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from dataops import ir, wire
from dataops.audit.signing import load_public_key
from dataops.audit.witness import Witness, WitnessError
from dataops.errors import RequestError
from dataops.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    subject_pb2,
    subject_pb2_grpc,
)
from dataops.values import (  # noqa: F401 (re-exported)
    AggregateAccuracy,
    Budget,
    Estimate,
    PrivacyLoss,
    Receipt,
    Spend,
)

__all__ = [
    "AggregateAccuracy",
    "AuditVerificationError",
    "Budget",
    "Client",
    "Column",
    "ConnectionFailed",
    "DataopsClientError",
    "Dataset",
    "Dominance",
    "DatasetDescription",
    "Estimate",
    "Grant",
    "InvalidRequest",
    "PublishedTable",
    "QueryResult",
    "PrivacyLoss",
    "Receipt",
    "Spend",
    "TableDimension",
    "TableMeasure",
    "TableRules",
    "count",
    "count_units",
    "mean",
    "median",
    "parse_aggregate",
    "quantile",
    "total",
]


# --- errors ----------------------------------------------------------------------


class DataopsClientError(Exception):
    """Anything that went wrong: a refusal by the server, a bad request, no connection."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        quota_violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(" ".join(p for p in (code.name, reason) if p) + (f": {message}" if message else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.field_violations = tuple(field_violations)
        self.quota_violations = tuple(quota_violations)
        self.retry_after_seconds: float | None = None  # google.rpc.RetryInfo: when to ask again

    @property
    def rule(self) -> str | None:
        return self.metadata.get("rule")

    @property
    def column(self) -> str | None:
        return self.metadata.get("column")

    @property
    def receipt(self) -> Receipt | None:
        """The audit receipt of the refused request, when the server wrote one: with its
        proof when the server sent it (it does unless the record is too long for a trailer)."""
        if "receipt_sequence" not in self.metadata:
            return None
        try:
            return _metadata_receipt(self.metadata)
        except (KeyError, ValueError):
            return Receipt(int(self.metadata["receipt_sequence"]), self.metadata.get("receipt_hash", ""))

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> DataopsClientError:
        status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
        reason, metadata, fields, quotas, retry = None, {}, [], [], None
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
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info_retry = error_details_pb2.RetryInfo()
                detail.Unpack(info_retry)
                retry = info_retry.retry_delay.seconds + info_retry.retry_delay.nanos / 1e9
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        message = (error.details() if isinstance(error, grpc.Call) else None) or ""
        if reason is None and code in _TRANSPORT:
            # No ErrorInfo: the request never reached our server (no route, TLS
            # refused, deadline) — say so in words rather than "UNAVAILABLE None".
            return ConnectionFailed(code, _TRANSPORT[code] + (f" ({message})" if message else ""))
        refusal = cls(code, message, reason, metadata, fields, quotas)
        refusal.retry_after_seconds = retry
        return refusal


class InvalidRequest(DataopsClientError):
    """The request was refused here, before it was sent (the server would refuse it too)."""

    def __init__(
        self,
        message: str,
        field_violations: Sequence[tuple[str, str]] = (),
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            grpc.StatusCode.INVALID_ARGUMENT, message, "INVALID_QUERY", metadata, field_violations
        )

    @classmethod
    def from_request_error(cls, error: RequestError) -> InvalidRequest:
        return cls(error.message, [(v.field, v.description) for v in error.field_violations], error.metadata)


class ConnectionFailed(DataopsClientError):
    """The server could not be reached or the TLS handshake failed; nothing was asked."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message, "CONNECTION")


class AuditVerificationError(DataopsClientError):
    """The server's audit log failed a check this client makes on its own (DATA_LOSS):
    a receipt not in the signed log, or a log rolled back, truncated or rewritten since
    the checkpoint this client holds. The answer is not returned."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.DATA_LOSS, message, "AUDIT_LOG_INCONSISTENT")


_TRANSPORT = {
    grpc.StatusCode.UNAVAILABLE: "the server cannot be reached or refused the TLS handshake "
    "(check the target, the certificate files and the server name)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "no answer before the deadline",
    grpc.StatusCode.CANCELLED: "the call was cancelled",
    grpc.StatusCode.UNKNOWN: "the call failed without a status from the server",
}


# --- results: plain dataclasses ----------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """A dataset as the contract's `Dataset` message shows it to a consumer.

    Not `dataops.catalog.Dataset`, the operator's catalog entry (its file, location,
    unit column and budget cap, which never cross the wire): this is the public
    description, the same for every consumer allowed to see it.
    """

    id: str
    zone: str
    title: str
    description: str
    provider: str
    privacy_unit: str
    max_rows_per_unit: int


@dataclass(frozen=True)
class Column:
    """A column as DescribeDataset shows it, with what this consumer's grant allows.

    Not `dataops.catalog.Column` (the catalog's typed entry): names are the contract's
    strings, and `allowed_uses` is the grant's, which the catalog does not know.
    """

    name: str
    type: str
    classification: str  # identifier | quasi_identifier | public | sensitive | unclassified
    description: str
    allowed_uses: tuple[str, ...]  # dimension | filter | measure; empty: not granted
    lower_bound: float | None
    upper_bound: float | None
    public_keys: tuple[str, ...]
    bins: tuple[float, ...]


@dataclass(frozen=True)
class Dominance:
    """(n, k) rule: the top `n` units may not make up more than `percent` of a SUM/MEAN cell."""

    n: int
    percent: float


@dataclass(frozen=True)
class Grant:
    """What this consumer's grant on a dataset allows, as DescribeDataset shows it.

    Not `dataops.policy.Grant` (the operator's policy entry, with per-column uses and
    accounting): the contract's flat view, budget as epsilon and delta.
    """

    purpose: str
    expires: str
    modes: tuple[str, ...]
    functions: tuple[str, ...]
    min_group_size: int  # deprecated, always 0: the rules are the tables' (`DatasetDescription.tables`)
    epsilon: float
    delta: float
    dominance: Dominance | None = None  # deprecated, never set
    tables: tuple[str, ...] = ()  # the published tables aggregate mode may read


@dataclass(frozen=True)
class TableDimension:
    column: str
    keys: tuple[str, ...]  # the public key set (bin labels "[low, high)" for a binned column)


@dataclass(frozen=True)
class TableMeasure:
    name: str
    function: str  # count | count_units | sum | mean
    column: str | None


@dataclass(frozen=True)
class TableRules:
    min_units: int
    dominance_n: int
    dominance_percent: float
    p_percent: float | None
    sensitive_dimensions: tuple[str, ...]
    group_attribute_percent: float
    # Declared impossible combinations, published as 0: per entry, dimension -> keys.
    structural_zeros: tuple[dict[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class PublishedTable:
    """A protected table aggregate mode answers from: group by and filter (equals / in_set)
    on its dimensions, aggregate its measures; rows needing a suppressed cell are not returned."""

    id: str
    title: str
    description: str
    dimensions: tuple[TableDimension, ...]
    measures: tuple[TableMeasure, ...]
    rules: TableRules


@dataclass(frozen=True)
class DatasetDescription:
    dataset: Dataset
    columns: list[Column]
    grant: Grant
    receipt: Receipt = field(default=Receipt(0, ""))
    raw: Any = field(default=None, repr=False, compare=False)  # the DescribeDatasetResponse, for new fields
    tables: tuple[PublishedTable, ...] = ()  # the published tables the grant names


@dataclass(frozen=True)
class QueryResult:
    """One answer: an Arrow table, with its accuracy, spend and audit receipt."""

    table: Any  # pyarrow.Table
    rows_suppressed: int
    accuracy: dict[str, AggregateAccuracy]
    spend: Spend | None
    receipt: Receipt
    reused: bool = False

    def to_arrow(self) -> Any:
        return self.table

    def to_polars(self) -> Any:
        try:
            import polars as pl
        except ImportError:
            raise ImportError(
                "to_polars() needs polars: pip install 'dataops[polars]' "
                "(or use result.table, a pyarrow.Table)"
            ) from None
        return pl.from_arrow(self.table)

    def to_pandas(self) -> Any:
        try:
            import pandas  # noqa: F401  (pyarrow's to_pandas imports it)
        except ImportError:
            raise ImportError(
                "to_pandas() needs pandas: pip install 'dataops[pandas]' "
                "(or use result.table, a pyarrow.Table)"
            ) from None
        return self.table.to_pandas()

    @property
    def frame(self) -> Any:
        """The answer as a polars DataFrame (`to_polars()`)."""
        return self.to_polars()


def _enum_names(enum: Any, values: Iterable[int], prefix: str) -> tuple[str, ...]:
    return tuple(enum.Name(v).removeprefix(prefix).lower() for v in values)


def _receipt(message: Any) -> Receipt:
    r = message.receipt
    return Receipt(
        r.sequence,
        r.hash,
        r.leaf_index,
        r.tree_size,
        tuple(r.inclusion_path),
        r.checkpoint,
        r.record,
        r.consistency_from,
        tuple(r.consistency_path),
    )


def _metadata_receipt(md: dict[str, str]) -> Receipt:
    """A refusal's receipt from its ErrorInfo metadata (`dataops.audit.receipts.receipt_metadata`);
    KeyError or ValueError if a part is missing or malformed."""
    hashes = lambda text: tuple(base64.b64decode(h, validate=True) for h in text.split(",") if h)  # noqa: E731
    sequence = int(md["receipt_sequence"])
    if "receipt_checkpoint" not in md:
        return Receipt(sequence, md.get("receipt_hash", ""))
    return Receipt(
        sequence,
        md["receipt_hash"],
        sequence - 1,
        int(md["receipt_tree_size"]),
        hashes(md["receipt_inclusion_path"]),
        md["receipt_checkpoint"],
        md["receipt_record"].encode("utf-8"),
        int(md.get("receipt_consistency_from", 0)),
        hashes(md.get("receipt_consistency_path", "")),
    )


def _accuracy(message: query_pb2.AggregateAccuracy) -> AggregateAccuracy:
    return AggregateAccuracy(message.column, message.noise_scale, message.half_width_95, message.mechanism)


def _spend(message: query_pb2.Spend) -> Spend:
    return Spend(message.epsilon, message.delta, message.remaining_epsilon, message.remaining_delta)


def _dataset(d: catalog_pb2.Dataset) -> Dataset:
    return Dataset(d.id, d.zone, d.title, d.description, d.provider, d.privacy_unit, d.max_rows_per_unit)


def _column(c: catalog_pb2.Column) -> Column:
    return Column(
        name=c.name,
        type=c.type,
        classification=catalog_pb2.Classification.Name(c.classification)
        .removeprefix("CLASSIFICATION_")
        .lower(),
        description=c.description,
        allowed_uses=_enum_names(catalog_pb2.ColumnUse, c.allowed_uses, "COLUMN_USE_"),
        lower_bound=c.lower_bound if c.HasField("lower_bound") else None,
        upper_bound=c.upper_bound if c.HasField("upper_bound") else None,
        public_keys=tuple(c.public_keys),
        bins=tuple(c.bins),
    )


def _grant(g: catalog_pb2.Grant) -> Grant:
    return Grant(
        purpose=g.purpose,
        expires=g.expires,
        modes=_enum_names(query_pb2.QueryMode, g.modes, "QUERY_MODE_"),
        functions=_enum_names(query_pb2.AggregateFunction, g.functions, "AGGREGATE_FUNCTION_"),
        min_group_size=g.min_group_size,
        epsilon=g.epsilon,
        delta=g.delta,
        dominance=Dominance(g.dominance.n, g.dominance.percent) if g.HasField("dominance") else None,
        tables=tuple(g.tables),
    )


def _table(t: catalog_pb2.PublishedTable) -> PublishedTable:
    r = t.rules
    return PublishedTable(
        id=t.id,
        title=t.title,
        description=t.description,
        dimensions=tuple(TableDimension(d.column, tuple(d.keys)) for d in t.dimensions),
        measures=tuple(
            TableMeasure(
                m.name,
                query_pb2.AggregateFunction.Name(m.function).removeprefix("AGGREGATE_FUNCTION_").lower(),
                m.column or None,
            )
            for m in t.measures
        ),
        rules=TableRules(
            r.min_units,
            r.dominance_n,
            r.dominance_percent,
            r.p_percent if r.HasField("p_percent") else None,
            tuple(r.sensitive_dimensions),
            r.group_attribute_percent,
            tuple({d.column: tuple(d.keys) for d in z.dimensions} for z in r.structural_zeros),
        ),
    )


# --- aggregates ------------------------------------------------------------------


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


AGGREGATE_FORMS = (
    "count",
    "count_units",
    "sum:COL",
    "mean:COL",
    "median:COL",
    "quantile:Q:COL",
    "sum(COL)",
    "mean(COL)",
    "median(COL)",
    "quantile(COL, Q)",
)
# "mean(tax_paid)", "quantile(tax_paid, 0.9)", "count()"; an optional " as ALIAS" follows either form.
_CALL = re.compile(r"\s*(\w+)\s*\(\s*([^),\s]*)\s*(?:,\s*([^)\s]+)\s*)?\)\s*")
_ALIAS = re.compile(r"(.*?)\s+as\s+(\w+)\s*", re.IGNORECASE)


def parse_aggregate(spec: str | ir.Aggregate) -> ir.Aggregate:
    """An aggregate from its shorthand: "count", "sum:tax_paid", "mean(tax_paid)", "median(x) as m"."""
    if isinstance(spec, ir.Aggregate):
        return spec
    if not isinstance(spec, str):
        raise InvalidRequest(
            f"an aggregate is an ir.Aggregate or a string like 'mean(tax_paid)', got {spec!r}"
        )
    alias = ""
    aliased = _ALIAS.fullmatch(spec)
    text = spec
    if aliased:
        text, alias = aliased.group(1), aliased.group(2)
    call = _CALL.fullmatch(text)
    if call:
        name, column, q = call.group(1).lower(), call.group(2), call.group(3)
        parts = [name] + ([q] if q is not None else []) + ([column] if column else [])
    else:
        parts = text.strip().split(":")
        name = parts[0].lower()
    aggregate = None
    try:
        if name in ("count", "count_units") and len(parts) == 1:
            aggregate = ir.Aggregate(ir.Function(name), alias=alias)
        elif name in ("sum", "total", "mean") and len(parts) == 2:
            aggregate = ir.Aggregate(
                ir.Function.SUM if name == "total" else ir.Function(name), parts[1], alias=alias
            )
        elif name == "median" and len(parts) == 2:
            aggregate = ir.Aggregate(ir.Function.QUANTILE, parts[1], 0.5, alias=alias)
        elif name == "quantile" and len(parts) == 3:
            aggregate = ir.Aggregate(ir.Function.QUANTILE, parts[2], float(parts[1]), alias=alias)
        if aggregate is not None:
            aggregate.validate("aggregates")  # e.g. a quantile outside (0, 1)
            return aggregate
    except ValueError:
        pass  # e.g. a quantile that is not a number: the message below says what is expected
    except RequestError as exc:
        raise InvalidRequest.from_request_error(exc) from None
    raise InvalidRequest(
        f"aggregate {spec!r}: expected one of {', '.join(AGGREGATE_FORMS)}",
        [("aggregates", f"{spec!r} is not an aggregate")],
    )


# --- the client ------------------------------------------------------------------


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise DataopsClientError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"cannot read the {what} {path}: {exc.strerror}",
            "CONFIGURATION",
        ) from None


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
        audit_public_key: str | Path | None = None,
        checkpoint_file: str | Path | None = None,
        witness: bool = True,
    ) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca, "CA certificate"),
            private_key=_read(key, "private key"),
            certificate_chain=_read(cert, "certificate"),
        )
        options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self.channel = grpc.secure_channel(target, credentials, options=options)
        self.timeout = timeout
        # The receipt of the most recent successful call (refusals carry theirs in the error).
        self.last_receipt: Receipt | None = None
        self._catalog = catalog_pb2_grpc.CatalogServiceStub(self.channel)
        self._query = query_pb2_grpc.QueryServiceStub(self.channel)
        self._subjects = subject_pb2_grpc.SubjectServiceStub(self.channel)
        self._audit = audit_pb2_grpc.AuditServiceStub(self.channel)
        # The operator's public key (out of band) makes the checkpoint signatures count.
        audit_key = load_public_key(Path(audit_public_key)) if audit_public_key is not None else None
        try:
            self.witness = Witness(audit_key, checkpoint_file) if witness else None
        except WitnessError as exc:  # a checkpoint file that is not one the audit key signed
            raise AuditVerificationError(str(exc)) from None

    @classmethod
    def from_directory(cls, target: str, directory: str | Path, consumer: str, **kwargs: Any) -> Client:
        """Connect with the files `dataops certs issue CONSUMER` wrote into `directory`."""
        d = Path(directory)
        return cls(target, cert=d / f"{consumer}.crt", key=d / f"{consumer}.key", ca=d / "ca.crt", **kwargs)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        metadata = self.witness.metadata() if self.witness else None
        try:
            response = method(request, timeout=timeout or self.timeout, metadata=metadata)
        except grpc.RpcError as error:
            refusal = DataopsClientError.from_rpc_error(error)
            self._witness_refusal(refusal)
            raise refusal from None
        self.last_receipt = _receipt(response)
        if self.witness is not None:
            try:
                self.witness.observe(self.last_receipt, self._fetch_consistency)
            except WitnessError as exc:
                raise AuditVerificationError(str(exc)) from None
        return response

    def _witness_refusal(self, refusal: DataopsClientError) -> None:
        """A refusal's record is checked like an answer's (its proof is in the ErrorInfo metadata)."""
        md = refusal.metadata
        if self.witness is None or "receipt_checkpoint" not in md:
            return
        try:
            receipt = _metadata_receipt(md)
        except (KeyError, ValueError) as exc:
            raise AuditVerificationError(f"a refusal's audit receipt is malformed ({exc!r})") from None
        try:
            # No proof fetched for a refusal: under a flood of refusals that would add a call
            # per refusal. Its inclusion and signature are checked; consistency when the proof
            # came with it (it usually does), else at the next answer.
            self.witness.observe(receipt, None)
        except WitnessError as exc:
            raise AuditVerificationError(str(exc)) from None

    def _fetch_consistency(self, first: int, second: int) -> list[bytes]:
        # Not through _call: this answer's own receipt would need a proof in turn.
        try:
            response = self._audit.GetConsistencyProof(
                audit_pb2.GetConsistencyProofRequest(first_size=first, second_size=second),
                timeout=self.timeout,
            )
        except grpc.RpcError as error:
            raise DataopsClientError.from_rpc_error(error) from None
        return list(response.proof)

    @property
    def checkpoint(self):
        """The newest audit checkpoint this client has verified (None before the first call)."""
        return self.witness.checkpoint if self.witness else None

    def audit_checkpoint(self) -> str:
        """The server's newest signed checkpoint (a C2SP note), checked like every response."""
        return self._call(self._audit.GetCheckpoint, audit_pb2.GetCheckpointRequest()).checkpoint

    def consistency_proof(self, first_size: int, second_size: int) -> list[bytes]:
        request = audit_pb2.GetConsistencyProofRequest(first_size=first_size, second_size=second_size)
        return list(self._call(self._audit.GetConsistencyProof, request).proof)

    def list_datasets(self) -> list[Dataset]:
        response = self._call(self._catalog.ListDatasets, catalog_pb2.ListDatasetsRequest())
        return [_dataset(d) for d in response.datasets]

    def describe(self, dataset_id: str) -> DatasetDescription:
        response = self._call(
            self._catalog.DescribeDataset, catalog_pb2.DescribeDatasetRequest(dataset_id=dataset_id)
        )
        return DatasetDescription(
            _dataset(response.dataset),
            [_column(c) for c in response.columns],
            _grant(response.grant),
            _receipt(response),
            response,
            tuple(_table(t) for t in response.tables),
        )

    @staticmethod
    def build(
        dataset: str,
        *,
        aggregates: Iterable[ir.Aggregate | str],
        group_by: Iterable[str] = (),
        filters: Iterable[ir.Filter] = (),
        mode: str | ir.Mode = ir.Mode.AGGREGATE,
        epsilon: float | None = None,
        delta: float = 0.0,
        target_half_width: float | None = None,
        purpose: str = "",
    ) -> ir.Query:
        """The query the server will see; every check that needs no data is made here."""
        if isinstance(aggregates, (str, ir.Aggregate)):
            aggregates = [aggregates]
        try:
            mode = ir.Mode(mode)
        except ValueError:
            raise InvalidRequest(
                f"mode {mode!r}: expected 'aggregate' or 'dp'", [("query.mode", "unknown mode")]
            ) from None
        try:
            privacy = None
            if mode is ir.Mode.DP:
                privacy = ir.Privacy(epsilon=epsilon, delta=delta, target_half_width=target_half_width)
            return ir.Query(
                dataset=dataset,
                aggregates=tuple(parse_aggregate(a) for a in aggregates),
                filters=tuple(filters),
                group_by=(group_by,) if isinstance(group_by, str) else tuple(group_by),
                mode=mode,
                privacy=privacy,
                purpose=purpose,
            )
        except RequestError as exc:
            raise InvalidRequest.from_request_error(exc) from None

    def run(self, query: ir.Query, *, timeout: float | None = None) -> QueryResult:
        return self._result(
            self._call(
                self._query.RunQuery, query_pb2.RunQueryRequest(query=wire.query_to_proto(query)), timeout
            )
        )

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
        try:
            mode = ir.Mode(mode)
        except ValueError:
            raise InvalidRequest(
                f"mode {mode!r}: expected 'aggregate' or 'dp'", [("sql.mode", "unknown mode")]
            ) from None
        message = query_pb2.SqlQuery(text=text, mode=wire.MODE_TO_PROTO[mode], purpose=purpose)
        if mode is ir.Mode.DP:
            message.privacy.CopyFrom(
                query_pb2.PrivacyParameters(
                    epsilon=epsilon or 0.0, delta=delta, target_half_width=target_half_width or 0.0
                )
            )
        return message

    def sql(self, text: str, *, timeout: float | None = None, **kwargs: Any) -> QueryResult:
        """Run one SQL SELECT, e.g. `client.sql("SELECT district, COUNT(*) FROM enterprise_credit
        GROUP BY district", mode="dp", epsilon=0.5)`: the answer its structured twin gets."""
        request = query_pb2.RunQueryRequest(sql=self.sql_request(text, **kwargs))
        return self._result(self._call(self._query.RunQuery, request, timeout))

    def estimate_sql(self, text: str, *, timeout: float | None = None, **kwargs: Any) -> Estimate:
        request = query_pb2.EstimateQueryRequest(sql=self.sql_request(text, **kwargs))
        return self._estimate(self._call(self._query.EstimateQuery, request, timeout))

    @staticmethod
    def _result(response: query_pb2.RunQueryResponse) -> QueryResult:
        return QueryResult(
            table=wire.table_from_ipc(response.result.ipc_stream),
            rows_suppressed=response.rows_suppressed,
            accuracy={a.column: _accuracy(a) for a in response.accuracy},
            spend=_spend(response.spend) if response.HasField("spend") else None,
            receipt=_receipt(response),
            reused=response.reused,
        )

    def query(self, dataset: str, **kwargs: Any) -> QueryResult:
        timeout = kwargs.pop("timeout", None)
        return self.run(self.build(dataset, **kwargs), timeout=timeout)

    def estimate_query(self, query: ir.Query, *, timeout: float | None = None) -> Estimate:
        response = self._call(
            self._query.EstimateQuery,
            query_pb2.EstimateQueryRequest(query=wire.query_to_proto(query)),
            timeout,
        )
        return self._estimate(response)

    @staticmethod
    def _estimate(response: query_pb2.EstimateQueryResponse) -> Estimate:
        return Estimate(
            _spend(response.spend),
            tuple(_accuracy(a) for a in response.accuracy),
            _receipt(response),
            tuple(response.notes),
        )

    def estimate(self, dataset: str, **kwargs: Any) -> Estimate:
        timeout = kwargs.pop("timeout", None)
        return self.estimate_query(self.build(dataset, **kwargs), timeout=timeout)

    def budgets(self, dataset_id: str = "") -> list[Budget]:
        response = self._call(self._query.GetBudget, query_pb2.GetBudgetRequest(dataset_id=dataset_id))
        return [
            Budget(
                b.dataset_id,
                PrivacyLoss(b.epsilon_total, b.delta_total),
                PrivacyLoss(b.epsilon_spent, b.delta_spent),
            )
            for b in response.budgets
        ]

    # --- subject products (consented per-subject evaluations) -------------------

    def evaluate(
        self, product_id: str, subject_id: str, consent: bytes, *, timeout: float | None = None
    ) -> SubjectEvaluation:
        """One product's outputs for one subject, under the subject's consent artefact."""
        item = subject_pb2.SubjectItem(product_id=product_id, subject_id=subject_id, consent=consent)
        response = self._call(self._subjects.Evaluate, subject_pb2.EvaluateRequest(item=item), timeout)
        return SubjectEvaluation.from_proto(response.evaluation, _receipt(response))

    def evaluate_batch(
        self, items: Iterable[tuple[str, str, bytes]], *, timeout: float | None = None
    ) -> list[SubjectEvaluation | DataopsClientError]:
        """(product, subject, consent) triples; each result is an evaluation or that item's refusal."""
        request = subject_pb2.EvaluateBatchRequest(
            items=[subject_pb2.SubjectItem(product_id=p, subject_id=s, consent=c) for p, s, c in items]
        )
        response = self._call(self._subjects.EvaluateBatch, request, timeout)
        receipt = _receipt(response)
        return [
            SubjectEvaluation.from_proto(r.evaluation, receipt)
            if r.HasField("evaluation")
            else _item_error(r.error)
            for r in response.results
        ]

    def watch(self, items: Iterable[tuple[str, str, bytes]], *, timeout: float | None = None) -> _Watch:
        """Updates of a watched portfolio as (index, evaluation or the refusal that ended it).

        Iterate it to receive updates; `cancel()` on the returned iterator stops the watch.
        """
        request = subject_pb2.WatchRequest(
            items=[subject_pb2.SubjectItem(product_id=p, subject_id=s, consent=c) for p, s, c in items]
        )
        return _Watch(self._subjects.Watch(request, timeout=timeout))


@dataclass(frozen=True)
class SubjectEvaluation:
    product_id: str
    consent_id: str
    data_version: str
    evaluation_date: str
    outputs: dict[str, Any]
    outputs_hash: str
    receipt: Receipt

    @classmethod
    def from_proto(cls, evaluation: subject_pb2.Evaluation, receipt: Receipt) -> SubjectEvaluation:
        outputs = {}
        for output in evaluation.outputs:
            kind = output.WhichOneof("value")
            outputs[output.name] = None if kind is None else getattr(output, kind)
        return cls(
            evaluation.product_id,
            evaluation.consent_id,
            evaluation.data_version,
            evaluation.evaluation_date,
            outputs,
            evaluation.outputs_hash,
            receipt,
        )


def _item_error(error: subject_pb2.ItemError) -> DataopsClientError:
    return DataopsClientError(
        grpc.StatusCode[_CODE_NAMES[error.code]], error.message, error.reason, dict(error.metadata)
    )


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class _Watch:
    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __iter__(self) -> _Watch:
        return self

    def __next__(self) -> tuple[int, SubjectEvaluation | DataopsClientError]:
        try:
            update = next(self.stream)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise DataopsClientError.from_rpc_error(error) from None
        receipt = _receipt(update)
        if update.HasField("evaluation"):
            return update.index, SubjectEvaluation.from_proto(update.evaluation, receipt)
        return update.index, _item_error(update.ended)

    def cancel(self) -> None:
        self.stream.cancel()
