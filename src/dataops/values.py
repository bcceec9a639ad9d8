"""Value types that both sides of the wire share: what a release cost and how accurate it is.

Dependency-free on purpose: the light client (`dataops.client`) and the server's engines
import the same two classes, so there is one definition of each, and the client install
needs no server package to hold them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AggregateAccuracy:
    """How far a DP value may be from the truth: the noise scale and a 95% half-width."""

    column: str
    noise_scale: float = 0.0
    half_width_95: float = 0.0
    mechanism: str = ""


@dataclass(frozen=True)
class Spend:
    """What a request spent (or would spend) and what remains of the grant's budget."""

    epsilon: float = 0.0
    delta: float = 0.0
    remaining_epsilon: float = 0.0
    remaining_delta: float = 0.0
