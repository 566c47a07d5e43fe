"""``engine=distributed``: one process per worker on torch.distributed (K = world size).

Every rank holds a :class:`~dpl.engine.workers.StackedWorkers` with K_local = 1 and a
:class:`ProcessGroupComm`; methods, loop and checkpoint format are the simulation's.
Only the communication primitive differs (STYLE principle 4):

- parameter averages (LocalSGD, SlowMo) are one all-reduce over a flat buffer per sync,
  through ``torch.distributed.algorithms.model_averaging.utils.average_parameters``;
- ``centralized`` runs its forward through DistributedDataParallel, whose bucketed
  all-reduce averages the gradients during backward, so ``average_grads_`` has
  nothing left to do;
- per-epoch sums (train loss and accuracy, drift, evaluation) are all-reduced, so every
  rank records, and chooses the next H from, the same history;
- a checkpoint is gathered on rank 0 into the simulation's stacked layout [K, ...] and
  each rank takes its own row back on resume.

How the processes start (torchrun or ``engine.spawn``) is :mod:`dpl.engine.launch`.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging.utils import average_parameters
from torch.nn.parallel import DistributedDataParallel

from dpl.engine.workers import StackedWorkers
from dpl.errors import CheckpointError, ConfigError, DatasetUnavailable

T = TypeVar("T")

# TrainState's running sums of the epoch in progress: a checkpoint of every worker holds
# their total (on rank 0's share), so the end-of-epoch all-reduce adds them up once.
SUMMED_STATE = ("loss_sum", "correct", "seen", "drift_sum")

# Store keys of one-off handshakes: every rank makes the same ones in the same order.
_handshakes = itertools.count(1)


class ProcessGroupComm:
    """The default process group as a Communicator: worker k is rank k.

    ``store`` is the key-value store the group was built on; it carries the one-off
    handshakes that must not be bounded by the collective timeout (rank 0 downloading
    the data) and the fault reports of :mod:`dpl.engine.launch`.
    """

    def __init__(self, store: dist.Store, device: torch.device) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store, self.device = store, device
        self.wall_s = 0.0

    # ------------------------------------------------------------------ Communicator
    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Mean over the ranks of each tensor, in place: one all-reduce of one flat buffer."""
        if not tensors:
            return
        t0 = time.perf_counter()
        average_parameters(iter(tensors), None)  # rebinds each tensor's .data to a slice of the buffer
        self._collective_done(t0)

    def all_gather(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every rank's tensors [1, ...] as [K, ...] in rank order: one all_gather of their bytes
        (a compressed payload: values, indices, packed signs, scales, whatever their dtypes)."""
        if not tensors:
            return []
        t0 = time.perf_counter()
        flat = torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in tensors])
        everyone = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(everyone, flat)
        self._collective_done(t0)
        out, start = [], 0
        for t in tensors:
            size = t.numel() * t.element_size()
            # a copy per slice: a dtype view needs its offset aligned to the dtype's size
            out.append(torch.cat([e[start:start + size].clone().view(t.dtype).view(t.shape) for e in everyone]))
            start += size
        return out

    def all_sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_state(self, state: dict[str, Any]) -> Optional[dict[str, Any]]:
        states = [None] * self.world if self.rank == 0 else None
        dist.gather_object(_to_cpu(state), states, dst=0)
        return stack_states(states) if self.rank == 0 else None

    def local_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return rank_state(state, self.rank, self.world)

    # ------------------------------------------------------------------ helpers
    def average_copy(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Means over the ranks of copies of ``tensors`` (evaluation weights; not timed as training traffic)."""
        copies = [t.detach().clone() for t in tensors]
        average_parameters(iter(copies), None)
        return copies

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

    def _collective_done(self, t0: float) -> None:
        if self.device.type == "cuda":  # NCCL returns before the GPU has finished
            torch.cuda.synchronize(self.device)
        self.wall_s += time.perf_counter() - t0


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


def _timed_allreduce(comm: ProcessGroupComm, bucket):  # no annotations: DDP checks them against real types
    """DDP's default gradient averaging (divide, all-reduce), timed from launch to completion."""
    t0 = time.perf_counter()
    buffer = bucket.buffer().div_(comm.world)

    def done(fut):
        comm.wall_s += time.perf_counter() - t0
        return fut.value()[0]

    return dist.all_reduce(buffer, async_op=True).get_future().then(done)


class _StackedModule(nn.Module):
    """The workers' stacked parameters as one module, so DDP can wrap them; its forward is the workers'."""

    def __init__(self, workers: StackedWorkers) -> None:
        super().__init__()
        self.stacked = nn.ParameterList(workers.params)
        object.__setattr__(self, "owner", workers)  # a plain reference, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return StackedWorkers.forward(self.owner, x)


class DistributedWorkers(StackedWorkers):
    """This rank's one worker (K_local = 1); ``K`` is the world size.

    With ``ddp`` (methods that average gradients every step) the parameters become
    ``nn.Parameter``s of a module wrapped in DistributedDataParallel and the forward runs
    through it. Model buffers (BatchNorm statistics) stay outside that module, so DDP
    never broadcasts them: each worker keeps its own, as simulated workers do, and
    ``mean_replica`` averages them, as the simulation's does.
    """

    def __init__(self, model: nn.Module, comm: ProcessGroupComm, ddp: bool) -> None:
        super().__init__(model, 1, comm, mode="loop")  # vmap over one worker would only add overhead
        self.ddp: Optional[DistributedDataParallel] = None
        if ddp:
            self.params = [nn.Parameter(p.detach()) for p in self.params]
            device_ids = [comm.device.index] if comm.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(_StackedModule(self), device_ids=device_ids)
            self.ddp.register_comm_hook(comm, _timed_allreduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ddp is not None and torch.is_grad_enabled():
            return self.ddp(x)  # registers the backward hooks that all-reduce the gradient buckets
        return super().forward(x)

    def average_grads_(self) -> None:
        if self.ddp is None:
            super().average_grads_()
        else:  # DDP averaged the gradients during backward: only count them
            self.point.average_([p.grad for p in self.params if p.grad is not None], "grads", sent=False)

    def average_params_(self) -> None:
        """x_k <- mean_j x_j, and this rank's term of the drift mean_k ||x_k - x̄|| / ||x̄||.

        x̄ is the all-reduced average itself, so measuring drift costs no extra collective;
        the trainer's end-of-epoch all-reduce adds the ranks' terms (dpl.comm.worker_drift).
        """
        with torch.no_grad():
            before = _flat64(self.params)
            self.point.average_(self.params + self.buffers, "params")
            self.drift = _rank_drift(before, _flat64(self.params), self.K)

    def measure_drift(self) -> torch.Tensor:
        """This rank's term of the drift, (1/K) ||x_k − x̄|| / ||x̄||; x̄ from an all-reduce of a copy that
        is not counted as traffic (a compressed sync never forms the exact average, only the drift needs it)."""
        return _rank_drift(_flat64(self.params), _flat64(self.comm.average_copy(self.params)), self.K)

    def mean_replica(self) -> dict[str, torch.Tensor]:
        names = self.param_names + self.buffer_names
        local = super().mean_replica()
        return dict(zip(names, self.comm.average_copy([local[n] for n in names])))

    @torch.no_grad()
    def evaluate(self, batches, weights: dict[str, torch.Tensor] | None = None) -> tuple[float, float]:
        """Each rank evaluates every K-th batch; the sums are all-reduced."""
        weights = self.mean_replica() if weights is None else weights
        comm = self.comm
        mine = (b for i, b in enumerate(batches) if i % comm.world == comm.rank)
        loss_sum, correct, count = comm.all_sum(self.eval_sums(mine, weights))
        return loss_sum / max(count, 1.0), correct / max(count, 1.0)


def build_distributed(cfg: Any, model: nn.Module, device: torch.device, comm=None,
                      synchronous: bool = False) -> DistributedWorkers:
    """The rank's workers; ``synchronous`` (the method averages gradients at every step of the
    run) wraps them in DDP, a method that switches (post-local SGD) all-reduces its gradients
    through the comm point instead."""
    if not isinstance(comm, ProcessGroupComm):
        raise ConfigError("engine=distributed needs its processes: launch with torchrun --nproc-per-node=K "
                          "-m dpl engine=distributed ..., or add engine.spawn=true")
    if comm.world != cfg.K:
        raise ConfigError(f"K={cfg.K} is invalid: engine=distributed runs K = world size = {comm.world} workers")
    return DistributedWorkers(model, comm, ddp=synchronous)


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
    merged["state"] = {**first["state"], **{k: sum(s["state"][k] for s in states) for k in SUMMED_STATE}}
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
    out["state"] = {**state["state"], **({} if rank == 0 else {k: 0 for k in SUMMED_STATE})}
    return out


def _per_worker(v: Any) -> bool:
    """Optimizer state stacked over workers: a tensor shaped like its parameter (scalars are step counts)."""
    return torch.is_tensor(v) and v.dim() >= 1


def _flat64(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def _rank_drift(mine: torch.Tensor, mean: torch.Tensor, K: int) -> torch.Tensor:
    """(1/K) ||x_k − x̄|| / ||x̄|| (0 when x̄ == 0) as a 0-dim float64 tensor on the device: the trainer
    sums it there and reads the sum once per epoch, as it does the simulation's drift."""
    norm = mean.norm()
    return torch.where(norm > 0, (mine - mean).norm() / norm.clamp_min(torch.finfo(torch.float64).tiny) / K, 0.0)


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
