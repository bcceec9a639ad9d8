from dataops.v1 import query_pb2 as _query_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubjectItem(_message.Message):
    __slots__ = ("product_id", "subject_id", "consent")
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    subject_id: str
    consent: bytes
    def __init__(self, product_id: _Optional[str] = ..., subject_id: _Optional[str] = ..., consent: _Optional[bytes] = ...) -> None: ...

class SubjectOutput(_message.Message):
    __slots__ = ("name", "int_value", "double_value", "bool_value", "band")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    BAND_FIELD_NUMBER: _ClassVar[int]
    name: str
    int_value: int
    double_value: float
    bool_value: bool
    band: str
    def __init__(self, name: _Optional[str] = ..., int_value: _Optional[int] = ..., double_value: _Optional[float] = ..., bool_value: _Optional[bool] = ..., band: _Optional[str] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("product_id", "consent_id", "data_version", "evaluation_date", "outputs", "outputs_hash")
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    CONSENT_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_DATE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_HASH_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    consent_id: str
    data_version: str
    evaluation_date: str
    outputs: _containers.RepeatedCompositeFieldContainer[SubjectOutput]
    outputs_hash: str
    def __init__(self, product_id: _Optional[str] = ..., consent_id: _Optional[str] = ..., data_version: _Optional[str] = ..., evaluation_date: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[SubjectOutput, _Mapping]]] = ..., outputs_hash: _Optional[str] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "reason", "message", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    message: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: SubjectItem
    def __init__(self, item: _Optional[_Union[SubjectItem, _Mapping]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("evaluation", "receipt")
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    evaluation: Evaluation
    receipt: _query_pb2.Receipt
    def __init__(self, evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., receipt: _Optional[_Union[_query_pb2.Receipt, _Mapping]] = ...) -> None: ...

class EvaluateBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SubjectItem]
    def __init__(self, items: _Optional[_Iterable[_Union[SubjectItem, _Mapping]]] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("index", "evaluation", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    evaluation: Evaluation
    error: ItemError
    def __init__(self, index: _Optional[int] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class EvaluateBatchResponse(_message.Message):
    __slots__ = ("results", "receipt")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchResult]
    receipt: _query_pb2.Receipt
    def __init__(self, results: _Optional[_Iterable[_Union[BatchResult, _Mapping]]] = ..., receipt: _Optional[_Union[_query_pb2.Receipt, _Mapping]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SubjectItem]
    def __init__(self, items: _Optional[_Iterable[_Union[SubjectItem, _Mapping]]] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("index", "evaluation", "ended", "receipt")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    index: int
    evaluation: Evaluation
    ended: ItemError
    receipt: _query_pb2.Receipt
    def __init__(self, index: _Optional[int] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., ended: _Optional[_Union[ItemError, _Mapping]] = ..., receipt: _Optional[_Union[_query_pb2.Receipt, _Mapping]] = ...) -> None: ...
