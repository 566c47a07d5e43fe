"""The torch.distributed communicator: one process per worker, worker k is rank k.

Collectives go over the default process group (gloo on CPU, NCCL on CUDA), each on one flat
buffer per dtype, copied back into the tensors (their storage stays where it is, so the
optimizer's references and a captured graph's addresses hold). A checkpoint is gathered on
rank 0 into the simulation's stacked layout [K, ...] (:func:`stack_states`) and each rank takes
its own row back on resume (:func:`rank_state`).
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from dpl.comm.flight import Flight
from dpl.errors import CheckpointError, DatasetUnavailable

T = TypeVar("T")


# Store keys of one-off handshakes: every rank makes the same ones in the same order.
_handshakes = itertools.count(1)


class ProcessGroupComm:
    """The default process group as a :class:`~dpl.comm.communicator.Communicator`: worker k is rank k.

    ``store`` is the key-value store the group was built on; it carries the one-off
    handshakes that must not be bounded by the collective timeout (rank 0 downloading
    the data) and the fault reports of :mod:`dpl.launch.ranks`.
    """

    k_local = 1
    # the syncs would run between a captured step's replays, which no GPU run has checked yet
    graph_blocker = "engine=distributed has not been run with CUDA graphs"

    def __init__(self, store: dist.Store, device: torch.device) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.processes = self.world
        self.store, self.device = store, device

    # ------------------------------------------------------------------ Communicator
    def all_reduce_(self, tensors: Sequence[torch.Tensor], op: str) -> None:
        """Mean or sum over the ranks of each tensor [1, ...], in place: one all-reduce per dtype.

        Integer tensors (BatchNorm's step count) travel as float64 and are truncated back, as the
        simulation averages them."""
        self.all_reduce_async_(tensors, op).wait()

    def all_reduce_async_(self, tensors: Sequence[torch.Tensor], op: str) -> Flight[None]:
        """:meth:`all_reduce_` with ``async_op=True``: the flat buffers are copied back into the
        tensors when ``wait()`` is called (a streaming fragment's average, waited on τ steps later)."""
        if op not in ("mean", "sum"):
            raise ValueError(f"op={op!r} is invalid: allowed mean, sum")
        works, copies = [], []
        for group in _by_dtype(tensors):
            dtype = group[0].dtype if group[0].is_floating_point() else torch.float64
            flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in group])
            if op == "mean":
                flat.div_(self.world)  # before the sum, as torch's average_parameters does
            works.append(dist.all_reduce(flat, async_op=True))
            copies.append((flat, group))

        def copy_back() -> None:
            for flat, group in copies:
                _copy_back(flat, group)

        return _landing(works, copy_back)

    def all_reduce_async(self, buffer: torch.Tensor) -> torch.futures.Future:
        """A sum all-reduce of ``buffer`` in place, not waited for (DDP's gradient buckets)."""
        return dist.all_reduce(buffer, async_op=True).get_future()

    def all_gather(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every rank's tensors [1, ...] as [K, ...] in rank order: one all_gather of their bytes
        (a compressed payload: values, indices, packed signs, scales, whatever their dtypes)."""
        return self.all_gather_async(tensors).wait()

    def all_gather_async(self, tensors: Sequence[torch.Tensor]) -> Flight[list[torch.Tensor]]:
        """:meth:`all_gather` with ``async_op=True``: ``wait()`` unpacks and returns its list."""
        if not tensors:
            return Flight.landed([])
        flat = torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in tensors])
        everyone = [torch.empty_like(flat) for _ in range(self.world)]
        work = dist.all_gather(everyone, flat, async_op=True)

        def unpack() -> list[torch.Tensor]:
            out, start = [], 0
            for t in tensors:
                size = t.numel() * t.element_size()
                # a copy per slice: a dtype view needs its offset aligned to the dtype's size
                out.append(torch.cat([e[start:start + size].clone().view(t.dtype).view(t.shape) for e in everyone]))
                start += size
            return out

        return _landing([work], unpack)

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Rank 0's tensors on every rank, in place: one broadcast per dtype."""
        for group in _by_dtype(tensors):
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            _copy_back(flat, group)

    def broadcast_from_(self, tensors: Sequence[torch.Tensor], worker: int) -> None:
        """The tensors of the rank that holds worker ``worker`` on every rank, in place: one broadcast per dtype."""
        for group in _by_dtype(tensors):
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=worker // self.k_local)
            _copy_back(flat, group)

    def settle(self) -> None:
        if self.device.type == "cuda":  # NCCL returns before the GPU has finished
            torch.cuda.synchronize(self.device)

    def gather_state(self, state: dict[str, Any]) -> Optional[dict[str, Any]]:
        states = [None] * self.world if self.rank == 0 else None
        dist.gather_object(_to_cpu(state), states, dst=0)
        return stack_states(states) if self.rank == 0 else None

    def local_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return rank_state(state, self.rank, self.world)

    def rank0_first(self, load: Callable[[bool], T], wait_s: float = 6 * 3600.0) -> T:
        """``load(download)`` on rank 0 first; the others wait, then load without downloading.

        The wait goes through the store with its own long limit: a download may take far
        longer than the collective timeout, and a rank 0 that dies meanwhile is caught by
        the launcher, not by this wait.
        """
        key = f"dpl/rank0_first/{next(_handshakes)}"
        if self.rank == 0:
            try:
                out = load(True)
            except BaseException as e:
                self.store.set(key, f"error: {e}")
                raise
            self.store.set(key, "ok")
            return out
        if not wait_for_key(self.store, key, wait_s):
            raise RuntimeError(f"timed out after {wait_s:.0f} s waiting for rank 0 to load the data")
        status = self.store.get(key).decode()
        if status != "ok":
            raise DatasetUnavailable(f"rank 0 could not load the data: {status[len('error: '):]}")
        return load(False)


def _landing(works: list, finish: Callable[[], T]) -> Flight[T]:
    """torch.distributed works in flight and what to do once they have landed (copy the flat buffers back,
    unpack a gather)."""

    def land() -> T:
        for work in works:
            work.wait()
        return finish()

    return Flight(land)


def wait_for_key(store: dist.Store, key: str, timeout_s: float) -> bool:
    """Wait until ``key`` is in ``store``; False after ``timeout_s``.

    In short slices, not one ``store.wait``: a signal (SIGTERM from the launcher or torchrun's
    agent, Ctrl-C) reaches Python only once the C++ call returns, so one long wait would hold
    it off until the key came or the wait ran out. The slices grow to 1 s, so that K ranks
    waiting out a long download do not flood the store.
    """
    deadline, pause = time.monotonic() + timeout_s, 0.02
    while not store.check([key]):
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(2 * pause, 1.0)
    return True


# ----------------------------------------------------------------------------- checkpoints


def stack_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge the ranks' trainer states into one of every worker, as the simulation saves it.

    Per-worker tensors ([1, ...] on a rank: parameters, buffers, the inner optimizer's
    momentum and moments) are concatenated in rank order; the running sums of the epoch
    are added; everything else (method state, ledger, averaged and best models, step
    counters) is the same on every rank and taken from rank 0.
    """
    first = states[0]
    merged = dict(first)
    merged["workers"] = {key: [torch.cat(ts) for ts in zip(*(s["workers"][key] for s in states))]
                         for key in first["workers"]}
    merged["optimizer"] = {**first["optimizer"], "state": {
        i: {k: torch.cat([s["optimizer"]["state"][i][k] for s in states]) if _per_worker(v) else v
            for k, v in per_param.items()}
        for i, per_param in first["optimizer"]["state"].items()}}
    # the epoch's running sums (dpl.core.state.TrainState) of every rank added: rank 0's share holds the
    # total in a checkpoint of every worker, so the end-of-epoch all-reduce adds them up once
    merged["state"] = {**first["state"], "seen": sum(s["state"]["seen"] for s in states),
                       "sums": {k: sum(s["state"]["sums"].get(k, 0.0) for s in states) for k in first["state"]["sums"]}}
    return merged


def rank_state(state: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Rank ``rank``'s share of a state of every worker (the inverse of :func:`stack_states`)."""
    held = state["workers"]["params"][0].shape[0]
    if held != world:
        raise CheckpointError(f"the checkpoint holds K={held} workers, this run has {world} processes: "
                              f"resume with the same world size")
    own = slice(rank, rank + 1)
    out = dict(state)
    out["workers"] = {key: [t[own] for t in ts] for key, ts in state["workers"].items()}
    out["optimizer"] = {**state["optimizer"], "state": {
        i: {k: v[own] if _per_worker(v) else v for k, v in per_param.items()}
        for i, per_param in state["optimizer"]["state"].items()}}
    # rank 0 carries the epoch's sums so far; the others restart theirs at zero
    out["state"] = state["state"] if rank == 0 else {**state["state"], "seen": 0, "sums": {}}
    return out


def _per_worker(v: Any) -> bool:
    """Optimizer state stacked over workers: a tensor shaped like its parameter (scalars are step counts)."""
    return torch.is_tensor(v) and v.dim() >= 1


def _copy_back(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Each tensor set, in place, to its slice of the flat buffer it was concatenated into."""
    start = 0
    for t in tensors:
        t.copy_(flat[start:start + t.numel()].view_as(t))
        start += t.numel()


def _by_dtype(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The tensors grouped by dtype, in first-seen order (one flat buffer each)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
