"""Value types that both sides of the wire share: privacy loss, what a release cost, how
accurate it is, a budget next to its spend, the audit receipt of a call, and what an
estimate answers.

Dependency-free on purpose: the light client (`dataops.client`) and the server's engines,
catalog, policy and ledger import the same classes, so there is one definition of each,
and the client install needs no server package to hold them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class PrivacyLoss:
    """An (epsilon, delta) privacy loss: a budget, a cap, a cost or a spend.

    Losses compose by basic sequential composition (`+`), and `<=` is the partial order
    a budget check needs: both parts within. `a <= b` is False when either part is over,
    so `not cost <= remaining` is the refusal test and there is no `<` to misread.
    """

    epsilon: float = 0.0
    delta: float = 0.0

    @classmethod
    def zero(cls) -> PrivacyLoss:
        """No loss: what an exact lookup or a reused release costs."""
        return cls(0.0, 0.0)

    def __add__(self, other: PrivacyLoss) -> PrivacyLoss:
        if not isinstance(other, PrivacyLoss):
            return NotImplemented
        return PrivacyLoss(self.epsilon + other.epsilon, self.delta + other.delta)

    def __le__(self, other: PrivacyLoss) -> bool:
        if not isinstance(other, PrivacyLoss):
            return NotImplemented
        return self.epsilon <= other.epsilon and self.delta <= other.delta

    def __ge__(self, other: PrivacyLoss) -> bool:
        if not isinstance(other, PrivacyLoss):
            return NotImplemented
        return other <= self

    def remaining_after(self, spent: PrivacyLoss) -> PrivacyLoss:
        """What is left of this budget once `spent` is gone, never below zero in either part."""
        return PrivacyLoss(max(0.0, self.epsilon - spent.epsilon), max(0.0, self.delta - spent.delta))

    def __iter__(self) -> Iterator[float]:
        """Unpacks as `epsilon, delta = loss`, the order every (epsilon, delta) pair is written in."""
        yield self.epsilon
        yield self.delta


@dataclass(frozen=True)
class AggregateAccuracy:
    """How far a DP value may be from the truth: the noise scale and a 95% half-width."""

    column: str
    noise_scale: float = 0.0
    half_width_95: float = 0.0
    mechanism: str = ""


@dataclass(frozen=True)
class Spend:
    """What a request spent (or would spend) and what remains of the grant's budget.

    Flat fields, as the contract's `Spend` message has them; `loss` and `remaining`
    are the same numbers as `PrivacyLoss` values.
    """

    epsilon: float = 0.0
    delta: float = 0.0
    remaining_epsilon: float = 0.0
    remaining_delta: float = 0.0

    @classmethod
    def of(cls, loss: PrivacyLoss, remaining: PrivacyLoss) -> Spend:
        return cls(loss.epsilon, loss.delta, remaining.epsilon, remaining.delta)

    @property
    def loss(self) -> PrivacyLoss:
        return PrivacyLoss(self.epsilon, self.delta)

    @property
    def remaining(self) -> PrivacyLoss:
        return PrivacyLoss(self.remaining_epsilon, self.remaining_delta)


@dataclass(frozen=True)
class Budget:
    """A budget next to what has been spent of it: a grant's (`consumer` set) or a
    dataset's cap (`consumer` None). The same value on the server (GetBudget) and in
    the client (`DataopsClient.budgets`)."""

    dataset: str
    total: PrivacyLoss
    spent: PrivacyLoss
    consumer: str | None = None

    @property
    def remaining(self) -> PrivacyLoss:
        return self.total.remaining_after(self.spent)

    # The flat names of the contract's `DatasetBudget` message, which clients read.
    @property
    def dataset_id(self) -> str:
        return self.dataset

    @property
    def epsilon_total(self) -> float:
        return self.total.epsilon

    @property
    def delta_total(self) -> float:
        return self.total.delta

    @property
    def epsilon_spent(self) -> float:
        return self.spent.epsilon

    @property
    def delta_spent(self) -> float:
        return self.spent.delta

    @property
    def epsilon_remaining(self) -> float:
        return self.remaining.epsilon

    @property
    def delta_remaining(self) -> float:
        return self.remaining.delta


@dataclass(frozen=True)
class Receipt:
    """Where a call's audit record is, and the proof that a signed checkpoint covers it.

    The contract's `Receipt` message, field for field. The server's audit log makes it
    (`AuditLog.append`, with the consistency proof added for the client's checkpoint by
    `AuditLog.with_consistency`); the client reads it back from the response (or a
    refusal's metadata) and its witness checks it (`dataops.audit.witness`). Without a
    checkpoint it is only the position: `sequence` and `hash`.
    """

    sequence: int
    hash: str
    leaf_index: int = -1  # sequence - 1
    tree_size: int = 0  # the size of `checkpoint`'s tree
    inclusion_path: tuple[bytes, ...] = ()
    checkpoint: str = ""  # the signed note (C2SP)
    record: bytes = b""  # the stored line (without "\n"): its leaf hash is SHA-256(0x00 || record)
    # The tree size of the checkpoint the client said it holds, and the proof from it.
    consistency_from: int = 0
    consistency_path: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Estimate:
    """What EstimateQuery answers: what a query would spend now and what would remain,
    how accurate it would be, and public notes on its terms; nothing was run or spent.

    The server's `Sandbox.estimate` makes it (no `receipt` yet: the interceptor writes
    the audit record and puts its receipt in the response); the client reads it back
    with the receipt. Not the engines' `EngineEstimate`, which is one engine's internal
    quote (cost, rho, the compiled query) before the ledger has been asked what remains.
    """

    spend: Spend
    accuracy: tuple[AggregateAccuracy, ...]
    receipt: Receipt | None = None
    # Public facts about the query's terms (read from no data), e.g. that clipping may bias.
    notes: tuple[str, ...] = ()
