from dataops.v1 import query_pb2 as _query_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Classification(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLASSIFICATION_UNSPECIFIED: _ClassVar[Classification]
    CLASSIFICATION_IDENTIFIER: _ClassVar[Classification]
    CLASSIFICATION_QUASI_IDENTIFIER: _ClassVar[Classification]
    CLASSIFICATION_PUBLIC: _ClassVar[Classification]
    CLASSIFICATION_SENSITIVE: _ClassVar[Classification]
    CLASSIFICATION_UNCLASSIFIED: _ClassVar[Classification]

class ColumnUse(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLUMN_USE_UNSPECIFIED: _ClassVar[ColumnUse]
    COLUMN_USE_DIMENSION: _ClassVar[ColumnUse]
    COLUMN_USE_FILTER: _ClassVar[ColumnUse]
    COLUMN_USE_MEASURE: _ClassVar[ColumnUse]
CLASSIFICATION_UNSPECIFIED: Classification
CLASSIFICATION_IDENTIFIER: Classification
CLASSIFICATION_QUASI_IDENTIFIER: Classification
CLASSIFICATION_PUBLIC: Classification
CLASSIFICATION_SENSITIVE: Classification
CLASSIFICATION_UNCLASSIFIED: Classification
COLUMN_USE_UNSPECIFIED: ColumnUse
COLUMN_USE_DIMENSION: ColumnUse
COLUMN_USE_FILTER: ColumnUse
COLUMN_USE_MEASURE: ColumnUse

class Dataset(_message.Message):
    __slots__ = ("id", "zone", "title", "description", "provider", "privacy_unit", "max_rows_per_unit")
    ID_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_UNIT_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_UNIT_FIELD_NUMBER: _ClassVar[int]
    id: str
    zone: str
    title: str
    description: str
    provider: str
    privacy_unit: str
    max_rows_per_unit: int
    def __init__(self, id: _Optional[str] = ..., zone: _Optional[str] = ..., title: _Optional[str] = ..., description: _Optional[str] = ..., provider: _Optional[str] = ..., privacy_unit: _Optional[str] = ..., max_rows_per_unit: _Optional[int] = ...) -> None: ...

class Column(_message.Message):
    __slots__ = ("name", "type", "classification", "description", "allowed_uses", "lower_bound", "upper_bound", "public_keys", "bins")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_USES_FIELD_NUMBER: _ClassVar[int]
    LOWER_BOUND_FIELD_NUMBER: _ClassVar[int]
    UPPER_BOUND_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEYS_FIELD_NUMBER: _ClassVar[int]
    BINS_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    classification: Classification
    description: str
    allowed_uses: _containers.RepeatedScalarFieldContainer[ColumnUse]
    lower_bound: float
    upper_bound: float
    public_keys: _containers.RepeatedScalarFieldContainer[str]
    bins: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., classification: _Optional[_Union[Classification, str]] = ..., description: _Optional[str] = ..., allowed_uses: _Optional[_Iterable[_Union[ColumnUse, str]]] = ..., lower_bound: _Optional[float] = ..., upper_bound: _Optional[float] = ..., public_keys: _Optional[_Iterable[str]] = ..., bins: _Optional[_Iterable[float]] = ...) -> None: ...

class Dominance(_message.Message):
    __slots__ = ("n", "percent")
    N_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    n: int
    percent: float
    def __init__(self, n: _Optional[int] = ..., percent: _Optional[float] = ...) -> None: ...

class Grant(_message.Message):
    __slots__ = ("purpose", "expires", "modes", "functions", "min_group_size", "epsilon", "delta", "dominance", "tables")
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DOMINANCE_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    purpose: str
    expires: str
    modes: _containers.RepeatedScalarFieldContainer[_query_pb2.QueryMode]
    functions: _containers.RepeatedScalarFieldContainer[_query_pb2.AggregateFunction]
    min_group_size: int
    epsilon: float
    delta: float
    dominance: Dominance
    tables: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, purpose: _Optional[str] = ..., expires: _Optional[str] = ..., modes: _Optional[_Iterable[_Union[_query_pb2.QueryMode, str]]] = ..., functions: _Optional[_Iterable[_Union[_query_pb2.AggregateFunction, str]]] = ..., min_group_size: _Optional[int] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., dominance: _Optional[_Union[Dominance, _Mapping]] = ..., tables: _Optional[_Iterable[str]] = ...) -> None: ...

class TableDimension(_message.Message):
    __slots__ = ("column", "keys")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    column: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, column: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class TableMeasure(_message.Message):
    __slots__ = ("name", "function", "column")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    name: str
    function: _query_pb2.AggregateFunction
    column: str
    def __init__(self, name: _Optional[str] = ..., function: _Optional[_Union[_query_pb2.AggregateFunction, str]] = ..., column: _Optional[str] = ...) -> None: ...

class TableRules(_message.Message):
    __slots__ = ("min_units", "dominance_n", "dominance_percent", "p_percent", "sensitive_dimensions", "group_attribute_percent", "structural_zeros")
    MIN_UNITS_FIELD_NUMBER: _ClassVar[int]
    DOMINANCE_N_FIELD_NUMBER: _ClassVar[int]
    DOMINANCE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    P_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SENSITIVE_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    GROUP_ATTRIBUTE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    STRUCTURAL_ZEROS_FIELD_NUMBER: _ClassVar[int]
    min_units: int
    dominance_n: int
    dominance_percent: float
    p_percent: float
    sensitive_dimensions: _containers.RepeatedScalarFieldContainer[str]
    group_attribute_percent: float
    structural_zeros: _containers.RepeatedCompositeFieldContainer[StructuralZero]
    def __init__(self, min_units: _Optional[int] = ..., dominance_n: _Optional[int] = ..., dominance_percent: _Optional[float] = ..., p_percent: _Optional[float] = ..., sensitive_dimensions: _Optional[_Iterable[str]] = ..., group_attribute_percent: _Optional[float] = ..., structural_zeros: _Optional[_Iterable[_Union[StructuralZero, _Mapping]]] = ...) -> None: ...

class StructuralZero(_message.Message):
    __slots__ = ("dimensions",)
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    dimensions: _containers.RepeatedCompositeFieldContainer[TableDimension]
    def __init__(self, dimensions: _Optional[_Iterable[_Union[TableDimension, _Mapping]]] = ...) -> None: ...

class PublishedTable(_message.Message):
    __slots__ = ("id", "title", "description", "dimensions", "measures", "rules")
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MEASURES_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    description: str
    dimensions: _containers.RepeatedCompositeFieldContainer[TableDimension]
    measures: _containers.RepeatedCompositeFieldContainer[TableMeasure]
    rules: TableRules
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., description: _Optional[str] = ..., dimensions: _Optional[_Iterable[_Union[TableDimension, _Mapping]]] = ..., measures: _Optional[_Iterable[_Union[TableMeasure, _Mapping]]] = ..., rules: _Optional[_Union[TableRules, _Mapping]] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "receipt")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    receipt: _query_pb2.Receipt
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ..., receipt: _Optional[_Union[_query_pb2.Receipt, _Mapping]] = ...) -> None: ...

class DescribeDatasetRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...

class DescribeDatasetResponse(_message.Message):
    __slots__ = ("dataset", "columns", "grant", "receipt", "tables")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    dataset: Dataset
    columns: _containers.RepeatedCompositeFieldContainer[Column]
    grant: Grant
    receipt: _query_pb2.Receipt
    tables: _containers.RepeatedCompositeFieldContainer[PublishedTable]
    def __init__(self, dataset: _Optional[_Union[Dataset, _Mapping]] = ..., columns: _Optional[_Iterable[_Union[Column, _Mapping]]] = ..., grant: _Optional[_Union[Grant, _Mapping]] = ..., receipt: _Optional[_Union[_query_pb2.Receipt, _Mapping]] = ..., tables: _Optional[_Iterable[_Union[PublishedTable, _Mapping]]] = ...) -> None: ...
