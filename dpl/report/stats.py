"""Statistics over seeds: the interval of a group's mean, and whether two groups can be told apart.

A group is the runs of one configuration that differ only in their seed; its numbers are a
sample of what that configuration gives. :func:`describe` is the sample's mean with a 95 %
confidence interval from Student's t with n − 1 degrees of freedom; :func:`compare` is the
difference of two groups' means with its interval and a two-sided p-value, from a paired t-test
when both groups ran exactly the same seeds (each run of one has its twin in the other, so the
seed's share of the spread cancels) and from Welch's unequal-variance t-test otherwise;
:func:`holm` adjusts a family of p-values for the number of comparisons made (Holm 1979,
"A simple sequentially rejective multiple test procedure", Scand. J. Statist. 6:65-70).
The t quantiles and tests are scipy.stats'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
INTERVAL = "95 % CI, Student's t with n−1 df"  # what the tables say their ± is
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
