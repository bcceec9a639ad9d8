"""What one RPC leaves in the audit log.

The interceptor opens a `CallRecord` for every RPC and each layer of the flow fills
in what it learns (consumer, dataset, canonical query, deciding rule, rows), so a
request that fails half-way still leaves a record saying how far it got.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from dataops.errors import InternalError, RequestError

# An attempted query that never became a canonical one is recorded as sent, up to this
# many characters: a reviewer sees what was asked, and a huge request cannot bloat the log.
MAX_ATTEMPT_CHARS = 2048


@dataclass
class CallRecord:
    method: str
    # Links the audit record to the ledger reservation it made, if any.
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    time: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"))
    consumer: str | None = None
    dataset: str | None = None
    query: str | None = None
    mode: str | None = None
    purpose: str | None = None
    decision: str = "error"
    code: str = "OK"
    reason: str | None = None
    rule: str | None = None
    column: str | None = None
    rows_returned: int | None = None
    rows_suppressed: int | None = None
    epsilon_spent: float = 0.0
    delta_spent: float = 0.0
    reused: bool = False
    # Aggregate mode: the protected table the answer was looked up in.
    table: str | None = None
    table_fingerprint: str | None = None
    # time.monotonic() by which the client stops waiting (its gRPC deadline); not audited.
    deadline: float | None = None
    # Subject evaluations: per evaluation the product, consent id, keyed subject hash
    # and outputs hash (never the subject id or an output value). Audited when set.
    evaluations: list[dict[str, Any]] | None = None
    # Streams leave a record when they open, one per message and one when they close.
    stream_event: str | None = None
    messages: int | None = None

    @property
    def caller(self) -> str:
        """The consumer the interceptor identified (it does so before any servicer runs)."""
        if self.consumer is None:
            raise InternalError(f"{self.method}: no consumer was identified")
        return self.consumer

    @property
    def evaluation_entries(self) -> list[dict[str, Any]]:
        """The subject evaluations the evaluator recorded for this call (it always records some)."""
        if self.evaluations is None:
            raise InternalError(f"{self.method}: no evaluations were recorded")
        return self.evaluations

    def allowed(self, rule: str = "grant") -> None:
        self.decision, self.code, self.rule = "allowed", "OK", self.rule or rule

    def refused(self, error: RequestError) -> None:
        # "invalid" is the consumer's malformed request; "denied" is a policy or control decision.
        self.decision = "invalid" if error.code.name == "INVALID_ARGUMENT" else "denied"
        self.code = error.code.name
        self.reason = error.reason
        self.rule = error.rule
        self.column = error.column

    def attempted(self, request: Any) -> None:
        """Record a refused query request as far as it parsed, when planning never recorded
        the canonical query (malformed, over a limit): `{"attempted": <the request as JSON>}`."""
        if self.query is not None or not any(f.name in ("query", "sql") for f in request.DESCRIPTOR.fields):
            return
        from google.protobuf.json_format import MessageToDict

        text = json.dumps(
            MessageToDict(request, preserving_proto_field_name=True),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        if len(text) <= MAX_ATTEMPT_CHARS - 20:
            self.query = '{"attempted":' + text + "}"
            return
        keep = MAX_ATTEMPT_CHARS
        while True:  # the prefix is escaped again inside the JSON string: shrink until it fits
            bounded = json.dumps(
                {"attempted_prefix": text[:keep], "attempted_chars": len(text)}, ensure_ascii=False
            )
            if len(bounded) <= MAX_ATTEMPT_CHARS:
                self.query = bounded
                return
            keep = keep * 3 // 4

    def unparsed(self, raw: bytes) -> None:
        """A request that is not even protobuf: its first bytes, hex-encoded, and its size."""
        self.query = json.dumps({"unparsed_hex": raw[:256].hex(), "unparsed_bytes": len(raw)})

    def failed(self, code: str) -> None:
        self.decision, self.code, self.reason = "error", code, "INTERNAL"

    def to_record(self, policy_version: str) -> dict[str, Any]:
        record = self._record(policy_version)
        if self.evaluations is not None:
            record["evaluations"] = self.evaluations
        if self.stream_event is not None:
            record["stream_event"] = self.stream_event
            record["messages"] = self.messages
        return record

    def _record(self, policy_version: str) -> dict[str, Any]:
        return {
            "time": self.time,
            "request_id": self.request_id,
            "consumer": self.consumer,
            "method": self.method,
            "dataset": self.dataset,
            "query": self.query,
            "mode": self.mode,
            "purpose": self.purpose,
            "decision": self.decision,
            "code": self.code,
            "reason": self.reason,
            "rule": self.rule,
            "column": self.column,
            "rows_returned": self.rows_returned,
            "rows_suppressed": self.rows_suppressed,
            "epsilon_spent": self.epsilon_spent,
            "delta_spent": self.delta_spent,
            "reused": self.reused,
            "latency_ms": round((time.perf_counter() - self.started) * 1000, 3),
            "policy_version": policy_version,
            # Only exact answers name a table; other records keep their shape.
            **({"table": self.table, "table_fingerprint": self.table_fingerprint} if self.table else {}),
        }


_current: contextvars.ContextVar[CallRecord] = contextvars.ContextVar("dataops_call")


def open_call(record: CallRecord) -> contextvars.Token:
    return _current.set(record)


def close_call(token: contextvars.Token) -> None:
    _current.reset(token)


def current_call() -> CallRecord:
    """The record of the RPC this thread is serving."""
    return _current.get()
