"""One interceptor for every dataops.v1 RPC: identity, audit, error mapping.

A gRPC server interceptor sees only the method name, so it wraps the handler
instead: the wrapper runs in the handler's thread with the real `context`, reads the
consumer from the verified client certificate, runs the servicer, appends exactly
one audit record, and only then lets the response (or the error) go out.

Domain errors become canonical status codes with `google.rpc` details here and
nowhere else (Feast's grpc_error_interceptor does the same).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from dataops.audit import AuditLog, AuditUnavailable, Receipt
from dataops.audit.record import CallRecord, close_call, open_call
from dataops.certs import RevocationList, consumer_identity_from_auth_context
from dataops.errors import InvalidQuery, LimitExceeded, QuotaViolation, RequestError, Unauthenticated
from dataops.policy import PolicyStore
from dataops.server.ratelimit import RateLimiter

log = logging.getLogger(__name__)

DOMAIN = "dataops.v1"


# gRPC refuses trailers above 16 KiB (the message and the packed details travel
# there), and the client would then see a bare RESOURCE_EXHAUSTED with no reason. A
# message quotes the request, so whatever the request held, each piece is bounded.
_MAX_MESSAGE = 1024
_MAX_DETAIL = 256


def _bounded(text: str, limit: int = _MAX_DETAIL) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_status(error: RequestError, receipt: Receipt | None) -> grpc.Status:
    metadata = {key: _bounded(value) for key, value in error.metadata.items()}
    if receipt is not None:
        metadata["receipt_sequence"] = str(receipt.sequence)
        metadata["receipt_hash"] = receipt.hash
    details = [error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata)]
    if error.field_violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=_bounded(v.field), description=_bounded(v.description)
                    )
                    for v in error.field_violations[:8]
                ]
            )
        )
    if error.quota_violations:
        details.append(
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=_bounded(v.subject), description=_bounded(v.description)
                    )
                    for v in error.quota_violations[:8]
                ]
            )
        )
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(code=error.code.value[0], message=_bounded(error.message, _MAX_MESSAGE), details=packed)
    return rpc_status.to_status(status)


# grpcio reports a call without a deadline as an enormous time_remaining() (about
# 2**63 ns), not None; stock clients (grpcurl, grpc-js) send none by default. Past a
# day it cannot be a real deadline, and a wait that long overflows time_t.
_NO_DEADLINE_ABOVE_SECONDS = 86_400.0


def client_deadline(remaining: float | None) -> float | None:
    """time.monotonic() by which the client stops waiting, or None when it set no deadline."""
    if remaining is None or not remaining < _NO_DEADLINE_ABOVE_SECONDS:
        return None
    return time.monotonic() + remaining


def internal_status(receipt: Receipt) -> grpc.Status:
    """INTERNAL with an ErrorInfo carrying the receipt, so a reviewer can find the record."""
    info = error_details_pb2.ErrorInfo(
        reason="INTERNAL", domain=DOMAIN,
        metadata={"receipt_sequence": str(receipt.sequence), "receipt_hash": receipt.hash},
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(
        code=grpc.StatusCode.INTERNAL.value[0],
        message=f"internal error (audit receipt {receipt.sequence})",
        details=[detail],
    )
    return rpc_status.to_status(status)


class AuditInterceptor(grpc.ServerInterceptor):
    def __init__(
        self,
        audit: AuditLog,
        policies: PolicyStore,
        revocations: RevocationList | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.audit = audit
        self.policies = policies
        self.revocations = revocations
        self.limiter = limiter

    def identify(self, context: grpc.ServicerContext, call: CallRecord) -> str:
        """The consumer named by a valid, unrevoked certificate, within its rate limit."""
        auth = context.auth_context()
        consumer = consumer_identity_from_auth_context(auth)
        call.consumer = consumer
        if consumer is None:
            raise Unauthenticated("the client certificate names no consumer", rule="identity")
        pem = (auth.get("x509_pem_cert") or [b""])[0]
        if self.revocations is not None and self.revocations.is_revoked(pem):
            raise Unauthenticated("the client certificate is revoked", rule="certificate.revoked")
        if self.limiter is not None and not self.limiter.allow(consumer):
            raise LimitExceeded(
                f"consumer {consumer!r} is over its rate limit; retry later",
                rule="limits.rate",
                quota_violations=(QuotaViolation(f"consumer:{consumer}", "request rate limit"),),
            )
        return consumer

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(f"/{DOMAIN}.") or handler.unary_unary is None:
            return handler  # health and reflection carry no data and are not audited
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(method.rsplit("/", 1)[-1], handler),
            # The wrapper parses the request itself, so a malformed message is
            # answered INVALID_ARGUMENT and audited like any other request.
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, method: str, handler: Any) -> Callable:
        def behavior(raw: bytes, context: grpc.ServicerContext) -> Any:
            call = CallRecord(method=method)
            token = open_call(call)
            response, error, request = None, None, None
            try:
                self.identify(context, call)
                call.deadline = client_deadline(context.time_remaining())
                try:
                    request = handler.request_deserializer(raw)
                except DecodeError:
                    call.unparsed(raw)
                    raise InvalidQuery("the request is not a valid protobuf message", rule="wire") from None
                response = handler.unary_unary(request, context)
                call.allowed()
            except RequestError as exc:
                call.refused(exc)
                if request is not None:
                    call.attempted(request)  # a refused query is recorded even when it never planned
                error = exc
            except Exception:
                log.exception("internal error in %s", method)
                call.failed("INTERNAL")
                error = None
            finally:
                close_call(token)
            try:
                receipt = self.audit.append(call.to_record(self.policies.current.version))
            except AuditUnavailable:
                log.exception("audit append failed; refusing %s", method)
                context.abort(grpc.StatusCode.UNAVAILABLE, "the audit log is unavailable; nothing was released")
            if error is not None:
                context.abort_with_status(to_status(error, receipt))
            if response is None:
                context.abort_with_status(internal_status(receipt))
            response.receipt.sequence = receipt.sequence
            response.receipt.hash = receipt.hash
            return response

        return behavior
