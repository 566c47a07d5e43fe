"""The training loop: K workers, local steps, and a sync every H steps.

:meth:`Trainer.fit` reads like Algorithm 1 of the LocalSGD and SlowMo papers (Lin et al. 2020; Wang et
al. 2020): each worker draws a batch from its own shard and takes a step of the inner optimizer; every H
local steps, counted over the whole run, the method syncs the workers: their average through the one
communication point, then the method's outer step on the pseudo-gradient (:mod:`dpl.core.methods`).
Centralized training averages the gradients every step instead. Epochs only pace the data, the lr
table, H's changes and the records: an epoch's end syncs nothing unless ``sync_at_epoch_end`` asks
(the study's code does), and validation reads the method's global model without changing the workers.
A record (validation, the history's row, the hooks) comes at each epoch's end, or every ``eval_every``
steps; ``max_steps`` ends the run where it falls. The loop does not know which method runs: the method
says when it syncs and what a sync does, and the bookkeeping of a record (metric sums, best model, early
stop) is :mod:`dpl.core.state`.

The trainer receives its parts finished (:func:`dpl.run.build.build_trainer` makes them). One step is
``next_inputs`` (the batch of every worker and the lr's entry), the local step, ``end_step`` (the sync
when due, the metric sums) and ``advance`` (the step's time and hooks); a packed sweep
(:mod:`dpl.pack.lockstep`) drives several trainers through these same calls, fusing their local steps.

Everything random on the training path is a pure function of (seed, epoch, step): shard order per
epoch and augmentation per step. A checkpoint at any step therefore resumes to exactly the numbers of
an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig

from dpl.comm.cost import CLOCKED_FIELDS, CommLedger, Traffic
from dpl.components.data.device import eval_batches
from dpl.components.data.sharding import batch_indices, epoch_order
from dpl.core.dynamic_h import HContext, next_h
from dpl.core.engines import EAGER
from dpl.core.methods.base import Method, Now
from dpl.core.schedules import LrSchedule
from dpl.core.state import DRIFT, STEP_METRICS, EpochSums, StepOutputs, TrainState, check_finite, track_best
from dpl.core.step import LocalStep, Outputs
from dpl.core.workers import StackedWorkers

# A record's fields that come from the wall clock (the epoch's time, the collectives' measured time, and
# what the ledger derives from measured compute): runs of the same maths may differ in these and nothing else.
WALL_CLOCK_FIELDS = frozenset({"epoch_time_s", "samples_per_s", "comm_wall_s"}) | CLOCKED_FIELDS
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInputs:
    """The step in progress: every worker's batch indices [K, B] and its entry of the lr table."""

    idx: torch.Tensor
    lr_i: int


class Trainer:
    """Owns the workers, the inner optimizer, the method and the training state.

    ``hooks`` are called by the loop, which does not know what they do:
    ``on_epoch(trainer, record)`` after each epoch (logging, checkpointing, progress) and
    ``on_step(trainer)`` after each step (mid-epoch checkpoints).
    """

    def __init__(self, cfg: DictConfig, hp: Any, data: Any, shards: torch.Tensor, workers: StackedWorkers,
                 method: Method, optimizer: torch.optim.Optimizer, schedule: LrSchedule, local_step: LocalStep,
                 ledger: CommLedger, compile: str = EAGER, best_metric: str = "val_acc") -> None:
        self.cfg, self.hp, self.data, self.shards = cfg, hp, data, shards
        self.workers, self.method, self.optimizer = workers, method, optimizer
        self.schedule, self.local_step, self.ledger, self.compile = schedule, local_step, ledger, compile
        self.device = shards.device
        self.steps_per_epoch = schedule.steps_per_epoch
        # the run's budget: max_steps, or whole epochs; its last epoch ends where the budget does
        self.total_steps = hp.max_steps or hp.epochs * self.steps_per_epoch
        self.epochs = -(-self.total_steps // self.steps_per_epoch)
        self.best_metric = best_metric
        self.state = TrainState(H=hp.H)
        self.metrics = list(STEP_METRICS.values())  # the per-step metrics of every record (dpl.core.state)
        self.sums = EpochSums(self.device, [*(m.name for m in self.metrics), DRIFT])
        self.best_weights: Optional[dict[str, torch.Tensor]] = None
        self.on_epoch: list[Callable[[Trainer, dict], None]] = []
        self.on_step: list[Callable[[Trainer], None]] = []
        self._order: Optional[torch.Tensor] = None  # the epoch in progress's sample order, once it started

    @property
    def base_lr(self) -> float:
        return self.schedule.base_lr

    # ------------------------------------------------------------------ the algorithm
    def fit(self) -> None:
        while not self.finished:
            if not self.ends_here():  # (a checkpoint between a step and its epoch's end resumes here)
                self.step()
            if self.ends_here():
                self.end_epoch()

    @property
    def finished(self) -> bool:
        return self.state.epoch >= self.epochs or self.state.stopped_early

    def epoch_over(self) -> bool:
        """The epoch in progress has taken its steps (or the run's budget is spent)."""
        s = self.state
        return s.step == self.steps_per_epoch or s.global_step >= self.total_steps

    def record_due(self) -> bool:
        """A record (validation, history row, hooks) is due after this step: at the epoch's end, or every
        ``eval_every`` steps and at the run's end; once per step (a resumed run does not record twice)."""
        s, every = self.state, self.hp.eval_every
        if s.global_step == s.recorded_at:
            return False
        if every is None:
            return self.epoch_over()
        return s.global_step % every == 0 or s.global_step >= self.total_steps

    def ends_here(self) -> bool:
        return self.epoch_over() or self.record_due()

    def step(self) -> None:
        """One local step of every worker, and the sync when the period (or the epoch) ends."""
        t0 = time.perf_counter()
        inputs = self.next_inputs()
        self.end_step(inputs, self.run_step(inputs))
        self.advance(time.perf_counter() - t0)

    def next_inputs(self) -> StepInputs:
        """The batch of every worker for the step in progress, starting its epoch where it begins."""
        if self._order is None:
            if self.state.step == 0:
                self.start_epoch()
            self._order = self.epoch_order()
        return self.step_inputs(self._order)

    def start_epoch(self) -> None:
        """Choose this epoch's H; restart the optimizers' state where the config says so
        (the study gives every epoch fresh inner optimizers and a fresh SlowMo buffer)."""
        self.state.H = self.next_h()
        if self.hp.restart_inner_each_epoch:
            self.optimizer.state.clear()
        self.method.on_epoch_start(self.workers, self.state.epoch)

    def epoch_order(self) -> torch.Tensor:
        """Each worker's sample order in the epoch in progress [K, n] (a function of the seed and epoch)."""
        return self.shards if self.hp.shuffle == "once" else epoch_order(self.shards, self.state.epoch, self.hp.seed)

    def step_inputs(self, order: torch.Tensor) -> StepInputs:
        """The batch indices [K, B] of the step in progress and its entry of the lr table."""
        s = self.state
        lr_i = self.schedule.index(s.global_step)
        s.lr = self.schedule.table[lr_i]  # the host's copy, for the outer step and the record
        return StepInputs(batch_indices(order, s.step, self.hp.batch_size), lr_i)

    def run_step(self, inputs: StepInputs) -> Outputs:
        """Each of this process's workers: its batch, cropped and flipped by a hash of (seed, step, worker,
        sample), forward, backward, the method's gradient hook (synchronous methods all-reduce the
        gradients), the inner optimizer's step at its lr (:mod:`dpl.core.step`: eager, compiled or a graph)."""
        stepping = self.method.stepped()  # the workers the step is due for (None: all of them)
        if stepping is not None and not any(stepping):  # none of this process's: nothing to compute
            return self.local_step.idle(inputs.idx, self.state.global_step, inputs.lr_i, self.state.epoch)
        return self.local_step(inputs.idx, self.state.global_step, inputs.lr_i, self.state.epoch)

    def end_step(self, inputs: StepInputs, outputs: Outputs) -> None:
        """After the local step: the sync when the method's schedule says so, and the epoch's sums."""
        s, workers, method = self.state, self.workers, self.method
        stepped = method.stepped()  # asked before the sync: the workers of the step that just ended
        s.period += 1
        last = s.step == self.steps_per_epoch - 1 or s.global_step + 1 >= self.total_steps
        epoch_end = self.hp.sync_at_epoch_end and last
        now = Now(epoch=s.epoch, period=s.period, H=s.H, step=s.global_step + 1, epoch_end=epoch_end)
        if method.syncs_after(now):
            # average, then the outer step on the pseudo-gradient
            drift = method.sync(workers, self.optimizer, s.lr)
            if drift is not None:  # how far apart the workers were just before the average (no read)
                self.sums.add_sync(drift)
        if method.period_ends(now):
            s.period = 0
        s.step += 1
        s.global_step += 1
        losses, correct = outputs
        batch = inputs.idx.shape[1] * self.data.tokens_per_sample  # text: bytes, not windows
        self.sums.add_step(self.metrics, StepOutputs(losses, correct, batch, self.schedule.now, self._weights(stepped),
                                                        None if stepped is None else sum(stepped)))

    def advance(self, seconds: float) -> None:
        """The step is done: its time, and the step hooks."""
        self.state.compute_s += seconds
        for hook in self.on_step:
            hook(self)

    def end_epoch(self) -> None:
        """The record when one is due (:meth:`record_due`), and the epoch's end when it has taken its
        steps; then the hooks with the record (they run once the epoch is closed, so a checkpoint written
        by them resumes at the next epoch's start)."""
        s = self.state
        record = self.record() if self.record_due() else None
        if self.epoch_over():
            s.epoch += 1
            s.step = 0
            self._order = None
        if record is None:
            return
        for hook in self.on_epoch:
            hook(self, record)

    def record(self) -> dict[str, float]:
        """Validation of the method's global model and the record of the steps since the last one."""
        s, point = self.state, self.workers.point
        sums = self._read_sums()  # the interval's one read of the device sums
        # Summed over every process's workers, so all ranks record (and choose H from) the same numbers.
        names = [m.name for m in self.metrics]
        *totals, seen, drift_sum = point.all_sum([*(sums[n] for n in names), s.seen, sums[DRIFT]], "metrics")
        comm_wall_s = point.take_wall_s()
        compute_s = max(s.compute_s - comm_wall_s, 0.0)  # the rest of the step: forward, backward, optimizer
        steps = s.global_step - s.recorded_at
        # an interval in which no worker stepped (asynchronous workers all waiting on the network) has no
        # training sample to average: its per-sample metrics are nan, not 0
        per = {"sample": seen if seen else math.nan, "step": max(steps, 1)}
        means = {m.name: total / per[m.per] for m, total in zip(self.metrics, totals)}
        train_loss, train_acc = means.pop("train_loss"), means.pop("train_acc")
        if seen:
            check_finite(train_loss, s.epoch)
        model = self.method.global_model(self.workers)  # the workers stay as they are: periods span epochs
        val_loss, val_acc = self.evaluate("val", model, (self.hp.seed, s.epoch) if self.data.augment_val else None)
        traffic = point.take()  # the interval's, evaluation's bookkeeping included
        # Epochs are counted from 1 wherever they are shown (log, history.csv, best_epoch, MLflow steps);
        # s.epoch stays the number of epochs done, which the schedules and the checkpoint count by.
        record = {
            "epoch": s.epoch + 1, "step": s.global_step, "train_loss": train_loss, "train_acc": train_acc,
            "val_loss": val_loss, "val_acc": val_acc,
            **self.data.metrics("train", train_loss), **self.data.metrics("val", val_loss),  # text: bits per byte
            "lr": s.lr, "H": s.H,
            "epoch_time_s": s.compute_s, "samples_per_s": seen / max(s.compute_s, 1e-9),
            "drift": drift_sum / s.syncs if s.syncs else 0.0,
            "syncs": s.syncs,  # syncs of the model that landed since the last record (streaming: fragments)
            # modelled: a worker of a real cluster computes only its own share of the simulated steps
            **self.ledger.record_epoch(traffic, steps, s.step_samples, compute_s / self.workers.k_local),
            "dropped": traffic.dropped,  # contributions to syncs that did not arrive (faults.drop_prob)
            "comm_wall_s": comm_wall_s,  # measured in the algorithm's collectives, beside the modelled bytes
            # every worker's training samples so far: the budget of an equal-samples comparison (dpl.report.budget)
            "samples_total": (s.history[-1].get("samples_total", 0.0) if s.history else 0.0) + seen,
            **means,  # the per-step metrics registered beside train_loss and train_acc
            **self.method.record(),  # the method's own (asynchronous: arrivals and their staleness)
        }
        s.history.append(record)
        if track_best(s, record, self.best_metric, self.hp.patience):
            self.best_weights = model
        s.recorded_at = s.global_step
        s.reset_interval()
        self.sums.reset()
        return record

    def rewind_epoch(self) -> None:
        """Start the epoch in progress over from its first step, its sums at zero (a benchmark's endless
        steps: no evaluation, nothing recorded)."""
        self.state.step = 0
        self.state.reset_interval()
        self.sums.reset()
        self._order = None

    # ------------------------------------------------------------------ helpers
    def _weights(self, stepped: Optional[list[bool]]) -> Optional[torch.Tensor]:
        """The workers whose step counts, as a 0/1 device tensor [K_local] (None: all of them)."""
        if stepped is None or all(stepped):
            return None
        return torch.tensor(stepped, dtype=torch.float64).to(self.device, non_blocking=True)

    def _read_sums(self) -> dict[str, float]:
        """The device sums of the epoch in progress, as host numbers, kept in the state too (a checkpoint)."""
        s = self.state
        s.sums = self.sums.read()
        s.seen, s.syncs, s.step_samples = self.sums.seen, self.sums.syncs, self.sums.step_samples
        return s.sums

    def lr(self, step: int) -> float:
        """The lr of global step ``step`` (per ``scheduler.interval``: of its epoch or of the step)."""
        return self.schedule.lr(step)

    def next_h(self) -> int:
        ctx = HContext(epoch=self.state.epoch, epochs=self.hp.epochs, steps_per_epoch=self.steps_per_epoch,
                       H0=self.hp.H, history=tuple(self.state.history))
        return next_h(ctx, self.cfg.dynamic_h)

    def evaluate(self, split: str, weights: Optional[dict[str, torch.Tensor]] = None,
                 augment_key: Optional[tuple[int, int]] = None) -> tuple[float, float]:
        batches = eval_batches(self.data, split, self.hp.engine.eval_batch_size, augment_key)
        return self.workers.evaluate(batches, weights)

    def final_metrics(self) -> dict[str, float]:
        """Test accuracy of the final model (the method's global model) and of the best-validation model."""
        final = self.method.global_model(self.workers)
        test_loss, test_acc = self.evaluate("test", final)
        best = self.best_weights if self.best_weights is not None else final
        _, test_acc_best = self.evaluate("test", best)
        return {"test_loss": test_loss, "test_acc": test_acc, "test_acc_best": test_acc_best,
                **self.data.metrics("test", test_loss),
                "best_val_acc": self.state.best_val_acc, "best_epoch": self.state.best_epoch,
                "epochs_run": self.state.epoch}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        self._read_sums()
        return {
            "state": asdict(self.state),
            "traffic": asdict(self.workers.point.traffic),
            "workers": {**self.workers.state_dict(), **self.method.worker_state()},
            "model": self.method.global_model(self.workers, "checkpoint"),
            "best_model": self.best_weights,
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "comm": self.ledger.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint of the current format (:func:`dpl.run.checkpoint.load` upgrades older ones)."""
        ckpt = self.workers.point.local_state(ckpt)  # a rank's share of a checkpoint of every worker
        self.state = TrainState(**ckpt["state"])
        if "step_samples" not in ckpt["state"]:  # written before it was kept: every worker stepped then
            self.state.step_samples = self.state.seen // self.workers.k_local
        self.sums.load(self.state.sums, self.state.seen, self.state.syncs, self.state.step_samples)
        self.workers.point.traffic = Traffic(**ckpt["traffic"])
        self.workers.load_state_dict(_to(ckpt["workers"], self.device))
        self.best_weights = _to(ckpt["best_model"], self.device)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.attach(self.optimizer)
        self.method.load_state_dict(_to(ckpt["method"], self.device))
        self.method.load_worker_state(_to(ckpt["workers"], self.device))
        step_factor = self.ledger.step_factor  # the config's (the workers' speeds are the seed's)
        self.ledger = CommLedger.from_state(ckpt["comm"])
        self.ledger.step_factor = step_factor
        self._order = None
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])


def _to(obj: Any, device: torch.device) -> Any:
    """Move every tensor of a nested container to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj
