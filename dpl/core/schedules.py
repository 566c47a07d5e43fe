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

Each option of the ``scheduler`` group is registered here with its schema; its builder makes the
main schedule ``main(optimizer, T, cfg, units_per_epoch)`` after warmup. torch is imported where a
table is built, so the registry loads without it.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING

from dpl.config.schema import at_least, check, key, one_of, positive
from dpl.registry import Registry

SCHEDULERS = Registry("scheduler", "the learning rate over the run, after warmup")
INTERVALS = ("step", "epoch")


@dataclass
class SchedulerBase:
    """Learning-rate schedule after ``warmup_epochs`` of linear warmup (see the module doc)."""

    name: str = key(MISSING, "the schedule (an option of the group)")
    interval: str = key("step", "step: the lr moves every optimizer step | epoch: once per epoch (the study)")
    warmup_start_factor: Optional[float] = key(None, "warm up from this x lr over warmup_epochs (the study: 0.1); "
                                                     "null: (t+1)/W x lr")

    def __post_init__(self) -> None:
        one_of("scheduler.interval", self.interval, INTERVALS)
        if self.warmup_start_factor is not None:
            check(0.0 < self.warmup_start_factor <= 1.0, "scheduler.warmup_start_factor",
                  self.warmup_start_factor, "null or 0 < x <= 1")


@dataclass
class DecayToFloorBase(SchedulerBase):
    min_lr: float = key(0.0, "the floor the lr decays to")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("scheduler.min_lr", self.min_lr, 0.0)


@dataclass
class PolyConfig(DecayToFloorBase):
    power: float = key(2.0, "lr = min_lr + (lr0 - min_lr) (1 - t/T)^power")

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("scheduler.power", self.power)


@dataclass
class StepConfig(SchedulerBase):
    step_epochs: int = key(30, "multiply the lr by gamma every this many epochs after warmup")
    gamma: float = key(0.1, "the factor")

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("scheduler.step_epochs", self.step_epochs, 1, "an integer")
        check(0.0 < self.gamma <= 1.0, "scheduler.gamma", self.gamma, "0 < x <= 1")


@SCHEDULERS.register("cosine", DecayToFloorBase)
def cosine(opt: Any, T: int, cfg: Any, per_epoch: int) -> Any:
    """Cosine annealing to ``min_lr`` at the last step (Loshchilov & Hutter 2017, SGDR eq. 5, no restarts)."""
    from torch.optim import lr_scheduler

    return lr_scheduler.CosineAnnealingLR(opt, T_max=T, eta_min=cfg.min_lr)


@SCHEDULERS.register("constant", SchedulerBase)
def constant(opt: Any, T: int, cfg: Any, per_epoch: int) -> Any:
    """The lr as it is after warmup."""
    from torch.optim import lr_scheduler

    return lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


@SCHEDULERS.register("step", StepConfig)
def step(opt: Any, T: int, cfg: Any, per_epoch: int) -> Any:
    """Multiply by ``gamma`` every ``step_epochs`` epochs after warmup."""
    from torch.optim import lr_scheduler

    return lr_scheduler.StepLR(opt, step_size=cfg.step_epochs * per_epoch, gamma=cfg.gamma)


@SCHEDULERS.register("poly", PolyConfig)
def poly(opt: Any, T: int, cfg: Any, per_epoch: int) -> Any:
    """(1 - t/T)^power decay from lr to ``min_lr``: PyTorch's ``PolynomialLR`` decays to 0, so a floor needs
    the same curve on (lr - min_lr)."""
    from torch.optim import lr_scheduler

    base = opt.param_groups[0]["lr"]
    floor = cfg.min_lr / base if base > 0 else 0.0
    return lr_scheduler.LambdaLR(opt, lambda t: floor + (1.0 - floor) * (1.0 - min(t, T) / T) ** cfg.power)


def lr_table(cfg, base_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: float,
             max_steps: Optional[int] = None, warmup_steps: Optional[int] = None) -> list[float]:
    """The lr of every scheduler step of the run: ``epochs`` values (interval epoch) or
    ``epochs x steps_per_epoch`` (interval step); with a budget of ``max_steps`` steps, that many (interval
    step) or the epochs they touch. ``warmup_steps`` (interval step) replaces ``warmup_epochs``. ``cfg``
    is the ``scheduler`` node."""
    import torch

    main = SCHEDULERS[cfg.name].build
    per_epoch = steps_per_epoch if cfg.interval == "step" else 1
    if max_steps is None:
        total = epochs * per_epoch
    else:
        total = max_steps if cfg.interval == "step" else math.ceil(max_steps / steps_per_epoch)
    check_table_size(total, epochs, steps_per_epoch, max_steps)
    if total > LONG_TABLE_STEPS:
        logging.getLogger("dpl").info("tabulating the lr of %d scheduler steps (about %d s)", total, total // 50_000)
    warmup = min(round(warmup_epochs * per_epoch) if warmup_steps is None else warmup_steps, total)
    opt = torch.optim.SGD([torch.zeros(0)], lr=base_lr)
    sched = _with_warmup(opt, main(opt, max(total - warmup, 1), cfg, per_epoch), warmup,
                         cfg.warmup_start_factor)
    out = []
    # SequentialLR's internal step(0) calls warn about the epoch argument, and every step warns that the
    # optimizer did not step: it need not, the lr a scheduler computes does not depend on it (and its step
    # was half the time of a table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(total):
            out.append(float(opt.param_groups[0]["lr"]))
            sched.step()
    return out


# The most scheduler steps a run's lr table holds: 80 MB on the device (float64), and 1-3 minutes to tabulate
# (torch's schedulers take 3-20 us a step). Far beyond the papers' runs (ImageNet, 90 epochs: ~450k steps at
# batch 256); a table over LONG_TABLE_STEPS says so in the log before it is built.
MAX_TABLE_STEPS = 10**7
LONG_TABLE_STEPS = 10**6


def check_table_size(total: int, epochs: int, steps_per_epoch: int, max_steps: Optional[int]) -> None:
    """Refuse a run longer than :data:`MAX_TABLE_STEPS` scheduler steps in one line, before tabulating it
    (``epochs=1e11`` would otherwise tabulate for hours in silence)."""
    if total <= MAX_TABLE_STEPS:
        return
    from dpl.errors import ConfigError

    if max_steps is not None:
        raise ConfigError(f"max_steps={max_steps} is invalid: allowed at most {MAX_TABLE_STEPS} (the steps "
                          f"an lr schedule spans)")
    raise ConfigError(f"epochs={epochs} is invalid with {steps_per_epoch} steps per epoch: allowed at most "
                      f"{MAX_TABLE_STEPS // steps_per_epoch} (the lr schedule spans at most {MAX_TABLE_STEPS} "
                      f"steps; max_steps= cuts a run shorter)")


def _with_warmup(opt: Any, main: Any, warmup: int, start_factor: Optional[float]) -> Any:
    from torch.optim import lr_scheduler

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


LR_SCALINGS = ("none", "linear", "sqrt")


def scaled_lr(lr: float, rule: str, batch: int, base_batch: int) -> float:
    """The base lr for a global batch of ``batch`` samples per step, given ``lr`` tuned at ``base_batch``.

    ``linear``: lr * batch / base_batch (Goyal et al. 2017, "Accurate, Large Minibatch SGD", Sec. 2.1);
    ``sqrt``: lr * sqrt(batch / base_batch), which keeps the variance of the update constant
    (Krizhevsky 2014, "One weird trick"; Hoffer et al. 2017); ``none``: lr as given.
    The global batch is K * batch_size: LocalSGD scales its inner lr by the K workers too (Lin et al. 2020).
    """
    ratio = batch / base_batch
    factors = dict(zip(LR_SCALINGS, (1.0, ratio, math.sqrt(ratio))))
    if rule not in factors:
        raise ValueError(f"lr_scaling={rule!r} is invalid: allowed one of {', '.join(factors)}")
    return lr * factors[rule]


class LrSchedule:
    """The run's lr, every step's entry of its table (:func:`lr_table`) on the host and on the device.

    The lr the optimizers read is one device tensor, ``now``: each step copies its entry of the device table
    there (a device-side copy, no host sync), so a captured CUDA graph reads the step's lr on replay. The
    table is float64, so the optimizers multiply by exactly the value a Python float lr had; float32 on
    CUDA (``capturable``), as torch's fused kernels read it (the same number for fp32 weights: their
    kernels multiply in float32 either way).
    """

    def __init__(self, table: list[float], base_lr: float, interval: str, steps_per_epoch: int, device: Any,
                 capturable: bool) -> None:
        import torch

        self.table, self.base_lr, self.interval, self.steps_per_epoch = table, base_lr, interval, steps_per_epoch
        dtype = torch.float32 if capturable else torch.float64
        self.device_table = torch.tensor(table, dtype=dtype, device=device)
        self.now = torch.full((), base_lr, dtype=dtype, device=device)
        self._flags: list[dict[str, Any]] = []

    def index(self, step: int) -> int:
        """The entry of the table global step ``step`` reads (per ``scheduler.interval``)."""
        return min(lr_index(self.interval, step // self.steps_per_epoch, step), len(self.table) - 1)

    def lr(self, step: int) -> float:
        """The lr of global step ``step``."""
        return self.table[self.index(step)]

    def attach(self, optimizer: Any) -> None:
        """Every param group of ``optimizer`` reads :attr:`now`, with the graph-safe flags it was built with
        (``fused``, ``capturable``). Called again after a checkpoint's optimizer state is loaded, which brings
        its own lr and flags (an eager run's)."""
        import torch

        if not self._flags:
            self._flags = [{k: g[k] for k in ("fused", "capturable") if k in g} for g in optimizer.param_groups]
        for group, flags in zip(optimizer.param_groups, self._flags):
            group["lr"] = self.now
            group.update(flags)
        if self._flags and self._flags[0].get("capturable"):  # AdamW: its step counts on the device
            for st in optimizer.state.values():
                if torch.is_tensor(st.get("step")) and st["step"].device != self.now.device:
                    st["step"] = st["step"].to(self.now.device, torch.float32)
