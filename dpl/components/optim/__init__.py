"""Optimizers: the ``optimizer`` group's options (the inner step) and the outer optimizers of the local
methods (``method.outer.name``), each registered here with its schema.

An inner optimizer's builder takes ``(params, cfg, lr, weight_decay, per_worker, capturable)``: the
stacked parameters [K, ...] of the workers (or torch's param groups of them: a group without weight
decay, :mod:`dpl.components.optim.decay`), its config node, the run's lr and weight decay (the
top-level keys), whether every parameter carries a worker dimension (LARS and LAMB take their norms
per worker then), and whether it must step inside a CUDA graph (torch's fused SGD and capturable
AdamW read a device lr). Gradient clipping (``grad_clip_norm``) is not the builders': the local step
clips for every optimizer (:mod:`dpl.components.optim.clip`). An outer optimizer's builder takes the
same over the float64 anchor of a local method (:mod:`dpl.core.methods.outer`), one tensor per
parameter, no worker dimension; any ``torch.optim.Optimizer`` will do, as torchft's DiLoCo takes one.
torch's optimizers are used as they are; LARS and LAMB (:mod:`dpl.components.optim.layerwise`) and
Muon (:mod:`dpl.components.optim.muon`) are written here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

from omegaconf import MISSING

from dpl.config.schema import at_least, betas, check, finite, fraction, key, one_of, positive
from dpl.registry import Registry


@dataclass(frozen=True)
class OptimizerFacts:
    # every value that changes between steps lives in a device tensor (the lr, a step count): a CUDA
    # graph can capture its step, and torch.compile compiles it once
    capturable: bool = False


OPTIMIZERS = Registry("optimizer", "the inner optimizer every worker steps with", facts=OptimizerFacts())
OUTER_OPTIMIZERS = Registry("outer", "the outer optimizer of a local method's sync", key="method.outer.name")
CAPTURABLE = OptimizerFacts(capturable=True)


# ----------------------------------------------------------------------------- schemas


DECAY_PARAMS = ("auto", "all", "matrices")  # optimizer.decay_params (dpl.components.optim.decay)


@dataclass
class OptimizerBase:
    """``lr`` and ``weight_decay`` are the optimizer's defaults; the top-level keys ``lr`` /
    ``weight_decay`` (which interpolate these) are what training reads. What every inner optimizer has
    besides: the gradient clip the local step applies before its step (:mod:`dpl.components.optim.clip`)
    and which parameters its weight decay applies to (:mod:`dpl.components.optim.decay`)."""

    name: str = key(MISSING, "the inner optimizer (an option of the group)")
    lr: float = key(0.01, "its default learning rate (the top-level lr follows it unless set)")
    weight_decay: float = key(0.0, "its default weight decay (the top-level weight_decay follows it unless set)")
    grad_clip_norm: Optional[float] = key(None, "clip each worker's gradient to this 2-norm over all its parameters "
                                                "before the step, as clip_grad_norm_ (null: no clip; nanoGPT: 1.0)")
    grad_clip_eps: float = key(1e-6, "the clip scales by min(1, grad_clip_norm / (norm + eps)) (torch's eps)")
    decay_params: str = key("auto", "which parameters weight decay applies to: all; matrices (not 1-D parameters "
                                    "- biases, norm weights - nor embeddings); auto: the model's default "
                                    "(matrices for the GPTs, all for the image models)")

    def __post_init__(self) -> None:
        positive("optimizer.lr", self.lr)
        at_least("optimizer.weight_decay", self.weight_decay, 0.0)
        if self.grad_clip_norm is not None:
            positive("optimizer.grad_clip_norm", self.grad_clip_norm)
        at_least("optimizer.grad_clip_eps", self.grad_clip_eps, 0.0)
        one_of("optimizer.decay_params", self.decay_params, DECAY_PARAMS)


@dataclass
class SgdmConfig(OptimizerBase):
    """torch.optim.SGD with (heavy-ball or Nesterov) momentum."""

    weight_decay: float = key(4e-4, "its default weight decay (L2, in the gradient)")
    momentum: float = key(0.9, "momentum coefficient")
    nesterov: bool = key(False, "Nesterov's look-ahead (with momentum 0: the plain step)")

    def __post_init__(self) -> None:
        super().__post_init__()
        fraction("optimizer.momentum", self.momentum)


@dataclass
class AdamwConfig(OptimizerBase):
    """torch.optim.AdamW (Loshchilov & Hutter 2019)."""

    lr: float = key(1e-3, "its default learning rate")
    weight_decay: float = key(0.01, "its default weight decay (decoupled)")
    betas: list[float] = key([0.9, 0.999], "decay rates of the first and second moments")
    eps: float = key(1e-8, "added to the second moment's root")

    def __post_init__(self) -> None:
        super().__post_init__()
        betas("optimizer.betas", self.betas)
        positive("optimizer.eps", self.eps)


@dataclass
class MuonConfig(OptimizerBase):
    """Muon (Jordan et al. 2024) for the 2-D weights with torch.optim.Muon's defaults, AdamW (betas, eps)
    for the rest; lr and weight_decay are both sides' (:class:`dpl.components.optim.muon.Muon`)."""

    lr: float = key(0.02, "its default learning rate (both sides)")
    momentum: float = key(0.95, "Muon's momentum")
    nesterov: bool = key(True, "Nesterov's look-ahead in Muon's update")
    ns_steps: int = key(5, "Newton-Schulz iterations of the orthogonalisation")
    adjust_lr_fn: Optional[str] = key(None, "torch's lr adjustment: null / original (sqrt(max(1, out/in))) or "
                                            "match_rms_adamw")
    betas: list[float] = key([0.9, 0.999], "AdamW's decay rates (the non-matrix parameters)")
    eps: float = key(1e-8, "AdamW's eps")

    def __post_init__(self) -> None:
        super().__post_init__()
        fraction("optimizer.momentum", self.momentum)
        check(isinstance(self.ns_steps, int) and 1 <= self.ns_steps < 100, "optimizer.ns_steps", self.ns_steps,
              "an integer in [1, 100)")
        if self.adjust_lr_fn is not None:
            one_of("optimizer.adjust_lr_fn", self.adjust_lr_fn, ("original", "match_rms_adamw"))
        betas("optimizer.betas", self.betas)
        positive("optimizer.eps", self.eps)


@dataclass
class TrustRatioBase(OptimizerBase):
    """What LARS and LAMB share: a layer-wise trust ratio (:mod:`dpl.components.optim.layerwise`)."""

    eps: float = key(1e-8, "added to the trust ratio's denominator")
    exclude_1d: bool = key(True, "biases and norm weights: no weight decay, no adaptation")
    max_trust_ratio: Optional[float] = key(None, "clip the trust ratio from above (null: no clip)")
    grad_clip_eps: float = key(0.0, "0: min(1, grad_clip_norm / norm), the clip LARS and LAMB had (the study's "
                                    "LAMB; NVIDIA apex's FusedLAMB)")

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("optimizer.eps", self.eps)
        if self.max_trust_ratio is not None:
            positive("optimizer.max_trust_ratio", self.max_trust_ratio)


@dataclass
class LarsConfig(TrustRatioBase):
    """LARS (You et al. 2017) on SGD momentum."""

    lr: float = key(1.0, "its default learning rate")
    weight_decay: float = key(5e-4, "its default weight decay")
    momentum: float = key(0.9, "momentum coefficient")
    trust_coefficient: float = key(0.001, "eta: the trust ratio is eta ||w|| / (||g|| + wd ||w||)")
    wd_in_grad_norm: bool = key(False, "the study: the ratio (and its zero test) from ||g + wd w||")
    momentum_form: str = key("lr_inside", "where the lr enters the momentum: lr_inside (v <- m v + lr d; w <- w - v, "
                                          "You et al. 2017, Alg. 1) or lr_outside (torch SGD's v <- m v + d; "
                                          "w <- w - lr v); the same unless the lr changes")

    def __post_init__(self) -> None:
        super().__post_init__()
        fraction("optimizer.momentum", self.momentum)
        positive("optimizer.trust_coefficient", self.trust_coefficient)
        one_of("optimizer.momentum_form", self.momentum_form, ("lr_inside", "lr_outside"))


@dataclass
class LambConfig(TrustRatioBase):
    """LAMB (You et al. 2020, Algorithm 2) on Adam moments."""

    lr: float = key(0.008, "its default learning rate")
    weight_decay: float = key(0.01, "its default weight decay (decoupled, on the update)")
    betas: list[float] = key([0.9, 0.999], "decay rates of the first and second moments")
    eps: float = key(1e-6, "added to the second moment's root")
    bias_correction: bool = key(True, "Adam's bias correction of both moments")
    trust_ratio_only_with_wd: bool = key(False, "the study: adapt only tensors whose weight decay is not 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        betas("optimizer.betas", self.betas)


@dataclass
class OuterOptimizerConfig:
    """``method.outer``: the optimizer of a local method's outer step, over the float64 anchor x with
    gradient the pseudo-gradient Δ = x − x̄ (:mod:`dpl.core.methods.outer`).

    ``sgd`` reads momentum and nesterov (Nesterov with momentum 0 is plain SGD, so a preset's
    ``nesterov: true`` survives ``momentum=0``); ``adam`` / ``adamw`` read betas and eps; weight_decay is
    L2 in the gradient for sgd and adam, decoupled for adamw (Loshchilov & Hutter 2019).
    """

    name: str = key("sgd", "the outer optimizer: one of OUTER_OPTIMIZERS (dpl.components.optim; sgd, adam, adamw "
                           "and those an extension registers)")
    lr: float = key(1.0, "outer learning rate (SlowMo: its slow lr alpha)")
    momentum: float = key(0.0, "outer momentum (SlowMo: its slow momentum beta; sgd)")
    nesterov: bool = key(False, "Nesterov momentum (sgd)")
    betas: list[float] = key([0.9, 0.999], "decay rates of the moments (adam, adamw)")
    eps: float = key(1e-8, "added to the second moment's root (adam, adamw)")
    weight_decay: float = key(0.0, "outer weight decay")

    def __post_init__(self) -> None:
        one_of("method.outer.name", self.name, tuple(OUTER_OPTIMIZERS))
        positive("method.outer.lr", self.lr)
        check(finite(self.momentum) and 0.0 <= self.momentum < 1.0, "method.outer.momentum", self.momentum,
              "0 <= x < 1")
        betas("method.outer.betas", self.betas)
        positive("method.outer.eps", self.eps)
        at_least("method.outer.weight_decay", self.weight_decay, 0.0)


# ----------------------------------------------------------------------------- inner optimizers


@OPTIMIZERS.register("sgdm", SgdmConfig, facts=CAPTURABLE)
@OUTER_OPTIMIZERS.register("sgd", OuterOptimizerConfig)
def sgdm(params: list, cfg: Any, lr: Any, weight_decay: float, per_worker: bool, capturable: bool = False) -> Any:
    """torch.optim.SGD. ``capturable``: its fused kernel reads a tensor lr on the device, where the foreach
    path would read it on the host (an item() per step, which a CUDA graph cannot capture)."""
    import torch

    # Nesterov's look-ahead with momentum 0 is the plain step (torch refuses the pair instead)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=bool(cfg.nesterov) and cfg.momentum > 0,
                           weight_decay=weight_decay, fused=True if capturable else None)


@OPTIMIZERS.register("adamw", AdamwConfig, facts=CAPTURABLE)
@OUTER_OPTIMIZERS.register("adamw", OuterOptimizerConfig)
def adamw(params: list, cfg: Any, lr: Any, weight_decay: float, per_worker: bool, capturable: bool = False) -> Any:
    """torch.optim.AdamW; ``capturable``: its step count lives on the device too, so a captured step
    advances it on replay."""
    import torch

    return torch.optim.AdamW(params, lr=lr, betas=tuple(float(b) for b in cfg.betas), eps=cfg.eps,
                             weight_decay=weight_decay, capturable=capturable)


@OUTER_OPTIMIZERS.register("adam", OuterOptimizerConfig)
def adam(params: list, cfg: Any, lr: Any, weight_decay: float, per_worker: bool, capturable: bool = False) -> Any:
    """torch.optim.Adam (weight decay as L2 in the gradient)."""
    import torch

    return torch.optim.Adam(params, lr=lr, betas=tuple(float(b) for b in cfg.betas), eps=cfg.eps,
                            weight_decay=weight_decay, capturable=capturable)


@OPTIMIZERS.register("lars", LarsConfig, facts=CAPTURABLE)
def lars(params: list, cfg: Any, lr: Any, weight_decay: float, per_worker: bool, capturable: bool = False) -> Any:
    """LARS (You et al. 2017, Algorithm 1; :class:`dpl.components.optim.layerwise.LARS`)."""
    from dpl.components.optim.layerwise import LARS

    return LARS(params, lr=lr, momentum=cfg.momentum, weight_decay=weight_decay,
                trust_coefficient=cfg.trust_coefficient, eps=cfg.eps, exclude_1d=cfg.exclude_1d,
                max_trust_ratio=cfg.max_trust_ratio, wd_in_grad_norm=cfg.wd_in_grad_norm,
                momentum_form=cfg.momentum_form, per_worker=per_worker)


@OPTIMIZERS.register("lamb", LambConfig, facts=CAPTURABLE)
def lamb(params: list, cfg: Any, lr: Any, weight_decay: float, per_worker: bool, capturable: bool = False) -> Any:
    """LAMB (You et al. 2020, Algorithm 2; :class:`dpl.components.optim.layerwise.LAMB`)."""
    from dpl.components.optim.layerwise import LAMB

    return LAMB(params, lr=lr, betas=tuple(float(b) for b in cfg.betas), eps=cfg.eps,
                weight_decay=weight_decay, exclude_1d=cfg.exclude_1d, max_trust_ratio=cfg.max_trust_ratio,
                bias_correction=cfg.bias_correction, trust_ratio_only_with_wd=cfg.trust_ratio_only_with_wd,
                per_worker=per_worker)


@OPTIMIZERS.register("muon", MuonConfig)
def muon(params: list, cfg: Any, lr: Any, weight_decay: float, per_worker: bool, capturable: bool = False) -> Any:
    """Muon for the matrices, AdamW for the rest (:class:`dpl.components.optim.muon.Muon`); its Muon side keeps
    a host step count, so it does not step inside a CUDA graph."""
    from dpl.components.optim.muon import Muon

    return Muon(params, lr=lr, weight_decay=weight_decay, momentum=cfg.momentum, nesterov=bool(cfg.nesterov),
                ns_steps=cfg.ns_steps, adjust_lr_fn=cfg.adjust_lr_fn, betas=tuple(float(b) for b in cfg.betas),
                eps=cfg.eps, per_worker=per_worker)


def build_optimizer(params: Iterable[Any], cfg: Any, lr: Any, weight_decay: float, per_worker: bool = False,
                    capturable: bool = False) -> Any:
    """The inner optimizer of the ``optimizer`` node ``cfg`` over ``params`` (tensors, or param groups: a
    group's own ``weight_decay`` overrides the run's); ``lr`` and ``weight_decay`` come
    from the top-level config, not from ``cfg``; ``per_worker``: every parameter carries a leading worker
    dimension [K, ...]; ``capturable``: torch's optimizers in their graph-safe form (:mod:`dpl.core.step`)."""
    return OPTIMIZERS.build(cfg.name, list(params), cfg, lr, weight_decay, per_worker, capturable=capturable)


def build_outer_optimizer(anchor: Iterable[Any], cfg: Any) -> Any:
    """The outer optimizer of the ``method.outer`` node over the anchor, with its own lr and weight_decay
    (the outer step sets the lr of each sync in ``param_groups``)."""
    return OUTER_OPTIMIZERS.build(cfg.name, list(anchor), cfg, cfg.lr, cfg.weight_decay, per_worker=False)
