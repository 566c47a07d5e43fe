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

import numpy as np

SPEEDS = ("constant", "lognormal", "slow")


def worker_speeds(K: int, speed: str, seed: int, spread: float = 0.5, slow_fraction: float = 0.25,
                  slow_factor: float = 2.0) -> np.ndarray:
    """Per-worker time factors s_k >= 0 (1 = nominal), a pure function of the arguments."""
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
