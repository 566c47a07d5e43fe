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

A sync of a local method is :meth:`CommPoint.start_pseudo_gradient`: the point alone runs it, with the
run's codec (:mod:`dpl.comm.codecs`; without one, ``compression=none``, the parameters are averaged
exactly), so the outer step has one path whatever is sent. It returns a
:class:`~dpl.comm.flight.Flight`: in the simulation the result is there at once; across processes the
collective is in flight (``async_op=True``) until ``wait()``, so a streaming sync overlaps the inner
steps taken meanwhile. With ``faults.drop_prob`` (the point's :class:`~dpl.comm.drops.Drops`), the
average is over the workers whose contribution arrived.

``with point.sync(overlap_steps)`` marks the collectives of one sync of the model: its bytes are
one sync's payload (the epoch's largest sync, for the peak bandwidth) and, when it overlaps later
inner steps, how many (the modelled clock hides its time behind that compute, :mod:`dpl.comm.cost`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch

from dpl.comm.codecs import Codec, Key
from dpl.comm.cost import Traffic, bytes_sent, gather_bytes_sent, param_bytes
from dpl.comm.drops import Drops
from dpl.comm.flight import Flight

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


@dataclass
class DeltaResult:
    """A local method's sync, landed: the pseudo-gradient Δ per tensor (float64, one worker's shape),
    the exact average x̄ of the parameters when it was formed (None when only encoded Δ_k crossed),
    the averaged buffers, and how many workers' contributions arrived (K without drops)."""

    deltas: list[torch.Tensor]
    mean: Optional[list[torch.Tensor]]
    buffers: list[torch.Tensor]
    arrived: int


@dataclass
class CheckpointTraffic:
    """Collectives and bytes (per worker) spent gathering checkpoints; not part of any epoch."""

    collectives: int = 0
    bytes: float = 0.0


class CommPoint:
    """Counts, times and runs every collective among the workers (see the module doc).

    ``codec`` is what a local method's sync sends (:mod:`dpl.comm.codecs`; None: the parameters
    themselves, averaged exactly), ``drops`` whose contributions arrive (``faults.drop_prob``).
    ``wall_s`` is the measured time of the algorithm's collectives since :meth:`take_wall_s` last read
    it, until each completed (NCCL included); 0 in the simulation, where nothing leaves the process.
    """

    def __init__(self, comm: Any, codec: Optional[Codec] = None, drops: Optional[Drops] = None,
                 seed: int = 0) -> None:
        self.comm, self.codec, self.seed = comm, codec, seed
        self.drops = drops if drops is not None else Drops()  # none dropped by default
        # the workers in the run for the sync in progress (faults.schedule: dpl.core.methods.elastic); None: all
        self.present: Optional[torch.Tensor] = None
        self.traffic = Traffic()
        self.checkpoint = CheckpointTraffic()
        self.wall_s = 0.0
        self._sync: Optional[SyncTally] = None  # the sync being counted (see sync())
        self._ddp_bytes = 0.0  # the gradient buckets of the step in progress under DDP

    @property
    def world(self) -> int:
        return self.comm.world

    @property
    def forms_mean(self) -> bool:
        """A sync forms the exact average x̄ of the parameters (no codec: they are what is sent)."""
        return self.codec is None

    def start(self, params: Sequence[torch.Tensor]) -> None:
        """Give the codec what it keeps per worker (error feedback's residuals, shaped like ``params``)."""
        if self.codec is not None:
            self.codec.start(params)

    # ------------------------------------------------------------------ collectives
    def average_(self, tensors: Sequence[torch.Tensor], kind: str) -> None:
        """Every stacked tensor [K_local, ...] replaced by its mean over all K workers, in place.

        With one worker there is nothing to send (the mean of one is itself), but the call still
        counts: a synchronous step of a 1-worker run is a round, as it is of a K-worker one.
        """
        self.average_async_(tensors, kind).wait()

    def average_async_(self, tensors: Sequence[torch.Tensor], kind: str,
                       arrived: Optional[torch.Tensor] = None) -> Flight[None]:
        """:meth:`average_` started: the tensors hold the mean once ``wait()`` returns. ``arrived``
        (a bool per worker [K]) averages over the workers whose contribution arrived: Σ_k a_k t_k / Σ_k a_k
        (the tensors are scaled in place first, so pass copies; all of them dropped leaves zeros); without it,
        over the workers in the run (``present``: elastic workers), or all of them."""
        self._count(kind, param_bytes(tensors, per_worker=True))
        arrived = self.present if arrived is None else arrived  # elastic workers: those in the run
        if arrived is None or bool(arrived.all()):
            return self._all_reduce(tensors, kind, "mean", lambda: None)
        mine = arrived[self.comm.rank * self.comm.k_local:][: self.comm.k_local]
        for t in tensors:
            t.mul_(mine.to(t.device, t.dtype).view(-1, *[1] * (t.dim() - 1)))
        count = int(arrived.sum())

        def divide() -> None:
            if count == 0:  # nobody arrived: the sums are zeros, and the caller leaves the model alone
                return
            for t in tensors:
                if t.is_floating_point():
                    t.div_(count)
                else:  # integer buffers: the sum of equal step counts, divided exactly
                    t.floor_divide_(count)

        return self._all_reduce(tensors, kind, "sum", divide)

    def _all_reduce(self, tensors: Sequence[torch.Tensor], kind: str, op: str, then: Callable[[], T]) -> Flight[T]:
        """The ``op`` all-reduce of ``tensors`` in flight (nothing to send with one worker), then ``then()``."""
        if self.world > 1 and tensors:
            work = self._timed(kind, lambda: self.comm.all_reduce_async_(tensors, op), settle=False)
            return self._landing(kind, work).then(lambda _: then())
        return Flight(then)

    def _landing(self, kind: str, work: Flight) -> Flight:
        """``work`` (a communicator's flight), its wait timed as the step's communication."""
        return Flight(lambda: self._timed(kind, work.wait))

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
        """Every tensor [K_local, ...] of every worker as [K, ...], in worker order (not counted here: the
        caller knows what the payload stands for, as :meth:`start_pseudo_gradient` does)."""
        return self._timed("params", lambda: self.comm.all_gather(tensors))

    def broadcast_(self, tensors: Sequence[torch.Tensor], kind: str) -> None:
        """Every worker's tensors [K_local, ...] set to worker 0's, in place."""
        self._count(kind, param_bytes(tensors, per_worker=True))
        if self.world > 1 and tensors:
            self._timed(kind, lambda: self.comm.broadcast_(tensors))

    # ------------------------------------------------------------------ the syncs of local methods
    @torch.no_grad()
    def start_pseudo_gradient(self, anchor: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                              buffers: Sequence[torch.Tensor], sync: int,
                              indices: Optional[Sequence[int]] = None) -> Flight[DeltaResult]:
        """A local method's sync, started: once landed, its :class:`DeltaResult`, the pseudo-gradient
        Δ = mean_k (x − x_k) per tensor (float64, one worker's shape; x the ``anchor``) as the run's codec
        sends it, and the workers' buffers averaged. The workers' tensors are not changed (what is sent are
        copies), so they may keep training while it is in flight. ``sync`` keys the randomness (drops,
        random-k); ``indices`` are the tensors' places among the model's parameters (default: all of them).

        Without a codec the parameters themselves are all-reduced (one collective), x_k <- x̄ and
        Δ = x − x̄ in float64 from the float64 anchor: x − x̄ of float32 values is exact in float64, so an
        outer SGD with lr 1 gives back x̄ bit for bit (plain LocalSGD). With a codec every worker sends
        its Δ_k = x − x_k encoded (:meth:`start_mean`) and the buffers (BatchNorm's statistics) are
        averaged as they are, one more all-reduce; no exact x̄ is formed."""
        arrived = self._arrivals(sync)
        count = self.world if arrived is None else int(arrived.sum())
        if self.codec is None:
            copies = [t.detach().clone() for t in (*params, *buffers)]
            n = len(params)

            def landed(_: Any) -> DeltaResult:
                means = copies[:n]
                return DeltaResult([x - m[0] for x, m in zip(anchor, means)], means, copies[n:], count)

            return self.average_async_(copies, "params", arrived).then(landed)
        deltas = [x.unsqueeze(0) - p.detach().double() for x, p in zip(anchor, params)]
        exchanged = self._exchange(deltas, sync, arrived, indices)
        copies = [b.clone() for b in buffers]
        averaged = self.average_async_(copies, "buffers", arrived) if copies else Flight.landed()

        def with_buffers(mean: list[torch.Tensor]) -> DeltaResult:
            averaged.wait()
            return DeltaResult(mean, None, copies, count)

        return exchanged.then(with_buffers)

    @torch.no_grad()
    def start_mean(self, deltas: Sequence[torch.Tensor], sync: int,
                   indices: Optional[Sequence[int]] = None) -> Flight[DeltaResult]:
        """Each worker's own pseudo-gradient Δ_k [K_local, ...] (float64) averaged as the run's codec sends it
        (eager updates: every worker has an anchor of its own); landed, a :class:`DeltaResult` with the mean
        Δ per tensor (float64, one worker's shape) and no buffers. Without a codec the Δ_k travel as fp32,
        like the parameters."""
        arrived = self._arrivals(sync)
        count = self.world if arrived is None else int(arrived.sum())
        if self.codec is None:
            copies = [d.float() for d in deltas]
            mean = self.average_async_(copies, "params", arrived).then(lambda _: [c[0].double() for c in copies])
        else:
            mean = self._exchange(deltas, sync, arrived, indices)
        return mean.then(lambda m: DeltaResult(m, None, [], count))

    def _arrivals(self, sync: int) -> Optional[torch.Tensor]:
        """Whose contribution reaches sync ``sync`` (a bool per worker [K]; None: everyone's), counted."""
        arrived = self.drops.arrived(sync, self.world)
        if arrived is not None:
            self.traffic.dropped += int((~arrived).sum())
        if self.present is not None:  # a worker away from the run sends nothing (and is not counted as dropped)
            arrived = self.present.clone() if arrived is None else arrived & self.present
        return arrived

    def _exchange(self, tensors: Sequence[torch.Tensor], sync: int, arrived: Optional[torch.Tensor],
                  indices: Optional[Sequence[int]]) -> Flight[list[torch.Tensor]]:
        """mean_k D(C(t_k)) of each stacked float64 tensor [K_local, ...], as one tensor of one worker's
        shape, once landed: every worker's payload reaches every process (an all-gather, a no-op in one
        process), which decodes all K of them in worker order, so the simulation and the ranks compute the
        same numbers. Counted as one sync whose payload a cluster would all-reduce or all-gather
        (``codec.collective``). ``arrived``: the mean is over the workers whose payload arrived (none: zeros)."""
        places = range(len(tensors)) if indices is None else indices
        mine = None if arrived is None else arrived[self.comm.rank * self.comm.k_local:][: self.comm.k_local]
        dropped = None if mine is None else ~mine
        keys = [Key(self.seed, sync, i) for i in places]
        payloads = [self.codec.encode(t.reshape(t.shape[0], -1), k, dropped) for t, k in zip(tensors, keys)]
        parts = [part for payload in payloads for part in payload]
        work = self._timed("params", lambda: self.comm.all_gather_async(parts), settle=False)
        nbytes = sum(self.codec.payload_bytes(t[0].numel()) for t in tensors)
        gathered = self.codec.collective == "allgather"
        self.traffic.collectives += 1
        self.traffic.syncs += 1
        if gathered:
            self.traffic.gathers += 1
            self.traffic.gathered_bytes += nbytes
        else:
            self.traffic.replica_bytes += nbytes
        self._tally(SyncTally(1, int(gathered), 0.0 if gathered else nbytes, nbytes if gathered else 0.0), model=True)
        shapes = [t.shape[1:] for t in tensors]

        def decode_mean(everything: list[torch.Tensor]) -> list[torch.Tensor]:
            it = iter(everything)
            out = []
            for payload, shape, k in zip(payloads, shapes, keys):
                decoded = self.codec.decode(tuple(next(it) for _ in payload), math.prod(shape), k)
                if arrived is None:
                    out.append(decoded.mean(0).view(shape))
                else:
                    keep = arrived.to(decoded.device)
                    out.append((decoded[keep].sum(0) / max(int(keep.sum()), 1)).view(shape))
            return out

        return self._landing("params", work).then(decode_mean)

    def push(self, tensors: Sequence[torch.Tensor], worker: int, counted: Sequence[torch.Tensor]) -> None:
        """An asynchronous worker's push: its tensors (one worker's shape; on other processes, any of that
        shape) take worker ``worker``'s values everywhere, in place. Every process holds a replica of the
        global model and applies the same arrivals in the same order, so the push is a broadcast from the
        worker's process (nothing moves in one process); it is counted as what a cluster with one holder of
        the global model sends, a point-to-point message of ``counted`` (the model in its dtype, where the
        replicas exchange float64 pseudo-gradients to compute the same x), and as a sync of the model."""
        self._message(counted)
        self.traffic.syncs += 1
        if self.comm.processes > 1:
            self._timed("params", lambda: self.comm.broadcast_from_(tensors, worker))

    def pull(self, tensors: Sequence[torch.Tensor]) -> None:
        """An asynchronous worker's pull of the global model after its push: every process holds it already,
        so nothing moves; counted as the point-to-point message a cluster sends back."""
        self._message(tensors)

    def _message(self, tensors: Sequence[torch.Tensor]) -> None:
        self.traffic.messages += 1
        self.traffic.message_bytes += param_bytes(tensors)

    def payload_bytes(self, tensors: Sequence[torch.Tensor]) -> int:
        """Bytes one worker sends in a sync of the stacked tensors [K_local, ...]: the tensors themselves
        without a codec, else the codec's payload of each."""
        if self.codec is None:
            return param_bytes(tensors, per_worker=True)
        return sum(self.codec.payload_bytes(t[0].numel()) for t in tensors)

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        """What the codec keeps per worker ([K_local, ...] tensors: error feedback's residuals), for the
        workers' checkpoint state."""
        return {} if self.codec is None else self.codec.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.codec is not None:
            self.codec.load_state_dict(state)

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
            self.comm.settle()
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
