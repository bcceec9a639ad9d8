"""One interceptor for every dataops.v1 RPC: identity, admission, audit, error mapping.

A gRPC server interceptor sees only the method name, so it wraps the handler
instead: the wrapper runs in the handler's thread with the real `context`, reads the
consumer from the verified client certificate itself, checks revocation, rate and
concurrency caps (shedding load here, where it is audited, rather than in gRPC),
runs the servicer, appends exactly one audit record, and only then lets the response
(or the error) go out. A request gRPC drops before any thread takes it is audited by
`RequestPool`.

Domain errors become canonical status codes with `google.rpc` details here and
nowhere else (Feast's grpc_error_interceptor does the same).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from dataops.audit import AuditLog, AuditUnavailable, Receipt
from dataops.audit.receipts import fill_receipt, receipt_metadata, witness_size
from dataops.audit.record import CallRecord
from dataops.certs import IdentityError, RevocationList, consumer_identity_from_certificate
from dataops.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidQuery,
    LimitExceeded,
    QuotaViolation,
    RequestError,
    ServerStopping,
    Unauthenticated,
)
from dataops.outcome import Outcome, outcome_of
from dataops.policy import PolicyStore
from dataops.server.lanes import ScanLane, is_scan
from dataops.server.ratelimit import Admission, RateLimiter, SharedRateLimiter
from dataops.server.status import status_code

log = logging.getLogger(__name__)

# Makes the context manager a DP query's engine run is held by (a scan-lane slot).
ScanGuard = Callable[[], AbstractContextManager[None]]

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
        # The record and its proof, so a witnessing client checks refusals too.
        metadata.update(receipt_metadata(receipt))
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
    if error.retry_after_seconds is not None:  # the domain's retry hint (a table or copy being built)
        details.append(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(seconds=int(error.retry_after_seconds))
            )
        )
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(
        code=status_code(error).value[0], message=_bounded(error.message, _MAX_MESSAGE), details=packed
    )
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
        reason="INTERNAL",
        domain=DOMAIN,
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


def certificate_identity(auth_context: Any) -> str:
    """The consumer the verified peer certificate itself names (one CN, the matching SAN).

    Not grpc's `x509_common_name`: that is the first CN only, cut at a NUL byte.
    """
    pem = (auth_context.get("x509_pem_cert") or [b""])[0]
    if not pem:
        raise Unauthenticated("no client certificate", rule="identity")
    try:
        return consumer_identity_from_certificate(pem)
    except IdentityError as exc:
        raise Unauthenticated(str(exc), rule=exc.rule) from None


_REVOCATION_MESSAGES = {
    "certificate.revoked": "the client certificate is revoked",
    "certificate.crl_unavailable": "the revocation list is unavailable; every certificate is refused",
}


class CallContext:
    """The servicer's `context`: gRPC's own, plus who is asking and a place for the outcome.

    The interceptor makes one per call and passes it to the servicer in place of
    gRPC's context (everything else is delegated to it), so identity, deadline and the
    scan lane's guard reach the servicer as arguments, not through a contextvar, and the servicer hands
    back the request flow's `Outcome` with `record`, from which the interceptor writes
    the audit record.
    """

    def __init__(
        self, context: grpc.ServicerContext, call: CallRecord, scan_slot: ScanGuard = nullcontext
    ) -> None:
        self._context = context
        self._call = call
        self._scan_slot = scan_slot

    @property
    def scan_slot(self) -> ScanGuard:
        """What the engine run of a DP query is held by: a slot in the scan lane (a no-op
        for other calls, and with one shared lane, whose admission holds the whole call)."""
        return self._scan_slot

    @property
    def consumer(self) -> str:
        consumer = self._call.consumer
        if consumer is None:  # the interceptor identifies before any servicer runs
            raise InternalError("a servicer ran before its caller was identified")
        return consumer

    @property
    def deadline(self) -> float | None:
        """time.monotonic() by which the client stops waiting, or None."""
        return self._call.deadline

    @property
    def request_id(self) -> str:
        """Links the audit record to the ledger reservation the request makes."""
        return self._call.request_id

    def record(self, outcome: Outcome) -> None:
        """What the request did (for a stream: what the next message carries)."""
        self._call.record_outcome(outcome)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _Pending:
    """One dataops.v1 request from its arrival; `started` once a thread took it.

    `late`: it arrived after the server began to stop, so it is refused, not served
    (a request that arrived before is drained like one already running)."""

    __slots__ = ("late", "method", "started")

    def __init__(self, method: str, late: bool = False) -> None:
        self.method, self.started, self.late = method, False, late


class RequestPool(futures.ThreadPoolExecutor):
    """The threads dataops.v1 requests run on, apart from gRPC's default pool.

    gRPC hands each request to a thread; if its client's deadline passes (or it
    cancels) while the request waits for one, gRPC drops it without calling our
    handler, so it would leave no audit record. This pool notices: after gRPC's job
    for a request ends, a request our handler never started is reported to
    `on_abandoned`, which audits it. Health checks and reflection stay on gRPC's
    default pool, so a flood here never delays them.
    """

    def __init__(self, max_workers: int, on_abandoned: Callable[[_Pending, Any], None]) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix="dataops")
        self._on_abandoned = on_abandoned

    def submit(self, fn, /, *args, **kwargs):
        pending = next((a.dataops_pending for a in args if hasattr(a, "dataops_pending")), None)
        if pending is None:
            return super().submit(fn, *args, **kwargs)
        # gRPC passes the call's event along: it still knows the peer certificate.
        event = next((a for a in args if hasattr(a, "call_details")), None)

        def run():
            try:
                return fn(*args, **kwargs)
            finally:
                if not pending.started:
                    self._on_abandoned(pending, event)

        return super().submit(run)


def check_wrappable(services: Any) -> None:
    """Refuse to start if a dataops.v1 method has a shape the interceptor cannot audit.

    `services` are protobuf ServiceDescriptors. Unary calls and server streams are
    wrapped; a client stream would reach the servicer before any identity check.
    """
    for service in services:
        if not service.full_name.startswith(f"{DOMAIN}."):
            continue
        for method in service.methods:
            if method.client_streaming:
                raise InternalError(
                    f"{method.full_name} is client-streaming; the audit interceptor cannot wrap it, "
                    "so the server refuses to start"
                )


class AuditInterceptor(grpc.ServerInterceptor):
    def __init__(
        self,
        audit: AuditLog,
        policies: PolicyStore,
        revocations: RevocationList | None = None,
        limiter: RateLimiter | SharedRateLimiter | None = None,
        admission: Admission | None = None,
        threads: int | None = None,
        scans: ScanLane | None = None,
        scan_cost: Callable[[str, Any], int] | None = None,
    ) -> None:
        self.audit = audit
        self.policies = policies
        self.revocations = revocations
        self.limiter = limiter
        self.admission = admission  # the cheap calls' lane (every call's, without `scans`)
        # The scans' lane (dataops.server.lanes) and what a scan weighs (consumer, request -> rows).
        self.scans = scans
        self.scan_cost = scan_cost or (lambda consumer, request: 1)
        # With `threads`, dataops.v1 requests run on their own pool (RequestPool).
        self.pool = RequestPool(threads, self._abandoned) if threads else None
        # Set when the server begins to stop, before its health check stops saying SERVING:
        # a request arriving from then on is refused, never started, whatever gRPC's
        # transport still accepts until its own shutdown closes it.
        self.stopping = threading.Event()

    def _abandoned(self, pending: _Pending, event: Any) -> None:
        """Audit a request gRPC dropped before any thread served it (deadline or cancel)."""
        call = CallRecord(method=pending.method)
        try:
            from grpc._cython import cygrpc  # the peer's auth context, as grpc's own context reads it

            auth = {
                (k.decode() if isinstance(k, bytes) else k): v
                for k, v in (cygrpc.auth_context(event.call) or {}).items()
            }
            call.consumer = certificate_identity(auth)
        except Exception:  # no identity to be had: the record says so (consumer null)
            call.consumer = None
        deadline = getattr(getattr(event, "call_details", None), "deadline", None)
        if deadline is not None and deadline <= time.time():  # grpc keeps it as a time.time() instant
            queued = DeadlineExceeded(
                "the deadline passed before a thread took the request; nothing was run",
                rule="deadline.queued",
            )
            call.refused(queued, status_code(queued).name)
        else:
            # gRPC refused it itself (a message over max_message_bytes) or the client
            # cancelled: what the client was told is gRPC's, nothing was run.
            call.decision, call.code, call.rule = "denied", "CANCELLED", "transport.dropped"
        try:
            self.audit.append(call.to_record(self.policies.current.version))
        except Exception:
            log.exception("could not audit an abandoned %s request", pending.method)

    def identify(self, context: grpc.ServicerContext, call: CallRecord) -> str:
        """The consumer named by a valid, unrevoked certificate, within its rate limit."""
        auth = context.auth_context()
        consumer = certificate_identity(auth)
        call.consumer = consumer
        pem = (auth.get("x509_pem_cert") or [b""])[0]
        refused = self.revocations.check(pem) if self.revocations is not None else None
        if refused is not None:
            raise Unauthenticated(_REVOCATION_MESSAGES[refused], rule=refused)
        if self.limiter is not None and not self.limiter.allow(consumer):
            raise LimitExceeded(
                f"consumer {consumer!r} is over its rate limit; retry later",
                rule="limits.rate",
                quota_violations=(QuotaViolation(f"consumer:{consumer}", "request rate limit"),),
            )
        return consumer

    def _admit(self, consumer: str) -> str | None:
        """Take a concurrency slot for `consumer` (returned to leave()), or refuse the request."""
        if self.admission is None:
            return None
        refused = self.admission.enter(consumer)
        if refused == "consumer":
            raise LimitExceeded(
                f"consumer {consumer!r} already has {self.admission.per_consumer} requests in flight; "
                "retry when one has finished",
                rule="limits.concurrency",
                quota_violations=(
                    QuotaViolation(f"consumer:{consumer}", "concurrent requests per consumer"),
                ),
            )
        if refused == "server":
            raise LimitExceeded(
                "the server is at its limit of concurrent requests; retry later",
                rule="limits.concurrency",
                quota_violations=(QuotaViolation("server", "concurrent requests"),),
            )
        return consumer

    def _leave(self, admitted: str | None) -> None:
        """Return the slot `_admit` took (None: it took none)."""
        if admitted is not None and self.admission is not None:
            self.admission.leave(admitted)

    def _enter(
        self, method: str, consumer: str, request: Any, call: CallRecord, context: grpc.ServicerContext
    ) -> tuple[Callable[[], None], ScanGuard]:
        """Admit the request to its lane, decided by the method and the request's mode;
        returns how to leave it and the guard its engine run is held by.

        A DP query counts against its consumer's cap in the scan lane now, but waits for
        a slot only when it runs an engine (the guard, held by `Sandbox.run`): refusals
        and re-served releases never wait behind scans, and cheap calls never do.
        """
        if self.scans is not None and is_scan(method, request):
            scans = self.scans
            scans.join(consumer)

            def scan_slot() -> AbstractContextManager[None]:
                # Weighed only when the engine runs: most DP requests never get here.
                return scans.slot(self.scan_cost(consumer, request), call.deadline, context.is_active)

            return lambda: scans.part(consumer), scan_slot
        admitted = self._admit(consumer)
        return lambda: self._leave(admitted), nullcontext

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(f"/{DOMAIN}."):
            return handler  # health and reflection carry no data and are not audited
        name = method.rsplit("/", 1)[-1]
        # The wrappers parse the request themselves, so a malformed message is
        # answered INVALID_ARGUMENT and audited like any other request.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(name, handler),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(name, handler),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        # Fail closed: a dataops.v1 handler of a shape this interceptor cannot wrap is
        # never served unwrapped (`check_wrappable` refuses such services at startup).
        refuse = self._refuse(name)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(refuse)
        return grpc.stream_stream_rpc_method_handler(refuse)

    @staticmethod
    def _refused(call: CallRecord, error: RequestError) -> None:
        """A refusal's record: how far the request got (its outcome), and the code it is answered with."""
        outcome = outcome_of(error)
        if outcome is not None:
            call.record_outcome(outcome)
        call.refused(error, status_code(error).name)

    @staticmethod
    def _failed(call: CallRecord, error: Exception) -> None:
        outcome = outcome_of(error)
        if outcome is not None:
            call.record_outcome(outcome)
        call.failed("INTERNAL")

    def _proven(self, receipt: Receipt, context: grpc.ServicerContext) -> Receipt:
        """The receipt with the consistency proof from the checkpoint the client holds."""
        return self.audit.with_consistency(receipt, witness_size(context.invocation_metadata()))

    def _append(self, call: CallRecord, context: grpc.ServicerContext, method: str) -> Receipt:
        try:
            return self.audit.append(call.to_record(self.policies.current.version))
        except AuditUnavailable:
            log.exception("audit append failed; refusing %s", method)
            context.abort(grpc.StatusCode.UNAVAILABLE, "the audit log is unavailable; nothing was released")
            raise  # unreachable: abort raises

    def _refuse(self, method: str) -> Callable:
        def behavior(_requests: Any, context: grpc.ServicerContext) -> Any:
            call = CallRecord(method=method)
            call.decision, call.code, call.reason, call.rule = (
                "denied",
                "UNIMPLEMENTED",
                "UNIMPLEMENTED",
                "wrap",
            )
            self._append(call, context, method)
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} cannot be served audited; it is disabled")

        return behavior

    def _open(self, context: grpc.ServicerContext, call: CallRecord, pending: _Pending) -> str:
        """Identity and the client's deadline: the same for unary calls and streams.

        Returns the consumer; admission (`_enter`) follows.
        """
        consumer = self.identify(context, call)
        if pending.late:
            raise ServerStopping(
                "the server is stopping; retry on another replica or once it is back",
                rule="server.stopping",
                retry_after_seconds=1,
            )
        call.deadline = client_deadline(context.time_remaining())
        if call.deadline is not None and call.deadline <= time.monotonic():
            # It waited out its deadline before a thread took it: recorded, never run.
            raise DeadlineExceeded(
                "the client's deadline passed before the request was admitted", rule="deadline"
            )
        return consumer

    @staticmethod
    def _parse(handler: Any, raw: bytes, call: CallRecord) -> Any:
        try:
            return handler.request_deserializer(raw)
        except DecodeError:
            call.unparsed(raw)
            raise InvalidQuery("the request is not a valid protobuf message", rule="wire") from None

    def _wrap_stream(self, method: str, handler: Any) -> Callable:
        """A server stream: identity and admission at open, a record at open, per message and at close.

        The admission slot is held only while the stream opens: a watch lasts as long
        as its consents, and the subject service caps how many are open at once.
        """
        pending = _Pending(method, late=self.stopping.is_set())

        def behavior(raw: bytes, context: grpc.ServicerContext) -> Any:
            pending.started = True
            call = CallRecord(method=method, stream_event="open", messages=0)
            leave: Callable[[], None] | None = None
            try:
                leave, _ = self._enter(method, self._open(context, call, pending), None, call, context)
                request = self._parse(handler, raw, call)
            except RequestError as exc:
                self._refused(call, exc)
                context.abort_with_status(
                    to_status(exc, self._proven(self._append(call, context, method), context))
                )
            finally:
                if leave is not None:
                    leave()
            call.allowed()
            self._append(call, context, method)
            error: RequestError | None = None
            failed = False
            try:
                for response in handler.unary_stream(request, CallContext(context, call)):
                    call.stream_event, call.messages = "message", (call.messages or 0) + 1
                    receipt = self._append(call, context, method)  # before the message goes out
                    call.evaluations = None
                    fill_receipt(response.receipt, self._proven(receipt, context))
                    yield response
            except RequestError as exc:
                error = exc
            except GeneratorExit:  # gRPC dropped the stream (client gone, server stopping)
                call.stream_event, call.evaluations = "close", None
                call.decision, call.code = "allowed", "CANCELLED"
                self.audit.append(call.to_record(self.policies.current.version))
                raise
            except Exception:
                log.exception("internal error in %s", method)
                failed = True
            call.stream_event, call.evaluations = "close", None
            if error is not None:
                self._refused(call, error)
                call.evaluations = None  # the messages carried them; the close record does not
            elif failed:
                call.failed("INTERNAL")
            elif not context.is_active():
                call.code = "CANCELLED"
            receipt = self._append(call, context, method)
            if error is not None:
                context.abort_with_status(to_status(error, self._proven(receipt, context)))
            if failed:
                context.abort_with_status(internal_status(receipt))

        if self.pool is not None:
            wrapped: Any = behavior  # grpcio reads the pool off the function's attributes
            wrapped.experimental_thread_pool = self.pool  # streams run on the dataops.v1 pool too
            wrapped.dataops_pending = pending
        return behavior

    def _wrap(self, method: str, handler: Any) -> Callable:
        pending = _Pending(method, late=self.stopping.is_set())

        def behavior(raw: bytes, context: grpc.ServicerContext) -> Any:
            pending.started = True
            call = CallRecord(method=method)
            response: Any = None  # the handler's response message
            error: RequestError | None = None
            request = None
            leave: Callable[[], None] | None = None
            try:
                consumer = self._open(context, call, pending)
                # Parsed before admission: the lane depends on the request's mode.
                request = self._parse(handler, raw, call)
                leave, scan_slot = self._enter(method, consumer, request, call, context)
                response = handler.unary_unary(request, CallContext(context, call, scan_slot))
                call.allowed()
            except RequestError as exc:
                self._refused(call, exc)
                if request is not None:
                    call.attempted(request)  # a refused query is recorded even when it never planned
                error = exc
            except Exception as exc:
                log.exception("internal error in %s", method)
                self._failed(call, exc)
                error = None
            finally:
                if leave is not None:
                    leave()
            try:
                receipt = self.audit.append(call.to_record(self.policies.current.version))
            except AuditUnavailable:
                log.exception("audit append failed; refusing %s", method)
                context.abort(
                    grpc.StatusCode.UNAVAILABLE, "the audit log is unavailable; nothing was released"
                )
            if error is not None:
                context.abort_with_status(to_status(error, self._proven(receipt, context)))
            if response is None:
                context.abort_with_status(internal_status(receipt))
            # With the inclusion proof, the signed checkpoint and, if the client holds one,
            # the consistency proof from it: every client is a witness (dataops.client).
            fill_receipt(response.receipt, self._proven(receipt, context))
            return response

        if self.pool is not None:
            wrapped: Any = behavior  # grpcio reads the pool off the function's attributes
            wrapped.experimental_thread_pool = self.pool  # grpcio runs the behavior there
            wrapped.dataops_pending = pending
        return behavior
