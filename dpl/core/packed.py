"""The local steps of several runs as one fused step: R runs' K workers stacked [R·K, ...].

A packed sweep (:mod:`dpl.pack`) trains runs that share their shapes in one process. With
``engine.simulate=vmap`` their forward and backward run as one vmapped call over all R·K
workers (:func:`dpl.core.workers.packed_losses`), the way dpl's K workers are one stacked
call already (HFTA, Wang et al. 2021, "Horizontally Fused Training Array"); on CUDA with
``engine.compile=graph`` the whole fused step is captured as one CUDA graph, as one run's step
is (:class:`dpl.core.step.GraphStep`). What stays per run is what carries its own
hyperparameters: each run's gradient hook and its inner optimizer's step, whose lr is the run's
own device tensor (written from its own lr table before every step), as are its weight decay and
momentum in its own optimizer. The syncs are outside the step, per run, on each run's schedule.

With ``engine.simulate=loop`` nothing is fused: each run's own step runs in turn, which is
exactly the run alone, bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dpl.components.data.device import make_batch
from dpl.core.engines import GRAPH
from dpl.core.step import GraphStep, LocalStep, Outputs
from dpl.core.workers import packed_losses


class PackedStep(LocalStep):
    """The eager fused step of the runs whose own steps are ``members`` (their workers in vmap mode,
    the same batch shape, at the same global step)."""

    def __init__(self, members: Sequence[LocalStep]) -> None:  # noqa: D107 - LocalStep's fields, from the members
        self.members = list(members)
        lead = self.members[0]
        self.workers, self.key = lead.workers, lead.key  # a captured step turns the lead's autocast cache off
        self.edits_gradients = any(m.edits_gradients for m in self.members)
        self.sizes = [m.workers.k_local for m in self.members]

    def __call__(self, idx: torch.Tensor, step: int, lr_i: int, epoch: int) -> Outputs:
        """Step ``step`` of every member on its batch ``idx[r]`` (``idx`` [R, K, B]) at entry ``lr_i``
        of its own lr table; each worker's loss and correct count [R·K], run by run."""
        self.set_inputs(step, lr_i)
        return self.eager(idx, epoch)

    def takes_fast_path(self, idx: torch.Tensor) -> bool:
        return True  # fused: one step for the members' own

    def set_inputs(self, step: int, lr_i: int) -> None:
        for m in self.members:
            m.set_inputs(step, lr_i)

    def batch_losses(self, idx: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # each run's batch from its own data, cropped by its own key (its seed's), as alone
        batches = [make_batch(m.data, idx[r], m.key, train=True, rows=m.rows) for r, m in enumerate(self.members)]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        losses, correct = packed_losses([m.workers for m in self.members], x, y)
        return losses.sum(), losses.detach(), correct

    def on_gradients(self, epoch: int) -> None:  # type: ignore[override] - a method here, a callable there
        for m in self.members:
            m.on_gradients(epoch)

    def optimizer_step(self) -> None:
        for m in self.members:
            m.optimizer_step()

    def clear_grads(self, set_to_none: bool) -> None:
        for m in self.members:
            m.clear_grads(set_to_none)

    def graph_tensors(self) -> list[torch.Tensor]:
        return [t for m in self.members for t in m.graph_tensors()]

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        """A fused output [R·K] as each member's [K]."""
        return list(out.split(self.sizes))


class PackedGraphStep(GraphStep, PackedStep):
    """The fused step captured as one CUDA graph per batch shape and replayed (GraphStep's rules:
    warm-up steps on a side stream, a fresh capture when a member's optimizer state is replaced)."""

    def __init__(self, members: Sequence[LocalStep]) -> None:
        PackedStep.__init__(self, members)
        self.captured, self.warm, self.failed = {}, {}, False
        self.side = torch.cuda.Stream(device=self.key.device)


def fused_step(members: Sequence[LocalStep], mode: str) -> PackedStep:
    """The fused step of ``members`` for their resolved ``engine.compile`` ``mode`` (graph: captured)."""
    return PackedGraphStep(members) if mode == GRAPH else PackedStep(members)
