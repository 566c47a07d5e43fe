"""The outer step of local methods: a real ``torch.optim`` optimizer on the pseudo-gradient.

Local methods let each worker take local steps of the inner optimizer; at a sync (Wang et
al. 2020, "SlowMo", Algorithm 1; Douillard et al. 2023, "DiLoCo", Algorithm 1):

1. the workers' parameters are averaged through the one communication point
   (:class:`dpl.comm.point.CommPoint`, which counts the bytes): x̄ = mean_k x_k;
2. the pseudo-gradient is Δ = x − x̄, with x the anchor (the global model after the
   previous sync). Δ points *against* the direction the workers moved;
3. an outer optimizer over the anchor takes one step with gradient s·Δ (s = 1, or 1/γ for
   SlowMo) and learning rate η_out: x ← OuterOpt(x, s·Δ). OuterOpt is ``method.outer``
   (:class:`dpl.components.optim.OuterOptimizerConfig`), built by :func:`dpl.components.optim.build_outer_optimizer`
   from the registry ``OUTER_OPTIMIZERS`` (torch's SGD, Adam, AdamW); torchft's DiLoCo likewise
   takes any ``torch.optim.Optimizer`` as its outer optimizer;
4. every worker restarts from the new x.

With ``compression`` other than none (:mod:`dpl.comm.codecs`), steps 1-2 become: every worker
sends its own Δ_k = x − x_k compressed (with error feedback, plus its residual), and the mean
over workers of the decoded Δ_k is the pseudo-gradient. Which of the two happens is the
point's business (:meth:`dpl.comm.point.CommPoint.start_pseudo_gradient`): the step below has one path.

With outer SGD, lr 1 and no momentum, step 3 gives x − Δ = x̄: plain LocalSGD averaging.
The anchor and the outer optimizer's state are kept in float64, so that x − (x − x̄)
gives back x̄ exactly (the difference of two float32 numbers is exact in float64) and
LocalSGD through the outer step equals plain averaging bit for bit.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from dpl.comm.point import DeltaResult
from dpl.components.optim import build_outer_optimizer
from dpl.core.methods.base import Method, Now
from dpl.core.workers import StackedWorkers


class OuterStep(Method):
    """The local methods: every H local steps of the run (and at an epoch's end with
    ``sync_at_epoch_end``, as the study's code does), the outer step
    x ← OuterOpt(x, Δ) with OuterOpt built from ``method.outer``. ``method=localsgd`` and
    ``method=diloco`` are this class with two presets of that node:

    - LocalSGD (Stich 2019; Lin et al. 2020, "Don't use large mini-batches, use local SGD",
      Algorithm 1): H inner steps per worker, then x_k ← (1/K) Σ_j x_j; as an outer step,
      SGD with lr 1 and no momentum: x ← x − Δ = x̄.
    - DiLoCo (Douillard et al. 2023, "DiLoCo", Algorithm 1): an inner AdamW
      (``optimizer=adamw``) for H steps, then SGD with Nesterov momentum, the paper's lr 0.7
      and momentum 0.9: b ← μ b + Δ; x ← x − η (Δ + μ b). Outer lr 1 without momentum is
      LocalSGD with the same inner optimizer.

    A subclass may scale the outer lr and the pseudo-gradient by the inner lr γ
    (:meth:`outer_lr`, :meth:`grad_scale`; SlowMo does). ``restart_each_epoch`` clears the
    outer optimizer's state (momentum, Adam moments) at every epoch start, as the study does
    for SlowMo.
    """


    def __init__(self, cfg: Any, local_momentum: str = "keep") -> None:
        super().__init__(cfg, local_momentum)
        self.anchor: list[torch.Tensor] | None = None  # x: the global model after the previous sync
        self.outer: torch.optim.Optimizer | None = None
        self.syncs = 0  # syncs so far in the run: the key of a compressor's randomness (random-k)

    # ------------------------------------------------------------------ what a subclass may change
    def make_outer(self, anchor: list[torch.Tensor]) -> torch.optim.Optimizer:
        return build_outer_optimizer(anchor, self.cfg.outer)

    def outer_lr(self, inner_lr: float) -> float:
        return self.cfg.outer.lr

    def grad_scale(self, inner_lr: float) -> float:
        return 1.0

    # ------------------------------------------------------------------ the loop's calls
    def start(self, workers: StackedWorkers, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        self.anchor = [p.detach()[0].double().clone() for p in workers.params]
        self.outer = self.make_outer(self.anchor)

    def on_epoch_start(self, workers: StackedWorkers, epoch: int) -> None:
        if getattr(self.cfg, "restart_each_epoch", False):
            self.outer.state.clear()

    def syncs_after(self, now: Now) -> bool:
        return self.period_ends(now)  # every H steps of the run (and an epoch's end, where the run asks)

    @torch.no_grad()
    def sync(self, workers: StackedWorkers, optimizer: torch.optim.Optimizer, lr: float) -> Optional[torch.Tensor]:
        if self.outer is None:
            raise RuntimeError(f"{type(self).__name__}.start(workers) must be called before the first sync")
        with workers.sync():
            landed, drift = workers.start_pseudo_gradient(self.anchor, self.syncs).wait()
        self.syncs += 1
        self.land(workers, optimizer, lr, landed, range(len(self.anchor)), range(len(workers.buffers)), mix=0.0)
        return drift

    @torch.no_grad()
    def land(self, workers: StackedWorkers, optimizer: torch.optim.Optimizer, lr: float, landed: DeltaResult,
             params: Sequence[int], buffers: Sequence[int], mix: float) -> None:
        """The outer step on the tensors ``params`` (indices; the anchor's and the workers'), once their
        pseudo-gradient has landed, then the workers take the new global model: x_k <- mix x_k + (1 − mix) x
        (mix 0: every worker restarts from x), and the averaged ``buffers``.

        A sync none of whose contributions arrived (``faults.drop_prob``) leaves the global model as it
        was: no outer step (an outer step on Δ = 0 would still move by its momentum)."""
        scale = self.grad_scale(lr)
        anchors = [self.anchor[i] for i in params]
        if landed.arrived:
            for x, delta in zip(anchors, landed.deltas):
                x.grad = delta.mul_(scale)  # the pseudo-gradient Δ = mean_k (x − x_k), float64
            for group in self.outer.param_groups:
                group["lr"] = self.outer_lr(lr)
            self.outer.step()  # steps only the tensors with a gradient: this sync's
        for x, i in zip(anchors, params):
            p = workers.params[i]
            if mix == 0.0:
                p.copy_(x.expand_as(p))  # every worker restarts from the new global model
            else:  # streaming's α: x_k <- α x_k + (1 − α) x, in float64 as the anchor is
                p.copy_(p.double().mul_(mix).add_(x, alpha=1.0 - mix))
            x.grad = None
        for b, mean in zip((workers.buffers[i] for i in buffers), landed.buffers):
            if mix == 0.0 or not b.is_floating_point():
                b.copy_(mean)
            else:
                b.mul_(mix).add_(mean, alpha=1.0 - mix)
        sync_inner_state(optimizer, workers, self.local_momentum, [workers.params[i] for i in params])

    def pull_model(self, workers: StackedWorkers) -> dict[str, torch.Tensor]:
        """The anchor x, the global model of the last sync, and the buffers the workers in the run average:
        what a worker that joins mid-period starts from (the others have moved on from x since)."""
        model = workers.mean_replica("eval")
        for name, x, p in zip(workers.param_names, self.anchor, workers.params):
            model[name] = x.to(p.dtype)
        return model

    def reset_anchor(self, workers: StackedWorkers) -> None:
        """x <- the workers' current (equal) weights; the outer state restarts."""
        with torch.no_grad():
            for x, p in zip(self.anchor, workers.params):
                x.copy_(p[0])
        self.outer.state.clear()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"anchor": [x.clone() for x in self.anchor], "outer": self.outer.state_dict(), "syncs": self.syncs}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():  # in place: the outer optimizer holds these very tensors
            for x, saved in zip(self.anchor, state["anchor"]):
                x.copy_(saved)
        self.outer.load_state_dict(state["outer"])
        self.syncs = state["syncs"]


@torch.no_grad()
def sync_inner_state(optimizer: torch.optim.Optimizer, workers: StackedWorkers, mode: str,
                     params: Optional[Sequence[torch.Tensor]] = None) -> None:
    """What happens to the inner optimizer's state (momentum, Adam moments) of the synced ``params``
    (default: all of the workers') at a sync.

    keep: every worker keeps its own; reset: cleared, as after a restart; average: every
    per-parameter state tensor is averaged across workers like the parameters (one more
    all-reduce through the comm point, counted as ``state``).
    """
    params = workers.params if params is None else params
    if mode == "keep":
        return
    if mode == "reset":
        if len(params) == len(workers.params):
            optimizer.state.clear()
        else:  # a fragment's: its tensors start over, the others keep theirs
            for p in params:
                optimizer.state.pop(p, None)
        return
    if mode != "average":
        raise ValueError(f"local_momentum={mode!r} is invalid: allowed keep, reset, average")
    stacked = [t for p in params for t in optimizer.state.get(p, {}).values()
               if torch.is_tensor(t) and t.shape == p.shape]
    if stacked:  # before the first step (or after a restart) there is no state to send
        workers.average_(stacked, "state")

