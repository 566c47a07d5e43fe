"""Dropped workers: which workers' contributions reach a sync (``faults.drop_prob``).

The DiLoCo paper (Douillard et al. 2023, Sec. 3.3, "Robustness to dropped gradients") drops each
worker's outer gradient with probability p at every outer step and averages what arrived. Here
the draw is a pure function of (seed, sync, worker), so every process of ``engine=distributed``,
a resumed run and the simulation see the same workers missing, and p = 0 draws nothing at all
(the run is today's, bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpl.config.schema import check, finite, key
from dpl.hashing import mix

_SALT = 0xD80F  # keeps the drop draws apart from the other streams keyed by (seed, sync, ...)


@dataclass
class FaultsConfig:
    """``faults``: workers that fail a sync, the DiLoCo paper's dropped outer gradients."""

    drop_prob: float = key(0.0, "each worker's contribution to a local method's sync is dropped with this "
                                "probability, drawn from (seed, sync, worker); the average is over those that arrived")

    def __post_init__(self) -> None:
        check(finite(self.drop_prob) and 0.0 <= self.drop_prob <= 1.0, "faults.drop_prob", self.drop_prob,
              "0 <= x <= 1")


class Drops:
    """Each worker's contribution to sync ``sync`` is dropped with probability ``p``."""

    def __init__(self, p: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"faults.drop_prob={p!r} is invalid: allowed 0 <= x <= 1")
        self.p, self.seed = float(p), seed

    def arrived(self, sync: int, K: int) -> Any:
        """A bool tensor per worker [K] (True: its contribution arrived) — None when none can be dropped."""
        import torch

        if self.p == 0.0:
            return None
        # u_k = mix(seed, sync, k) / 2^63 in [0, 1): dropped when u_k < p (so p = 1 drops every worker)
        u = torch.tensor([mix(self.seed, _SALT, sync, k) / 2.0**63 for k in range(K)], dtype=torch.float64)
        return u >= self.p
