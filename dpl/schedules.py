"""Learning-rate schedules as pure functions of the optimizer step.

The lr at a step depends only on (step, steps per epoch, config), so a resumed run
needs no scheduler state beyond the step counter. Every schedule starts with a linear
warmup over ``warmup_epochs`` (Goyal et al. 2017, "Accurate, Large Minibatch SGD"),
which the large-batch optimizers need.
"""

from __future__ import annotations

import math
from typing import Callable

from dpl.registry import lookup

# factor(progress, cfg, epochs) -> multiplier of the base lr after warmup; progress in [0, 1]
# is the fraction of the post-warmup steps done, epoch the (fractional) epoch.
Schedule = Callable[[float, float, object], float]


def _cosine(progress: float, epoch: float, cfg) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _constant(progress: float, epoch: float, cfg) -> float:
    return 1.0


def _step(progress: float, epoch: float, cfg) -> float:
    return cfg.gamma ** int(epoch // cfg.step_epochs)


def _poly(progress: float, epoch: float, cfg) -> float:
    return (1.0 - progress) ** cfg.power


SCHEDULERS: dict[str, Schedule] = {"cosine": _cosine, "constant": _constant, "step": _step, "poly": _poly}
_FLOORED = {"cosine", "poly"}  # schedules that anneal towards scheduler.min_lr


def lr_at(step: int, steps_per_epoch: int, epochs: int, base_lr: float, warmup_epochs: float, cfg) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of a run of ``epochs`` epochs."""
    schedule = lookup(SCHEDULERS, "scheduler", cfg.name)
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    total = max(epochs * steps_per_epoch - warmup_steps, 1)
    progress = min((step - warmup_steps) / total, 1.0)
    factor = schedule(progress, step / steps_per_epoch, cfg)
    if cfg.name in _FLOORED:
        return cfg.min_lr + (base_lr - cfg.min_lr) * factor
    return base_lr * factor
