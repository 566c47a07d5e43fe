"""dpl.report.stats on fixed numbers: intervals, paired and Welch tests and Holm's adjustment, each against
scipy called another way or against the formula worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sp

from dpl.report.stats import PAIRED, WELCH, compare, describe, describe_bounded, holm

A = [0.62, 0.55, 0.71, 0.58, 0.66]  # five seeds of one configuration
B = [0.60, 0.50, 0.69, 0.52, 0.61]  # the same five seeds of another


def test_interval_is_students_t_with_n_minus_1_degrees_of_freedom():
    s = describe(A)
    mean, sd = np.mean(A), np.std(A, ddof=1)
    half = sp.t.ppf(0.975, df=4) * sd / math.sqrt(5)  # t quantile 2.7764...: the 95 % two-sided interval
    assert (s.n, s.mean, s.std) == (5, pytest.approx(mean), pytest.approx(sd))
    assert (s.lo, s.hi) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert s.half_width == pytest.approx(half)
    # by hand: [1, 2, 3, 4, 5] has mean 3, sd sqrt(2.5), half-width 2.776445 * sqrt(2.5) / sqrt(5) = 1.963243
    assert describe([1, 2, 3, 4, 5]).half_width == pytest.approx(1.963243, abs=1e-6)


def test_one_run_has_no_interval_and_none_has_nothing():
    one = describe([0.4])
    assert one.n == 1 and one.mean == 0.4
    assert math.isnan(one.std) and math.isnan(one.lo) and math.isnan(one.hi)  # undefined, never zero
    assert describe([]).n == 0 and math.isnan(describe([]).mean)
    same = describe([0.3, 0.3, 0.3])  # no spread: the interval is the value itself
    assert (same.std, same.lo, same.hi) == (0.0, 0.3, 0.3)


def test_paired_when_every_seed_is_shared_equals_scipys_paired_test():
    seeds = [str(s) for s in range(5)]
    d = compare(list(zip(seeds, A)), list(zip(seeds[::-1], B[::-1])))  # order does not matter: seeds pair
    ref = sp.ttest_1samp(np.subtract(A, B), 0.0)  # a paired test is a one-sample test of the differences
    diff = np.subtract(A, B)
    half = sp.t.ppf(0.975, 4) * np.std(diff, ddof=1) / math.sqrt(5)
    assert d.test == PAIRED and (d.n, d.n_baseline) == (5, 5)
    assert d.delta == pytest.approx(diff.mean()) and d.p == pytest.approx(ref.pvalue)
    assert (d.lo, d.hi) == (pytest.approx(diff.mean() - half), pytest.approx(diff.mean() + half))


def test_welch_when_seeds_differ_equals_the_satterthwaite_formula():
    a, b = A, [0.40, 0.52, 0.47]
    d = compare([(str(s), v) for s, v in enumerate(a)], [(str(s + 10), v) for s, v in enumerate(b)])
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    half = sp.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert d.test == WELCH and (d.n, d.n_baseline) == (5, 3)
    assert d.p == pytest.approx(2 * sp.t.sf(abs(t), df))
    assert (d.lo, d.hi) == (pytest.approx(d.delta - half), pytest.approx(d.delta + half))


def test_partly_shared_or_repeated_seeds_are_not_paired():
    half_shared = compare([("0", 0.5), ("1", 0.6), ("2", 0.7)], [("0", 0.4), ("1", 0.5), ("9", 0.55)])
    repeated = compare([("0", 0.5), ("0", 0.6)], [("0", 0.4), ("1", 0.5)])
    assert half_shared.test == WELCH and repeated.test == WELCH


def test_too_few_runs_give_a_difference_without_a_test():
    d = compare([("0", 0.5)], [("0", 0.4), ("1", 0.6)])
    assert d.delta == pytest.approx(0.0) and d.test == "" and math.isnan(d.p) and math.isnan(d.lo)


def test_identical_numbers_are_an_exact_difference_not_a_test():
    runs = [("0", 0.5), ("1", 0.6), ("2", 0.7)]
    same = compare(runs, runs)
    shifted = compare([(s, v + 0.1) for s, v in runs], runs)
    assert (same.delta, same.lo, same.hi, same.p, same.exact) == (0.0, 0.0, 0.0, 1.0, True)
    assert shifted.exact and shifted.p == 0.0 and shifted.delta == pytest.approx(0.1)


def test_holm_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> raised to 0.06; nan untested
    assert holm([0.01, 0.04, 0.03, math.nan, 0.005]) == pytest.approx([0.03, 0.06, 0.06, math.nan, 0.02],
                                                                       nan_ok=True)
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # never above 1
    assert holm([0.02]) == [0.02] and holm([]) == []


# ----------------------------------------------------------------------------- bounded metrics (accuracies)

NEAR_BOUNDS = [[0.995, 0.999, 0.97], [0.001, 0.03, 0.004], [1.0, 0.98], [0.0, 0.02, 0.0], [0.9999, 1.0, 1.0, 0.99],
               [0.5, 0.6, 0.7], A]


@pytest.mark.parametrize("values", NEAR_BOUNDS)
def test_a_bounded_interval_stays_in_its_range_and_holds_the_mean(values):
    s = describe_bounded(values)
    assert (s.n, s.mean, s.std) == (describe(values).n, describe(values).mean, describe(values).std)  # the same sample
    assert 0.0 <= s.lo <= s.mean <= s.hi <= 1.0
    assert s.lo < s.mean < s.hi  # a spread gives an interval of some width, on both sides


def test_near_a_bound_the_t_interval_leaves_the_range_and_the_bounded_one_does_not():
    for values in NEAR_BOUNDS[:4]:  # three seeds at 97-99.9 %: Student's t says up to 103 %
        t, bounded = describe(values), describe_bounded(values)
        assert t.lo < 0.0 or t.hi > 1.0, values
        assert 0.0 <= bounded.lo and bounded.hi <= 1.0, values


def test_the_bounded_interval_is_the_logit_interval_by_hand():
    # p = mean, se = sd / sqrt(n); logit(p) +- t(0.975, n-1) * se / (p (1 - p)), mapped back by expit
    p, sd, n = np.mean(A), np.std(A, ddof=1), len(A)
    half = sp.t.ppf(0.975, n - 1) * sd / math.sqrt(n) / (p * (1 - p))
    logit = math.log(p / (1 - p))
    expit = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    s = describe_bounded(A)
    assert (s.lo, s.hi) == (pytest.approx(expit(logit - half)), pytest.approx(expit(logit + half)))
    # a range other than [0, 1] (an accuracy in percent) is the same interval, scaled
    pct = describe_bounded([100 * a for a in A], lo=0.0, hi=100.0)
    assert (pct.lo, pct.hi) == (pytest.approx(100 * s.lo), pytest.approx(100 * s.hi))


def test_away_from_the_bounds_the_bounded_interval_is_the_t_interval_to_first_order():
    values = [0.50, 0.501, 0.499, 0.5005]  # a small spread about one half: the logit is nearly straight
    t, bounded = describe(values), describe_bounded(values)
    assert (bounded.lo, bounded.hi) == (pytest.approx(t.lo, abs=1e-6), pytest.approx(t.hi, abs=1e-6))


def test_the_bounded_interval_keeps_describes_cases_and_refuses_values_outside_the_range():
    one, same = describe_bounded([0.99]), describe_bounded([1.0, 1.0, 1.0])
    assert one.n == 1 and math.isnan(one.lo) and math.isnan(one.hi)  # one seed: undefined, never zero
    assert (same.lo, same.hi) == (1.0, 1.0) and describe_bounded([]).n == 0
    with pytest.raises(ValueError, match=r"1\.2 is outside \[0, 1\]"):
        describe_bounded([0.9, 1.2])
