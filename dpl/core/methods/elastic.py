"""Elastic workers around a synchronous local method: workers leave the run and join it (``faults.schedule``).

The DiLoCo paper's "adaptive compute" (Douillard et al. 2023, Sec. 3.4) changes the number of workers during
training; torchft's Manager re-forms its quorum at every sync. Here the schedule is a pure function of the
step (:class:`dpl.comm.drops.Membership`), and :class:`Elastic` wraps a local method (LocalSGD, SlowMo,
DiLoCo, streaming DiLoCo) without changing it:

- a worker away from the run computes a step that is thrown away (its rows given back,
  :mod:`dpl.core.methods.rows`), counts in no metric and no sample, and contributes to no average: the
  communication point averages over the workers in the run (``CommPoint.present``), as it does over the
  contributions that arrived with ``faults.drop_prob``;
- a worker that joins pulls the method's global model (:meth:`Method.pull_model`: the anchor x of the
  outer step) before its first step, and starts its inner optimizer afresh.

An asynchronous method keeps its own timeline and takes the membership itself
(:class:`dpl.core.methods.asynchronous.AsyncDiLoCo`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from dpl.comm.drops import Membership
from dpl.core.methods import rows
from dpl.core.methods.base import Method, Now
from dpl.core.workers import StackedWorkers


class Elastic(Method):
    """``inner`` with the workers of ``members`` at each step (see the module doc)."""

    def __init__(self, inner: Method, members: Membership) -> None:
        super().__init__(inner.cfg, inner.local_momentum)
        self.inner, self.members = inner, members
        self.edits_gradients = inner.edits_gradients
        self.next_step = 0  # the global step about to be taken (counted from 0)
        self._inner_due = False
        self._kept: Optional[rows.KeptRows] = None

    def timeline(self, clock: Any) -> Optional[float]:
        return self.inner.timeline(clock)

    def start(self, workers: StackedWorkers, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        self.inner.start(workers, optimizer)
        self.workers, self.optimizer = workers, optimizer
        self.first = workers.point.comm.rank * workers.k_local
        self._begin(0)

    def _present(self, step: int) -> list[bool]:
        """This process's workers in the run at ``step``."""
        return self.members.present(step)[self.first:self.first + self.workers.k_local]

    def _begin(self, step: int) -> None:
        """Step ``step`` is next: the point averages over its workers, the others' rows are kept aside."""
        self.next_step = step
        self.workers.point.present = self.members.arrived(step)
        self._kept = rows.keep(self.workers, self.optimizer, [i for i, p in enumerate(self._present(step)) if not p])

    # ------------------------------------------------------------------ the loop's calls
    def on_epoch_start(self, workers: StackedWorkers, epoch: int) -> None:
        self.inner.on_epoch_start(workers, epoch)

    def on_gradients(self, workers: StackedWorkers, epoch: int) -> None:
        self.inner.on_gradients(workers, epoch)

    def stepped(self) -> Optional[list[bool]]:
        return self._present(self.next_step)

    def syncs_after(self, now: Now) -> bool:
        self._inner_due = self.inner.syncs_after(now)
        return True  # every step: the away rows given back, the next step's workers

    def period_ends(self, now: Now) -> bool:
        return self.inner.period_ends(now)

    @torch.no_grad()
    def sync(self, workers: StackedWorkers, optimizer: torch.optim.Optimizer, lr: float) -> Optional[torch.Tensor]:
        kept, self._kept = self._kept, None
        if kept is not None:
            kept.give_back(workers, optimizer)
        drift = self.inner.sync(workers, optimizer, lr) if self._inner_due else None
        step = self.next_step + 1
        joining = self.members.joining(step)
        if joining:
            self._join(workers, optimizer, joining, step)
        self._begin(step)
        return drift

    def _join(self, workers: StackedWorkers, optimizer: torch.optim.Optimizer, joining: list[int], step: int) -> None:
        """The workers back from ``step`` on pull the global model (averaged over those in the run before
        them) and start their inner optimizer afresh."""
        model = self.inner.pull_model(workers)
        names = workers.param_names + workers.buffer_names
        mine = [k - self.first for k in joining if 0 <= k - self.first < workers.k_local]
        for _ in joining:
            workers.point.pull([p[0] for p in workers.params])  # one model to each worker that joins
        for row in mine:
            for name, t in zip(names, workers.params + workers.buffers):
                t[row].copy_(model[name])
        if mine:
            rows.zero_state_rows(optimizer, workers.params, mine)

    # ------------------------------------------------------------------ what the method reads out
    def global_model(self, workers: StackedWorkers, kind: str = "eval") -> dict[str, torch.Tensor]:
        return self.inner.global_model(workers, kind)

    def pull_model(self, workers: StackedWorkers) -> dict[str, torch.Tensor]:
        return self.inner.pull_model(workers)

    def record(self) -> dict[str, float]:
        """The inner method's, and how many workers were in the run at the record's last step."""
        return {**self.inner.record(), "workers_active": sum(self.members.present(self.next_step - 1))}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "elastic.next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.next_step = int(state.pop("elastic.next_step"))
        self.inner.load_state_dict(state)

    def worker_state(self) -> dict[str, list[torch.Tensor]]:
        return self.inner.worker_state()

    def load_worker_state(self, state: dict[str, list[torch.Tensor]]) -> None:
        self.inner.load_worker_state(state)
        self._begin(self.next_step)  # the workers and the optimizer are loaded: keep the away rows as they are


def with_members(method: Method, members: Optional[Membership]) -> Method:
    """``method`` with the elastic workers of ``members`` (None: as it is): an asynchronous method takes them
    itself (it keeps its own timeline), a synchronous one is wrapped in :class:`Elastic`."""
    if members is None:
        return method
    if hasattr(method, "members"):
        method.members = members
        return method
    return Elastic(method, members)
