"""Bookkeeping beside the training loop: the epoch's metric sums, the epoch record, the
best model and early stopping. The loop calls these; it does not do their work."""

from __future__ import annotations

import math
from typing import Any

import torch

from dpl.errors import Diverged


class EpochSums:
    """Training loss and correct count of the epoch in progress, summed on the device.

    Every step adds its per-worker losses without reading them, so the step never waits
    for the device; the epoch's end (or a checkpoint) reads the sums once. The sample
    count is known on the host from the batch shapes.
    """

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0

    def add(self, losses: torch.Tensor, correct: torch.Tensor, batch: int) -> None:
        """``losses`` [K_local]: each worker's mean loss over its ``batch`` samples; ``correct`` [K_local]."""
        self.loss += losses.detach().sum().double() * batch
        self.correct += correct.sum()
        self.seen += losses.numel() * batch

    def read(self) -> tuple[float, int, int]:
        """(loss sum, correct, seen) on the host: one device read."""
        return float(self.loss), int(self.correct), self.seen

    def load(self, loss_sum: float, correct: int, seen: int) -> None:
        self.loss.fill_(loss_sum)
        self.correct.fill_(int(correct))
        self.seen = int(seen)

    def reset(self) -> None:
        self.load(0.0, 0, 0)


def check_finite(train_loss: float, epoch: int) -> None:
    if not math.isfinite(train_loss):
        raise Diverged(f"training loss is {train_loss} in epoch {epoch}")


def track_best(state: Any, val_acc: float, patience: int) -> bool:
    """Update ``state``'s best validation accuracy, its epoch and the early-stopping count
    after epoch ``state.epoch`` (0-based while it runs; ``best_epoch`` counts from 1, as the log
    and history.csv do); True when this epoch is a new best."""
    improved = val_acc > state.best_val_acc
    if improved:
        state.best_val_acc, state.best_epoch, state.bad_epochs = val_acc, state.epoch + 1, 0
    else:
        state.bad_epochs += 1
    state.stopped_early = 0 < patience <= state.bad_epochs
    return improved


def drift_term(workers: torch.Tensor, mean: torch.Tensor, K: int) -> torch.Tensor:
    """This process's share of the workers' drift, sum_k ||x_k − x̄|| / (K ||x̄||) over its workers.

    ``workers`` [K_local, n] holds each local worker's parameters flattened together, ``mean`` [n]
    the average x̄ over all K; summed over the processes (the trainer's end-of-epoch sum) the terms
    give mean_k ||x_k − x̄|| / ||x̄||: how far the workers moved apart before a sync. 0 when x̄ = 0 or
    the workers are equal. Float64, so the small differences between workers are not lost to
    rounding, and a 0-dim tensor left on the device (the trainer sums it there and reads the sum
    once per epoch), so a sync costs no device-to-host read; x̄ = 0 is decided on the device too.
    """
    norm = mean.norm()
    spread = (workers - mean).norm(dim=1).sum()
    return torch.where(norm > 0, spread / norm.clamp_min(torch.finfo(torch.float64).tiny) / K, 0.0)
