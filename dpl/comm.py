"""Communication accounting: how many bytes a run sends and how long that would take.

The simulation runs the K workers in one process, so nothing is really sent; this
module models what a cluster would send. Each sync round is one ring all-reduce of
a full replica (LocalSGD / SlowMo average the parameters; synchronous training
all-reduces gradients, which have the same size, at every step). In a ring
all-reduce (Patarasuk & Yuan 2009) each worker sends 2 (K - 1) / K of the buffer:
K - 1 chunks of size n / K in the reduce-scatter phase and as many in the
all-gather phase. The time of one all-reduce follows the latency-bandwidth (alpha-beta)
model: each of its 2 (K - 1) ring steps pays the latency alpha once, so
T = 2 (K - 1) alpha + n_sent / beta (Thakur, Rabenseifner & Gropp 2005, Sec. 4.4 for
the reduce-scatter + all-gather ring; Patarasuk & Yuan 2009).

A sync may all-reduce more than the parameters: ``local_momentum=average`` averages the
inner optimizer's state too (one more all-reduce of the state tensors). The ledger
counts those bytes and collectives beside the parameter rounds.

Everything here is a pure function or a ledger of plain numbers, so the totals
survive a checkpoint and a resumed run reports the same curves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch


def ring_allreduce_bytes(nbytes: int, K: int) -> float:
    """Bytes each worker sends in one ring all-reduce of an ``nbytes`` buffer: 2 (K - 1) / K * nbytes."""
    if K < 1:
        raise ValueError(f"K={K} is invalid: allowed an integer >= 1")
    return 2.0 * (K - 1) / K * nbytes


def param_bytes(tensors: Iterable[torch.Tensor], per_worker: bool = False) -> int:
    """Bytes of one replica's parameters.

    With ``per_worker`` the tensors are stacked [K, ...] over workers and one replica
    holds numel / shape[0] elements of each.
    """
    total = 0
    for t in tensors:
        numel = t.numel() // t.shape[0] if per_worker else t.numel()
        total += numel * t.element_size()
    return total


def sync_time_s(nbytes_sent: float, bandwidth_gbps: float, latency_us: float, K: int) -> float:
    """Modelled seconds of one ring all-reduce among K workers that sends ``nbytes_sent`` per
    worker: 2 (K - 1) latencies (one per ring step) + bytes / bandwidth, Gb/s = 1e9 bits/s."""
    if K <= 1:
        return 0.0
    return 2 * (K - 1) * latency_us * 1e-6 + nbytes_sent * 8.0 / (bandwidth_gbps * 1e9)


@dataclass
class CommLedger:
    """Running communication totals of one run; plain fields so it round-trips through a checkpoint.

    ``replica_bytes`` is the size of one model replica; every round all-reduces that
    many bytes. With K == 1 nothing is sent, so bytes and modelled communication time
    stay 0, but rounds are still counted as given (a 1-worker LocalSGD run still has
    its sync points, they are just free).
    """

    K: int
    replica_bytes: int
    bandwidth_gbps: float
    latency_us: float
    rounds_total: int = 0
    collectives_total: int = 0
    steps_total: int = 0
    bytes_total: float = 0.0
    comm_time_total_s: float = 0.0
    compute_time_total_s: float = 0.0

    @property
    def bytes_per_round(self) -> float:
        return ring_allreduce_bytes(self.replica_bytes, self.K)

    @property
    def time_per_round_s(self) -> float:
        # with K == 1 no all-reduce happens, so no latency is paid either
        return sync_time_s(self.bytes_per_round, self.bandwidth_gbps, self.latency_us, self.K)

    def record_epoch(self, rounds: int, steps: int, compute_time_s: float,
                     state_rounds: int = 0, state_bytes: float = 0.0) -> dict[str, float]:
        """Add one epoch of ``rounds`` syncs over ``steps`` local steps; return this epoch's metrics.

        ``state_rounds`` more all-reduces moved ``state_bytes`` of optimizer state in all
        (per replica, before the ring's 2 (K - 1) / K), e.g. with ``local_momentum=average``.
        ``sync_rounds`` counts the syncs; ``collectives`` every all-reduce.
        ``rounds_vs_sync`` is rounds / steps over the run so far: 1.0 for synchronous
        training (a round every step), about 1 / H for LocalSGD.
        """
        state_sent = ring_allreduce_bytes(state_bytes, self.K)
        comm_bytes = rounds * self.bytes_per_round + state_sent
        comm_time = rounds * self.time_per_round_s
        if state_rounds:
            comm_time += state_rounds * sync_time_s(state_sent / state_rounds, self.bandwidth_gbps,
                                                    self.latency_us, self.K)
        self.collectives_total += rounds + state_rounds
        self.rounds_total += rounds
        self.steps_total += steps
        self.bytes_total += comm_bytes
        self.comm_time_total_s += comm_time
        self.compute_time_total_s += compute_time_s
        return {
            "sync_rounds": rounds,
            "sync_rounds_total": self.rounds_total,
            "collectives": rounds + state_rounds,
            "comm_bytes": comm_bytes,
            "comm_bytes_total": self.bytes_total,
            "rounds_vs_sync": self.rounds_total / self.steps_total if self.steps_total else 0.0,
            "comm_time_s": comm_time,
            "modelled_time_s": self.compute_time_total_s + self.comm_time_total_s,
        }

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> CommLedger:
        return cls(**d)


def worker_drift(stacked: Sequence[torch.Tensor]) -> float:
    """How far the workers have moved apart: mean_k ||x_k - x̄|| / ||x̄||.

    ``stacked`` holds every parameter as [K, ...]; the norms are taken over all of a
    replica's parameters flattened together. 0.0 when K == 1 or x̄ == 0. Accumulated
    in float64 so the small differences between workers are not lost to rounding.
    """
    if not stacked or stacked[0].shape[0] == 1:
        return 0.0
    K, device = stacked[0].shape[0], stacked[0].device
    # Sums stay on the device and are read once: one host sync per call, not one per tensor.
    dev_sq = torch.zeros(K, dtype=torch.float64, device=device)
    mean_sq = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for t in stacked:
            x = t.detach().double().reshape(K, -1)
            mean = x.mean(0)
            dev_sq += (x - mean).pow(2).sum(1)
            mean_sq += mean.pow(2).sum()
    spread, norm = torch.stack([dev_sq.sqrt().mean(), mean_sq.sqrt()]).tolist()
    return spread / norm if norm > 0.0 else 0.0
