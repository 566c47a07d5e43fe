"""The training loop: K workers, local steps, and a sync every H steps.

:meth:`Trainer.train_epoch` reads like Algorithm 1 of the LocalSGD and SlowMo papers
(Lin et al. 2020; Wang et al. 2020): each worker draws a batch from its own shard and
takes a step of the inner optimizer; every H local steps (and at the end of an epoch,
so validation sees the averaged model) the method syncs the workers: their average through
the one communication point, then the method's outer step on the pseudo-gradient
(:mod:`dpl.core.methods`). Centralized training averages the gradients every step instead.
The loop does not know which method runs: the method says when it syncs and what a sync
does, and the bookkeeping of an epoch (sums, best model, early stop) is :mod:`dpl.core.state`.

Everything random on the training path is a pure function of (seed, epoch, step):
shard order per epoch and augmentation per step. A checkpoint at any step therefore
resumes to exactly the numbers of an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from dpl.run import checkpoint
from dpl.comm.clock import worker_speeds
from dpl.comm import CLOCKED_FIELDS, CommLedger, Traffic
from dpl.components.data import DeviceData, batch_indices, epoch_order, eval_batches, make_shards, steps_per_epoch
from dpl.core.dynamic_h import HContext, next_h
from dpl.core.step import build_local_step, compile_mode
from dpl.core.workers import StackedWorkers, memory_format
from dpl.core.state import EpochSums, check_finite, track_best
from dpl.core.methods import Method
from dpl.components.optim import build_optimizer
from dpl.core.schedules import lr_index, lr_table

# A record's fields that come from the wall clock (the epoch's time, the collectives' measured time, and
# what the ledger derives from measured compute): runs of the same maths may differ in these and nothing else.
WALL_CLOCK_FIELDS = frozenset({"epoch_time_s", "samples_per_s", "comm_wall_s"}) | CLOCKED_FIELDS
EVAL_BATCH = 1000  # engine.eval_batch_size of configs written before the key existed
log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything that changes while training; saved whole in every checkpoint."""

    epoch: int = 0  # the epoch in progress (or the next one, when step == 0)
    step: int = 0  # steps done in this epoch
    global_step: int = 0
    period: int = 0  # local steps since the last sync
    H: int = 1  # local steps per period in this epoch
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_acc: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    # running sums of the epoch in progress (the loss and accuracy sums live on the device in
    # Trainer.sums while training; these fields hold them in a checkpoint)
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    syncs: int = 0  # parameter syncs of local methods, for the mean drift
    drift_sum: float = 0.0
    compute_s: float = 0.0
    lr: float = 0.0

    def reset_epoch(self) -> None:
        self.step = self.period = self.correct = self.seen = self.syncs = 0
        self.loss_sum = self.drift_sum = self.compute_s = 0.0


def scaled_lr(lr: float, rule: str, batch: int, base_batch: int) -> float:
    """The base lr for a global batch of ``batch`` samples per step, given ``lr`` tuned at ``base_batch``.

    ``linear``: lr * batch / base_batch (Goyal et al. 2017, "Accurate, Large Minibatch SGD", Sec. 2.1);
    ``sqrt``: lr * sqrt(batch / base_batch), which keeps the variance of the update constant
    (Krizhevsky 2014, "One weird trick"; Hoffer et al. 2017); ``none``: lr as given.
    The global batch is K * batch_size: LocalSGD scales its inner lr by the K workers too (Lin et al. 2020).
    """
    ratio = batch / base_batch
    factors = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}
    if rule not in factors:
        raise ValueError(f"lr_scaling={rule!r} is invalid: allowed one of {', '.join(factors)}")
    return lr * factors[rule]


def epochs_from_one(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's TrainState fields with its history's epochs and ``best_epoch`` counted from 1.

    Checkpoints written before epochs were counted from 1 everywhere hold 0-based records; a
    resumed run would otherwise append epoch 3 after epochs 0 and 1 (and report the wrong best
    epoch). Newer checkpoints are returned unchanged.
    """
    history = state.get("history") or []
    if not history or history[0].get("epoch") != 0:
        return state
    best = state.get("best_epoch", -1)
    return {**state, "history": [{**row, "epoch": row["epoch"] + 1} for row in history],
            "best_epoch": best + 1 if best >= 0 else best}


class Trainer:
    """Owns the workers, the inner optimizer, the method and the training state.

    ``hooks`` are called by the loop, which does not know what they do:
    ``on_epoch(trainer, record)`` after each epoch (logging, checkpointing, progress) and
    ``on_step(trainer)`` after each step (mid-epoch checkpoints).
    """

    def __init__(self, cfg: DictConfig, data: DeviceData, workers: StackedWorkers, method: Method,
                 rank: int = 0) -> None:
        self.cfg, self.data, self.workers, self.method = cfg, data, workers, method
        # Plain dataclasses for the per-step reads: DictConfig attribute access costs ~10 us each.
        self.hp = OmegaConf.to_object(cfg)
        self.device = data.train_x.device
        workers.precision = cfg.get("precision", "fp32")
        workers.channels_last = memory_format(cfg.engine.get("memory_format", "auto"), self.device) == "channels_last"
        # Shards are a function of the seed only, so every method and engine sees the same ones.
        # Every process holds all K rows: the shuffles and crops of a step are drawn jointly for
        # the K workers, so a rank of the multi-process engine draws them all and cuts its ``rows``.
        shards = make_shards(data.train_y.cpu(), workers.K, cfg.sharding, cfg.seed, cfg.dirichlet_alpha)
        self.shards = shards.to(self.device)
        self.rows = slice(rank, rank + workers.k_local)
        self.steps_per_epoch = steps_per_epoch(self.shards.shape[1], cfg.batch_size)
        self.base_lr = scaled_lr(cfg.lr, cfg.lr_scaling, workers.K * cfg.batch_size, cfg.base_batch_size)
        self.lr_table = lr_table(cfg.scheduler, self.base_lr, cfg.epochs, self.steps_per_epoch, cfg.warmup_epochs)
        # how the local step runs (engine.compile): eager, torch.compile, or a replayed CUDA graph
        self.compile, why = compile_mode(cfg.engine.get("compile", "auto"), self.device, workers, cfg.optimizer.name)
        if why:
            log.warning(why)
        # On CUDA torch's optimizers in their graph-safe form (fused SGD, capturable AdamW): they read the
        # tensor lr on the device, where the default foreach SGD reads it back to the host every step.
        capturable = self.device.type == "cuda"
        self.optimizer = build_optimizer(workers.params, cfg.optimizer, self.base_lr, cfg.weight_decay,
                                         per_worker=True, capturable=capturable)
        self._group_flags = [{k: g[k] for k in ("fused", "capturable") if k in g} for g in self.optimizer.param_groups]
        # The inner lr lives on the device: each step copies its entry of the table there
        # (a device-side copy, no host sync). float64, so the optimizers multiply by exactly
        # the value a Python float lr had; float32 on CUDA, as torch's fused kernels read it (the
        # same number for fp32 weights: their kernels multiply in float32 either way).
        lr_dtype = torch.float32 if capturable else torch.float64
        self.lr_table_dev = torch.tensor(self.lr_table, dtype=lr_dtype, device=self.device)
        self.lr_now = torch.full((), self.base_lr, dtype=lr_dtype, device=self.device)
        self._point_lr()
        self.state = TrainState(H=cfg.H)
        self.sums = EpochSums(self.device)
        # the epoch's drift sum, on the device like the loss sums (TrainState.drift_sum holds it in a checkpoint)
        self.drift_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        clock = cfg.clock
        speeds = worker_speeds(workers.K, clock.speed, cfg.seed, clock.spread, clock.slow_fraction, clock.slow_factor)
        self.ledger = CommLedger(
            K=workers.K, bandwidth_gbps=cfg.network.bandwidth_gbps, latency_us=cfg.network.latency_us,
            topology=cfg.network.topology, slowest=float(speeds.max()),
            sample_cost_s=None if clock.sample_cost_us is None else clock.sample_cost_us * 1e-6)
        self.best_weights: Optional[dict[str, torch.Tensor]] = None
        self.on_epoch: list[Callable[[Trainer, dict], None]] = []
        self.on_step: list[Callable[[Trainer], None]] = []
        method.start(workers)
        self.local_step = build_local_step(
            self.compile, data, workers, self.optimizer, lambda epoch: method.on_gradients(workers, epoch),
            method.edits_gradients, cfg.seed, self.rows, self.lr_now, self.lr_table_dev,
            optimizer_name=cfg.optimizer.name)

    # ------------------------------------------------------------------ the algorithm
    def fit(self) -> None:
        s = self.state
        while s.epoch < self.cfg.epochs and not s.stopped_early:
            if s.step == 0:
                self.start_epoch()
            self.train_epoch()
            self.end_epoch()

    def start_epoch(self) -> None:
        """Choose this epoch's H; restart the optimizers' state where the config says so
        (the study gives every epoch fresh inner optimizers and a fresh SlowMo buffer)."""
        self.state.H = self.next_h()
        if self.hp.restart_inner_each_epoch:
            self.optimizer.state.clear()
        self.method.on_epoch_start(self.workers, self.state.epoch)

    def train_epoch(self) -> None:
        """One pass of every worker over its shard, resuming at ``state.step``."""
        order = self.epoch_order()
        while self.state.step < self.steps_per_epoch:
            self.train_step(order)
            for hook in self.on_step:
                hook(self)

    def epoch_order(self) -> torch.Tensor:
        """Each worker's sample order in the epoch in progress [K, n] (a function of the seed and epoch)."""
        return self.shards if self.hp.shuffle == "once" else epoch_order(self.shards, self.state.epoch, self.cfg.seed)

    def train_step(self, order: torch.Tensor) -> None:
        """One local step of every worker; a sync when the period (or the epoch) ends."""
        t0 = time.perf_counter()
        idx, lr_i = self.step_inputs(order)
        # Each of this process's workers: its batch, cropped and flipped by a hash of (seed, step, worker,
        # sample), forward, backward, the method's gradient hook (synchronous methods all-reduce the
        # gradients), the inner optimizer's step at lr_table[lr_i] (dpl.core.step: eager, compiled or a graph)
        losses, correct = self.local_step(idx, self.state.global_step, lr_i, self.state.epoch)
        self.end_step(idx, losses, correct)
        self.state.compute_s += time.perf_counter() - t0

    def step_inputs(self, order: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The batch indices [K, B] of the step in progress and its entry of the lr table."""
        s = self.state
        lr_i = self.lr_index(s.global_step)
        s.lr = self.lr_table[lr_i]  # the host's copy, for the outer step and the record
        return batch_indices(order, s.step, self.hp.batch_size), lr_i

    def end_step(self, idx: torch.Tensor, losses: torch.Tensor, correct: torch.Tensor) -> None:
        """After the local step: the sync when the period (or the epoch) ends, and the epoch's sums."""
        s, workers, method = self.state, self.workers, self.method
        s.period += 1
        if method.syncs_after(s.epoch, s.period, s.H, last_step=s.step == self.steps_per_epoch - 1, step=s.step + 1):
            # average, then the outer step on the pseudo-gradient
            drift = method.sync(workers, self.optimizer, s.lr)
            if drift is not None:  # how far apart the workers were just before the average (no read)
                self.drift_sum += drift
                s.syncs += 1
            s.period = 0
        s.step += 1
        s.global_step += 1
        self.sums.add(losses, correct, idx.shape[1] * self.data.tokens_per_sample)  # text: bytes, not windows

    def end_epoch(self) -> None:
        s, point = self.state, self.workers.point
        self._read_sums()  # the epoch's one read of the device sums
        # Summed over every process's workers, so all ranks record (and choose H from) the same numbers.
        loss_sum, correct, seen, drift_sum = point.all_sum([s.loss_sum, s.correct, s.seen, s.drift_sum], "metrics")
        comm_wall_s = point.take_wall_s()
        compute_s = max(s.compute_s - comm_wall_s, 0.0)  # the rest of the step: forward, backward, optimizer
        train_loss = loss_sum / max(seen, 1)
        check_finite(train_loss, s.epoch)
        val_loss, val_acc = self.evaluate("val", augment_key=(self.cfg.seed, s.epoch) if self.data.augment_val else None)
        traffic = point.take()  # the epoch's, evaluation's bookkeeping included
        # Epochs are counted from 1 wherever they are shown (log, history.csv, best_epoch, MLflow steps);
        # s.epoch stays the number of epochs done, which the schedules and the checkpoint count by.
        record = {
            "epoch": s.epoch + 1, "train_loss": train_loss, "train_acc": correct / max(seen, 1),
            "val_loss": val_loss, "val_acc": val_acc,
            **self.data.metrics("train", train_loss), **self.data.metrics("val", val_loss),  # text: bits per byte
            "lr": s.lr, "H": s.H,
            "epoch_time_s": s.compute_s, "samples_per_s": seen / max(s.compute_s, 1e-9),
            "drift": drift_sum / s.syncs if s.syncs else 0.0,
            # modelled: a worker of a real cluster computes only its own share of the simulated steps
            **self.ledger.record_epoch(traffic, s.step, seen / self.workers.K, compute_s / self.workers.k_local),
            "dropped": traffic.dropped,  # contributions to syncs that did not arrive (faults.drop_prob)
            "comm_wall_s": comm_wall_s,  # measured in the algorithm's collectives, beside the modelled bytes
            # every worker's training samples so far: the budget of an equal-samples comparison (dpl.report.budget)
            "samples_total": (s.history[-1].get("samples_total", 0.0) if s.history else 0.0) + seen,
        }
        s.history.append(record)
        if track_best(s, val_acc, self.cfg.patience):
            self.best_weights = self.workers.mean_replica()
        s.epoch += 1
        s.reset_epoch()
        self.sums.reset()
        self.drift_sum.zero_()
        for hook in self.on_epoch:
            hook(self, record)

    # ------------------------------------------------------------------ helpers
    def _read_sums(self) -> TrainState:
        """Copy the device sums of the epoch in progress into the state, as host numbers."""
        s = self.state
        s.loss_sum, s.correct, s.seen = self.sums.read()
        s.drift_sum = float(self.drift_sum)
        return s

    def lr(self, step: int) -> float:
        """The lr of global step ``step`` (per ``scheduler.interval``: of its epoch or of the step)."""
        return self.lr_table[self.lr_index(step)]

    def lr_index(self, step: int) -> int:
        return min(lr_index(self.hp.scheduler.interval, step // self.steps_per_epoch, step), len(self.lr_table) - 1)

    def _point_lr(self) -> None:
        """Every param group reads the device lr (also after loading an optimizer state,
        which would otherwise bring the checkpoint's own lr object), with the graph-safe
        flags it was built with (a checkpoint of an eager run brings its own)."""
        for group, flags in zip(self.optimizer.param_groups, self._group_flags):
            group["lr"] = self.lr_now
            group.update(flags)
        if self._group_flags and self._group_flags[0].get("capturable"):  # AdamW: its step counts on the device
            for st in self.optimizer.state.values():
                if torch.is_tensor(st.get("step")) and st["step"].device != self.device:
                    st["step"] = st["step"].to(self.device, torch.float32)

    def next_h(self) -> int:
        ctx = HContext(epoch=self.state.epoch, epochs=self.cfg.epochs, steps_per_epoch=self.steps_per_epoch,
                       H0=self.cfg.H, history=tuple(self.state.history))
        return next_h(ctx, self.cfg.dynamic_h)

    def evaluate(self, split: str, weights: Optional[dict[str, torch.Tensor]] = None,
                 augment_key: Optional[tuple[int, int]] = None) -> tuple[float, float]:
        batches = eval_batches(self.data, split, self.cfg.engine.get("eval_batch_size", EVAL_BATCH), augment_key)
        return self.workers.evaluate(batches, weights)

    def final_metrics(self) -> dict[str, float]:
        """Test accuracy of the final (averaged) model and of the best-validation model."""
        test_loss, test_acc = self.evaluate("test")
        best = self.best_weights if self.best_weights is not None else self.workers.mean_replica()
        _, test_acc_best = self.evaluate("test", best)
        return {"test_loss": test_loss, "test_acc": test_acc, "test_acc_best": test_acc_best,
                **self.data.metrics("test", test_loss),
                "best_val_acc": self.state.best_val_acc, "best_epoch": self.state.best_epoch,
                "epochs_run": self.state.epoch}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        s = self._read_sums()
        return {
            "state": asdict(s),
            "traffic": asdict(self.workers.point.traffic),
            "workers": {**self.workers.state_dict(), **self.method.worker_state()},
            "model": self.workers.mean_replica("checkpoint"),
            "best_model": self.best_weights,
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "comm": self.ledger.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        ckpt = self.workers.point.local_state(ckpt)  # a rank's share of a checkpoint of every worker
        self.state = TrainState(**epochs_from_one(ckpt["state"]))
        self.sums.load(self.state.loss_sum, self.state.correct, self.state.seen)
        self.drift_sum.fill_(self.state.drift_sum)
        self.workers.point.traffic = Traffic(**ckpt["traffic"])
        self.workers.load_state_dict(_to(ckpt["workers"], self.device))
        self.best_weights = _to(ckpt["best_model"], self.device)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self._point_lr()
        self.method.load_state_dict(_to(ckpt["method"], self.device))
        self.method.load_worker_state(_to(ckpt["workers"], self.device))
        self.ledger = CommLedger.from_state(ckpt["comm"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])

    def save_checkpoint(self, path: str | Path, extra: dict[str, Any]) -> None:
        state = self.workers.point.gather_state(self.state_dict())  # every worker, on the writing process
        if state is not None:
            checkpoint.save({**state, **extra}, path)


def _to(obj: Any, device: torch.device) -> Any:
    """Move every tensor of a nested container to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj
