"""Equal-budget comparisons: what a run spent before it first reached a target accuracy (or bits per byte).

Step-matched comparisons (the same epochs for every method) favour whichever method spends more
per epoch. Local methods are compared in the field at an equal budget instead: the samples seen,
the bytes sent or the (modelled) time needed to reach a target quality (Lin et al., "Don't use
large mini-batches, use local SGD", ICLR 2020; Douillard et al., "DiLoCo", 2023). A run's history
has, per epoch, the validation accuracy and each cumulative budget; the budget to target is their
value at the first epoch whose validation accuracy reaches the target.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from dpl.comm.cost import RESCALED_FIELDS, epoch_time_at

# Cumulative per-epoch metrics (history.csv columns, MLflow metric histories): what was spent so far.
BUDGETS = ("samples_total", "sync_rounds_total", "comm_bytes_total", "modelled_time_s")
ACCURACY = "val_acc"
# what a budget's target may be set on: the validation accuracy (higher is better), or a language model's
# validation bits per byte or loss (lower is better)
TARGET_METRICS = ("val_acc", "val_bpb", "val_loss")
LOWER_IS_BETTER = frozenset({"val_bpb", "val_loss"})

History = Mapping[str, Sequence[tuple[int, float]]]  # key -> [(epoch number from 1, value)]


def final_value(history: History, key: str = ACCURACY) -> float:
    """The last epoch's value of ``key`` (nan without one)."""
    points = history.get(key) or []
    return max(points)[1] if points else math.nan


def reaches(value: float, target: float, key: str = ACCURACY) -> bool:
    """``value`` of ``key`` is at the target: at least it, or at most it where lower is better."""
    return value <= target if key in LOWER_IS_BETTER else value >= target


def target_text(target: float, key: str = ACCURACY) -> str:
    """The target in words: "41.20 % validation accuracy", "3.912 validation bits per byte"."""
    if key == "val_bpb":
        return f"{target:.3f} validation bits per byte"
    if key == "val_loss":
        return f"{target:.4f} validation loss"
    return f"{100 * target:.2f} % validation accuracy"


def to_target(history: History, target: float, key: str = ACCURACY) -> Optional[dict[str, float]]:
    """``{"epoch": e, budget: value at e, ...}`` for the first epoch e whose ``key`` reaches ``target``
    (:func:`reaches`); None when no epoch does. A budget the run did not log is nan."""
    for epoch, value in sorted(history.get(key) or []):
        if reaches(value, target, key):
            spent = {"epoch": float(epoch)}
            for budget in BUDGETS:
                at = dict(history.get(budget) or [])
                spent[budget] = float(at.get(epoch, math.nan))
            return spent
    return None


def time_to_target_at(history: History, target: float, bandwidth_gbps: float, recorded_gbps: float,
                      key: str = ACCURACY) -> Optional[float]:
    """The modelled time a run took to first reach ``target`` had its network had ``bandwidth_gbps``
    instead of the ``recorded_gbps`` it ran with: its epochs up to that one, each rescaled by
    :func:`dpl.comm.cost.epoch_time_at`. None when no epoch reaches the target, nan when the run
    did not log the fields that needs (runs from before they were recorded)."""
    spent = to_target(history, target, key)
    if spent is None:
        return None
    fields = {f: dict(history.get(f) or []) for f in RESCALED_FIELDS}
    epochs = range(1, int(spent["epoch"]) + 1)
    if any(e not in fields[f] for f in RESCALED_FIELDS for e in epochs):
        return math.nan
    return sum(epoch_time_at({f: fields[f][e] for f in RESCALED_FIELDS}, bandwidth_gbps, recorded_gbps)
               for e in epochs)
