"""SlowMo: the outer step of :class:`~dpl.core.methods.outer.OuterStep`, scaled by the inner lr.

LocalSGD and DiLoCo are OuterStep itself, with their presets of ``method.outer``
(``conf/method/localsgd.yaml``, ``conf/method/diloco.yaml``).
"""

from __future__ import annotations

from dpl.core.methods.outer import OuterStep


class SlowMo(OuterStep):
    """SlowMo (Wang et al. 2020, "SlowMo: Improving communication-efficient distributed SGD
    with slow momentum", Algorithm 1, lines 8-9), with γ the current inner learning rate:

        u <- β u + (x − x̄) / γ ;   x <- x − α γ u

    which is ``method.outer`` (SGD, momentum β = ``method.outer.momentum``, no dampening) with
    learning rate α γ (α = ``method.outer.lr``) and gradient Δ / γ. With β = 0 and α = 1 this is
    LocalSGD. Another outer optimizer (``method.outer.name=adam``) gets the same α γ and Δ / γ.
    """


    def outer_lr(self, inner_lr: float) -> float:
        return self.cfg.outer.lr * inner_lr

    def grad_scale(self, inner_lr: float) -> float:
        return 1.0 / inner_lr
