"""Dropped and elastic workers: which workers' contributions reach a sync (``faults.drop_prob``), and which
workers are in the run at each step (``faults.schedule``).

The DiLoCo paper (Douillard et al. 2023, Sec. 3.3, "Robustness to dropped gradients") drops each
worker's outer gradient with probability p at every outer step and averages what arrived. Here
the draw is a pure function of (seed, sync, worker), so every process of ``engine=distributed``,
a resumed run and the simulation see the same workers missing, and p = 0 draws nothing at all
(the run is today's, bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from dpl.config.schema import check, finite, key
from dpl.errors import ConfigError
from dpl.hashing import mix

CHANGES = ("leave", "join")

_SALT = 0xD80F  # keeps the drop draws apart from the other streams keyed by (seed, sync, ...)


@dataclass
class FaultsConfig:
    """``faults``: workers that fail a sync, the DiLoCo paper's dropped outer gradients."""

    drop_prob: float = key(0.0, "each worker's contribution to a local method's sync is dropped with this "
                                "probability, drawn from (seed, sync, worker); the average is over those that arrived")

    schedule: list[str] = key([], "elastic workers: entries STEP:WORKER:leave|join, the worker gone (or back) from "
                                  "global step STEP on (counted from 0); a worker whose first entry is a join "
                                  "starts away")

    def __post_init__(self) -> None:
        check(finite(self.drop_prob) and 0.0 <= self.drop_prob <= 1.0, "faults.drop_prob", self.drop_prob,
              "0 <= x <= 1")
        parse_schedule(self.schedule)


def parse_schedule(entries: Sequence[str]) -> list[tuple[int, int, str]]:
    """``faults.schedule``'s entries as (step, worker, leave|join), in step order (a step's entries in
    theirs); one line for an entry that is not STEP:WORKER:leave|join."""
    out = []
    for entry in entries:
        parts = str(entry).split(":")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts[:2]) or parts[2].strip() not in CHANGES:
            raise ConfigError(f"faults.schedule entry {entry!r} is invalid: allowed STEP:WORKER:leave|join with "
                              f"STEP and WORKER integers >= 0 (e.g. 100:1:leave)")
        out.append((int(parts[0]), int(parts[1]), parts[2].strip()))
    return sorted(out, key=lambda e: e[0])


class Membership:
    """Which of K workers are in the run at each global step (``faults.schedule``), a pure function of the
    step: a worker leaves from the step of its ``leave`` on and is back from that of its ``join`` (the
    DiLoCo paper's "adaptive compute", Douillard et al. 2023, Sec. 3.4; torchft's quorum that changes at a
    sync). Checked once: every change applies to a worker that can make it, and one worker is always in."""

    def __init__(self, schedule: Sequence[str], K: int) -> None:
        self.events = parse_schedule(schedule)
        self.K = K
        first = {}
        for step, k, change in self.events:
            if k >= K:
                raise ConfigError(f"faults.schedule entry {step}:{k}:{change} is invalid: allowed workers 0..{K - 1} "
                                  f"(K={K})")
            first.setdefault(k, change)
        self.initial = [first.get(k) != "join" for k in range(K)]
        present = list(self.initial)
        for step, k, change in self.events:
            if present[k] == (change == "join"):
                state = "in the run" if present[k] else "away"
                raise ConfigError(f"faults.schedule entry {step}:{k}:{change} is invalid: worker {k} is {state} "
                                  f"then; allowed alternating leave and join")
            present[k] = change == "join"
            if not any(present):
                raise ConfigError(f"faults.schedule entry {step}:{k}:{change} is invalid: it leaves no worker in "
                                  f"the run; allowed schedules that keep one")
        if not any(self.initial):
            raise ConfigError("faults.schedule is invalid: every worker starts away; allowed schedules that keep one")

    def present(self, step: int) -> list[bool]:
        """Who takes global step ``step`` (counted from 0)."""
        out = list(self.initial)
        for at, k, change in self.events:
            if at > step:
                break
            out[k] = change == "join"
        return out

    def joining(self, step: int) -> list[int]:
        """The workers back from step ``step`` on (they pull the global model before it)."""
        return [k for at, k, change in self.events if at == step and change == "join"]

    def arrived(self, step: int) -> Optional[Any]:
        """A bool tensor per worker [K] of those in the run at ``step``; None when all are."""
        import torch

        present = self.present(step)
        return None if all(present) else torch.tensor(present)


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
