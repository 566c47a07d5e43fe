"""The one communication point: every byte between workers passes :class:`CommPoint`.

The point runs each collective through the engine's :class:`~dpl.comm.communicator.Communicator`
(a reduction over the stacked worker axis in the simulation, torch.distributed across
processes), times it and counts it, so a run's traffic is measured in one place whatever the
method and the engine. Each call names its ``kind``:

- the algorithm's traffic, which a real cluster must send: ``grads`` and ``params`` (the syncs
  of the model), ``state`` (the inner optimizer's state with ``local_momentum=average``),
  ``buffers`` (the model's buffers beside a compressed sync);
- bookkeeping: ``metrics`` (the epoch's sums, the exact average a compressed sync's drift
  needs) and ``eval`` (the averaged model and the evaluation sums) — counted per epoch in
  :class:`~dpl.comm.cost.Traffic` apart from the algorithm's, and never modelled as time;
- ``checkpoint`` (gathering every worker's state, the averaged model it stores): counted in
  :attr:`CommPoint.checkpoint`, outside the epoch's traffic, so a run that checkpoints more
  often, or was resumed, reports the same curves as one that did not.

A sync of a local method goes through :meth:`CommPoint.mean_delta`, which hands it to the
run's compression (:mod:`dpl.comm.compression`; ``none`` is the exact average), so the outer
step has one path whatever is sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from dpl.comm.compression import PlainAverage
from dpl.comm.cost import Traffic, param_bytes

T = TypeVar("T")

MODEL = ("grads", "params")  # syncs of the model: one round each
ALGORITHM = (*MODEL, "state", "buffers")
BOOKKEEPING = ("metrics", "eval")
KINDS = (*ALGORITHM, *BOOKKEEPING, "checkpoint")


@dataclass
class CheckpointTraffic:
    """Collectives and bytes (per worker) spent gathering checkpoints; not part of any epoch."""

    collectives: int = 0
    bytes: float = 0.0


class CommPoint:
    """Counts, times and runs every collective among the workers (see the module doc).

    ``compression`` is what a local method's sync sends (:class:`~dpl.comm.compression.PlainAverage`
    for ``compression=none``, else a :class:`~dpl.comm.compression.Compression`). ``wall_s`` is the
    measured time of the algorithm's collectives since :meth:`take_wall_s` last read it, until each
    completed (NCCL included); 0 in the simulation, where nothing leaves the process.
    """

    def __init__(self, comm: Any, compression: Any = None) -> None:
        self.comm = comm
        self.compression = compression if compression is not None else PlainAverage()
        self.traffic = Traffic()
        self.checkpoint = CheckpointTraffic()
        self.wall_s = 0.0

    @property
    def world(self) -> int:
        return self.comm.world

    # ------------------------------------------------------------------ collectives
    def average_(self, tensors: Sequence[torch.Tensor], kind: str) -> None:
        """Every stacked tensor [K_local, ...] replaced by its mean over all K workers, in place.

        With one worker there is nothing to send (the mean of one is itself), but the call still
        counts: a synchronous step of a 1-worker run is a round, as it is of a K-worker one.
        """
        self._count(kind, param_bytes(tensors, per_worker=True))
        if self.world > 1 and tensors:
            self._timed(kind, lambda: self.comm.all_reduce_(tensors, "mean"))

    def average_copy(self, tensors: Sequence[torch.Tensor], kind: str) -> list[torch.Tensor]:
        """Means over all workers of copies of ``tensors`` [K_local, ...] (the tensors stay as they are)."""
        copies = [t.detach().clone() for t in tensors]
        self.average_(copies, kind)
        return copies

    def all_sum(self, values: Sequence[float], kind: str) -> list[float]:
        """Host numbers of this process (sums over its workers) summed over every process, as floats:
        so every rank records, and chooses the next H from, the same numbers."""
        t = torch.tensor([[float(v) for v in values]], dtype=torch.float64, device=self.comm.device)
        self._count(kind, t.numel() * t.element_size())
        if self.comm.processes > 1:
            self._timed(kind, lambda: self.comm.all_reduce_([t], "sum"))
        return t[0].tolist()

    def all_gather(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every tensor [K_local, ...] of every worker as [K, ...], in worker order (not counted here:
        the caller knows what the payload stands for, see :meth:`exchange`)."""
        return self._timed("params", lambda: self.comm.all_gather(tensors))

    def broadcast_(self, tensors: Sequence[torch.Tensor], kind: str) -> None:
        """Every worker's tensors [K_local, ...] set to worker 0's, in place."""
        self._count(kind, param_bytes(tensors, per_worker=True))
        if self.world > 1 and tensors:
            self._timed(kind, lambda: self.comm.broadcast_(tensors))

    def exchange(self, compression: Any, tensors: Sequence[torch.Tensor], sync: int) -> list[torch.Tensor]:
        """mean_k D(C(t_k (+ e_k))) of each stacked float64 tensor [K_local, ...], as one tensor of
        one worker's shape: every worker's payload reaches every process (an all-gather, a no-op in
        one process), which decodes all K of them in worker order. Counted as one sync whose payload
        a cluster would all-reduce or all-gather (``compressor.collective``)."""
        payloads = compression.encode(tensors, sync)
        parts = [part for payload in payloads for part in payload]
        gathered = iter(self.all_gather(parts))
        everyone = [tuple(next(gathered) for _ in payload) for payload in payloads]
        nbytes = compression.payload_bytes(tensors)
        self.traffic.collectives += 1
        self.traffic.syncs += 1
        if compression.compressor.collective == "allgather":
            self.traffic.gathers += 1
            self.traffic.gathered_bytes += nbytes
        else:
            self.traffic.replica_bytes += nbytes
        return compression.decode_mean(everyone, [t.shape[1:] for t in tensors], sync)

    def mean_delta(self, anchor: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                   buffers: Sequence[torch.Tensor], sync: int) -> tuple[list[torch.Tensor], Optional[list]]:
        """A local method's sync: the pseudo-gradient Δ = mean_k (x − x_k) per tensor (float64, one
        worker's shape; x the ``anchor``) as the run's compression sends it, and the exact average
        x̄ when the sync formed it (None when only compressed Δ_k crossed)."""
        return self.compression.mean_delta(self, anchor, params, buffers, sync)

    # ------------------------------------------------------------------ checkpoints
    def gather_state(self, state: dict[str, Any]) -> Optional[dict[str, Any]]:
        """A trainer state of every worker, stacked [K, ...], on the process that writes it (None elsewhere)."""
        self._count("checkpoint", _state_bytes(state.get("workers", {})) / max(self.comm.k_local, 1))
        return self._timed("checkpoint", lambda: self.comm.gather_state(state))

    def local_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """This process's share of a state of every worker (the inverse of :meth:`gather_state`; no traffic)."""
        return self.comm.local_state(state)

    # ------------------------------------------------------------------ DistributedDataParallel
    def ddp_hook(self, _state, bucket):
        """DDP's comm hook: each gradient bucket all-reduced (a mean) through the point; the step's
        buckets together count as one ``grads`` round, as :meth:`average_` counts the simulation's.

        No annotations on purpose: DDP checks a hook's annotations against its own types.
        """
        buffer = bucket.buffer()
        self.traffic.replica_bytes += buffer.numel() * buffer.element_size()
        if bucket.is_last():
            self.traffic.collectives += 1
            self.traffic.syncs += 1
        t0 = time.perf_counter()

        def done(fut):
            self.wall_s += time.perf_counter() - t0
            return fut.value()[0]

        return self.comm.all_reduce_async(buffer.div_(self.world)).then(done)

    # ------------------------------------------------------------------ per epoch
    def take(self) -> Traffic:
        """This epoch's traffic; the counters restart."""
        traffic, self.traffic = self.traffic, Traffic()
        return traffic

    def take_wall_s(self) -> float:
        """Seconds in the algorithm's collectives since the last call."""
        wall, self.wall_s = self.wall_s, 0.0
        return wall

    # ------------------------------------------------------------------ helpers
    def _count(self, kind: str, nbytes: float) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is invalid: allowed {', '.join(KINDS)}")
        if kind in BOOKKEEPING:
            self.traffic.bookkeeping_collectives += 1
            self.traffic.bookkeeping_bytes += nbytes
        elif kind == "checkpoint":
            self.checkpoint.collectives += 1
            self.checkpoint.bytes += nbytes
        else:
            self.traffic.collectives += 1
            self.traffic.syncs += kind in MODEL
            self.traffic.replica_bytes += nbytes

    def _timed(self, kind: str, op: Callable[[], T]) -> T:
        # One process sends nothing: its reduction over the worker axis is compute, and a measured 0
        # keeps the simulation's records reproducible to the bit.
        if self.comm.processes == 1:
            return op()
        t0 = time.perf_counter()
        out = op()
        self.comm.wait()
        if kind in ALGORITHM:  # what the step spent communicating; bookkeeping happens beside the steps
            self.wall_s += time.perf_counter() - t0
        return out


def _state_bytes(obj: Any) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0
