"""LocalSGD, SlowMo and DiLoCo: the same local steps, three outer optimizers."""

from __future__ import annotations

import torch

from dpl.methods.outer import OuterStep


class LocalSGD(OuterStep):
    """LocalSGD (Stich 2019; Lin et al. 2020, "Don't use large mini-batches, use local SGD",
    Algorithm 1): each worker takes H steps of the inner optimizer on its own shard, then
    x_k <- (1/K) sum_j x_j for every k.

    As an outer step: SGD with lr 1 and no momentum on Δ = x − x̄, i.e. x ← x − Δ = x̄.
    """

    name = "localsgd"

    def make_outer(self, anchor: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(anchor, lr=1.0)


class SlowMo(OuterStep):
    """SlowMo (Wang et al. 2020, "SlowMo: Improving communication-efficient distributed SGD
    with slow momentum", Algorithm 1, lines 8-9), with γ the current inner learning rate:

        u <- β u + (x − x̄) / γ ;   x <- x − α γ u

    which is torch's SGD with momentum β (no dampening), learning rate α γ and gradient
    Δ / γ. With β = 0 and α = 1 this is LocalSGD.
    """

    name = "slowmo"

    def make_outer(self, anchor: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(anchor, lr=1.0, momentum=self.cfg.beta)

    def outer_lr(self, inner_lr: float) -> float:
        return self.cfg.alpha * inner_lr

    def grad_scale(self, inner_lr: float) -> float:
        return 1.0 / inner_lr


class DiLoCo(OuterStep):
    """DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
    Language Models", Algorithm 1): an inner AdamW (``optimizer=adamw``) for H steps, then
    the outer step θ ← OuterOpt(θ, Δ) with Δ = θ − mean_k θ_k and OuterOpt SGD with
    Nesterov momentum (the paper's values: outer lr 0.7, momentum 0.9).

    ``method.outer_lr``, ``method.outer_momentum`` and ``method.nesterov`` configure it; outer
    lr 1 without momentum is LocalSGD with the same inner optimizer.
    """

    name = "diloco"

    def make_outer(self, anchor: list[torch.Tensor]) -> torch.optim.Optimizer:
        momentum = self.cfg.outer_momentum
        return torch.optim.SGD(anchor, lr=self.cfg.outer_lr, momentum=momentum,
                               nesterov=bool(self.cfg.nesterov) and momentum > 0)

    def outer_lr(self, inner_lr: float) -> float:
        return self.cfg.outer_lr
