"""What one request did, as the domain reports it: the interceptor writes the audit record from it.

The request flow (`dataops.service.Sandbox`, `dataops.subjects.Evaluator`) fills an
`Outcome` as it goes and returns it with the answer. On a refusal (or a bug) the same
object, as far as the flow got, rides on the exception (`error.outcome`), so a request
refused half-way still leaves a record of the dataset, mode and canonical query it
named. Nothing here knows the audit log or the transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dataops.values import PrivacyLoss


@dataclass
class Outcome:
    dataset: str | None = None
    mode: str | None = None
    # The query's canonical form (`Query.canonical()`): what was asked, as audit and reuse key it.
    query: str | None = None
    # What the answer may be used for: the grant's purpose once authorised, else the request's.
    purpose: str | None = None
    # What this request debited from the ledger (zero for exact answers and reused releases).
    spent: PrivacyLoss = field(default_factory=PrivacyLoss.zero)
    rows_returned: int | None = None
    rows_suppressed: int | None = None
    reused: bool = False
    # Exact answers: the protected table looked up, and its fingerprint.
    table: str | None = None
    table_fingerprint: str | None = None
    # Subject evaluations: one entry per evaluation (product, consent, keyed subject hash,
    # outputs hash; never the subject id or an output value).
    evaluations: list[dict[str, Any]] | None = None
    # The answer itself, for the servicer to translate (an EngineResult, an estimate, views...).
    result: Any = None

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The subject evaluations' audit entries (none for other requests)."""
        return self.evaluations or []

    def attach(self, error: BaseException) -> None:
        """Attach this outcome (how far the request got) to `error`, for the audit record.

        A refusal (`RequestError.outcome`) or a bug alike: an internal error's record
        still names the dataset and query it failed on.
        """
        try:
            error.outcome = self  # type: ignore[attr-defined]
        except AttributeError:  # an exception type with __slots__: the record says less
            pass


def outcome_of(error: BaseException) -> Outcome | None:
    """The outcome a failed request got to, if the flow attached one."""
    outcome = getattr(error, "outcome", None)
    return outcome if isinstance(outcome, Outcome) else None
