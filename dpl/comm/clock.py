"""A modelled clock: how long a run would take on a cluster, as a function of the config and seed.

The simulation's own wall time is noise (K workers share one machine that is busy with
other things), so time-to-accuracy is modelled instead, with the usual decomposition of a
data-parallel step into compute and communication (the alpha-beta model of Hockney 1994,
as in the DiLoCo line of work, Douillard et al. 2023 / 2025):

- compute: each worker processes a sample in ``c`` seconds times its own speed factor
  s_k (1 = nominal, 2 = twice as slow). A period of local steps ends when the slowest
  worker has finished it, so a period of P steps of batch B costs P · B · c · max_k s_k;
- communication (:func:`dpl.comm.cost.sync_time_s`): every all-reduce of n bytes per replica
  costs, on a ring, 2 (K − 1) α + 2 (K − 1)/K · n / β; through one parameter server,
  2 α + 2 K n / β (the server's link carries every worker's push and pull);
- modelled time = Σ over the run of compute + communication.

``c`` is ``clock.sample_cost_us`` or, left null, measured once per run: the mean
compute time per sample and worker of the first epoch, then fixed (and checkpointed).
The speed factors are drawn once per run from the seed (``clock.speed``): all 1
(``constant``), lognormal with median 1 and ``clock.spread`` the sigma of log s, or a
``clock.slow_fraction`` of the workers ``clock.slow_factor`` times slower (``slow``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from dpl.config.schema import at_least, check, key, one_of, positive

SPEEDS = ("constant", "lognormal", "slow")


@dataclass
class ClockConfig:
    """``clock``: the modelled compute time of the workers, per-sample cost and speed spread."""

    sample_cost_us: Optional[float] = key(None, "compute per sample and worker at speed 1, in microseconds; "
                                                "null: measured in the first epoch")
    speed: str = key("constant", "the workers' time factors, drawn from the seed: constant (all 1) | lognormal | "
                                 "slow (a share of them slower)")
    spread: float = key(0.5, "lognormal: sigma of the log time factor (median 1)")
    slow_fraction: float = key(0.25, "slow: this share of the workers ...")
    slow_factor: float = key(2.0, "... takes this many times longer per sample")

    def __post_init__(self) -> None:
        if self.sample_cost_us is not None:
            positive("clock.sample_cost_us", self.sample_cost_us)
        one_of("clock.speed", self.speed, SPEEDS)
        at_least("clock.spread", self.spread, 0.0)
        check(0.0 <= self.slow_fraction <= 1.0, "clock.slow_fraction", self.slow_fraction, "0 <= x <= 1")
        at_least("clock.slow_factor", self.slow_factor, 1.0)


def worker_speeds(K: int, speed: str, seed: int, spread: float = 0.5, slow_fraction: float = 0.25,
                  slow_factor: float = 2.0) -> Any:
    """Per-worker time factors s_k >= 0 (1 = nominal) as a NumPy array, a pure function of the arguments."""
    import numpy as np

    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, 4]))
    if speed == "constant":
        return np.ones(K)
    if speed == "lognormal":
        return np.exp(rng.normal(0.0, spread, size=K))
    if speed == "slow":
        s = np.ones(K)
        slow = rng.permutation(K)[: int(round(slow_fraction * K))]
        s[slow] = slow_factor
        return s
    raise ValueError(f"clock.speed={speed!r} is invalid: allowed {', '.join(SPEEDS)}")
