"""Learning-rate schedules, built from ``torch.optim.lr_scheduler`` and tabulated once.

A run's whole lr sequence is computed when the trainer is built, by stepping PyTorch's
own schedulers (``LinearLR`` warmup chained to ``CosineAnnealingLR`` & co. with
``SequentialLR``) on a throw-away optimizer. The trainer then reads ``table[i]``: the lr
is a pure function of the step (or epoch) counter, so a resumed run needs no scheduler
state and reproduces an uninterrupted one exactly.

``scheduler.interval`` says what one scheduler step is:
- ``step`` (dpl's default): the lr moves after every optimizer step, as in Goyal et al.
  2017 ("Accurate, Large Minibatch SGD", Sec. 2.2: gradual warmup per iteration);
- ``epoch`` (the reference study): the lr of epoch e is the scheduler's value before its
  e-th ``step()``, i.e. constant within an epoch.

Warmup (Goyal et al. 2017) lasts ``warmup_epochs`` (in scheduler steps: epochs, or
epochs x steps per epoch). With ``scheduler.warmup_start_factor`` = f it is
``LinearLR(start_factor=f, total_iters=W)``: from f x lr to lr over W steps, the main
schedule starting at step W (the study: f = 0.1, per epoch). Left null, the ramp is
(t + 1) / W x lr, reaching lr at the last warmup step (``LinearLR(1/W, total_iters=W-1)``).
After warmup the main schedule runs over the remaining ``T = total - W`` steps.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch.optim import lr_scheduler

from dpl.registry import lookup

# main(optimizer, T, cfg, units_per_epoch) -> the schedule after warmup over T scheduler steps
Main = Callable[[torch.optim.Optimizer, int, object, int], lr_scheduler.LRScheduler]


def _cosine(opt: torch.optim.Optimizer, T: int, cfg, per_epoch: int) -> lr_scheduler.LRScheduler:
    """Cosine annealing to ``min_lr`` at the last step (Loshchilov & Hutter 2017, SGDR eq. 5, no restarts)."""
    return lr_scheduler.CosineAnnealingLR(opt, T_max=T, eta_min=cfg.min_lr)


def _constant(opt: torch.optim.Optimizer, T: int, cfg, per_epoch: int) -> lr_scheduler.LRScheduler:
    return lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


def _step(opt: torch.optim.Optimizer, T: int, cfg, per_epoch: int) -> lr_scheduler.LRScheduler:
    """Multiply by ``gamma`` every ``step_epochs`` epochs after warmup."""
    return lr_scheduler.StepLR(opt, step_size=cfg.step_epochs * per_epoch, gamma=cfg.gamma)


def _poly(opt: torch.optim.Optimizer, T: int, cfg, per_epoch: int) -> lr_scheduler.LRScheduler:
    """(1 - t/T)^power decay from lr to ``min_lr``.

    PyTorch's ``PolynomialLR`` decays to 0; a floor needs the same curve on (lr - min_lr).
    """
    base = opt.param_groups[0]["lr"]
    floor = cfg.min_lr / base if base > 0 else 0.0
    return lr_scheduler.LambdaLR(opt, lambda t: floor + (1.0 - floor) * (1.0 - min(t, T) / T) ** cfg.power)


SCHEDULERS: dict[str, Main] = {"cosine": _cosine, "constant": _constant, "step": _step, "poly": _poly}
INTERVALS = ("step", "epoch")


def lr_table(cfg, base_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: float) -> list[float]:
    """The lr of every scheduler step of the run: ``epochs`` values (interval epoch) or
    ``epochs x steps_per_epoch`` (interval step). ``cfg`` is the ``scheduler`` node."""
    main = lookup(SCHEDULERS, "scheduler", cfg.name)
    per_epoch = steps_per_epoch if cfg.interval == "step" else 1
    total = epochs * per_epoch
    warmup = min(round(warmup_epochs * per_epoch), total)
    opt = torch.optim.SGD([torch.zeros(0)], lr=base_lr)
    sched = _with_warmup(opt, main(opt, max(total - warmup, 1), cfg, per_epoch), warmup,
                         cfg.warmup_start_factor)
    out = []
    with warnings.catch_warnings():  # SequentialLR's internal step(0) calls warn about the epoch argument
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(total):
            out.append(float(opt.param_groups[0]["lr"]))
            opt.step()
            sched.step()
    return out


def _with_warmup(opt: torch.optim.Optimizer, main: lr_scheduler.LRScheduler, warmup: int,
                 start_factor: Optional[float]) -> lr_scheduler.LRScheduler:
    if warmup == 0:
        return main
    if start_factor is None:  # (t + 1) / W: the lr itself at the last warmup step
        ramp = lr_scheduler.LinearLR(opt, start_factor=1.0 / warmup, total_iters=max(warmup - 1, 0))
    else:
        ramp = lr_scheduler.LinearLR(opt, start_factor=start_factor, total_iters=warmup)
    return lr_scheduler.SequentialLR(opt, [ramp, main], milestones=[warmup])


def lr_index(interval: str, epoch: int, global_step: int) -> int:
    """Which entry of :func:`lr_table` a step reads."""
    return epoch if interval == "epoch" else global_step

