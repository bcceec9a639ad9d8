from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_QUERY: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN_DATASET: _ClassVar[ErrorReason]
    ERROR_REASON_POLICY_DENIED: _ClassVar[ErrorReason]
    ERROR_REASON_UNKNOWN_CONSUMER: _ClassVar[ErrorReason]
    ERROR_REASON_UNAUTHENTICATED: _ClassVar[ErrorReason]
    ERROR_REASON_OUTPUT_CONTROL: _ClassVar[ErrorReason]
    ERROR_REASON_BUDGET_EXHAUSTED: _ClassVar[ErrorReason]
    ERROR_REASON_LIMIT_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_DEADLINE_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
    ERROR_REASON_CONSENT_INVALID: _ClassVar[ErrorReason]
    ERROR_REASON_SERVER_STOPPING: _ClassVar[ErrorReason]
    ERROR_REASON_DATASET_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_TABLE_NOT_READY: _ClassVar[ErrorReason]
    ERROR_REASON_DP_COPY_NOT_READY: _ClassVar[ErrorReason]
    ERROR_REASON_DP_COPY_FAILED: _ClassVar[ErrorReason]
    ERROR_REASON_LIMITS_UNAVAILABLE: _ClassVar[ErrorReason]
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_INVALID_QUERY: ErrorReason
ERROR_REASON_UNKNOWN_DATASET: ErrorReason
ERROR_REASON_POLICY_DENIED: ErrorReason
ERROR_REASON_UNKNOWN_CONSUMER: ErrorReason
ERROR_REASON_UNAUTHENTICATED: ErrorReason
ERROR_REASON_OUTPUT_CONTROL: ErrorReason
ERROR_REASON_BUDGET_EXHAUSTED: ErrorReason
ERROR_REASON_LIMIT_EXCEEDED: ErrorReason
ERROR_REASON_DEADLINE_EXCEEDED: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason
ERROR_REASON_CONSENT_INVALID: ErrorReason
ERROR_REASON_SERVER_STOPPING: ErrorReason
ERROR_REASON_DATASET_UNAVAILABLE: ErrorReason
ERROR_REASON_TABLE_NOT_READY: ErrorReason
ERROR_REASON_DP_COPY_NOT_READY: ErrorReason
ERROR_REASON_DP_COPY_FAILED: ErrorReason
ERROR_REASON_LIMITS_UNAVAILABLE: ErrorReason
