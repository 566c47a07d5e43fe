"""Dynamic local steps: the number H of local steps between averages, chosen per epoch.

LocalSGD (Stich 2019, "Local SGD Converges Fast and Communicates Little"; Lin et al.
2020, "Don't Use Large Mini-Batches, Use Local SGD") lets K workers take H local
steps and then average their parameters, so a larger H sends fewer bytes but lets
the workers drift apart. The reference study proposed adjusting H during training:
on a fixed schedule (linear, powers of two, sigmoid, reverse cosine) or in reaction
to the validation metrics (accuracy improvement, loss trend, windowed mean loss).

Each strategy is a pure function of an :class:`HContext` and the ``dynamic_h``
config node: no hidden state, so a resumed run recomputes exactly the H of an
uninterrupted one from the saved per-epoch history. Every bound and shape value
(h_min, h_max, patience, n_losses, midpoint, steepness, the divisors) comes from the
YAML file in ``conf/dynamic_h/``; the registry :data:`STRATEGIES` is keyed by those
file names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from dpl.registry import lookup


@dataclass(frozen=True)
class HContext:
    """What a strategy may look at when choosing H for the epoch about to start."""

    epoch: int  # 0-based index of the epoch about to start
    epochs: int  # total epochs of the run
    steps_per_epoch: int  # local steps per worker per epoch
    H0: int  # the configured H (top-level key H)
    history: Sequence[Mapping[str, float]]  # one record per finished epoch: at least H, val_loss, val_acc


Strategy = Callable[[HContext, Any], int]


# ----------------------------------------------------------------------------- helpers


def _round(x: float) -> int:
    """Round half up: Python's round() goes to even, which would make 4.5 -> 4 but 5.5 -> 6."""
    return math.floor(x + 0.5)


def _clamp(h: int, cfg) -> int:
    return max(cfg.h_min, min(cfg.h_max, h))


def _move(h: int, direction: int) -> int:
    """+1 doubles H, -1 halves it, 0 keeps it."""
    return h * 2 if direction > 0 else h // 2 if direction < 0 else h


def _current(ctx: HContext, cfg) -> int:
    """The H used in the last finished epoch; H0 clamped to the bounds before the first."""
    return int(ctx.history[-1]["H"]) if ctx.history else _clamp(ctx.H0, cfg)


def _progress(ctx: HContext) -> float:
    """epoch / (epochs - 1) in [0, 1]: 0 at the first epoch, 1 at the last (0 for a 1-epoch run)."""
    return ctx.epoch / (ctx.epochs - 1) if ctx.epochs > 1 else 0.0


def _steps_bounds(ctx: HContext, cfg) -> tuple[float, float]:
    """The sigmoid / reverse-cosine range: a fraction of the steps in one epoch."""
    return ctx.steps_per_epoch / cfg.low_divisor, ctx.steps_per_epoch / cfg.high_divisor


def _logistic(z: float) -> float:
    """1 / (1 + e^-z) without overflow for large |z|."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _doublings(cfg) -> list[int]:
    """h_min, 2 h_min, 4 h_min, ... up to h_max (4, 8, 16, 32, 64 with the study's bounds)."""
    powers = [cfg.h_min]
    while powers[-1] * 2 <= cfg.h_max:
        powers.append(powers[-1] * 2)
    return powers


# ----------------------------------------------------------------------------- schedules


def constant(ctx: HContext, cfg) -> int:
    return ctx.H0


def asc_linear(ctx: HContext, cfg) -> int:
    """H_e = h_min + (h_max - h_min) e / (epochs - 1), rounded."""
    return _round(cfg.h_min + (cfg.h_max - cfg.h_min) * _progress(ctx))


def desc_linear(ctx: HContext, cfg) -> int:
    return _round(cfg.h_max - (cfg.h_max - cfg.h_min) * _progress(ctx))


def _pow2_stage(ctx: HContext, powers: list[int]) -> int:
    """The epochs split into len(powers) equal stages; the power of the stage holding ``epoch``."""
    stage = min(len(powers) - 1, ctx.epoch * len(powers) // ctx.epochs)
    return powers[stage]


def asc_pow2(ctx: HContext, cfg) -> int:
    return _pow2_stage(ctx, _doublings(cfg))


def desc_pow2(ctx: HContext, cfg) -> int:
    return _pow2_stage(ctx, _doublings(cfg)[::-1])


def sigmoid(ctx: HContext, cfg) -> int:
    """H_e = lo + (hi - lo) / (1 + exp(-steepness (e - midpoint))), lo/hi = steps / divisors."""
    lo, hi = _steps_bounds(ctx, cfg)
    return max(1, _round(lo + (hi - lo) * _logistic(cfg.steepness * (ctx.epoch - cfg.midpoint))))


def rev_cosine(ctx: HContext, cfg) -> int:
    """Cosine annealing run backwards: H_e = lo + (hi - lo)(1 - cos(pi e / (epochs - 1))) / 2."""
    lo, hi = _steps_bounds(ctx, cfg)
    return max(1, _round(lo + (hi - lo) * (1.0 - math.cos(math.pi * _progress(ctx))) / 2.0))


# ----------------------------------------------------------------------------- adaptive


def improvement(ctx: HContext, cfg) -> int:
    """Double H after an epoch that beat the best validation accuracy before it; halve it
    after ``patience`` epochs in a row without improvement (the count then restarts).

    The counter is not stored anywhere: it is replayed from the history, which is what
    makes the strategy pure and a resumed run exact.
    """
    if not ctx.history:
        return _clamp(ctx.H0, cfg)
    best, stale, move = -math.inf, 0, 0
    for record in ctx.history:
        if record["val_acc"] > best:  # the first epoch improves on nothing, so it counts
            best, stale, move = record["val_acc"], 0, +1
        else:
            stale += 1
            move = -1 if stale == cfg.patience else 0
            stale %= cfg.patience
    return _clamp(_move(_current(ctx, cfg), move), cfg)


def loss(ctx: HContext, cfg) -> int:
    """Halve H when the validation loss rose in each of the last two epochs, double it
    when it fell in each of them (three finished epochs needed), else keep it."""
    h = _current(ctx, cfg)
    if len(ctx.history) >= 3:
        a, b, c = (r["val_loss"] for r in ctx.history[-3:])
        h = _move(h, -1 if a < b < c else +1 if a > b > c else 0)
    return _clamp(h, cfg)


def avg_loss(ctx: HContext, cfg) -> int:
    """Compare the mean validation loss of the latest ``half = n_losses // 2`` epochs with the
    ``half`` before them: lower -> double H, higher -> halve it, otherwise (or with fewer
    than 2 half finished epochs) keep it."""
    h = _current(ctx, cfg)
    half = max(1, cfg.n_losses // 2)
    if len(ctx.history) >= 2 * half:
        window = [r["val_loss"] for r in ctx.history[-2 * half:]]
        before, latest = sum(window[:half]) / half, sum(window[half:]) / half
        h = _move(h, +1 if latest < before else -1 if latest > before else 0)
    return _clamp(h, cfg)


# ----------------------------------------------------------------------------- registry

STRATEGIES: dict[str, Strategy] = {
    "constant": constant,
    "asc_linear": asc_linear,
    "desc_linear": desc_linear,
    "asc_pow2": asc_pow2,
    "desc_pow2": desc_pow2,
    "improvement": improvement,
    "loss": loss,
    "avg_loss": avg_loss,
    "sigmoid": sigmoid,
    "rev_cosine": rev_cosine,
}


def next_h(ctx: HContext, cfg) -> int:
    """H for the epoch ``ctx.epoch``, by the strategy named ``cfg.name``; always an int >= 1."""
    return max(1, int(lookup(STRATEGIES, "dynamic_h", cfg.name)(ctx, cfg)))
