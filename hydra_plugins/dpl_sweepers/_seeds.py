"""Several seeds per Optuna trial: each seed is its own job, the trial's value is their mean.

The name starts with ``_`` so that Hydra's plugin scan, which executes every other module of
``hydra_plugins`` anew, leaves this one (and its classes) as imported.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, List, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus


class SeedsLauncher:
    """Stands between Hydra's Optuna sweeper and its launcher: a batch of trials becomes a batch
    of trials × seeds jobs, and their returns are folded back into one return per trial, which
    the sweeper tells Optuna as it does a job's. Optuna's trials get the per-seed values as the
    user attrs ``seeds`` and ``seed_values`` (None for a seed that failed or diverged)."""

    def __init__(self, launcher: Any, seeds: List[int]) -> None:
        self.launcher = launcher
        self.seeds = seeds
        self.trials: list = []  # the batch's Optuna trials, in the order of its overrides
        # The sweeper numbers jobs by the returns it gets back (one per trial): the jobs' own
        # numbers, hence their dirs under the sweep dir, are counted here.
        self.job_idx = 0

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> List[JobReturn]:
        jobs = [[*overrides, f"seed={seed}"] for overrides in job_overrides for seed in self.seeds]
        returns = self.launcher.launch(jobs, initial_job_idx=self.job_idx)
        self.job_idx += len(returns)
        n = len(self.seeds)
        per_trial = [returns[i * n:(i + 1) * n] for i in range(len(job_overrides))]
        for trial, seed_returns in zip(self.trials, per_trial):
            trial.set_user_attr("seeds", list(self.seeds))
            trial.set_user_attr("seed_values", [_value(r) for r in seed_returns])
        return [fold(overrides, seed_returns, self.seeds) for overrides, seed_returns in zip(job_overrides, per_trial)]


def _value(ret: JobReturn) -> Optional[float]:
    """A job's objective, or None when it failed or returned no finite number (dpl's diverged
    job returns the string ``diverged``)."""
    if ret.status != JobStatus.COMPLETED:
        return None
    try:
        value = float(ret._return_value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def fold(overrides: Sequence[str], returns: Sequence[JobReturn], seeds: Sequence[int]) -> JobReturn:
    """One trial's return from its seeds' returns. A failed seed's own return stands for the
    trial (the sweeper then reports that job's error and overrides, and marks the trial FAIL);
    a diverged seed makes the value a string naming it, which the sweeper marks FAIL too: a mean
    over the seeds that survived would reward an lr for diverging only sometimes."""
    failed = next((r for r in returns if r.status != JobStatus.COMPLETED), None)
    if failed is not None:
        return failed
    values = [_value(r) for r in returns]
    lost = [str(seed) for seed, value in zip(seeds, values) if value is None]
    mean: Any = f"diverged (seed {', '.join(lost)})" if lost else statistics.fmean(values)
    return dataclasses.replace(returns[0], overrides=list(overrides), _return_value=mean)
