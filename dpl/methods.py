"""Training methods: what happens to gradients each step and to parameters at a sync.

The loop in :mod:`dpl.train` calls ``on_gradients`` after every backward pass and
``sync`` at the end of every period of H local steps. Methods only see the stacked
workers and their communicator, so the same code runs in the one-process simulation
and on torch.distributed.
"""

from __future__ import annotations

from typing import Any

import torch

from dpl.comm import param_bytes
from dpl.engine.workers import StackedWorkers
from dpl.registry import lookup


class Method:
    name = "base"
    local = False  # True: workers step on their own and average every H steps

    def __init__(self, cfg: Any, local_momentum: str = "keep") -> None:
        self.cfg, self.local_momentum = cfg, local_momentum

    def on_gradients(self, workers: StackedWorkers) -> None:
        """Called after backward, before the inner optimizer step."""

    def sync(self, workers: StackedWorkers, optimizer: torch.optim.Optimizer, lr: float) -> int:
        """Called at the end of a period of local steps; returns the bytes (per replica) of
        optimizer state it all-reduced beside the parameters (``local_momentum=average``)."""
        return 0

    def on_epoch_start(self) -> None:
        """Called before the first step of every epoch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Centralized(Method):
    """Synchronous data parallelism: the K workers' gradients are averaged every step.

    With equal per-worker batches this is one step on the union batch of K x batch_size
    (the mean of per-worker mean losses), as DistributedDataParallel computes it.
    """

    name = "centralized"

    def on_gradients(self, workers: StackedWorkers) -> None:
        if workers.K > 1:
            workers.average_grads_()


class LocalSGD(Method):
    """LocalSGD (Stich 2019; Lin et al. 2020, "Don't use large mini-batches, use local SGD").

    Each worker takes H steps of the inner optimizer on its own shard; then
    x_k <- (1/K) sum_j x_j for every worker k (Lin et al. 2020, Algorithm 1).
    """

    name = "localsgd"
    local = True

    def sync(self, workers: StackedWorkers, optimizer: torch.optim.Optimizer, lr: float) -> int:
        workers.average_params_()
        return sync_inner_state(optimizer, workers, self.local_momentum)


class SlowMo(LocalSGD):
    """SlowMo (Wang et al. 2020, "SlowMo: Improving communication-efficient distributed SGD
    with slow momentum", Algorithm 1), on top of LocalSGD's average.

    With x the parameters at the previous sync, x̄ the new average and γ the current
    inner learning rate:  u <- β u + (x - x̄) / γ ;  x <- x - α γ u ; every worker
    restarts from x. (x - x̄) is the pseudo-gradient: it points *against* the direction
    the workers moved, so subtracting α γ u moves the model forward. With β = 0 and
    α = 1 this is exactly LocalSGD.
    """

    name = "slowmo"

    def __init__(self, cfg: Any, local_momentum: str = "keep") -> None:
        super().__init__(cfg, local_momentum)
        self.anchor: list[torch.Tensor] | None = None  # x at the previous sync, one replica
        self.u: list[torch.Tensor] | None = None  # slow momentum buffers

    @torch.no_grad()
    def sync(self, workers: StackedWorkers, optimizer: torch.optim.Optimizer, lr: float) -> int:
        if self.anchor is None:  # first sync: the start of training is the previous sync
            raise RuntimeError("SlowMo.start(workers) must be called before the first sync")
        workers.average_params_()
        beta, alpha = self.cfg.beta, self.cfg.alpha
        for p, x, u in zip(workers.params, self.anchor, self.u):
            x_bar = p[:1]
            u.mul_(beta).add_((x - x_bar) / lr)
            x.sub_(alpha * lr * u)
            p.copy_(x)
        return sync_inner_state(optimizer, workers, self.local_momentum)

    @torch.no_grad()
    def on_epoch_start(self) -> None:
        """``method.restart_each_epoch``: u <- 0, as the study's fresh SlowMo optimizer per epoch."""
        if getattr(self.cfg, "restart_each_epoch", False) and self.u is not None:
            for u in self.u:
                u.zero_()

    def start(self, workers: StackedWorkers) -> None:
        """Record the initial parameters as the first anchor (all workers are equal then)."""
        self.anchor = [p.detach()[:1].clone() for p in workers.params]
        self.u = [torch.zeros_like(x) for x in self.anchor]

    def state_dict(self) -> dict:
        return {"anchor": self.anchor, "u": self.u}

    def load_state_dict(self, state: dict) -> None:
        self.anchor, self.u = state["anchor"], state["u"]


METHODS: dict[str, type[Method]] = {"centralized": Centralized, "localsgd": LocalSGD, "slowmo": SlowMo}


def build_method(cfg: Any, local_momentum: str) -> Method:
    return lookup(METHODS, "method", cfg.name)(cfg, local_momentum)


@torch.no_grad()
def sync_inner_state(optimizer: torch.optim.Optimizer, workers: StackedWorkers, mode: str) -> int:
    """What happens to the inner optimizer's state (momentum, Adam moments) at a sync.

    keep: every worker keeps its own; reset: cleared, as after a restart; average: every
    per-parameter state tensor is averaged across workers like the parameters, in one
    more all-reduce. Returns the bytes of one replica's share of what was all-reduced.
    """
    if mode == "keep":
        return 0
    if mode == "reset":
        optimizer.state.clear()
        return 0
    if mode != "average":
        raise ValueError(f"local_momentum={mode!r} is invalid: allowed keep, reset, average")
    stacked = [t for p in workers.params for t in optimizer.state.get(p, {}).values()
               if torch.is_tensor(t) and t.shape == p.shape]
    if not stacked:  # before the first step (or after a restart) there is no state to send
        return 0
    workers.comm.mean_(stacked)
    return param_bytes(stacked, per_worker=True)
