"""Rows of the stacked workers kept aside over a step and given back after it.

Every worker of this process computes in every step (they are one stacked tensor); a worker that should
not have stepped (an asynchronous worker with no step due, an elastic worker away from the run) gets its
parameters, buffers and inner optimizer state back as they were, so the step it computed is thrown away,
as an idle GPU's would be. State the step created for the first time (momentum, Adam's moments) was zeros
before it. The inner optimizer's scalar step count is shared by the rows and is not given back. When no
worker of the process has the step due, nothing is computed at all (:meth:`dpl.core.step.LocalStep.idle`):
the rows it gives back are the same.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from dpl.core.workers import StackedWorkers


class KeptRows:
    """The rows ``rows`` (indices into this process's workers) of the workers and their inner optimizer."""

    def __init__(self, workers: StackedWorkers, optimizer: Optional[torch.optim.Optimizer], rows: Sequence[int]) -> None:
        self.rows = torch.tensor(list(rows), dtype=torch.long, device=workers.params[0].device)
        self.params = [p.detach().index_select(0, self.rows) for p in workers.params]
        self.buffers = [b.index_select(0, self.rows) for b in workers.buffers]
        self.state = [{name: t.index_select(0, self.rows) for name, t in per_worker_state(optimizer, p).items()}
                      for p in workers.params]

    @torch.no_grad()
    def give_back(self, workers: StackedWorkers, optimizer: Optional[torch.optim.Optimizer]) -> None:
        for p, v in zip(workers.params, self.params):
            p.index_copy_(0, self.rows, v)
        for b, v in zip(workers.buffers, self.buffers):
            b.index_copy_(0, self.rows, v)
        for p, kept in zip(workers.params, self.state):
            for name, t in per_worker_state(optimizer, p).items():
                t.index_copy_(0, self.rows, kept[name] if name in kept else torch.zeros_like(t[: len(self.rows)]))


def keep(workers: StackedWorkers, optimizer: Optional[torch.optim.Optimizer], rows: Sequence[int]) -> Optional[KeptRows]:
    """The rows kept aside (None when there are none)."""
    return KeptRows(workers, optimizer, rows) if rows else None


def per_worker_state(optimizer: Optional[torch.optim.Optimizer], p: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inner optimizer's state of ``p`` that is stacked over the workers like it (not its scalar step)."""
    state = {} if optimizer is None else optimizer.state.get(p, {})
    return {name: t for name, t in state.items() if torch.is_tensor(t) and t.shape == p.shape}


@torch.no_grad()
def zero_state_rows(optimizer: Optional[torch.optim.Optimizer], params: Sequence[torch.Tensor],
                    rows: Sequence[int]) -> None:
    """The inner optimizer's per-worker state of ``rows`` set to zeros: those workers start afresh."""
    for p in params:
        for t in per_worker_state(optimizer, p).values():
            t[list(rows)] = 0
