"""Numbers around the DP stages that carry no proof of their own: zCDP conversions, accuracy.

`dataops.engines.dp` builds the measurements (the proof-bearing part); what is here
only converts or describes what OpenDP computes for them. The conversion of a zCDP
loss to (epsilon, delta) is OpenDP's (`make_zCDP_to_approxDP`, `make_fix_delta`),
applied to a measurement whose rho is the query's.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import opendp.prelude as dp

dp.enable_features("contrib")


def zcdp_to_epsilon(rho: float, delta: float) -> float:
    """The epsilon OpenDP gives rho-zCDP at delta (make_zCDP_to_approxDP, make_fix_delta).

    OpenDP converts measurements, not numbers: a Gaussian mechanism of scale 1 is
    rho = d^2 / 2 at distance d, so it is mapped at d with d^2 / 2 >= rho (checked
    through its own map, never below), then converted.
    """
    if rho <= 0:
        return 0.0
    base = dp.m.make_gaussian(dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=1.0)
    d = math.sqrt(2 * rho)
    while base.map(d) < rho:
        d = math.nextafter(d, math.inf)
    return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(base), delta).map(d)[0]


def rho_for_epsilon(epsilon: float, delta: float) -> float:
    """The largest rho (to a relative 1e-9) that OpenDP converts to at most epsilon at delta."""
    low, high = 0.0, max(epsilon, 1.0)
    while zcdp_to_epsilon(high, delta) <= epsilon:
        high *= 2
    while high - low > 1e-9 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if zcdp_to_epsilon(middle, delta) <= epsilon else (low, middle)
    return low


def gaussian_accuracy(scale: float, alpha: float) -> float:
    """The (1 - alpha) half-width of discrete Gaussian noise at this scale (integer units).

    OpenDP's own up to a scale of 1e4; above it, where OpenDP's sums over the support
    and takes ever longer (about 1 s at 1e6), the continuous Gaussian's z * scale plus
    one unit: OpenDP's was within one unit of z * scale at 1e4, 1e5 and 1e6 (0.16).
    """
    if scale <= 1e4:
        return float(dp.discrete_gaussian_scale_to_accuracy(float(scale), alpha, T=float))
    return float(NormalDist().inv_cdf(1 - alpha / 2)) * scale + 1.0
