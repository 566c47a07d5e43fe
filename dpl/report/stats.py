"""Statistics over seeds: the interval of a group's mean, and whether two groups can be told apart.

A group is the runs of one configuration that differ only in their seed; its numbers are a
sample of what that configuration gives. :func:`describe` is the sample's mean with a 95 %
confidence interval from Student's t with n − 1 degrees of freedom; :func:`compare` is the
difference of two groups' means with its interval and a two-sided p-value, from a paired t-test
when both groups ran exactly the same seeds (each run of one has its twin in the other, so the
seed's share of the spread cancels) and from Welch's unequal-variance t-test otherwise;
:func:`holm` adjusts a family of p-values for the number of comparisons made (Holm 1979,
"A simple sequentially rejective multiple test procedure", Scand. J. Statist. 6:65-70).
:func:`describe_bounded` is :func:`describe` for a metric that lives in a bounded range (an
accuracy in [0, 1]): the same mean, its interval computed on the logit scale and mapped back, so
that three seeds at 99 % never draw a bar above 100 %.
The t quantiles and tests are scipy.stats'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import special, stats

CONFIDENCE = 0.95
INTERVAL = "95 % CI, Student's t with n−1 df"  # what the tables say their ± is
BOUNDED_INTERVAL = "95 % CI over seeds, t on the logit scale"  # what the figures say of an accuracy's bars
PAIRED, WELCH = "paired", "welch"


@dataclass(frozen=True)
class Summary:
    """n, mean, sample std and the 95 % interval of the mean; std and the interval are nan for n < 2
    (undefined, never zero), everything is nan for n = 0."""

    n: int
    mean: float
    std: float
    lo: float
    hi: float

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def describe(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, sample std (n − 1) and the Student-t confidence interval of the mean of ``values``."""
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    if std == 0.0:  # every seed gave the same number: the interval is that number
        return Summary(n, mean, 0.0, mean, mean)
    lo, hi = stats.t.interval(confidence, n - 1, loc=mean, scale=std / math.sqrt(n))
    return Summary(n, mean, std, float(lo), float(hi))


def describe_bounded(values: Sequence[float], lo: float = 0.0, hi: float = 1.0,
                     confidence: float = CONFIDENCE) -> Summary:
    """:func:`describe` for values in ``[lo, hi]`` (an accuracy: [0, 1]), with an interval that stays there.

    The mean and std are :func:`describe`'s. The interval is the logit-transformed Wald interval
    (the "logit interval" of Brown, Cai & DasGupta 2001, "Interval estimation for a binomial
    proportion", Statist. Sci. 16:101-133), with Student's t for the normal quantile as
    :func:`describe` has: with p the mean as a fraction of the range and se its standard error,
    the delta method gives logit(p) the standard error se / (p (1 − p)), so the interval is
    expit(logit(p) ± t · se / (p (1 − p))) mapped back onto ``[lo, hi]``. expit maps every real
    into (0, 1), so the interval never leaves the range; it is centred on logit(p), so it always
    holds the mean; away from the bounds it is the t-interval to first order, near a bound it
    is shorter towards the bound and longer away from it. No spread gives the zero-width interval at the mean, as
    :func:`describe`; a value outside ``[lo, hi]`` is a ValueError (the range is the caller's claim).
    """
    s = describe(values, confidence)
    if s.n < 2 or s.std == 0.0:
        return s  # no interval (nan) or a zero-width one: nothing that can leave the range
    outside = [v for v in values if not lo <= v <= hi]
    if outside:
        raise ValueError(f"{outside[0]!r} is outside [{lo:g}, {hi:g}]: not a bounded metric's value")
    span = hi - lo
    p = (s.mean - lo) / span
    se = s.std / math.sqrt(s.n) / span
    slope = p * (1.0 - p)
    if slope <= 0.0:  # a mean rounded onto a bound while the values spread: the logit is unbounded there
        return Summary(s.n, s.mean, s.std, lo, hi)
    half = float(stats.t.ppf(0.5 + confidence / 2, s.n - 1)) * se / slope
    centre = float(special.logit(p))
    low, high = (lo + span * float(special.expit(centre + d)) for d in (-half, half))
    # logit and expit round: clamped so that the interval provably holds the mean and stays in range
    return Summary(s.n, s.mean, s.std, min(max(low, lo), s.mean), max(min(high, hi), s.mean))


@dataclass(frozen=True)
class Difference:
    """``group − baseline``: mean difference, its interval, the two-sided p-value and the test used
    (``paired`` or ``welch``; empty when there are too few runs to test). ``exact``: no spread to
    test against (the same numbers on every seed), so p is 1 or 0 by definition, not a test's."""

    delta: float
    lo: float
    hi: float
    p: float
    test: str
    n: int
    n_baseline: int
    exact: bool = False


def compare(group: Sequence[tuple[str, float]], baseline: Sequence[tuple[str, float]],
            confidence: float = CONFIDENCE) -> Difference:
    """Compare two groups given as [(seed, value)].

    Paired t-test on the per-seed differences when both hold the same seeds, each once (at least
    two), else Welch's t-test (at least two runs each). With fewer runs the difference is still the
    difference of the means, but its interval and p are nan. No spread on either side (a departure
    that changes nothing, or a metric that the seed does not move) gives a zero-width interval and
    p = 1 for no difference, 0 for a difference.
    """
    a = np.asarray([v for _, v in group], dtype=np.float64)
    b = np.asarray([v for _, v in baseline], dtype=np.float64)
    n, m = len(a), len(b)
    delta = float(a.mean() - b.mean()) if n and m else math.nan
    seeds, base_seeds = [s for s, _ in group], dict(baseline)
    if n >= 2 and len(set(seeds)) == n and len(base_seeds) == m and set(seeds) == set(base_seeds):
        b = np.asarray([base_seeds[s] for s in seeds], dtype=np.float64)
        test, spread = PAIRED, float(np.ptp(a - b))
    elif n >= 2 and m >= 2:
        test, spread = WELCH, float(np.ptp(a) + np.ptp(b))
    else:
        return Difference(delta, math.nan, math.nan, math.nan, "", n, m)
    if spread == 0.0:  # t is undefined (0/0 or x/0): the difference is exact
        return Difference(delta, delta, delta, 1.0 if delta == 0 else 0.0, test, n, m, exact=True)
    result = stats.ttest_rel(a, b) if test == PAIRED else stats.ttest_ind(a, b, equal_var=False)
    interval = result.confidence_interval(confidence_level=confidence)
    return Difference(delta, float(interval.low), float(interval.high), float(result.pvalue), test, n, m)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (nan entries are not tested and stay nan).

    The i-th smallest of the m tested p-values is multiplied by m − i + 1 (i from 1), each adjusted
    value is at least the one before it, and none exceeds 1. Rejecting where the adjusted value is
    below α keeps the chance of any false rejection in the family at most α.
    """
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted
