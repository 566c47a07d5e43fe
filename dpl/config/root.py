"""The top-level config of one run: its groups (each typed by the group's base schema; the option's own
schema merges in when Hydra composes), the nodes that are not groups (``network``, ``clock``,
``faults``) and the keys of the run itself (K, H, batch size, lr, epochs ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from dpl.comm.clock import ClockConfig
from dpl.comm.codecs import CompressionBase
from dpl.comm.cost import NetworkConfig
from dpl.comm.drops import FaultsConfig
from dpl.components.data import DatasetBase
from dpl.components.models import ModelConfig
from dpl.components.optim import OptimizerBase
from dpl.config.schema import at_least, check, key, one_of, positive
from dpl.core.dynamic_h import DynamicHBase
from dpl.core.engines import EngineBase
from dpl.core.methods import MethodBase
from dpl.core.schedules import LR_SCALINGS, SchedulerBase
from dpl.tracking.loggers import LoggerBase

DEVICES = ("auto", "cpu", "cuda")
SHARDINGS = ("iid", "random", "dirichlet")
PRECISIONS = ("fp32", "bf16")
SHUFFLES = ("epoch", "once")
BEST_METRICS = ("auto", "val_acc", "val_loss")
MOMENTUM_MODES = ("keep", "reset", "average")


@dataclass
class Config:
    # typed by each group's base; the option's YAML merges its own schema (a subclass) in
    dataset: DatasetBase = key(MISSING, "where the samples come from")
    model: ModelConfig = key(MISSING, "the network every worker trains")
    optimizer: OptimizerBase = key(MISSING, "the inner optimizer")
    scheduler: SchedulerBase = key(MISSING, "the learning rate over the run")
    method: MethodBase = key(MISSING, "how the workers train together")
    dynamic_h: DynamicHBase = key(MISSING, "how H changes from epoch to epoch")
    engine: EngineBase = key(MISSING, "how the K workers run")
    logger: LoggerBase = key(MISSING, "where the run is recorded")
    compression: CompressionBase = key(MISSING, "what a sync of a local method sends")
    network: NetworkConfig = key(NetworkConfig(), "the modelled network")
    clock: ClockConfig = key(ClockConfig(), "the modelled compute time")
    faults: FaultsConfig = key(FaultsConfig(), "workers that fail a sync")

    K: int = key(1, "workers")
    H: int = key(1, "local steps between syncs of a local method (dynamic_h may change it per epoch)")
    batch_size: int = key(64, "samples per worker and step")
    lr: float = key(0.01, "the inner learning rate (default: the optimizer's)")
    lr_scaling: str = key("none", "none | linear | sqrt: scale lr by the global batch K x batch_size ...")
    base_batch_size: int = key(64, "... relative to this one (the batch that lr was tuned for)")
    weight_decay: float = key(0.0, "the inner weight decay (default: the optimizer's)")
    epochs: int = key(150, "passes of every worker over its shard")
    warmup_epochs: float = key(0.0, "epochs of linear lr warmup before the schedule")
    patience: int = key(0, "stop after this many epochs without a new best validation accuracy (0: never)")
    seed: int = key(0, "seeds everything: initialisation, splits, shards, orders, augmentation, drops")
    device: str = key("auto", "auto (CUDA when one is visible) | cpu | cuda")
    precision: str = key("fp32", "fp32 | bf16: forward and backward under bf16 autocast, fp32 weights and optimizer")
    sharding: str = key("iid", "how the training set is split among the workers: iid | random | dirichlet")
    dirichlet_alpha: float = key(0.5, "dirichlet sharding: the concentration of each worker's class mix")
    local_momentum: str = key("keep", "what a sync does to the inner optimizer's state: keep | reset | average")
    restart_inner_each_epoch: bool = key(False, "fresh inner optimizer state every epoch (the study's local methods)")
    shuffle: str = key("epoch", "epoch: each shard reshuffled every epoch | once: the same order every epoch")
    max_steps: Optional[int] = key(None, "the run's budget in optimizer steps, its last epoch cut short where it "
                                         "falls (null: epochs x the steps of an epoch); the lr schedule spans it")
    eval_every: Optional[int] = key(None, "validate and record every this many steps (null: at every epoch's "
                                          "end); history rows, MLflow steps, the best model and patience follow")
    warmup_steps: Optional[int] = key(None, "warmup in optimizer steps, with scheduler.interval=step (null: "
                                            "warmup_epochs)")
    best_metric: str = key("auto", "what picks the best model and stops early: val_acc (highest) | val_loss "
                                   "(lowest) | auto: val_loss for text, val_acc for images")
    sync_at_epoch_end: bool = key(False, "local methods: every epoch's end also syncs the workers (the study's code "
                                         "does); false: a sync every H steps counted over the whole run (the papers)")

    resume: Optional[str] = key(None, "a job dir (or its checkpoint file) to continue")
    test_only: bool = key(False, "only evaluate a checkpoint on the test split")
    checkpoint: Optional[str] = key(None, "with test_only: the checkpoint to evaluate")
    pretrained: Optional[str] = key(None, "initial weights: a dpl checkpoint or a state_dict file")
    checkpoint_every: int = key(0, "also checkpoint every this many optimizer steps (0: once per epoch)")
    results_csv: str = key("results.csv", "the CSV every finished run adds its row to (relative: the launch directory)")
    progress: bool = key(True, "progress bars")
    sweep: Optional[str] = key(None, "the name that groups a sweep's runs (their experiment and tag)")
    ablation: str = key("none", "which study behaviour conf/ablation/ switched to the paper's")

    def __post_init__(self) -> None:
        at_least("K", self.K, 1, "an integer")
        at_least("H", self.H, 1, "an integer")
        at_least("batch_size", self.batch_size, 1, "an integer")
        positive("lr", self.lr)
        one_of("lr_scaling", self.lr_scaling, LR_SCALINGS)
        at_least("base_batch_size", self.base_batch_size, 1, "an integer")
        at_least("weight_decay", self.weight_decay, 0.0)
        at_least("epochs", self.epochs, 1, "an integer")
        at_least("warmup_epochs", self.warmup_epochs, 0.0)
        at_least("patience", self.patience, 0, "an integer")
        check(0 <= self.seed < 2**63, "seed", self.seed, "an integer in [0, 2**63)")
        one_of("device", self.device, DEVICES)
        one_of("precision", self.precision, PRECISIONS)
        if isinstance(self.clock, ClockConfig):  # the modelled GPU needs a peak at the run's precision
            self.clock.check_precision(self.precision)
        one_of("sharding", self.sharding, SHARDINGS)
        positive("dirichlet_alpha", self.dirichlet_alpha)
        one_of("local_momentum", self.local_momentum, MOMENTUM_MODES)
        one_of("shuffle", self.shuffle, SHUFFLES)
        for name in ("max_steps", "eval_every"):
            if getattr(self, name) is not None:
                at_least(name, getattr(self, name), 1, "null or an integer")
        one_of("best_metric", self.best_metric, BEST_METRICS)
        if self.warmup_steps is not None:
            at_least("warmup_steps", self.warmup_steps, 0, "null or an integer")
            if isinstance(self.scheduler, SchedulerBase):
                check(self.scheduler.interval != "epoch", "warmup_steps", self.warmup_steps,
                      "null with scheduler.interval=epoch (warmup_epochs counts epochs)")
        if isinstance(self.scheduler, SchedulerBase) and self.scheduler.interval == "epoch":
            check(float(self.warmup_epochs).is_integer(), "warmup_epochs", self.warmup_epochs,
                  "a whole number of epochs with scheduler.interval=epoch")
        at_least("checkpoint_every", self.checkpoint_every, 0, "an integer")


# the nodes of the top-level config that are not config groups
NODES = {"network": NetworkConfig, "clock": ClockConfig, "faults": FaultsConfig}
