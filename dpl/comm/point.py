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

A sync of a local method goes through :meth:`CommPoint.start_mean_delta`, which hands it to the
run's compression (:mod:`dpl.comm.codecs`; ``none`` is the exact average), so the outer
step has one path whatever is sent. It returns a :class:`Pending`: in the simulation the result is
there at once; across processes the collective is in flight (``async_op=True``) until ``wait()``,
so a streaming sync overlaps the inner steps taken meanwhile. With ``faults.drop_prob`` (the
point's :class:`~dpl.comm.drops.Drops`), the average is over the workers whose contribution arrived.

``with point.sync(overlap_steps)`` marks the collectives of one sync of the model: its bytes are
one sync's payload (the epoch's largest sync, for the peak bandwidth) and, when it overlaps later
inner steps, how many (the modelled clock hides its time behind that compute, :mod:`dpl.comm.cost`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch

from dpl.comm.codecs import DeltaResult, PlainAverage, Then
from dpl.comm.cost import Traffic, bytes_sent, gather_bytes_sent, param_bytes
from dpl.comm.drops import Drops

T = TypeVar("T")

MODEL = ("grads", "params")  # syncs of the model: one round each
ALGORITHM = (*MODEL, "state", "buffers")
BOOKKEEPING = ("metrics", "eval")
KINDS = (*ALGORITHM, *BOOKKEEPING, "checkpoint")


@dataclass
class SyncTally:
    """What the collectives of one sync of the model counted (see :meth:`CommPoint.sync`)."""

    collectives: int = 0
    gathers: int = 0
    replica_bytes: float = 0.0
    gathered_bytes: float = 0.0


class Pending:
    """A collective in flight. ``wait()`` returns its result (once landed, the same result again);
    across processes the seconds spent issuing and waiting count as the step's communication."""

    def __init__(self, point: "CommPoint", kind: str, work: Any, finish: Callable[[Any], T]) -> None:
        self.point, self.kind, self.work, self.finish = point, kind, work, finish
        self.done, self.result = False, None

    def wait(self) -> Any:
        if not self.done:
            landed = self.point._timed(self.kind, self.work.wait)
            self.result, self.done = self.finish(landed), True
            self.work = None  # the buffers of the collective can go
        return self.result


@dataclass
class CheckpointTraffic:
    """Collectives and bytes (per worker) spent gathering checkpoints; not part of any epoch."""

    collectives: int = 0
    bytes: float = 0.0


class CommPoint:
    """Counts, times and runs every collective among the workers (see the module doc).

    ``compression`` is what a local method's sync sends (:class:`~dpl.comm.codecs.PlainAverage`
    for ``compression=none``, else a :class:`~dpl.comm.codecs.Compression`). ``wall_s`` is the
    measured time of the algorithm's collectives since :meth:`take_wall_s` last read it, until each
    completed (NCCL included); 0 in the simulation, where nothing leaves the process.
    """

    def __init__(self, comm: Any, compression: Any = None) -> None:
        self.comm = comm
        self.compression = compression if compression is not None else PlainAverage()
        self.traffic = Traffic()
        self.checkpoint = CheckpointTraffic()
        self.wall_s = 0.0
        self.drops = Drops()  # faults.drop_prob: whose contribution reaches a sync (none dropped by default)
        self._sync: Optional[SyncTally] = None  # the sync being counted (see sync())
        self._ddp_bytes = 0.0  # the gradient buckets of the step in progress under DDP

    @property
    def world(self) -> int:
        return self.comm.world

    # ------------------------------------------------------------------ collectives
    def average_(self, tensors: Sequence[torch.Tensor], kind: str) -> None:
        """Every stacked tensor [K_local, ...] replaced by its mean over all K workers, in place.

        With one worker there is nothing to send (the mean of one is itself), but the call still
        counts: a synchronous step of a 1-worker run is a round, as it is of a K-worker one.
        """
        self.average_async_(tensors, kind).wait()

    def average_async_(self, tensors: Sequence[torch.Tensor], kind: str,
                       arrived: Optional[torch.Tensor] = None) -> Pending:
        """:meth:`average_` started: the tensors hold the mean once ``wait()`` returns. ``arrived``
        (a bool per worker [K]) averages over the workers whose contribution arrived: Σ_k a_k t_k / Σ_k a_k
        (the tensors are scaled in place first, so pass copies; all of them dropped leaves zeros)."""
        self._count(kind, param_bytes(tensors, per_worker=True))
        if arrived is None or bool(arrived.all()):
            if self.world > 1 and tensors:
                return Pending(self, kind, self._timed(kind, lambda: self.comm.all_reduce_async_(tensors, "mean"), settle=False),
                               lambda _: None)
            return Pending(self, kind, _DONE, lambda _: None)
        mine = arrived[self.comm.rank * self.comm.k_local:][: self.comm.k_local]
        for t in tensors:
            t.mul_(mine.to(t.device, t.dtype).view(-1, *[1] * (t.dim() - 1)))
        count = int(arrived.sum())

        def divide(_: Any) -> None:
            if count == 0:  # nobody arrived: the sums are zeros, and the caller leaves the model alone
                return
            for t in tensors:
                if t.is_floating_point():
                    t.div_(count)
                else:  # integer buffers: the sum of equal step counts, divided exactly
                    t.floor_divide_(count)

        if self.world > 1 and tensors:
            return Pending(self, kind, self._timed(kind, lambda: self.comm.all_reduce_async_(tensors, "sum"), settle=False), divide)
        return Pending(self, kind, _DONE, divide)

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
        """mean_k D(C(t_k (+ e_k))) of each stacked float64 tensor [K_local, ...] (see :meth:`exchange_async`)."""
        return self.exchange_async(compression, tensors, sync).wait()

    def exchange_async(self, compression: Any, tensors: Sequence[torch.Tensor], sync: int,
                       arrived: Optional[torch.Tensor] = None, indices: Optional[Sequence[int]] = None) -> Pending:
        """mean_k D(C(t_k (+ e_k))) of each stacked float64 tensor [K_local, ...], as one tensor of
        one worker's shape, once ``wait()`` returns: every worker's payload reaches every process (an
        all-gather, a no-op in one process), which decodes all K of them in worker order. Counted as
        one sync whose payload a cluster would all-reduce or all-gather (``compressor.collective``).
        ``arrived`` (a bool per worker [K]): the mean is over the workers whose payload arrived (a
        dropped worker keeps all of its u_k as residual). ``indices``: the tensors' places among the model's
        parameters (a streaming fragment's; keys their residuals and randomness)."""
        mine = None if arrived is None else arrived[self.comm.rank * self.comm.k_local:][: self.comm.k_local]
        payloads = compression.encode(tensors, sync, mine, indices)
        parts = [part for payload in payloads for part in payload]
        work = self._timed("params", lambda: self.comm.all_gather_async(parts), settle=False)
        nbytes = compression.payload_bytes(tensors)
        self.traffic.collectives += 1
        self.traffic.syncs += 1
        gathered = compression.compressor.collective == "allgather"
        if gathered:
            self.traffic.gathers += 1
            self.traffic.gathered_bytes += nbytes
        else:
            self.traffic.replica_bytes += nbytes
        self._tally(SyncTally(1, int(gathered), 0.0 if gathered else nbytes, nbytes if gathered else 0.0), model=True)
        shapes = [t.shape[1:] for t in tensors]

        def decode(everything: list[torch.Tensor]) -> list[torch.Tensor]:
            it = iter(everything)
            everyone = [tuple(next(it) for _ in payload) for payload in payloads]
            return compression.decode_mean(everyone, shapes, sync, arrived, indices)

        return Pending(self, "params", work, decode)

    def start_mean_delta(self, anchor: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                         buffers: Sequence[torch.Tensor], sync: int, indices: Optional[Sequence[int]] = None) -> Pending:
        """A local method's sync, started: ``wait()`` gives its :class:`DeltaResult`, the pseudo-gradient
        Δ = mean_k (x − x_k) per tensor (float64, one worker's shape; x the ``anchor``) as the run's
        compression sends it. The workers' tensors are not changed (what was sent are copies), so
        they may keep training while it is in flight. ``sync`` keys the randomness (drops, random-k);
        ``indices`` are the tensors' places among the model's parameters (default: all of them, in order)."""
        arrived = self.drops.arrived(sync, self.world)
        if arrived is not None:
            self.traffic.dropped += int((~arrived).sum())
        return self.compression.start_mean_delta(self, anchor, params, buffers, sync, arrived, indices)

    def start_mean(self, deltas: Sequence[torch.Tensor], sync: int, indices: Optional[Sequence[int]] = None) -> Pending:
        """Each worker's own pseudo-gradient Δ_k [K_local, ...] (float64) averaged as the run's compression
        sends it (eager updates: every worker has an anchor of its own); ``wait()`` gives a
        :class:`DeltaResult` with the mean Δ per tensor and no buffers."""
        arrived = self.drops.arrived(sync, self.world)
        if arrived is not None:
            self.traffic.dropped += int((~arrived).sum())
        count = self.world if arrived is None else int(arrived.sum())
        pending = self.compression.start_mean(self, deltas, sync, arrived, indices)
        return Then(pending, lambda mean: DeltaResult(mean, None, [], count))

    def mean_delta(self, anchor: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                   buffers: Sequence[torch.Tensor], sync: int) -> DeltaResult:
        """:meth:`start_mean_delta`, waited for."""
        return self.start_mean_delta(anchor, params, buffers, sync).wait()

    @contextlib.contextmanager
    def sync(self, overlap_steps: int = 0) -> Iterator[None]:
        """The collectives issued inside are one sync of the model: together they are one payload for
        the epoch's largest sync, and with ``overlap_steps`` > 0 they overlap that many later inner steps
        (streaming DiLoCo's delay τ, an eager sync's next period), which the modelled clock hides them behind."""
        outer, self._sync = self._sync, SyncTally()
        try:
            yield
        finally:
            tally, self._sync = self._sync, outer
            self._close(tally, overlap_steps)

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
        nbytes = buffer.numel() * buffer.element_size()
        self.traffic.replica_bytes += nbytes
        self._ddp_bytes += nbytes
        if bucket.is_last():
            self.traffic.collectives += 1
            self.traffic.syncs += 1
            self._tally(SyncTally(1, 0, self._ddp_bytes, 0.0), model=True)
            self._ddp_bytes = 0.0
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
            self._tally(SyncTally(1, 0, nbytes, 0.0), model=kind in MODEL)

    def _tally(self, part: SyncTally, model: bool) -> None:
        """Add a collective's counts to the sync being counted; outside one, a sync of the model
        (a synchronous step's gradients) is a sync of its own."""
        if self._sync is not None:
            for name in ("collectives", "gathers", "replica_bytes", "gathered_bytes"):
                setattr(self._sync, name, getattr(self._sync, name) + getattr(part, name))
        elif model:
            self._close(part, 0)

    def _close(self, tally: SyncTally, overlap_steps: int) -> None:
        """One sync done: the overlap counters, and the epoch's largest sync (by the bytes a ring sends)."""
        t = self.traffic
        if overlap_steps > 0 and tally.collectives:
            t.overlap_syncs += 1
            t.overlap_steps += overlap_steps
            t.overlap_collectives += tally.collectives
            t.overlap_gathers += tally.gathers
            t.overlap_replica_bytes += tally.replica_bytes
            t.overlap_gathered_bytes += tally.gathered_bytes
        K = max(self.world, 2)  # the ring's shares only rank the syncs; K = 1 sends nothing anyway
        size = bytes_sent(tally.replica_bytes, K) + gather_bytes_sent(tally.gathered_bytes, K)
        if size > bytes_sent(t.peak_replica_bytes, K) + gather_bytes_sent(t.peak_gathered_bytes, K):
            t.peak_replica_bytes, t.peak_gathered_bytes = tally.replica_bytes, tally.gathered_bytes
            t.peak_overlap_steps = overlap_steps

    def _timed(self, kind: str, op: Callable[[], T], settle: bool = True) -> T:
        """``op()``, its seconds added to ``wall_s`` for the algorithm's kinds. ``settle``: wait for the
        device too (NCCL returns before the GPU is done); not when issuing an async collective, which
        would otherwise be waited for on the spot."""
        # One process sends nothing: its reduction over the worker axis is compute, and a measured 0
        # keeps the simulation's records reproducible to the bit.
        if self.comm.processes == 1:
            return op()
        t0 = time.perf_counter()
        out = op()
        if settle:
            self.comm.wait()
        if kind in ALGORITHM:  # what the step spent communicating; bookkeeping happens beside the steps
            self.wall_s += time.perf_counter() - t0
        return out


class _Done:
    """Nothing to wait for: the collective was a no-op (one worker) or ran in the issuing call."""

    @staticmethod
    def wait() -> None:
        return None


_DONE = _Done()


def _state_bytes(obj: Any) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0
