"""Synchronous data parallelism."""

from __future__ import annotations

from dpl.core.methods.base import Method
from dpl.core.workers import StackedWorkers


class Centralized(Method):
    """Synchronous data parallelism: the K workers' gradients are averaged every step.

    With equal per-worker batches this is one step on the union batch of K x batch_size
    (the mean of per-worker mean losses), as DistributedDataParallel computes it.
    """

    edits_gradients = True

    def on_gradients(self, workers: StackedWorkers, epoch: int) -> None:
        workers.average_grads_()
