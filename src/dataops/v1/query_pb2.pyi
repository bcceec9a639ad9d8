from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QueryMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUERY_MODE_UNSPECIFIED: _ClassVar[QueryMode]
    QUERY_MODE_AGGREGATE: _ClassVar[QueryMode]
    QUERY_MODE_DP: _ClassVar[QueryMode]

class AggregateFunction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATE_FUNCTION_UNSPECIFIED: _ClassVar[AggregateFunction]
    AGGREGATE_FUNCTION_COUNT: _ClassVar[AggregateFunction]
    AGGREGATE_FUNCTION_COUNT_UNITS: _ClassVar[AggregateFunction]
    AGGREGATE_FUNCTION_SUM: _ClassVar[AggregateFunction]
    AGGREGATE_FUNCTION_MEAN: _ClassVar[AggregateFunction]
    AGGREGATE_FUNCTION_QUANTILE: _ClassVar[AggregateFunction]
QUERY_MODE_UNSPECIFIED: QueryMode
QUERY_MODE_AGGREGATE: QueryMode
QUERY_MODE_DP: QueryMode
AGGREGATE_FUNCTION_UNSPECIFIED: AggregateFunction
AGGREGATE_FUNCTION_COUNT: AggregateFunction
AGGREGATE_FUNCTION_COUNT_UNITS: AggregateFunction
AGGREGATE_FUNCTION_SUM: AggregateFunction
AGGREGATE_FUNCTION_MEAN: AggregateFunction
AGGREGATE_FUNCTION_QUANTILE: AggregateFunction

class Value(_message.Message):
    __slots__ = ("string_value", "int_value", "double_value", "bool_value")
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    string_value: str
    int_value: int
    double_value: float
    bool_value: bool
    def __init__(self, string_value: _Optional[str] = ..., int_value: _Optional[int] = ..., double_value: _Optional[float] = ..., bool_value: _Optional[bool] = ...) -> None: ...

class Equals(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: Value
    def __init__(self, value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class InSet(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("low", "high")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    low: Value
    high: Value
    def __init__(self, low: _Optional[_Union[Value, _Mapping]] = ..., high: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("column", "equals", "in_set", "range")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    IN_SET_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    column: str
    equals: Equals
    in_set: InSet
    range: Range
    def __init__(self, column: _Optional[str] = ..., equals: _Optional[_Union[Equals, _Mapping]] = ..., in_set: _Optional[_Union[InSet, _Mapping]] = ..., range: _Optional[_Union[Range, _Mapping]] = ...) -> None: ...

class Aggregate(_message.Message):
    __slots__ = ("function", "column", "quantile", "alias", "weight")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    function: AggregateFunction
    column: str
    quantile: float
    alias: str
    weight: float
    def __init__(self, function: _Optional[_Union[AggregateFunction, str]] = ..., column: _Optional[str] = ..., quantile: _Optional[float] = ..., alias: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class MeasureTerms(_message.Message):
    __slots__ = ("column", "lower", "upper", "auto_clip_share", "auto_clip_quantile")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    AUTO_CLIP_SHARE_FIELD_NUMBER: _ClassVar[int]
    AUTO_CLIP_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    column: str
    lower: float
    upper: float
    auto_clip_share: float
    auto_clip_quantile: float
    def __init__(self, column: _Optional[str] = ..., lower: _Optional[float] = ..., upper: _Optional[float] = ..., auto_clip_share: _Optional[float] = ..., auto_clip_quantile: _Optional[float] = ...) -> None: ...

class PrivacyParameters(_message.Message):
    __slots__ = ("epsilon", "delta", "target_half_width", "max_rows_per_unit", "measures", "consistent")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TARGET_HALF_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_UNIT_FIELD_NUMBER: _ClassVar[int]
    MEASURES_FIELD_NUMBER: _ClassVar[int]
    CONSISTENT_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    delta: float
    target_half_width: float
    max_rows_per_unit: int
    measures: _containers.RepeatedCompositeFieldContainer[MeasureTerms]
    consistent: bool
    def __init__(self, epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., target_half_width: _Optional[float] = ..., max_rows_per_unit: _Optional[int] = ..., measures: _Optional[_Iterable[_Union[MeasureTerms, _Mapping]]] = ..., consistent: _Optional[bool] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("dataset", "filters", "group_by", "aggregates", "mode", "privacy", "purpose")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    AGGREGATES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    filters: _containers.RepeatedCompositeFieldContainer[Filter]
    group_by: _containers.RepeatedScalarFieldContainer[str]
    aggregates: _containers.RepeatedCompositeFieldContainer[Aggregate]
    mode: QueryMode
    privacy: PrivacyParameters
    purpose: str
    def __init__(self, dataset: _Optional[str] = ..., filters: _Optional[_Iterable[_Union[Filter, _Mapping]]] = ..., group_by: _Optional[_Iterable[str]] = ..., aggregates: _Optional[_Iterable[_Union[Aggregate, _Mapping]]] = ..., mode: _Optional[_Union[QueryMode, str]] = ..., privacy: _Optional[_Union[PrivacyParameters, _Mapping]] = ..., purpose: _Optional[str] = ...) -> None: ...

class SqlQuery(_message.Message):
    __slots__ = ("text", "mode", "privacy", "purpose")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    text: str
    mode: QueryMode
    privacy: PrivacyParameters
    purpose: str
    def __init__(self, text: _Optional[str] = ..., mode: _Optional[_Union[QueryMode, str]] = ..., privacy: _Optional[_Union[PrivacyParameters, _Mapping]] = ..., purpose: _Optional[str] = ...) -> None: ...

class ArrowTable(_message.Message):
    __slots__ = ("ipc_stream", "row_count")
    IPC_STREAM_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    ipc_stream: bytes
    row_count: int
    def __init__(self, ipc_stream: _Optional[bytes] = ..., row_count: _Optional[int] = ...) -> None: ...

class AggregateAccuracy(_message.Message):
    __slots__ = ("column", "noise_scale", "half_width_95", "mechanism")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    NOISE_SCALE_FIELD_NUMBER: _ClassVar[int]
    HALF_WIDTH_95_FIELD_NUMBER: _ClassVar[int]
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    column: str
    noise_scale: float
    half_width_95: float
    mechanism: str
    def __init__(self, column: _Optional[str] = ..., noise_scale: _Optional[float] = ..., half_width_95: _Optional[float] = ..., mechanism: _Optional[str] = ...) -> None: ...

class Spend(_message.Message):
    __slots__ = ("epsilon", "delta", "remaining_epsilon", "remaining_delta")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    REMAINING_EPSILON_FIELD_NUMBER: _ClassVar[int]
    REMAINING_DELTA_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    delta: float
    remaining_epsilon: float
    remaining_delta: float
    def __init__(self, epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., remaining_epsilon: _Optional[float] = ..., remaining_delta: _Optional[float] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("sequence", "hash", "leaf_index", "tree_size", "inclusion_path", "checkpoint", "record", "consistency_from", "consistency_path")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    INCLUSION_PATH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FROM_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_PATH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    hash: str
    leaf_index: int
    tree_size: int
    inclusion_path: _containers.RepeatedScalarFieldContainer[bytes]
    checkpoint: str
    record: bytes
    consistency_from: int
    consistency_path: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, sequence: _Optional[int] = ..., hash: _Optional[str] = ..., leaf_index: _Optional[int] = ..., tree_size: _Optional[int] = ..., inclusion_path: _Optional[_Iterable[bytes]] = ..., checkpoint: _Optional[str] = ..., record: _Optional[bytes] = ..., consistency_from: _Optional[int] = ..., consistency_path: _Optional[_Iterable[bytes]] = ...) -> None: ...

class RunQueryRequest(_message.Message):
    __slots__ = ("query", "sql")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    query: Query
    sql: SqlQuery
    def __init__(self, query: _Optional[_Union[Query, _Mapping]] = ..., sql: _Optional[_Union[SqlQuery, _Mapping]] = ...) -> None: ...

class RunQueryResponse(_message.Message):
    __slots__ = ("result", "rows_suppressed", "accuracy", "spend", "receipt", "reused")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ROWS_SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SPEND_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    result: ArrowTable
    rows_suppressed: int
    accuracy: _containers.RepeatedCompositeFieldContainer[AggregateAccuracy]
    spend: Spend
    receipt: Receipt
    reused: bool
    def __init__(self, result: _Optional[_Union[ArrowTable, _Mapping]] = ..., rows_suppressed: _Optional[int] = ..., accuracy: _Optional[_Iterable[_Union[AggregateAccuracy, _Mapping]]] = ..., spend: _Optional[_Union[Spend, _Mapping]] = ..., receipt: _Optional[_Union[Receipt, _Mapping]] = ..., reused: _Optional[bool] = ...) -> None: ...

class EstimateQueryRequest(_message.Message):
    __slots__ = ("query", "sql")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    SQL_FIELD_NUMBER: _ClassVar[int]
    query: Query
    sql: SqlQuery
    def __init__(self, query: _Optional[_Union[Query, _Mapping]] = ..., sql: _Optional[_Union[SqlQuery, _Mapping]] = ...) -> None: ...

class EstimateQueryResponse(_message.Message):
    __slots__ = ("spend", "accuracy", "receipt", "notes")
    SPEND_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    spend: Spend
    accuracy: _containers.RepeatedCompositeFieldContainer[AggregateAccuracy]
    receipt: Receipt
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, spend: _Optional[_Union[Spend, _Mapping]] = ..., accuracy: _Optional[_Iterable[_Union[AggregateAccuracy, _Mapping]]] = ..., receipt: _Optional[_Union[Receipt, _Mapping]] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...

class DatasetBudget(_message.Message):
    __slots__ = ("dataset_id", "epsilon_total", "delta_total", "epsilon_spent", "delta_spent")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    EPSILON_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DELTA_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    DELTA_SPENT_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    epsilon_total: float
    delta_total: float
    epsilon_spent: float
    delta_spent: float
    def __init__(self, dataset_id: _Optional[str] = ..., epsilon_total: _Optional[float] = ..., delta_total: _Optional[float] = ..., epsilon_spent: _Optional[float] = ..., delta_spent: _Optional[float] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("budgets", "receipt")
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[DatasetBudget]
    receipt: Receipt
    def __init__(self, budgets: _Optional[_Iterable[_Union[DatasetBudget, _Mapping]]] = ..., receipt: _Optional[_Union[Receipt, _Mapping]] = ...) -> None: ...
