"""Dynamic local steps: the number H of local steps between averages, chosen per epoch.

LocalSGD (Stich 2019, "Local SGD Converges Fast and Communicates Little"; Lin et al.
2020, "Don't Use Large Mini-Batches, Use Local SGD") lets K workers take H local
steps and then average their parameters, so a larger H sends fewer bytes but lets
the workers drift apart. The reference study ("Understanding data-parallel approaches
in Distributed Learning: objectives, challenges, and performance trade-offs") proposed
adjusting H during training: on a fixed schedule (linear, powers of two, sigmoid,
reverse cosine) or in reaction to the validation metrics (accuracy improvement, loss
trend, windowed mean loss). Every
strategy here that carries a study name reproduces the study's function exactly
(tests/test_dynamic_h.py replays 162 H sequences produced by the study's own code,
tests/data/dynamic_h_golden.json.gz, and demands every epoch).

The one-epoch lag. The study calls its strategy once per epoch, *after* that epoch has
been validated, with that epoch's index e, and the H it returns is used in epoch e+1.
So epoch 0 always runs with the configured H (top-level key ``H``, here ``ctx.H0``),
and epoch e >= 1 runs with the strategy evaluated at e-1 -- for the fixed schedules
too, whose formulas are therefore one epoch behind their own index (desc_linear runs
epoch 0 at H0, epoch 1 at h_max). :func:`next_h` is asked for the H of the epoch about
to start, ``ctx.epoch``; it evaluates the study's function at ``ctx.epoch - 1`` with the
finished epochs' history.

Each strategy is a pure function of an :class:`HContext` and the ``dynamic_h``
config node: no hidden state (the adaptive strategies replay their counters from the
history), so a resumed run recomputes exactly the H of an uninterrupted one. Every
bound and shape value (h_min, h_max, patience, n_losses, trend, midpoint, steepness,
the divisors, snap) is a key of the strategy's schema, with the study's values as defaults; each
strategy is registered in :data:`STRATEGIES` with its schema.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from omegaconf import MISSING

from dpl.config.schema import at_least, check, key, positive
from dpl.registry import Registry


@dataclass(frozen=True)
class HContext:
    """What a strategy may look at when choosing H for the epoch about to start."""

    epoch: int  # 0-based index of the epoch about to start
    epochs: int  # total epochs of the run
    steps_per_epoch: int  # local steps per worker per epoch (the study's "budget")
    H0: int  # the configured H (top-level key H): the H of epoch 0
    history: Sequence[Mapping[str, float]]  # one record per finished epoch: at least H, val_loss, val_acc


@dataclass(frozen=True)
class StrategyFacts:
    changes_h: bool = True  # False: every epoch runs with the configured H


# ----------------------------------------------------------------------------- schemas (the study's values)


VARIES = StrategyFacts()
STRATEGIES = Registry("dynamic_h", "how H, the local steps between syncs, changes from epoch to epoch", facts=VARIES)


@dataclass
class DynamicHBase:
    name: str = key(MISSING, "the strategy (an option of the group)")


@dataclass
class HRangeConfig(DynamicHBase):
    """linear / pow2 range, and the halve (H > h_min) / double (H < h_max) guards of the adaptive ones."""

    h_min: int = key(4, "the smallest H of the range (halving stops above it)")
    h_max: int = key(64, "the largest H of the range (doubling stops below it)")

    def __post_init__(self) -> None:
        at_least("dynamic_h.h_min", self.h_min, 1, "an integer")
        check(self.h_max >= self.h_min, "dynamic_h.h_max", self.h_max, f"an integer >= h_min ({self.h_min})")


@dataclass
class ImprovementConfig(HRangeConfig):
    patience: int = key(4, "halve after every epoch once this many in a row had no new best (the study: c > 3)")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("dynamic_h.patience", self.patience, 1, "an integer")


@dataclass
class AvgLossConfig(HRangeConfig):
    n_losses: int = key(10, "act once more than this many val losses exist; two windows of n_losses / 2")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.n_losses >= 2 and self.n_losses % 2 == 0, "dynamic_h.n_losses", self.n_losses,
              "an even integer >= 2 for avg_loss")


@dataclass
class LossConfig(HRangeConfig):
    n_losses: int = key(3, "act once more than this many val losses exist")
    trend: int = key(3, "this many latest val losses must rise (fall) strictly to halve (double) H")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("dynamic_h.n_losses", self.n_losses, 2, "an integer")
        at_least("dynamic_h.trend", self.trend, 2, "an integer")


@dataclass
class RevCosineConfig(DynamicHBase):
    low_divisor: float = key(22.0, "the lower bound of H is steps_per_epoch / this")
    high_divisor: float = key(2.0, "the upper bound of H is steps_per_epoch / this")
    snap: float = key(0.05, "one more sync when the epoch's leftover steps are <= this fraction")

    def __post_init__(self) -> None:
        positive("dynamic_h.low_divisor", self.low_divisor)
        positive("dynamic_h.high_divisor", self.high_divisor)
        check(0 <= self.snap < 1, "dynamic_h.snap", self.snap, "a number in [0, 1)")


@dataclass
class SigmoidConfig(RevCosineConfig):
    midpoint: float = key(75.0, "the epoch of the sigmoid's midpoint")
    steepness: float = key(0.5, "the sigmoid's steepness per epoch")

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("dynamic_h.steepness", self.steepness)


# A strategy gets the context of the epoch about to start (epoch >= 1: at least one
# finished epoch) and returns its H; next_h handles epoch 0.
Strategy = Callable[[HContext, Any], int]


# ----------------------------------------------------------------------------- helpers


def _last(ctx: HContext) -> int:
    """Index of the epoch validated last: the study's strategy argument (the lag)."""
    return ctx.epoch - 1


def _current(ctx: HContext) -> int:
    """The H used in the last finished epoch (the study's running ``ls``)."""
    return int(ctx.history[-1]["H"]) if ctx.history else ctx.H0


def _progress(ctx: HContext) -> float:
    """e / (E - 1) for the epoch e validated last, as the study computes it.

    With the lag, e <= E - 2, so E - 1 >= 1 whenever a schedule is evaluated."""
    return _last(ctx) / (ctx.epochs - 1)


def _halve_or_double(h: int, direction: int, cfg) -> int:
    """The study's move: halve only if H > h_min, double only if H < h_max.

    The guards test H before the move and the result is not clamped, exactly as in the
    study; with H0 = h_min * 2^k (the study's 4 and 8 with 4..64) H stays in the bounds.
    """
    if direction < 0 and h > cfg.h_min:
        return h // 2
    if direction > 0 and h < cfg.h_max:
        return h * 2
    return h


def _logistic(z: float) -> float:
    """1 / (1 + e^-z) in the study's float order; 0 where e^-z overflows."""
    try:
        return 1 / (1 + math.exp(-z))
    except OverflowError:
        return 0.0


def _clamp_round_snap(h: float, budget: int, cfg) -> int:
    """The study's last steps of sigmoid and rev_cosine.

    Clamp round(H) (Python's round: half to even) to [lo, hi], then fit H to the epoch:
    s = budget // H syncs, r = budget % H; if 0 < r <= snap * budget, one more sync and
    H = ceil(budget / s), else H = floor(budget / s) (the largest H giving s syncs).
    """
    lo, hi = _range(budget, cfg)
    h = max(lo, min(hi, round(h)))  # lo / hi may be fractions: h may stay a float here
    syncs = budget // h
    remainder = budget % h
    if remainder > 0 and remainder / budget <= cfg.snap:
        syncs += 1
        return math.ceil(budget / syncs)
    return math.floor(budget / syncs)


def _range(budget: int, cfg) -> tuple[float, float]:
    """The sigmoid / rev_cosine range: budget / low_divisor .. budget / high_divisor (real numbers)."""
    return budget / cfg.low_divisor, budget / cfg.high_divisor


# ----------------------------------------------------------------------------- schedules


@STRATEGIES.register("constant", DynamicHBase, facts=StrategyFacts(changes_h=False))
def constant(ctx: HContext, cfg) -> int:
    """The configured H in every epoch (no study counterpart: the plain LocalSGD of the papers)."""
    return ctx.H0


def _linear(p: float, cfg) -> int:
    # The study: int(p * 120 + 1) // 2 + 4, i.e. (h_max - h_min) p rounded half up after
    # flooring 2 (h_max - h_min) p to an integer; 120 = 2 (64 - 4). p * span2 keeps the
    # study's float order, so e.g. 149/149 * 120 is computed the same way.
    span2 = 2 * (cfg.h_max - cfg.h_min)
    return int(p * span2 + 1) // 2 + cfg.h_min


@STRATEGIES.register("asc_linear", HRangeConfig, facts=VARIES)
def asc_linear(ctx: HContext, cfg) -> int:
    """The study's ALin: H = floor((floor(2 (h_max - h_min) e / (E - 1)) + 1) / 2) + h_min.

    With the study's bounds 4..64: floor((floor(120 e / (E - 1)) + 1) / 2) + 4, from 4
    at e = 0 up to 64 (e = E - 1 is never reached under the lag; the last epoch uses
    e = E - 2). Any h_min <= h_max gives integers from h_min to h_max.
    """
    return _linear(_progress(ctx), cfg)


@STRATEGIES.register("desc_linear", HRangeConfig, facts=VARIES)
def desc_linear(ctx: HContext, cfg) -> int:
    """The study's DLin: asc_linear with 1 - e / (E - 1) in place of e / (E - 1) (h_max down to h_min)."""
    return _linear(1.0 - _progress(ctx), cfg)


def _pow2(p: float, cfg) -> int:
    # The study: 2 ** (int(p * 8 + 1) // 2 + 2), i.e. 4 * 2^k with k = (floor(8 p) + 1) // 2:
    # 8 = 2 * log2(64 / 4) levels of doubling, so the first and last powers get half-length
    # stages. Generalised: h_min * 2^k, k up to n = floor(log2(h_max / h_min)).
    n = (cfg.h_max // cfg.h_min).bit_length() - 1
    return cfg.h_min * 2 ** (int(p * (2 * n) + 1) // 2)


@STRATEGIES.register("asc_pow2", HRangeConfig, facts=VARIES)
def asc_pow2(ctx: HContext, cfg) -> int:
    """The study's ABin: H = h_min * 2^floor((floor(2 n e / (E - 1)) + 1) / 2), n = floor(log2(h_max / h_min)).

    With 4..64 (n = 4) this is 2^(floor((floor(8 e / (E - 1)) + 1) / 2) + 2): 4, 8, 16,
    32, 64, where 4 and 64 hold for half as many epochs as the powers between. If
    h_max / h_min is not a power of two the top is h_min * 2^n, the largest doubling of
    h_min that is <= h_max.
    """
    return _pow2(_progress(ctx), cfg)


@STRATEGIES.register("desc_pow2", HRangeConfig, facts=VARIES)
def desc_pow2(ctx: HContext, cfg) -> int:
    """The study's DBin: asc_pow2 with 1 - e / (E - 1) in place of e / (E - 1) (h_min * 2^n down to h_min)."""
    return _pow2(1.0 - _progress(ctx), cfg)


@STRATEGIES.register("sigmoid", SigmoidConfig, facts=VARIES)
def sigmoid(ctx: HContext, cfg) -> int:
    """The study's Sigmoid: H = lo + (hi - lo) / (1 + exp(-steepness (e - midpoint))),
    lo = budget / low_divisor, hi = budget / high_divisor (budget = steps per epoch; the
    study: 22, 2, midpoint 75, steepness 0.5), then clamp, round and snap
    (:func:`_clamp_round_snap`). h_min / h_max do not apply."""
    lo, hi = _range(ctx.steps_per_epoch, cfg)
    h = lo + (hi - lo) * _logistic(cfg.steepness * (_last(ctx) - cfg.midpoint))
    return _clamp_round_snap(h, ctx.steps_per_epoch, cfg)


@STRATEGIES.register("rev_cosine", RevCosineConfig, facts=VARIES)
def rev_cosine(ctx: HContext, cfg) -> int:
    """The study's RevCosAnn: H = hi - (hi - lo) / 2 (1 + cos(pi e / E)) (E, not E - 1,
    so hi itself is never reached), lo / hi as in :func:`sigmoid`, then clamp, round and
    snap (:func:`_clamp_round_snap`). h_min / h_max do not apply."""
    lo, hi = _range(ctx.steps_per_epoch, cfg)
    h = hi - (hi - lo) / 2 * (1 + math.cos(math.pi * _last(ctx) / ctx.epochs))
    return _clamp_round_snap(h, ctx.steps_per_epoch, cfg)


# ----------------------------------------------------------------------------- adaptive


@STRATEGIES.register("improvement", ImprovementConfig, facts=VARIES)
def improvement(ctx: HContext, cfg) -> int:
    """The study's ImprLS. c = epochs in a row without a new best validation accuracy
    (a strictly higher val_acc resets it to 0; the best starts at 0, so a first epoch
    with val_acc > 0 is a new best). After each epoch: if c >= patience (the study:
    c > 3) halve H, so H halves after *every* further stale epoch; else if c == 0 (a new
    best) double it. Both moves are guarded by the bounds (:func:`_halve_or_double`).

    The counter is replayed from the history, which keeps the strategy pure.
    """
    best, stale = 0.0, 0
    for record in ctx.history:
        if record["val_acc"] > best:
            best, stale = record["val_acc"], 0
        else:
            stale += 1
    direction = -1 if stale >= cfg.patience else +1 if stale == 0 else 0
    return _halve_or_double(_current(ctx), direction, cfg)


def _monotone(values: Sequence[float]) -> int:
    """+1 if strictly rising, -1 if strictly falling, else 0."""
    pairs = list(zip(values, values[1:]))
    return +1 if all(a < b for a, b in pairs) else -1 if all(a > b for a, b in pairs) else 0


@STRATEGIES.register("loss", LossConfig, facts=VARIES)
def loss(ctx: HContext, cfg) -> int:
    """The study's LossLS. Once more than n_losses validation losses exist (the study:
    3, so from the 4th finished epoch on): if the latest ``trend`` losses (the study: 3)
    rose strictly, halve H; if they fell strictly, double it; both guarded by the bounds
    (:func:`_halve_or_double`)."""
    losses = [r["val_loss"] for r in ctx.history]
    h = _current(ctx)
    if len(losses) > cfg.n_losses and len(losses) >= cfg.trend:
        h = _halve_or_double(h, -_monotone(losses[-cfg.trend:]), cfg)
    return h


@STRATEGIES.register("avg_loss", AvgLossConfig, facts=VARIES)
def avg_loss(ctx: HContext, cfg) -> int:
    """The study's AvgLossLS. Once more than n_losses validation losses exist (the study's
    reported runs: 10), compare the mean of the latest n_losses / 2 losses with the mean
    of the n_losses / 2 before them: higher -> halve H, lower -> double it, both guarded
    by the bounds (:func:`_halve_or_double`). n_losses must be even (config check).

    (The published code reads a history key its loop never sets; this is the behaviour
    of the version that produced the reported runs, where that key held the last
    n_losses losses once more than n_losses existed.)
    """
    losses = [r["val_loss"] for r in ctx.history]
    h = _current(ctx)
    if len(losses) > cfg.n_losses:
        half = cfg.n_losses // 2
        latest = sum(losses[-half:]) / half
        before = sum(losses[-2 * half:-half]) / half
        h = _halve_or_double(h, -1 if latest > before else +1 if latest < before else 0, cfg)
    return h


def next_h(ctx: HContext, cfg) -> int:
    """H for the epoch ``ctx.epoch``, by the strategy named ``cfg.name``; always an int >= 1.

    Epoch 0 runs with the configured H; epoch e >= 1 with the strategy evaluated after
    epoch e - 1 (the study's lag, see the module docstring). The floor of 1 only matters
    where the study would crash or stall (sigmoid / rev_cosine with fewer than
    low_divisor steps per epoch, or H = 0 configured)."""
    strategy = STRATEGIES[cfg.name].build
    h = ctx.H0 if ctx.epoch == 0 else strategy(ctx, cfg)
    return max(1, int(h))
