"""What every method tells the loop: what happens after backward, and when a sync happens.

The loop in :mod:`dpl.core.loop` has no method-specific branch. After each backward pass it
calls :meth:`Method.on_gradients`; after the inner optimizer's step it asks
:meth:`Method.syncs_after` whether this step ends a period, and if so calls
:meth:`Method.sync`. Methods only see the stacked workers (and, through them, the one
communication point), so the same code runs in the simulation and on torch.distributed.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from dpl.core.workers import StackedWorkers


class Method:
    # True: on_gradients may change the gradients (an all-reduce); a captured step then replays in two
    # graphs with the hook between them, instead of one (dpl.core.step)
    edits_gradients = False

    def __init__(self, cfg: Any, local_momentum: str = "keep") -> None:
        self.cfg, self.local_momentum = cfg, local_momentum

    def start(self, workers: StackedWorkers) -> None:
        """Called once, before training, with the workers at their initial (equal) weights."""

    def on_epoch_start(self, workers: StackedWorkers, epoch: int) -> None:
        """Called before the first step of every epoch."""

    def on_gradients(self, workers: StackedWorkers, epoch: int) -> None:
        """Called after backward, before the inner optimizer step."""

    def syncs_after(self, epoch: int, period: int, H: int, last_step: bool, step: int) -> bool:
        """Whether the step that completed ``period`` local steps since the last sync (``step`` steps of
        this epoch) ends with a sync. Asked once per step; a sync follows a True at once."""
        return False

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
