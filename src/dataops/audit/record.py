"""What one RPC leaves in the audit log.

The interceptor opens a `CallRecord` for every RPC and each layer of the flow fills
in what it learns (consumer, dataset, canonical query, deciding rule, rows), so a
request that fails half-way still leaves a record saying how far it got.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from dataops.errors import RequestError


@dataclass
class CallRecord:
    method: str
    # Links the audit record to the ledger reservation it made, if any.
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    time: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"))
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
    # time.monotonic() by which the client stops waiting (its gRPC deadline); not audited.
    deadline: float | None = None

    def allowed(self, rule: str = "grant") -> None:
        self.decision, self.code, self.rule = "allowed", "OK", self.rule or rule

    def refused(self, error: RequestError) -> None:
        # "invalid" is the consumer's malformed request; "denied" is a policy or control decision.
        self.decision = "invalid" if error.code.name == "INVALID_ARGUMENT" else "denied"
        self.code = error.code.name
        self.reason = error.reason
        self.rule = error.rule
        self.column = error.column

    def failed(self, code: str) -> None:
        self.decision, self.code, self.reason = "error", code, "INTERNAL"

    def to_record(self, policy_version: str) -> dict[str, Any]:
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
        }


_current: contextvars.ContextVar[CallRecord] = contextvars.ContextVar("dataops_call")


def open_call(record: CallRecord) -> contextvars.Token:
    return _current.set(record)


def close_call(token: contextvars.Token) -> None:
    _current.reset(token)


def current_call() -> CallRecord:
    """The record of the RPC this thread is serving."""
    return _current.get()
