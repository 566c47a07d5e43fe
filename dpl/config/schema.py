"""Typed schemas for every config group, registered in Hydra's ConfigStore.

YAML files in ``conf/<group>/`` supply values; the dataclasses here say which keys
exist and what type they have (checked by OmegaConf at composition) and
``__post_init__`` checks ranges and choices (run by :func:`validate`).  A bad value
therefore fails before any data is loaded, with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from dpl.errors import ConfigError


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: allowed {allowed}")


# Numbers become float32 tensors (lr tables, coefficients): beyond this they overflow there.
FLOAT32_MAX = 3.4028234663852886e38


def _finite(value: Any) -> bool:
    # inf passes every ">= low" test, and an inf lr or coefficient trains nothing but NaNs
    return isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= FLOAT32_MAX


def _bounds(allowed: str, value: Any) -> str:
    """``allowed``, plus the float32 bound when that is what ``value`` broke (``lr=1e300``)."""
    big = isinstance(value, (int, float)) and math.isfinite(value) and abs(value) > FLOAT32_MAX
    return f"{allowed} and at most {FLOAT32_MAX:.4g} (float32)" if big else allowed


def _at_least(key: str, value: Any, low: float, kind: str = "a number") -> None:
    _check(_finite(value) and value >= low, key, value, _bounds(f"{kind} >= {low}", value))


def _positive(key: str, value: Any) -> None:
    _check(_finite(value) and value > 0, key, value, _bounds("a number > 0", value))


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, value, "one of " + ", ".join(choices))


# ----------------------------------------------------------------------------- groups
#
# One dataclass per option of each group, holding only the keys that option reads (issue:
# "the lars schema has trust_coefficient and sgdm does not"). Each group has a base class
# with the keys every option shares; the top-level Config types the group's node with it,
# and the option's YAML names its own schema in its defaults list
# (``- /schema/optimizer/lars@_here_``), so Hydra merges the subclass in and a key the option
# does not have fails composition. SCHEMAS (at the end of this section) is the registry:
# group -> option -> dataclass, keyed like conf/<group>/<option>.yaml and the code registries.


# --- dataset


@dataclass
class DatasetBase:
    name: str = MISSING
    val_fraction: float = 0.1
    augment: bool = True  # random crop (with padding) + horizontal flip on train batches
    # the study: validation images augmented too, redrawn (seeded) at every evaluation
    augment_val: bool = False
    crop_padding: int = 4

    def __post_init__(self) -> None:
        _check(0.0 < self.val_fraction < 1.0, "dataset.val_fraction", self.val_fraction, "0 < x < 1")
        _at_least("dataset.crop_padding", self.crop_padding, 0, "an integer")


@dataclass
class FileDatasetConfig(DatasetBase):
    """A dataset read from files under ``root`` (cifar10, cifar100, fashion_mnist)."""

    root: str = "data"  # relative paths resolve against the launch directory
    download: bool = True


@dataclass
class SyntheticDatasetConfig(DatasetBase):
    """Generated class prototypes plus Gaussian noise (dpl.components.data.sources.synthetic)."""

    num_train: int = 5000
    num_test: int = 1000
    num_classes: int = 10
    channels: int = 3
    image_size: int = 32
    noise: float = 0.35

    def __post_init__(self) -> None:
        super().__post_init__()
        # two training images at least: the validation split takes one of them
        _at_least("dataset.num_train", self.num_train, 2, "an integer")
        for key in ("num_test", "channels", "image_size"):
            _at_least(f"dataset.{key}", getattr(self, key), 1, "an integer")
        _at_least("dataset.num_classes", self.num_classes, 2, "an integer")
        _at_least("dataset.noise", self.noise, 0.0)


@dataclass
class TextDatasetConfig(DatasetBase):
    """Byte-level text (dpl.components.data.text): every UTF-8 file under ``path``, split by position in each file.
    ``augment``: each training window starts at a random offset past its slot (no crops or flips)."""

    path: str = "/usr/share/games/fortunes"  # Debian's fortunes (apt-get install fortunes); relative: the launch dir
    block_size: int = 64  # bytes per window (the model's context must hold it)
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("dataset.block_size", self.block_size, 1, "an integer")
        _check(0.0 < self.test_fraction < 1.0 and self.val_fraction + self.test_fraction < 1.0,
               "dataset.test_fraction", self.test_fraction, "0 < x < 1 - dataset.val_fraction")


# --- model


@dataclass
class ModelConfig:
    name: str = MISSING


@dataclass
class GptConfig(ModelConfig):
    """A decoder-only transformer over bytes (dpl.components.models.GPT)."""

    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    block_size: int = 64  # the longest context (positions); dataset.block_size may not exceed it
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            _at_least(f"model.{key}", getattr(self, key), 1, "an integer")
        _check(self.n_embd % self.n_head == 0, "model.n_embd", self.n_embd,
               f"a multiple of model.n_head={self.n_head}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "0 <= x < 1")


# --- optimizer


@dataclass
class OptimizerBase:
    """``lr`` and ``weight_decay`` are the optimizer's defaults; the top-level keys ``lr`` /
    ``weight_decay`` (which interpolate these) are what training reads."""

    name: str = MISSING
    lr: float = 0.01
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _positive("optimizer.lr", self.lr)
        _at_least("optimizer.weight_decay", self.weight_decay, 0.0)


def _momentum(value: float) -> None:
    _check(0.0 <= value < 1.0, "optimizer.momentum", value, "0 <= x < 1")


def _betas(value: Any, key: str = "optimizer.betas") -> None:
    pair = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    ok = pair and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in value)
    shown = list(value) if pair or (isinstance(value, Sequence) and not isinstance(value, str)) else value
    _check(ok, key, shown, "two numbers in [0, 1), e.g. [0.9,0.999]")


@dataclass
class SgdmConfig(OptimizerBase):
    """torch.optim.SGD with (heavy-ball or Nesterov) momentum."""

    momentum: float = 0.9
    nesterov: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _momentum(self.momentum)


@dataclass
class AdamwConfig(OptimizerBase):
    """torch.optim.AdamW (Loshchilov & Hutter 2019)."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        _betas(self.betas)
        _positive("optimizer.eps", self.eps)


@dataclass
class MuonConfig(OptimizerBase):
    """Muon (Jordan et al. 2024) for the 2-D weights with torch.optim.Muon's defaults, AdamW (betas,
    eps) for the rest; lr and weight_decay are both sides' (dpl.components.optim.Muon)."""

    lr: float = 0.02
    weight_decay: float = 0.0
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5  # Newton–Schulz iterations
    adjust_lr_fn: Optional[str] = None  # torch's: null/original (sqrt(max(1, out/in))) or match_rms_adamw
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(_finite(self.momentum) and 0.0 <= self.momentum < 1.0, "optimizer.momentum", self.momentum,
               "0 <= x < 1")
        _check(isinstance(self.ns_steps, int) and 1 <= self.ns_steps < 100, "optimizer.ns_steps", self.ns_steps,
               "an integer in [1, 100)")
        if self.adjust_lr_fn is not None:
            _one_of("optimizer.adjust_lr_fn", self.adjust_lr_fn, ("original", "match_rms_adamw"))
        _betas(self.betas, "optimizer.betas")
        _positive("optimizer.eps", self.eps)


@dataclass
class TrustRatioBase(OptimizerBase):
    """What LARS and LAMB share: a layer-wise trust ratio (dpl.components.optim)."""

    eps: float = 1e-8
    exclude_1d: bool = True  # biases and norm weights: no weight decay, no adaptation
    max_trust_ratio: Optional[float] = None  # clip the trust ratio from above
    grad_clip_norm: Optional[float] = None  # global gradient-norm clipping before the step

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("optimizer.eps", self.eps)
        if self.max_trust_ratio is not None:
            _positive("optimizer.max_trust_ratio", self.max_trust_ratio)
        if self.grad_clip_norm is not None:
            _positive("optimizer.grad_clip_norm", self.grad_clip_norm)


@dataclass
class LarsConfig(TrustRatioBase):
    """LARS (You et al. 2017) on SGD momentum."""

    momentum: float = 0.9
    trust_coefficient: float = 1.0
    wd_in_grad_norm: bool = False  # the study: ratio (and its zero test) from ||g + wd*w||
    # Where the lr enters the momentum. lr_inside: v <- m v + lr d; w <- w - v (You et al.
    # 2017, Alg. 1); lr_outside: v <- m v + d; w <- w - lr v (torch SGD). Same unless the lr changes.
    momentum_form: str = "lr_inside"

    def __post_init__(self) -> None:
        super().__post_init__()
        _momentum(self.momentum)
        _positive("optimizer.trust_coefficient", self.trust_coefficient)
        _one_of("optimizer.momentum_form", self.momentum_form, ("lr_inside", "lr_outside"))


@dataclass
class LambConfig(TrustRatioBase):
    """LAMB (You et al. 2020, Algorithm 2) on Adam moments."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    bias_correction: bool = True
    trust_ratio_only_with_wd: bool = False  # the study: adapt only where wd != 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _betas(self.betas)


# --- scheduler


@dataclass
class SchedulerBase:
    """Learning-rate schedule after ``warmup_epochs`` of linear warmup (see dpl.core.schedules)."""

    name: str = MISSING
    interval: str = "step"  # step: the lr moves every optimizer step; epoch: once per epoch (the study)
    warmup_start_factor: Optional[float] = None  # warmup from this x lr (the study: 0.1); null: (t+1)/W

    def __post_init__(self) -> None:
        _one_of("scheduler.interval", self.interval, ("step", "epoch"))
        if self.warmup_start_factor is not None:
            _check(0.0 < self.warmup_start_factor <= 1.0, "scheduler.warmup_start_factor",
                   self.warmup_start_factor, "null or 0 < x <= 1")


@dataclass
class DecayToFloorBase(SchedulerBase):
    min_lr: float = 0.0  # the floor the lr decays to

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("scheduler.min_lr", self.min_lr, 0.0)


@dataclass
class CosineConfig(DecayToFloorBase):
    """Cosine annealing (Loshchilov & Hutter 2017) from lr to min_lr over the run."""


@dataclass
class PolyConfig(DecayToFloorBase):
    power: float = 1.0  # lr = min_lr + (lr0 - min_lr) (1 - t/T)^power

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("scheduler.power", self.power)


@dataclass
class StepConfig(SchedulerBase):
    step_epochs: int = 30  # decay every this many epochs ...
    gamma: float = 0.1  # ... by this factor

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("scheduler.step_epochs", self.step_epochs, 1, "an integer")
        _check(0.0 < self.gamma <= 1.0, "scheduler.gamma", self.gamma, "0 < x <= 1")


# --- method


@dataclass
class MethodBase:
    name: str = MISSING


# method.outer.name: the keys of dpl.components.optim.OUTER_OPTIMIZERS (a test holds the two equal)
OUTER_OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class OuterOptimizerConfig:
    """``method.outer``: the torch.optim optimizer of a local method's outer step, over the
    float64 anchor x with gradient the pseudo-gradient Δ = x − x̄ (dpl.core.methods.outer).

    ``sgd`` reads momentum and nesterov (Nesterov with momentum 0 is plain SGD, so a preset's
    ``nesterov: true`` survives ``momentum=0``); ``adam`` / ``adamw`` read betas and eps;
    weight_decay is L2 in the gradient for sgd and adam, decoupled for adamw (Loshchilov &
    Hutter 2019). There is no separate ``nesterov`` name: it is sgd with ``nesterov: true``.
    """

    name: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _one_of("method.outer.name", self.name, OUTER_OPTIMIZERS)
        _positive("method.outer.lr", self.lr)
        _check(_finite(self.momentum) and 0.0 <= self.momentum < 1.0, "method.outer.momentum", self.momentum,
               "0 <= x < 1")
        _betas(self.betas, "method.outer.betas")
        _positive("method.outer.eps", self.eps)
        _at_least("method.outer.weight_decay", self.weight_decay, 0.0)


def _outer(**preset: Any) -> Any:
    return field(default_factory=lambda: OuterOptimizerConfig(**preset))


@dataclass
class LocalMethodBase(MethodBase):
    """What every local method has: its outer optimizer, and whether its state restarts each epoch."""

    outer: OuterOptimizerConfig = _outer()  # LocalSGD: SGD, lr 1, no momentum: x <- x̄
    # zero the outer optimizer's state (momentum) at the start of every epoch (the study does for slowmo)
    restart_each_epoch: bool = False


@dataclass
class SlowmoConfig(LocalMethodBase):
    """SlowMo (Wang et al. 2020, Alg. 1): outer.lr is the slow learning rate α (the step is
    α γ, γ the inner lr) and outer.momentum the slow momentum β."""

    outer: OuterOptimizerConfig = _outer(lr=1.0, momentum=0.6)


@dataclass
class DilocoConfig(LocalMethodBase):
    """DiLoCo (Douillard et al. 2023): outer SGD with Nesterov momentum, the paper's lr 0.7 and momentum 0.9."""

    outer: OuterOptimizerConfig = _outer(lr=0.7, momentum=0.9, nesterov=True)
    # Kale et al. 2025: the outer step at once on the stale average with this worker's own Δ fresh; the
    # average is waited for at the next sync (dpl.core.methods.streaming)
    eager: bool = False


@dataclass
class StreamingDilocoConfig(DilocoConfig):
    """Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512): the model cut into ``fragments``
    contiguous groups of layers, fragment p synced at the steps t of an epoch with (t − p H/P) mod H = 0,
    its outer step applied ``delay`` inner steps after its all-reduce started, and the landed global
    fragment mixed into the local one: x_k <- alpha x_k + (1 − alpha) x. fragments 1, delay 0, alpha 0 is DiLoCo."""

    fragments: int = 2  # P
    delay: int = 0  # τ: inner steps a fragment's all-reduce is in flight
    alpha: float = 0.0  # weight of the local fragment when the global one lands

    def __post_init__(self) -> None:
        _at_least("method.fragments", self.fragments, 1, "an integer")
        _at_least("method.delay", self.delay, 0, "an integer")
        _check(_finite(self.alpha) and 0.0 <= self.alpha < 1.0, "method.alpha", self.alpha, "0 <= x < 1")
        if self.eager and self.delay:
            raise ConfigError(f"method.delay={self.delay} is invalid with method.eager=true: an eager sync's "
                              f"average lands at the fragment's next sync (allowed method.delay=0)")


@dataclass
class PostLocalConfig(LocalMethodBase):
    """Post-local SGD (Lin et al. 2020): synchronous until switch_epoch, then LocalSGD."""

    switch_epoch: int = 75  # the first epoch of local steps

    def __post_init__(self) -> None:
        _at_least("method.switch_epoch", self.switch_epoch, 0, "an integer")


# --- dynamic_h (defaults are the study's values; see dpl.core.dynamic_h)


@dataclass
class DynamicHBase:
    name: str = MISSING


@dataclass
class HRangeConfig(DynamicHBase):
    """linear / pow2 range, and the halve (H > h_min) / double (H < h_max) guards of the adaptive ones."""

    h_min: int = 4
    h_max: int = 64

    def __post_init__(self) -> None:
        _at_least("dynamic_h.h_min", self.h_min, 1, "an integer")
        _check(self.h_max >= self.h_min, "dynamic_h.h_max", self.h_max, f"an integer >= h_min ({self.h_min})")


@dataclass
class ImprovementConfig(HRangeConfig):
    patience: int = 4  # halve after every epoch once this many in a row had no new best (study: c > 3)

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("dynamic_h.patience", self.patience, 1, "an integer")


@dataclass
class AvgLossConfig(HRangeConfig):
    n_losses: int = 3  # act once more than this many val losses exist; two windows of n_losses / 2

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.n_losses >= 2 and self.n_losses % 2 == 0, "dynamic_h.n_losses", self.n_losses,
               "an even integer >= 2 for avg_loss")


@dataclass
class LossConfig(HRangeConfig):
    n_losses: int = 3  # act once more than this many val losses exist
    trend: int = 3  # this many latest val losses must rise (fall) strictly to halve (double) H

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("dynamic_h.n_losses", self.n_losses, 2, "an integer")
        _at_least("dynamic_h.trend", self.trend, 2, "an integer")


@dataclass
class RevCosineConfig(DynamicHBase):
    low_divisor: float = 22.0  # lower bound = steps_per_epoch / this
    high_divisor: float = 2.0  # upper bound = steps_per_epoch / this
    snap: float = 0.05  # one more sync when the epoch's leftover steps are <= this fraction

    def __post_init__(self) -> None:
        _positive("dynamic_h.low_divisor", self.low_divisor)
        _positive("dynamic_h.high_divisor", self.high_divisor)
        _check(0 <= self.snap < 1, "dynamic_h.snap", self.snap, "a number in [0, 1)")


@dataclass
class SigmoidConfig(RevCosineConfig):
    midpoint: float = 75.0  # epoch of the midpoint
    steepness: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("dynamic_h.steepness", self.steepness)


# --- engine

MEMORY_FORMATS = ("auto", "contiguous", "channels_last")  # engine.memory_format (dpl.core.workers.memory_format)


@dataclass
class EngineBase:
    name: str = MISSING
    # how the local step runs (dpl.core.step): auto (graph on CUDA where it can, none otherwise) |
    # none (eager) | graph (one replayed CUDA graph) | compile (torch.compile)
    compile: str = "auto"
    eval_batch_size: int = 1000  # images per evaluation batch (the results do not depend on it)
    # the layout of image batches entering the model: auto (channels_last on CPU, where it measured
    # faster; contiguous on CUDA) | contiguous | channels_last (dpl.core.workers.memory_format)
    memory_format: str = "auto"

    def __post_init__(self) -> None:
        _one_of("engine.compile", self.compile, ("auto", "none", "graph", "compile"))
        _one_of("engine.memory_format", self.memory_format, MEMORY_FORMATS)
        _at_least("engine.eval_batch_size", self.eval_batch_size, 1, "an integer")


@dataclass
class SimulatedEngineConfig(EngineBase):
    simulate: str = "auto"  # how the K forwards run: vmap | loop | auto (picks per device)

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("engine.simulate", self.simulate, ("auto", "vmap", "loop"))


@dataclass
class DistributedEngineConfig(EngineBase):
    backend: str = "auto"  # auto: nccl on cuda, gloo on cpu
    spawn: bool = False  # start K local processes from one command
    timeout_s: float = 300.0  # a rank that dies or hangs ends the job after this long
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # spawn: the launcher's store; 0 = a free port

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("engine.backend", self.backend, ("auto", "gloo", "nccl"))
        _positive("engine.timeout_s", self.timeout_s)
        _check(0 <= self.master_port < 65536, "engine.master_port", self.master_port, "0 (a free port) to 65535")


# --- compression (dpl.comm.codecs): what a sync of a local method sends


@dataclass
class CompressionBase:
    name: str = MISSING


@dataclass
class CompressorConfig(CompressionBase):
    """A lossy compressor of each worker's pseudo-gradient (fp16, bf16, sign)."""

    # keep what was not sent in a per-worker residual and add it at the next sync
    # (Stich et al. 2018; Karimireddy et al. 2019)
    error_feedback: bool = False


@dataclass
class SparseConfig(CompressorConfig):
    """top-k / random-k: a fraction of each tensor's elements."""

    ratio: float = 0.01

    def __post_init__(self) -> None:
        _check(_finite(self.ratio) and 0.0 < self.ratio <= 1.0, "compression.ratio", self.ratio, "0 < x <= 1")


@dataclass
class Int8Config(CompressorConfig):
    chunk: int = 1024  # elements per fp32 scale (0: one scale per tensor)

    def __post_init__(self) -> None:
        _at_least("compression.chunk", self.chunk, 0, "an integer")


# --- logger


@dataclass
class LoggerBase:
    name: str = MISSING
    plots: bool = True  # PNG figures of the run in its job dir (and in MLflow with logger=mlflow)
    # The names a run is grouped and shown under (MLflow's experiment and run name). Every logger
    # has them because sweeps and study rows set them, and `logger=none` must still compose there.
    experiment: str = "dpl"
    run_name: Optional[str] = None

    def __post_init__(self) -> None:
        _check(bool(str(self.experiment).strip()), "logger.experiment", self.experiment, "a non-empty name")


@dataclass
class MlflowLoggerConfig(LoggerBase):
    tracking_uri: str = "sqlite:///mlflow.db"  # relative sqlite paths resolve against the launch dir

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(str(self.tracking_uri).strip()), "logger.tracking_uri", self.tracking_uri, "a non-empty URI")


_HRANGE = ("asc_linear", "desc_linear", "asc_pow2", "desc_pow2")

# group -> option -> schema; the options are the YAML files conf/<group>/<option>.yaml
SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {"cifar10": FileDatasetConfig, "cifar100": FileDatasetConfig,
                "fashion_mnist": FileDatasetConfig, "synthetic": SyntheticDatasetConfig, "text": TextDatasetConfig},
    "model": {"lenet5": ModelConfig, "resnet20": ModelConfig, "gpt": GptConfig, "gpt_tiny": GptConfig,
              "gpt_small": GptConfig},
    "optimizer": {"sgdm": SgdmConfig, "adamw": AdamwConfig, "lars": LarsConfig, "lamb": LambConfig,
                  "muon": MuonConfig},
    "scheduler": {"constant": SchedulerBase, "cosine": CosineConfig, "poly": PolyConfig, "step": StepConfig},
    "method": {"centralized": MethodBase, "localsgd": LocalMethodBase, "slowmo": SlowmoConfig,
               "diloco": DilocoConfig, "streaming_diloco": StreamingDilocoConfig, "post_local": PostLocalConfig},
    "dynamic_h": {"constant": DynamicHBase, **{n: HRangeConfig for n in _HRANGE},
                  "improvement": ImprovementConfig, "loss": LossConfig, "avg_loss": AvgLossConfig,
                  "sigmoid": SigmoidConfig, "rev_cosine": RevCosineConfig},
    "engine": {"simulated": SimulatedEngineConfig, "distributed": DistributedEngineConfig},
    "logger": {"mlflow": MlflowLoggerConfig, "none": LoggerBase},
    "compression": {"none": CompressionBase, "topk": SparseConfig, "randomk": SparseConfig, "sign": CompressorConfig,
                    "int8": Int8Config, "fp8": Int8Config, "fp4": Int8Config, "fp16": CompressorConfig,
                    "bf16": CompressorConfig},
}


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
class FaultsConfig:
    """Workers that fail a sync (dpl.comm.drops): the DiLoCo paper's dropped outer gradients."""

    # each worker's contribution to a local method's sync is dropped with this probability, drawn from
    # (seed, sync, worker); the average is over the workers that arrived
    drop_prob: float = 0.0

    def __post_init__(self) -> None:
        _check(_finite(self.drop_prob) and 0.0 <= self.drop_prob <= 1.0, "faults.drop_prob", self.drop_prob,
               "0 <= x <= 1")


@dataclass
class ClockConfig:
    """The modelled compute time of the workers (dpl.comm.clock): per-sample cost and speed spread."""

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
LR_SCALINGS = ("none", "linear", "sqrt")  # see dpl.core.loop.scaled_lr


@dataclass
class Config:
    # typed by each group's base; the option's YAML merges its own schema (a subclass) in
    dataset: DatasetBase = MISSING
    model: ModelConfig = MISSING
    optimizer: OptimizerBase = MISSING
    scheduler: SchedulerBase = MISSING
    method: MethodBase = MISSING
    dynamic_h: DynamicHBase = MISSING
    engine: EngineBase = MISSING
    logger: LoggerBase = MISSING
    # a default, not MISSING: the config of a job from before the group existed resumes as compression=none
    compression: CompressionBase = field(default_factory=lambda: CompressionBase(name="none"))
    network: NetworkConfig = field(default_factory=NetworkConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

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
    ablation: str = "none"  # which study behaviour conf/ablation/ switched to the paper's (dpl.config.study)

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
        if isinstance(self.scheduler, SchedulerBase) and self.scheduler.interval == "epoch":
            _check(float(self.warmup_epochs).is_integer(), "warmup_epochs", self.warmup_epochs,
                   "a whole number of epochs with scheduler.interval=epoch")
        _at_least("checkpoint_every", self.checkpoint_every, 0, "an integer")


GROUPS = tuple(SCHEMAS)


def option_schema(group: str, option: str) -> type:
    """The schema of ``<group>=<option>``; ConfigError naming the options if there is none."""
    options = SCHEMAS[group]
    if option not in options:
        raise ConfigError(f"{group}={option!r} is invalid: allowed one of {', '.join(sorted(options))}")
    return options[option]


def option_keys(group: str, option: str) -> list[str]:
    """The keys ``<group>=<option>`` has (``name`` first)."""
    return [f.name for f in dataclasses.fields(option_schema(group, option))]


def register_configs() -> None:
    """Store the top-level schema (``conf/config.yaml`` names it first in its defaults) and every
    option's schema as ``schema/<group>/<option>``, which the option's YAML names in its defaults
    (``- /schema/optimizer/lars@_here_``): a YAML or override with a key its option does not have
    then fails composition."""
    store = ConfigStore.instance()
    store.store(name="dpl_schema", node=Config)
    # conf/config.yaml's hydra.run.dir and hydra.output_subdir: a resumed or tested job writes into its own dir
    OmegaConf.register_new_resolver("dpl.job_dir", continued_job_dir, replace=True)
    OmegaConf.register_new_resolver("dpl.output_subdir",
                                    lambda resume, test_only, ckpt: None if continued_job(resume, test_only, ckpt)
                                    else ".hydra", replace=True)
    for group, options in SCHEMAS.items():
        for option, schema in options.items():
            store.store(group=f"schema/{group}", name=option, node=schema)


def continued_job(resume: Any, test_only: Any, checkpoint: Any) -> Optional[Path]:
    """The job dir that ``resume=`` (or ``test_only=true checkpoint=``) continues, if it exists: the
    run writes there, not into a new, empty job dir (a missing one is reported by the run, in one line)."""
    target = resume or (checkpoint if str(test_only).lower() == "true" else None)
    if not target or str(target) == "null":
        return None
    path = Path(str(target).strip("'\"")).expanduser().resolve()
    job = path if path.is_dir() else path.parent
    return job if job.is_dir() else None


def continued_job_dir(resume: Any, test_only: Any, checkpoint: Any, new: str) -> str:
    """``hydra.run.dir``: the continued job's dir (:func:`continued_job`), else ``new``."""
    job = continued_job(resume, test_only, checkpoint)
    return str(job) if job is not None else new


def typed(container: Any) -> DictConfig:
    """A plain config (a checkpoint's, a test's dict) as the typed config Hydra would compose:
    each group's node under its option's schema. Keys an option does not have are dropped:
    checkpoints written before the per-option schemas carried every option's keys."""
    data = OmegaConf.to_container(container) if isinstance(container, DictConfig) else dict(container)
    cfg = OmegaConf.structured(Config)
    for group in GROUPS:
        node = data.get(group)
        if not isinstance(node, dict) or "name" not in node:
            continue
        schema = option_schema(group, node["name"])
        cfg[group] = OmegaConf.structured(schema)
        keys = set(option_keys(group, node["name"]))
        data[group] = {k: v for k, v in node.items() if k in keys}
    return OmegaConf.merge(cfg, data)


def check_options(cfg: DictConfig) -> None:
    """Each group's node must carry its option's schema: ``optimizer.name=lars`` on the command
    line would keep sgdm's keys; the option is chosen with ``optimizer=lars``."""
    for group in GROUPS:
        node = cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        schema = option_schema(group, node.name)
        if OmegaConf.get_type(node) is not schema:
            raise ConfigError(f"{group}.name={node.name!r} is invalid: choose the option with {group}={node.name}, "
                              f"which brings its keys")
def to_schema(cfg: DictConfig) -> Config:
    """Instantiate the dataclasses (running every range check); raise ConfigError in one line.

    Whether each group's name is a registered option, and checks across groups, are
    :func:`dpl.config.validate.validate`'s (it knows every registry; this module knows none).
    """
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf type errors carry the key in their message
        raise ConfigError(str(e).splitlines()[0]) from None
