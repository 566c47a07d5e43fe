"""Training methods: the ``method`` group's options, each registered here with its schema and facts.

``centralized`` averages gradients every step; the local methods (``localsgd``, ``slowmo``, ``diloco``,
``streaming_diloco``) take local steps and then an outer step on the pseudo-gradient with the outer
optimizer ``method.outer`` (:mod:`dpl.core.methods.outer`); ``post_local`` switches from the first to the
second; ``async_localsgd`` and ``async_diloco`` apply each worker's pseudo-gradient the moment it arrives,
on the modelled clock (:mod:`dpl.core.methods.asynchronous`). ``localsgd`` and ``diloco`` are one class
each with presets of ``method.outer``. A method's
facts say how it communicates, so a config that asks the impossible (a dynamic H without local steps)
fails before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from dpl.components.optim import OuterOptimizerConfig
from dpl.config.schema import at_least, check, finite, key, one_of
from dpl.errors import ConfigError
from dpl.registry import Registry

STREAMING_SCHEDULES = ("paper", "torchft")
METHODS = Registry("method", "how the workers train together: what is averaged, and when")


@dataclass(frozen=True)
class MethodFacts:
    local_steps: bool  # workers take local steps between syncs in some part of the run
    averages_gradients: bool = False  # gradients are all-reduced in some steps (they cannot be compressed)
    # gradients are all-reduced at every step of the whole run: on ranks, DistributedDataParallel does it
    synchronous: bool = False
    # each worker's pseudo-gradient is applied the moment it arrives, on the method's own modelled timeline
    # (dpl.core.methods.asynchronous): every process holds a replica of the global model
    asynchronous: bool = False


# ----------------------------------------------------------------------------- schemas


@dataclass
class MethodBase:
    name: str = key(MISSING, "the method (an option of the group)")


@dataclass
class LocalMethodBase(MethodBase):
    """What every local method has: its outer optimizer, and whether its state restarts each epoch."""

    outer: OuterOptimizerConfig = key(OuterOptimizerConfig(), "the outer step (LocalSGD: SGD, lr 1, no momentum: "
                                                              "x <- the workers' average)")
    restart_each_epoch: bool = key(False, "zero the outer optimizer's state (momentum) at every epoch start "
                                          "(the study does for SlowMo)")


@dataclass
class SlowmoConfig(LocalMethodBase):
    """SlowMo (Wang et al. 2020, Alg. 1): outer.lr is the slow learning rate α (the step is α γ, γ the inner
    lr) and outer.momentum the slow momentum β."""

    outer: OuterOptimizerConfig = key(OuterOptimizerConfig(lr=1.0, momentum=0.6),
                                      "the slow step: lr alpha, momentum beta")


@dataclass
class DilocoConfig(LocalMethodBase):
    """DiLoCo (Douillard et al. 2023): outer SGD with Nesterov momentum, the paper's lr 0.7 and momentum 0.9."""

    outer: OuterOptimizerConfig = key(OuterOptimizerConfig(lr=0.7, momentum=0.9, nesterov=True),
                                      "the outer step: Nesterov SGD, lr 0.7, momentum 0.9 (the paper's)")
    eager: bool = key(False, "Kale et al. 2025: the outer step at once on the stale average with this worker's own "
                             "fresh pseudo-gradient; the average lands at the next sync, hidden behind H steps")


@dataclass
class StreamingDilocoConfig(DilocoConfig):
    """Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512): the model cut into ``fragments`` contiguous
    groups of layers synced in turn, fragment p at step (p + 1) H/P of every period of H steps (fragment 0
    first, as torchft orders them), its outer step applied ``delay`` inner steps after its all-reduce started,
    and the landed global fragment mixed into the local one: x_k <- alpha x_k + (1 − alpha) x. fragments 1,
    delay 0, alpha 0 is DiLoCo. H must be a multiple of fragments and delay < H / fragments."""

    fragments: int = key(2, "P: fragments of the model, synced in turn (one every H/P steps; H a multiple of P)")
    delay: int = key(0, "tau: inner steps a fragment's all-reduce is in flight before its outer step lands "
                        "(below H/P)")
    alpha: float = key(0.0, "weight of the local fragment when the global one lands (the paper mixes 0.5 with "
                            "tau > 0)")
    schedule: str = key("paper", "paper: a fragment's pseudo-gradient taken at its slot, landed tau steps later "
                                 "(Algorithm 1) | torchft: taken tau steps before the slot, landed at it "
                                 "(torchft 0.2.0)")

    def __post_init__(self) -> None:
        at_least("method.fragments", self.fragments, 1, "an integer")
        at_least("method.delay", self.delay, 0, "an integer")
        one_of("method.schedule", self.schedule, STREAMING_SCHEDULES)
        check(finite(self.alpha) and 0.0 <= self.alpha < 1.0, "method.alpha", self.alpha, "0 <= x < 1")
        if self.eager and self.delay:
            raise ConfigError(f"method.delay={self.delay} is invalid with method.eager=true: an eager sync's "
                              f"average lands at the fragment's next sync (allowed method.delay=0)")


@dataclass
class AsyncLocalsgdConfig(LocalMethodBase):
    """Asynchronous Local-SGD (Liu et al. 2024, arXiv 2401.09135): each worker's pseudo-gradient applied the moment
    it arrives, in the order of the modelled clock; its outer step per arrival, delayed Nesterov (Sec. 4) with
    nesterov_every > 1, and dynamic local updates. async_localsgd: outer SGD, lr 1, no momentum (x <- x − Δ_k)."""

    nesterov_every: int = key(1, "N, delayed Nesterov: the outer momentum updated once every N arrivals (with "
                                 "their mean), plain steps g/N between; 1: the outer optimizer every arrival")
    momentum_activation: float = key(0.0, "c, delayed Nesterov: the share c beta m of the momentum applied at "
                                          "each arrival between two updates (0 <= c <= 1/N)")
    dynamic_local_updates: bool = key(False, "each worker's H scaled by its speed, max(1, floor(H min_j s_j / s_k)): "
                                             "every round takes about the fastest worker's H steps of time")
    blocking_comm: bool = key(True, "a worker waits for its push and its pull on the modelled network (one "
                                    "message of the model each; the others compute meanwhile); false: free")

    def __post_init__(self) -> None:
        at_least("method.nesterov_every", self.nesterov_every, 1, "an integer")
        check(finite(self.momentum_activation) and 0.0 <= self.momentum_activation <= 1.0 / self.nesterov_every,
              "method.momentum_activation", self.momentum_activation, f"0 <= x <= 1/{self.nesterov_every}")
        if (self.nesterov_every > 1 or self.momentum_activation > 0) and self.outer.name != "sgd":
            raise ConfigError(f"method.outer.name={self.outer.name!r} is invalid with method.nesterov_every="
                              f"{self.nesterov_every}: delayed Nesterov is an outer SGD with momentum; allowed "
                              f"method.outer.name=sgd, or method.nesterov_every=1 method.momentum_activation=0")


@dataclass
class AsyncDilocoConfig(AsyncLocalsgdConfig):
    """Asynchronous DiLoCo (Liu et al. 2024): async_localsgd with DiLoCo's inner AdamW and outer Nesterov SGD."""

    outer: OuterOptimizerConfig = key(OuterOptimizerConfig(lr=0.7, momentum=0.9, nesterov=True),
                                      "the outer step per arrival: Nesterov SGD, lr 0.7, momentum 0.9 (DiLoCo's)")


@dataclass
class PostLocalConfig(LocalMethodBase):
    """Post-local SGD (Lin et al. 2020): synchronous until switch_epoch, then LocalSGD."""

    switch_epoch: int = key(75, "the first epoch of local steps (half of the default 150 epochs)")

    def __post_init__(self) -> None:
        at_least("method.switch_epoch", self.switch_epoch, 0, "an integer")


# ----------------------------------------------------------------------------- options


@METHODS.register("centralized", MethodBase,
                  facts=MethodFacts(local_steps=False, averages_gradients=True, synchronous=True))
def centralized(cfg: Any, local_momentum: str) -> Any:
    """Synchronous data parallelism: the gradients averaged every step (:class:`~.centralized.Centralized`)."""
    from dpl.core.methods.centralized import Centralized

    return Centralized(cfg, local_momentum)


@METHODS.register("localsgd", LocalMethodBase, facts=MethodFacts(local_steps=True))
def localsgd(cfg: Any, local_momentum: str) -> Any:
    """LocalSGD (Stich 2019; Lin et al. 2020): H local steps, then the average (:class:`~.outer.OuterStep`)."""
    from dpl.core.methods.outer import OuterStep

    return OuterStep(cfg, local_momentum)


@METHODS.register("slowmo", SlowmoConfig, facts=MethodFacts(local_steps=True))
def slowmo(cfg: Any, local_momentum: str) -> Any:
    """SlowMo (Wang et al. 2020): the outer step scaled by the inner lr (:class:`~.slowmo.SlowMo`)."""
    from dpl.core.methods.slowmo import SlowMo

    return SlowMo(cfg, local_momentum)


def diloco(cfg: Any, local_momentum: str) -> Any:
    """DiLoCo (Douillard et al. 2023) and its streaming form (:class:`~.streaming.StreamingDiLoCo`; DiLoCo is
    one fragment, no delay, no mixing)."""
    from dpl.core.methods.streaming import StreamingDiLoCo

    return StreamingDiLoCo(cfg, local_momentum)


METHODS.add("diloco", DilocoConfig, diloco, MethodFacts(local_steps=True), module=__name__)
METHODS.add("streaming_diloco", StreamingDilocoConfig, diloco, MethodFacts(local_steps=True), module=__name__)


def asynchronous(cfg: Any, local_momentum: str) -> Any:
    """Asynchronous DiLoCo and Local-SGD (Liu et al. 2024): every worker at its own modelled speed, each arrival
    applied at once (:class:`~.asynchronous.AsyncDiLoCo`)."""
    from dpl.core.methods.asynchronous import AsyncDiLoCo

    return AsyncDiLoCo(cfg, local_momentum)


ASYNCHRONOUS = MethodFacts(local_steps=True, asynchronous=True)
METHODS.add("async_localsgd", AsyncLocalsgdConfig, asynchronous, ASYNCHRONOUS, module=__name__)
METHODS.add("async_diloco", AsyncDilocoConfig, asynchronous, ASYNCHRONOUS, module=__name__)


@METHODS.register("post_local", PostLocalConfig, facts=MethodFacts(local_steps=True, averages_gradients=True))
def post_local(cfg: Any, local_momentum: str) -> Any:
    """Post-local SGD (Lin et al. 2020): synchronous first, then LocalSGD (:class:`~.post_local.PostLocal`)."""
    from dpl.core.methods.post_local import PostLocal

    return PostLocal(cfg, local_momentum)


def build_method(cfg: Any, local_momentum: str) -> Any:
    """The method of the ``method`` config node; ``local_momentum``: what a sync does to the inner state."""
    return METHODS.build(cfg.name, cfg, local_momentum)
