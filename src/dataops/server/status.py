"""The one table from a domain error's neutral kind to its canonical gRPC status code.

The domain (`dataops.errors`) says what sort of refusal an error is; only the
transport knows how gRPC spells it. Clients program against these codes
(docs/api.md), so a change here is a change of the contract.
"""

from __future__ import annotations

import grpc

from dataops.errors import Kind, RequestError

STATUS_CODES: dict[Kind, grpc.StatusCode] = {
    Kind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Kind.DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Kind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Kind.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


def status_code(error: RequestError) -> grpc.StatusCode:
    """The canonical code a domain error crosses the wire as."""
    return STATUS_CODES[error.kind]
