"""What every method tells the loop: what happens after backward, and when a sync happens.

The loop in :mod:`dpl.core.loop` has no method-specific branch. After each backward pass it
calls :meth:`Method.on_gradients`; after the inner optimizer's step it asks
:meth:`Method.syncs_after` whether this step ends a period (or starts or lands a sync), and if so
calls :meth:`Method.sync`; :meth:`Method.period_ends` says when the count of local steps starts
over. Periods are counted over the whole run, as in the papers, which have no epochs: an epoch's
end syncs only where the run asks for it (``sync_at_epoch_end``, the study's code). Methods only
see the stacked workers (and, through them, the one communication point), so the same code runs
in the simulation and on torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from dpl.core.workers import StackedWorkers


@dataclass(frozen=True)
class Now:
    """Where the step that just ended stands, as a method's schedule reads it."""

    epoch: int  # the epoch in progress (counted from 0)
    period: int  # local steps since the period began, this one included, counted across epochs
    H: int  # local steps per period (of this epoch: dynamic_h may change it at an epoch start)
    step: int  # steps of the whole run, this one included
    epoch_end: bool = False  # the step ends an epoch and the run syncs there (sync_at_epoch_end)


class Method:
    # True: on_gradients may change the gradients (an all-reduce); a captured step then replays in two
    # graphs with the hook between them, instead of one (dpl.core.step)
    edits_gradients = False

    def __init__(self, cfg: Any, local_momentum: str = "keep") -> None:
        self.cfg, self.local_momentum = cfg, local_momentum

    def start(self, workers: StackedWorkers, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Called once, before training, with the workers at their initial (equal) weights and the inner
        optimizer that steps them (None where a method is built alone)."""

    def on_epoch_start(self, workers: StackedWorkers, epoch: int) -> None:
        """Called before the first step of every epoch."""

    def on_gradients(self, workers: StackedWorkers, epoch: int) -> None:
        """Called after backward, before the inner optimizer step."""

    def syncs_after(self, now: Now) -> bool:
        """Whether the step ``now`` ends with a sync. Asked once per step; a sync follows a True at once."""
        return False

    def period_ends(self, now: Now) -> bool:
        """Whether the count of local steps starts over after the step ``now`` (its sync, if any, done):
        after H steps, and at an epoch's end where the run syncs there."""
        return now.period >= now.H or now.epoch_end

    def global_model(self, workers: StackedWorkers, kind: str = "eval") -> dict[str, torch.Tensor]:
        """The model the method stands for, as a ``state_dict``, for validation, test, the best model and
        the checkpoint's ``model``, without changing the workers: their average (through the point, as
        bookkeeping traffic of ``kind``), equal to every worker right after a sync."""
        return workers.mean_replica(kind)

    def timeline(self, clock: Any) -> Optional[float]:
        """Given the workers' modelled clock (:class:`dpl.comm.clock.WorkerClock`), the time factor of one step
        of the loop when the method keeps a timeline of its own (an asynchronous method's tick: the fastest
        worker's step, min_k s_k); None: the synchronous rule, a step ends when the slowest worker's does."""
        return None

    def stepped(self) -> Optional[list[bool]]:
        """Which of this process's workers take the step in progress (asked before it, and after it until the
        sync: its metrics and samples count); None: all of them. Another worker's rows are given back after
        the step (an asynchronous worker between its steps, an elastic worker away): what it computed is
        thrown away, and a process with none due computes nothing (:meth:`dpl.core.step.LocalStep.idle`)."""
        return None

    def record(self) -> dict[str, float]:
        """The method's own numbers since the last record, added to it (asynchronous: arrivals, staleness)."""
        return {}

    def pull_model(self, workers: StackedWorkers) -> dict[str, torch.Tensor]:
        """The model a worker that joins the run starts from (``faults.schedule``): the global model."""
        return self.global_model(workers, "eval")

    def sync(self, workers: StackedWorkers, optimizer: torch.optim.Optimizer, lr: float) -> Optional[torch.Tensor]:
        """The sync at the end of a period of local steps. Returns this process's term of the workers'
        drift before it (:func:`dpl.core.state.drift_term`), or None when no sync of the model landed."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def worker_state(self) -> dict[str, list[torch.Tensor]]:
        """What each worker holds of the method's own ([K_local, ...] tensors, per key), saved with the
        workers' state: the multi-process engine stacks it over ranks, as the parameters."""
        return {}

    def load_worker_state(self, state: dict[str, list[torch.Tensor]]) -> None:
        """This process's share of :meth:`worker_state` (after :meth:`load_state_dict`)."""
