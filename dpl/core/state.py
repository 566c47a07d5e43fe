"""What changes while training, and the bookkeeping beside the loop: the epoch's metric sums, the best
model and early stopping. The loop calls these; it does not do their work.

A per-step metric is one registration (:func:`step_metric`): a function of the step's outputs whose
value is summed on the device every step and divided, at the epoch's end, by the samples seen (or the
steps taken). It lands in the epoch's record, so in ``history.csv``, MLflow and the report, like
``train_loss`` and ``train_acc``, which are registered the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

from dpl.errors import Diverged


@dataclass
class TrainState:
    """Everything that changes while training; saved whole in every checkpoint."""

    epoch: int = 0  # the epoch in progress (or the next one, when step == 0)
    step: int = 0  # steps done in this epoch
    global_step: int = 0
    period: int = 0  # local steps since the period began, counted across epochs (the papers have no epochs)
    H: int = 1  # local steps per period in this epoch
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_acc: float = -1.0  # the validation accuracy of the best record (by best_metric)
    best_score: float = -math.inf  # the best record's best_metric, signed so that higher is better
    best_epoch: int = -1
    recorded_at: int = 0  # the global step of the last record (a checkpoint between a step and its record)
    bad_epochs: int = 0
    stopped_early: bool = False
    # the epoch in progress: its metric sums by name (on the device in Trainer.sums while training; host
    # numbers here, in a checkpoint), the samples this process's workers have seen, and the syncs
    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    syncs: int = 0  # parameter syncs of local methods that landed in this epoch, for the mean drift
    # one worker's samples of the interval's steps, whoever took them: the modelled clock's count (elastic
    # workers away from the run, an asynchronous worker idle, see none of these samples but the step lasts)
    step_samples: int = 0
    compute_s: float = 0.0
    lr: float = 0.0

    def reset_interval(self) -> None:
        """A record was made: the sums of the next one start (an epoch's, or eval_every steps')."""
        self.seen = self.syncs = self.step_samples = 0
        self.sums = {}
        self.compute_s = 0.0


# ----------------------------------------------------------------------------- per-step metrics


@dataclass(frozen=True)
class StepOutputs:
    """What one local step of this process's workers gives its metrics."""

    losses: torch.Tensor  # [K_local]: each worker's mean loss (attached to no graph)
    correct: torch.Tensor  # [K_local]: each worker's correct predictions
    batch: int  # samples per worker (a text window counts its bytes)
    lr: torch.Tensor  # the step's inner lr (a device tensor)
    # 0/1 per worker [K_local]: those whose step counts (an asynchronous method's idle workers' does not);
    # None: every worker's
    weights: Optional[torch.Tensor] = None
    stepped: Optional[int] = None  # how many of them (a host number, so counting samples reads nothing back)

    def counted(self, per_worker: torch.Tensor) -> torch.Tensor:
        """``per_worker`` [K_local] with the workers whose step does not count at zero."""
        return per_worker if self.weights is None else per_worker * self.weights

    @property
    def workers(self) -> int:
        """How many of this process's workers' steps count (a host number: the weights are the host's)."""
        return self.losses.numel() if self.stepped is None else self.stepped


@dataclass(frozen=True)
class StepMetric:
    """A metric every step adds to on the device. The epoch's value is the sum divided by the samples
    this process's workers saw (``per="sample"``) or by the steps (``per="step"``)."""

    name: str
    value: Callable[[StepOutputs], torch.Tensor]
    per: str = "sample"


PER = ("sample", "step")
STEP_METRICS: dict[str, StepMetric] = {}  # by the name the epoch's record gives its value


def step_metric(name: str, per: str = "sample") -> Callable[[Callable[[StepOutputs], torch.Tensor]], Any]:
    """Decorator: register ``value(outputs) -> tensor`` as the per-step metric ``name`` (see the module doc)."""
    if per not in PER:
        raise ValueError(f"per={per!r} is invalid: allowed {', '.join(PER)}")

    def add(value: Callable[[StepOutputs], torch.Tensor]) -> Callable[[StepOutputs], torch.Tensor]:
        if name in STEP_METRICS and STEP_METRICS[name].value.__module__ != value.__module__:
            raise ValueError(f"step metric {name!r} is registered twice: in {STEP_METRICS[name].value.__module__} "
                             f"and in {value.__module__}")
        STEP_METRICS[name] = StepMetric(name, value, per)
        return value

    return add


@step_metric("train_loss")
def train_loss(out: StepOutputs) -> torch.Tensor:
    """The mean training loss of the epoch's samples (text: nats per byte)."""
    return out.counted(out.losses.detach().double()).sum() * out.batch


@step_metric("train_acc")
def train_acc(out: StepOutputs) -> torch.Tensor:
    """The share of the epoch's training samples predicted right (text: of its bytes)."""
    return out.counted(out.correct).sum()


DRIFT = "drift"  # summed at each sync, not each step: the mean over the epoch's syncs


class EpochSums:
    """The epoch's metric sums, on the device: every step adds its metrics without reading them, so the
    step never waits for the device; the epoch's end (or a checkpoint) reads them all at once. The
    samples seen and the syncs are counted on the host."""

    def __init__(self, device: torch.device, names: Iterable[str]) -> None:
        self.totals = {name: torch.zeros((), dtype=torch.float64, device=device) for name in names}
        self.seen = self.syncs = self.step_samples = 0

    def add_step(self, metrics: Iterable[StepMetric], out: StepOutputs) -> None:
        for metric in metrics:
            self.totals[metric.name] += metric.value(out)
        self.seen += out.workers * out.batch
        self.step_samples += out.batch

    def add_sync(self, drift: torch.Tensor) -> None:
        self.totals[DRIFT] += drift
        self.syncs += 1

    def read(self) -> dict[str, float]:
        """Every sum on the host: one device read."""
        values = torch.stack(list(self.totals.values())).tolist()
        return dict(zip(self.totals, values))

    def load(self, sums: dict[str, float], seen: int, syncs: int, step_samples: int = 0) -> None:
        for name, total in self.totals.items():
            total.fill_(sums.get(name, 0.0))  # a metric registered after the checkpoint was written starts at 0
        self.seen, self.syncs, self.step_samples = int(seen), int(syncs), int(step_samples)

    def reset(self) -> None:
        self.load({}, 0, 0, 0)


# ----------------------------------------------------------------------------- the best model, early stopping


def check_finite(train_loss: float, epoch: int) -> None:
    if not math.isfinite(train_loss):
        raise Diverged(f"training loss is {train_loss} in epoch {epoch}")


def track_best(state: Any, record: dict[str, float], metric: str, patience: int) -> bool:
    """Update ``state``'s best record by ``metric`` (``val_acc``: highest; ``val_loss``: lowest), its
    epoch and the early-stopping count (in records: epochs, or eval_every intervals) after ``record``
    (``best_epoch`` counts from 1, as the log and history.csv do); True when it is a new best."""
    score = -record[metric] if metric == "val_loss" else record[metric]
    improved = score > state.best_score
    if improved:
        state.best_score, state.best_val_acc = score, record["val_acc"]
        state.best_epoch, state.bad_epochs = int(record["epoch"]), 0
    else:
        state.bad_epochs += 1
    state.stopped_early = 0 < patience <= state.bad_epochs
    return improved


def drift_term(workers: torch.Tensor, mean: torch.Tensor, K: int, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This process's share of the workers' drift, sum_k ||x_k − x̄|| / (K ||x̄||) over its workers.

    ``workers`` [K_local, n] holds each local worker's parameters flattened together, ``mean`` [n]
    the average x̄ over all K; summed over the processes (the trainer's end-of-epoch sum) the terms
    give mean_k ||x_k − x̄|| / ||x̄||: how far the workers moved apart before a sync. 0 when x̄ = 0 or
    the workers are equal. Float64, so the small differences between workers are not lost to
    rounding, and a 0-dim tensor left on the device (the trainer sums it there and reads the sum
    once per epoch), so a sync costs no device-to-host read; x̄ = 0 is decided on the device too.
    ``rows`` (a bool per local worker): only these count (elastic workers in the run; K is then how many
    are in it over all processes): a worker away holds what it held when it left, not a drift.
    """
    norm = mean.norm()
    distances = (workers - mean).norm(dim=1)
    spread = (distances if rows is None else distances * rows.to(distances)).sum()
    return torch.where(norm > 0, spread / norm.clamp_min(torch.finfo(torch.float64).tiny) / K, 0.0)
