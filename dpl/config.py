"""Typed schemas for every config group, registered in Hydra's ConfigStore.

YAML files in ``conf/<group>/`` supply values; the dataclasses here say which keys
exist and what type they have (checked by OmegaConf at composition) and
``__post_init__`` checks ranges and choices (run by :func:`validate`).  A bad value
therefore fails before any data is loaded, with one line naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from dpl.errors import ConfigError


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: allowed {allowed}")


def _finite(value: Any) -> bool:
    # inf passes every ">= low" test, and an inf lr or coefficient trains nothing but NaNs
    return value is not None and math.isfinite(value)


def _at_least(key: str, value: Any, low: float, kind: str = "a number") -> None:
    _check(_finite(value) and value >= low, key, value, f"{kind} >= {low}")


def _positive(key: str, value: Any) -> None:
    _check(_finite(value) and value > 0, key, value, "a number > 0")


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, value, "one of " + ", ".join(choices))


# ----------------------------------------------------------------------------- groups


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str = "data"  # relative paths resolve against the launch directory
    download: bool = True
    val_fraction: float = 0.1
    augment: bool = True  # random crop (with padding) + horizontal flip on train batches
    # the study: validation images augmented too, redrawn (seeded) at every evaluation
    augment_val: bool = False
    crop_padding: int = 4
    # only `synthetic` reads these
    num_train: int = 5000
    num_test: int = 1000
    num_classes: int = 10
    channels: int = 3
    image_size: int = 32
    noise: float = 0.35

    def __post_init__(self) -> None:
        _check(0.0 < self.val_fraction < 1.0, "dataset.val_fraction", self.val_fraction, "0 < x < 1")
        _at_least("dataset.crop_padding", self.crop_padding, 0, "an integer")
        for key in ("num_train", "num_test", "channels", "image_size"):
            _at_least(f"dataset.{key}", getattr(self, key), 1, "an integer")
        _at_least("dataset.num_classes", self.num_classes, 2, "an integer")
        _at_least("dataset.noise", self.noise, 0.0)


@dataclass
class ModelConfig:
    name: str = MISSING


@dataclass
class OptimizerConfig:
    """Union of the optimizers' hyperparameters; each YAML sets those it uses.

    ``lr`` and ``weight_decay`` here are per-optimizer defaults; the top-level keys
    ``lr`` / ``weight_decay`` (which interpolate these) are what training reads.
    """

    name: str = MISSING
    lr: float = 0.01
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # LARS / LAMB
    trust_coefficient: float = 1.0
    exclude_1d: bool = True  # biases and norm weights: no weight decay, no adaptation
    max_trust_ratio: Optional[float] = None  # clip the trust ratio from above
    grad_clip_norm: Optional[float] = None  # global gradient-norm clipping before the step
    bias_correction: bool = True  # LAMB
    trust_ratio_only_with_wd: bool = False  # LAMB as in the study: adapt only when wd != 0
    wd_in_grad_norm: bool = False  # LARS as in the study: ratio (and its zero test) from ||g + wd*w||
    # LARS: where the lr enters the momentum. lr_inside: v <- m v + lr d; w <- w - v (You et al.
    # 2017, Alg. 1); lr_outside: v <- m v + d; w <- w - lr v (torch SGD). Same unless the lr changes.
    momentum_form: str = "lr_inside"

    def __post_init__(self) -> None:
        _positive("optimizer.lr", self.lr)
        _at_least("optimizer.weight_decay", self.weight_decay, 0.0)
        _check(0.0 <= self.momentum < 1.0, "optimizer.momentum", self.momentum, "0 <= x < 1")
        _check(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "optimizer.betas", list(self.betas), "two numbers in [0, 1)",
        )
        _positive("optimizer.eps", self.eps)
        _positive("optimizer.trust_coefficient", self.trust_coefficient)
        _one_of("optimizer.momentum_form", self.momentum_form, ("lr_inside", "lr_outside"))
        if self.max_trust_ratio is not None:
            _positive("optimizer.max_trust_ratio", self.max_trust_ratio)
        if self.grad_clip_norm is not None:
            _positive("optimizer.grad_clip_norm", self.grad_clip_norm)
            if self.name != MISSING:  # the command-line pre-check knows the value, not the optimizer
                _check(self.name in ("lars", "lamb"), "optimizer.grad_clip_norm", self.grad_clip_norm,
                       "null for optimizer " + self.name + " (only lars and lamb clip)")


@dataclass
class SchedulerConfig:
    """Learning-rate schedule after ``warmup_epochs`` of linear warmup (see dpl.schedules)."""

    name: str = MISSING
    interval: str = "step"  # step: the lr moves every optimizer step; epoch: once per epoch (the study)
    warmup_start_factor: Optional[float] = None  # warmup from this x lr (the study: 0.1); null: (t+1)/W
    min_lr: float = 0.0  # cosine / poly floor
    step_epochs: int = 30  # step: decay every this many epochs
    gamma: float = 0.1  # step: decay factor
    power: float = 1.0  # poly: exponent

    def __post_init__(self) -> None:
        _one_of("scheduler.interval", self.interval, ("step", "epoch"))
        if self.warmup_start_factor is not None:
            _check(0.0 < self.warmup_start_factor <= 1.0, "scheduler.warmup_start_factor",
                   self.warmup_start_factor, "null or 0 < x <= 1")
        _at_least("scheduler.min_lr", self.min_lr, 0.0)
        _at_least("scheduler.step_epochs", self.step_epochs, 1, "an integer")
        _check(0.0 < self.gamma <= 1.0, "scheduler.gamma", self.gamma, "0 < x <= 1")
        _positive("scheduler.power", self.power)


@dataclass
class MethodConfig:
    name: str = MISSING
    # slowmo (Wang et al. 2020): slow momentum beta and slow learning rate alpha
    beta: float = 0.6
    alpha: float = 1.0
    # slowmo / diloco: zero the outer momentum at the start of every epoch (the study does for slowmo)
    restart_each_epoch: bool = False
    # diloco (Douillard et al. 2023): outer SGD with Nesterov momentum
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    # post_local (Lin et al. 2020): the first epoch of local steps
    switch_epoch: int = 75

    def __post_init__(self) -> None:
        _check(0.0 <= self.beta < 1.0, "method.beta", self.beta, "0 <= x < 1")
        _positive("method.alpha", self.alpha)
        _positive("method.outer_lr", self.outer_lr)
        _check(0.0 <= self.outer_momentum < 1.0, "method.outer_momentum", self.outer_momentum, "0 <= x < 1")
        _at_least("method.switch_epoch", self.switch_epoch, 0, "an integer")


@dataclass
class DynamicHConfig:
    """Shape parameters of the dynamic local-step strategies (see dpl.dynamic_h).

    Defaults are the study's values; conf/dynamic_h/avg_loss.yaml sets n_losses 10 (its reported runs)."""

    name: str = MISSING
    h_min: int = 4  # linear / pow2 range and the halve (H > h_min) / double (H < h_max) guards
    h_max: int = 64
    patience: int = 4  # improvement: halve after every epoch once this many in a row had no new best (study: c > 3)
    n_losses: int = 3  # loss / avg_loss: act once more than this many val losses exist; avg_loss: window (even)
    trend: int = 3  # loss: this many latest val losses must rise (fall) strictly to halve (double) H
    midpoint: float = 75.0  # sigmoid: epoch of the midpoint
    steepness: float = 0.5  # sigmoid
    low_divisor: float = 22.0  # sigmoid / rev_cosine: lower bound = steps_per_epoch / this
    high_divisor: float = 2.0  # sigmoid / rev_cosine: upper bound = steps_per_epoch / this
    snap: float = 0.05  # sigmoid / rev_cosine: one more sync when the epoch's leftover steps are <= this fraction

    def __post_init__(self) -> None:
        _at_least("dynamic_h.h_min", self.h_min, 1, "an integer")
        _check(self.h_max >= self.h_min, "dynamic_h.h_max", self.h_max, f"an integer >= h_min ({self.h_min})")
        _at_least("dynamic_h.patience", self.patience, 1, "an integer")
        _at_least("dynamic_h.n_losses", self.n_losses, 2, "an integer")
        if self.name == "avg_loss":  # two windows of n_losses / 2 epochs each
            _check(self.n_losses % 2 == 0, "dynamic_h.n_losses", self.n_losses, "an even integer >= 2 for avg_loss")
        _at_least("dynamic_h.trend", self.trend, 2, "an integer")
        _positive("dynamic_h.steepness", self.steepness)
        _positive("dynamic_h.low_divisor", self.low_divisor)
        _positive("dynamic_h.high_divisor", self.high_divisor)
        _check(0 <= self.snap < 1, "dynamic_h.snap", self.snap, "a number in [0, 1)")


@dataclass
class EngineConfig:
    name: str = MISSING
    simulate: str = "auto"  # simulated engine: how the K forwards run (auto picks per device)
    # how the local step runs (dpl.engine.step): auto (graph on CUDA where it can, none otherwise) |
    # none (eager) | graph (one replayed CUDA graph) | compile (torch.compile)
    compile: str = "auto"
    eval_batch_size: int = 1000  # images per evaluation batch (the results do not depend on it)
    # distributed engine
    backend: str = "auto"  # auto: nccl on cuda, gloo on cpu
    spawn: bool = False  # start K local processes from one command
    timeout_s: float = 300.0  # a rank that dies or hangs ends the job after this long
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # spawn: the launcher's store; 0 = a free port

    def __post_init__(self) -> None:
        _one_of("engine.simulate", self.simulate, ("auto", "vmap", "loop"))
        _one_of("engine.compile", self.compile, ("auto", "none", "graph", "compile"))
        _at_least("engine.eval_batch_size", self.eval_batch_size, 1, "an integer")
        _one_of("engine.backend", self.backend, ("auto", "gloo", "nccl"))
        _positive("engine.timeout_s", self.timeout_s)
        _check(0 <= self.master_port < 65536, "engine.master_port", self.master_port, "0 (a free port) to 65535")


@dataclass
class LoggerConfig:
    name: str = MISSING
    tracking_uri: str = "sqlite:///mlflow.db"  # relative sqlite paths resolve against the launch dir
    experiment: str = "dpl"
    run_name: Optional[str] = None
    plots: bool = True

    def __post_init__(self) -> None:
        _check(bool(str(self.experiment).strip()), "logger.experiment", self.experiment, "a non-empty name")
        _check(bool(str(self.tracking_uri).strip()), "logger.tracking_uri", self.tracking_uri, "a non-empty URI")


@dataclass
class NetworkConfig:
    """The modelled cluster network for the communication-time estimate (10 Gb/s default)."""

    bandwidth_gbps: float = 10.0
    latency_us: float = 50.0
    topology: str = "ring"  # ring all-reduce | ps: one parameter server

    def __post_init__(self) -> None:
        _positive("network.bandwidth_gbps", self.bandwidth_gbps)
        _at_least("network.latency_us", self.latency_us, 0.0)
        _one_of("network.topology", self.topology, ("ring", "ps"))


@dataclass
class ClockConfig:
    """The modelled compute time of the workers (dpl.clock): per-sample cost and speed spread."""

    sample_cost_us: Optional[float] = None  # per sample and worker at speed 1; null: measured in epoch 0
    speed: str = "constant"  # constant | lognormal | slow: the workers' time factors, drawn from the seed
    spread: float = 0.5  # lognormal: sigma of the log time factor (median 1)
    slow_fraction: float = 0.25  # slow: this share of the workers ...
    slow_factor: float = 2.0  # ... takes this many times longer per sample

    def __post_init__(self) -> None:
        if self.sample_cost_us is not None:
            _positive("clock.sample_cost_us", self.sample_cost_us)
        _one_of("clock.speed", self.speed, ("constant", "lognormal", "slow"))
        _at_least("clock.spread", self.spread, 0.0)
        _check(0.0 <= self.slow_fraction <= 1.0, "clock.slow_fraction", self.slow_fraction, "0 <= x <= 1")
        _at_least("clock.slow_factor", self.slow_factor, 1.0)


# ----------------------------------------------------------------------------- top level

DEVICES = ("auto", "cpu", "cuda")
SHARDINGS = ("iid", "random", "dirichlet")
PRECISIONS = ("fp32", "bf16")
SHUFFLES = ("epoch", "once")
MOMENTUM_MODES = ("keep", "reset", "average")
LR_SCALINGS = ("none", "linear", "sqrt")  # see dpl.train.scaled_lr


@dataclass
class Config:
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    method: MethodConfig = MISSING
    dynamic_h: DynamicHConfig = MISSING
    engine: EngineConfig = MISSING
    logger: LoggerConfig = MISSING
    network: NetworkConfig = field(default_factory=NetworkConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)

    K: int = 1  # workers
    H: int = 1  # local steps between syncs (the dynamic_h group may change it per epoch)
    batch_size: int = 64  # per worker
    lr: float = 0.01
    lr_scaling: str = "none"  # none | linear | sqrt: scale lr by the global batch K*batch_size ...
    base_batch_size: int = 64  # ... relative to this one (the batch that lr was tuned for)
    weight_decay: float = 0.0
    epochs: int = 150
    warmup_epochs: float = 0.0
    patience: int = 0  # early stopping on validation accuracy; 0 = off
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16: forward/backward under bf16 autocast, fp32 weights and optimizer state
    sharding: str = "iid"
    dirichlet_alpha: float = 0.5
    local_momentum: str = "keep"  # inner-optimizer state at a sync: keep | reset | average
    restart_inner_each_epoch: bool = False  # fresh inner optimizer state every epoch (the study's local methods)
    shuffle: str = "epoch"  # epoch: each shard reshuffled every epoch; once: the same order every epoch

    resume: Optional[str] = None  # a job dir (or checkpoint file) to continue
    test_only: bool = False
    checkpoint: Optional[str] = None  # with test_only: the checkpoint to evaluate
    pretrained: Optional[str] = None  # initial weights (a checkpoint or a state_dict file)
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps (0 = once per epoch)
    results_csv: str = "results.csv"  # relative paths resolve against the launch dir
    progress: bool = True  # tqdm bars
    sweep: Optional[str] = None  # tag grouping the runs of one sweep in MLflow
    ablation: str = "none"  # which study behaviour conf/ablation/ switched to the paper's (dpl.study)

    def __post_init__(self) -> None:
        _at_least("K", self.K, 1, "an integer")
        _at_least("H", self.H, 1, "an integer")
        _at_least("batch_size", self.batch_size, 1, "an integer")
        _positive("lr", self.lr)
        _one_of("lr_scaling", self.lr_scaling, LR_SCALINGS)
        _at_least("base_batch_size", self.base_batch_size, 1, "an integer")
        _at_least("weight_decay", self.weight_decay, 0.0)
        _at_least("epochs", self.epochs, 1, "an integer")
        _at_least("warmup_epochs", self.warmup_epochs, 0.0)
        _at_least("patience", self.patience, 0, "an integer")
        _check(0 <= self.seed < 2**63, "seed", self.seed, "an integer in [0, 2**63)")
        _one_of("device", self.device, DEVICES)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("sharding", self.sharding, SHARDINGS)
        _positive("dirichlet_alpha", self.dirichlet_alpha)
        _one_of("local_momentum", self.local_momentum, MOMENTUM_MODES)
        _one_of("shuffle", self.shuffle, SHUFFLES)
        if isinstance(self.scheduler, SchedulerConfig) and self.scheduler.interval == "epoch":
            _check(float(self.warmup_epochs).is_integer(), "warmup_epochs", self.warmup_epochs,
                   "a whole number of epochs with scheduler.interval=epoch")
        _at_least("checkpoint_every", self.checkpoint_every, 0, "an integer")


GROUP_SCHEMAS: dict[str, type] = {
    "dataset": DatasetConfig,
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "method": MethodConfig,
    "dynamic_h": DynamicHConfig,
    "engine": EngineConfig,
    "logger": LoggerConfig,
}


def register_configs() -> None:
    """Store the top-level schema; ``conf/config.yaml`` names it first in its defaults.

    Group nodes are typed through the fields of :class:`Config`, so a YAML file in
    ``conf/optimizer/`` with a misspelt key fails composition.
    """
    ConfigStore.instance().store(name="dpl_schema", node=Config)


def to_schema(cfg: DictConfig) -> Config:
    """Instantiate the dataclasses (running every range check); raise ConfigError in one line.

    Whether each group's name is a registered option, and checks across groups, are
    :func:`dpl.preflight.validate`'s (it knows every registry; this module knows none).
    """
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf type errors carry the key in their message
        raise ConfigError(str(e).splitlines()[0]) from None
