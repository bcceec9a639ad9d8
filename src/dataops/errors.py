"""Domain errors.

Two families, kept apart on purpose (as Tumult Analytics does):

* `RequestError` and its subclasses are the consumer's fault or the policy's
  decision. Each carries a neutral `Kind` (what sort of refusal it is), an
  `ErrorInfo` reason and, where it helps, the rule and column that decided. The
  domain knows nothing of the transport: the server maps a kind to its canonical
  gRPC status code (`dataops.server.status`) and builds the `google.rpc.Status` in
  one place (`dataops.server.interceptors`).
  Their messages must never state a data-dependent fact (a group's size, a value):
  they are built only from the query, the policy and the catalog.
* `LoadError` and its subclasses are an operator's mistake in a file; they name
  the file and the key.

Anything else that escapes is a bug and crosses the wire as INTERNAL with no detail.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class Kind(Enum):
    """What sort of refusal an error is, in the domain's words, not the transport's."""

    INVALID = "invalid"  # the request is malformed: the consumer's mistake
    NOT_FOUND = "not_found"  # nothing by that name in the caller's zone
    DENIED = "denied"  # a policy decision: the consumer may not do this
    UNAUTHENTICATED = "unauthenticated"  # no valid, unrevoked identity
    PRECONDITION = "precondition"  # refused in the current state (an output control, a file to fix)
    EXHAUSTED = "exhausted"  # a budget, rate or complexity limit is used up
    DEADLINE = "deadline"  # the client's deadline passed; nothing was released
    UNAVAILABLE = "unavailable"  # not ready or stopping; retrying later may succeed


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    subject: str
    description: str


class RequestError(Exception):
    kind: Kind = Kind.INVALID
    reason: str = "INVALID_QUERY"
    # A neutral retry hint: after this many seconds asking again may succeed (something
    # the request needs is being built), or None. The server turns it into a
    # google.rpc.RetryInfo; the domain does not know that type.
    retry_after_seconds: int | None = None

    def __init__(
        self,
        message: str,
        *,
        rule: str | None = None,
        column: str | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        quota_violations: tuple[QuotaViolation, ...] = (),
        retry_after_seconds: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.rule = rule
        self.column = column
        self.field_violations = tuple(field_violations)
        self.quota_violations = tuple(quota_violations)
        self.retry_after_seconds = retry_after_seconds
        # How far the request got before this refusal (`dataops.outcome.Outcome`), set by
        # the request flow so the audit record names what was asked; None before planning.
        self.outcome: Any = None

    @property
    def invalid(self) -> bool:
        """The consumer's malformed request, as opposed to a policy or control decision."""
        return self.kind is Kind.INVALID

    @property
    def metadata(self) -> dict[str, str]:
        """The ErrorInfo metadata: which rule and column decided."""
        meta = {}
        if self.rule:
            meta["rule"] = self.rule
        if self.column:
            meta["column"] = self.column
        if self.retry_after_seconds is not None:  # also for clients that read only ErrorInfo
            meta["retry_after_seconds"] = str(self.retry_after_seconds)
        return meta


class InvalidQuery(RequestError):
    """The request is malformed or names something that does not exist."""


class UnknownDataset(RequestError):
    """No such dataset in the caller's zone (datasets of other zones look the same)."""

    kind = Kind.NOT_FOUND
    reason = "UNKNOWN_DATASET"


class PolicyDenied(RequestError):
    """The consumer's policy does not allow this."""

    kind = Kind.DENIED
    reason = "POLICY_DENIED"


class UnknownConsumer(RequestError):
    """The certificate is valid but no policy names its consumer (or it is revoked)."""

    kind = Kind.DENIED
    reason = "UNKNOWN_CONSUMER"


class Unauthenticated(RequestError):
    kind = Kind.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class OutputControlDenied(RequestError):
    """An output control refused the whole query (e.g. the tracker defence)."""

    kind = Kind.PRECONDITION
    reason = "OUTPUT_CONTROL"


class BudgetExhausted(RequestError):
    kind = Kind.EXHAUSTED
    reason = "BUDGET_EXHAUSTED"


class LimitExceeded(RequestError):
    """The request exceeds a configured complexity or rate limit."""

    kind = Kind.EXHAUSTED
    reason = "LIMIT_EXCEEDED"


class DeadlineExceeded(RequestError):
    """The client's deadline passed before an answer was ready; nothing was released."""

    kind = Kind.DEADLINE
    reason = "DEADLINE_EXCEEDED"


class DataUnavailable(RequestError):
    """The dataset's file cannot be served as catalogued (unreadable, a symlink out of
    the sandbox, or the same content as another entry). The details are the
    operator's and go to the server log; the consumer learns only the dataset id."""

    kind = Kind.PRECONDITION
    reason = "DATASET_UNAVAILABLE"

    def __init__(self, dataset_id: str) -> None:
        super().__init__(
            f"dataset {dataset_id!r} is unavailable until the operator fixes its catalog entry or file",
            rule="catalog.location",
        )


class TableUnavailable(RequestError):
    """The protected table is still being built for the current data version; retry soon.

    Says nothing about the data: only that the table is not ready.
    """

    kind = Kind.UNAVAILABLE
    reason = "TABLE_NOT_READY"

    def __init__(self, message: str, *, retry_after_seconds: int = 5, **kwargs: Any) -> None:
        super().__init__(message, retry_after_seconds=retry_after_seconds, **kwargs)


class CopyUnavailable(RequestError):
    """The DP serving copy of the dataset is being built for its current data version; retry later.

    Says nothing about the data: only that the copy is not ready.
    """

    kind = Kind.UNAVAILABLE
    reason = "DP_COPY_NOT_READY"

    def __init__(self, message: str, *, retry_after_seconds: int = 5, **kwargs: Any) -> None:
        super().__init__(message, retry_after_seconds=retry_after_seconds, **kwargs)


class CopyFailed(CopyUnavailable):
    """The DP serving copy could not be built (see the server log); retried after a back-off."""

    reason = "DP_COPY_FAILED"


class LimitsUnavailable(RequestError):
    """The shared store the replicas' rate limits are kept in cannot be reached: the
    request is refused (fail closed) rather than admitted unlimited; retry soon."""

    kind = Kind.UNAVAILABLE
    reason = "LIMITS_UNAVAILABLE"

    def __init__(self, message: str, *, retry_after_seconds: int = 1, **kwargs: Any) -> None:
        super().__init__(message, retry_after_seconds=retry_after_seconds, **kwargs)


class ServerStopping(RequestError):
    """The server is shutting down: a request that arrives once it has begun to stop is
    refused (and audited) rather than started, and an open watch ends; the client may
    reconnect to another replica, or to this one once it is back."""

    kind = Kind.UNAVAILABLE
    reason = "SERVER_STOPPING"


class LoadError(Exception):
    """An operator-written file is invalid; the message names the file and the key."""


class CatalogError(LoadError):
    pass


class PolicyError(LoadError):
    pass


class ProductError(LoadError):
    """A table or subject product file is wrong; the message names the file and key."""


class ConfigError(LoadError):
    pass


class StateInUse(ConfigError):
    """Another `dataops serve` holds the state directory: a second server on it would
    append to the same audit log and recover the other's open reservations."""


class InternalError(Exception):
    """A bug: an invariant of our own code does not hold."""
