"""K model replicas held as one set of stacked tensors.

Workers are a leading dimension, not K model copies: every
parameter and buffer of the model is stored once as a tensor of shape [K, ...], the
model itself stays a stateless template run through ``torch.func.functional_call``.
Averaging the workers is then ``mean(0)``, and an optimizer acting on the stacked
tensors updates all workers at once (elementwise optimizers as they are; LARS/LAMB
in their ``per_worker`` mode, which takes norms per slice).

Model buffers (BatchNorm's running statistics) are stacked [K, ...] the same way, so each
worker tracks its own and a sync averages them with the parameters. The loop updates
them in place through per-worker views; vmap updates them functionally: each worker's
forward runs on its own copy of its buffers, returns the updated copy as an output, and
the stacked buffers take the new values afterwards. Both give the same numbers.

The same class serves the multi-process engine with K_local = 1: there ``comm``
reduces across processes instead of across the leading dimension, and everything
else is shared. Every collective goes through ``point`` (:class:`dpl.comm.point.CommPoint`),
which counts and times it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from dpl.comm.communicator import Communicator
from dpl.comm.drops import Drops
from dpl.comm.flight import Flight
from dpl.comm.point import CommPoint, DeltaResult
from dpl.core.state import drift_term


class StackedWorkers:
    """``K_local`` replicas of ``model`` as stacked leaf tensors, all initialised from ``model``."""

    precision = "fp32"  # the builder sets the config's (fp32 | bf16)
    # the builder sets it from engine.memory_format (dpl.core.engines.memory_format): image batches enter the
    # model channels_last (NHWC in memory), for which oneDNN's convolutions are faster
    channels_last = False
    # autocast's cast cache: off while a CUDA graph is captured (the cached casts would be
    # tensors of the capture, stale at the next replay; torch.cuda.graph's notes)
    autocast_cache = True

    def __init__(self, model: nn.Module, k_local: int, comm: Communicator, mode: str = "loop", codec: Any = None,
                 drops: Optional[Drops] = None, seed: int = 0) -> None:
        if mode not in ("loop", "vmap"):
            raise ValueError(f"simulate={mode!r} is invalid: allowed loop, vmap")
        self.model, self.k_local, self.mode = model, k_local, mode
        # Every worker starts from the same weights (a peer-implementation failure mode
        # is workers initialised differently).
        self.param_names = [n for n, _ in model.named_parameters()]
        self.buffer_names = [n for n, _ in model.named_buffers()]
        self.params = [_stack(p, k_local).requires_grad_(True) for p in model.parameters()]
        self.buffers = [_stack(b, k_local) for b in model.buffers()]
        # every collective among the workers goes through it, and is counted there; ``codec``: what a local
        # method's sync sends (dpl.comm.codecs), ``drops``: whose contributions arrive (faults.drop_prob)
        self.point = CommPoint(comm, codec, drops, seed)
        self.point.start(self.params)
        self.drift = 0.0  # this process's term of the workers' drift before the last sync
        # DistributedDataParallel all-reduces the gradients during backward (through the point's hook)
        self.reduces_in_backward = False

    @property
    def K(self) -> int:
        """Every worker of the run (the communicator's world: the one K, checked once at build time)."""
        return self.point.world

    def graph_blocker(self) -> str:
        """Why the step cannot be captured as a CUDA graph with these workers ('' when it can)."""
        if self.reduces_in_backward:
            return "DistributedDataParallel all-reduces inside the backward"
        return self.point.comm.graph_blocker

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [K_local, B, classes] for per-worker inputs x [K_local, B, ...]."""
        if self.mode == "vmap":
            logits, buffers = self.vmapped(self.params, self.buffers, x)
            with torch.no_grad():
                for b, new in zip(self.buffers, buffers):
                    b.copy_(new)
            return logits
        # each worker's buffers are views into the stacked ones, so BatchNorm updates them in place
        return torch.stack([self._forward_one([p[k] for p in self.params], [b[k] for b in self.buffers],
                                              self._layout(x[k])) for k in range(self.k_local)])

    def vmapped(self, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor],
                x: torch.Tensor) -> tuple[torch.Tensor, Sequence[torch.Tensor]]:
        """Every worker's logits in one vmapped call over the stacked ``params`` and ``buffers`` (a worker
        per row), and the buffers as the forward left them (to be copied back: see _forward_updating)."""
        if not buffers:
            return vmap(self._forward_one)(tuple(params), (), x), ()
        return vmap(self._forward_updating)(tuple(params), tuple(buffers), x)

    def _forward_one(self, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor], x: torch.Tensor):
        tensors = dict(zip(self.param_names, params))
        tensors.update(zip(self.buffer_names, buffers))
        return functional_call(self.model, tensors, (x,))

    def _forward_updating(self, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor], x: torch.Tensor):
        """One worker's logits and its buffers after the forward (BatchNorm's running statistics).

        The forward updates a copy, which is returned: writing in place into a tensor that
        vmap passed in would rely on vmap propagating the write to the stacked original.
        """
        buffers = [b.clone() for b in buffers]
        return self._forward_one(params, buffers, x), tuple(buffers)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each worker's mean cross-entropy on its own batch (attached to the graph), and its correct count.

        precision=bf16: the forward runs under autocast (the stacked parameters stay fp32
        masters, their gradients fp32); the caller's backward runs outside it, as torch.amp
        recommends.
        """
        with _autocast(x.device, self.precision, self.autocast_cache):
            logits = self.forward(x)
            losses = worker_losses(logits, y)
        return losses, worker_correct(logits, y)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each worker's mean cross-entropy on its own batch, and its correct count.

        Backpropagating the *sum* of the K losses gives each slice of a stacked
        parameter exactly its own worker's gradient, since worker k's loss depends
        only on slice k.
        """
        losses, correct = self.losses(x, y)
        losses.sum().backward()
        return losses.detach(), correct

    # ------------------------------------------------------------------ state
    def average_params_(self) -> None:
        """x_k <- mean_j x_j for every worker (and buffers, e.g. BatchNorm statistics), one round.

        Records in ``drift`` how far apart the workers were just before, as :meth:`pseudo_gradient_` does.
        """
        with torch.no_grad():
            before, present = _flat64(self.params), self.point.present
            self.point.average_(self.params + self.buffers, "params")
            self.drift = self._drift(before, self.params, present)

    def pseudo_gradient_(self, anchor: Sequence[torch.Tensor], sync: int) -> DeltaResult:
        """A local method's sync of the whole model, waited for (:meth:`start_pseudo_gradient`); records
        the drift in ``drift``."""
        result, self.drift = self.start_pseudo_gradient(anchor, sync).wait()
        return result

    def start_pseudo_gradient(self, anchor: Sequence[torch.Tensor], sync: int,
                              params: Optional[Sequence[int]] = None,
                              buffers: Optional[Sequence[int]] = None) -> Flight[tuple[DeltaResult, torch.Tensor]]:
        """A local method's sync started: Δ = mean_k (x − x_k) per tensor (float64, one worker's shape; x the
        float64 ``anchor``, one per tensor of ``params``) as the run's codec sends it through the point.
        ``params`` / ``buffers``: indices of the tensors synced (a streaming fragment; default all). The
        workers are not changed: they may keep training until it lands.

        Landed, it also gives this process's term of mean_k ||x_k − x̄|| / ||x̄|| over the synced tensors
        as they were when it started (:func:`dpl.core.state.drift_term`).
        """
        with torch.no_grad():
            chosen = self.params if params is None else [self.params[i] for i in params]
            kept = self.buffers if buffers is None else [self.buffers[i] for i in buffers]
            before, present = _flat64(chosen), self.point.present  # (the workers in the run when it starts)
            pending = self.point.start_pseudo_gradient(anchor, chosen, kept, sync, params)
            # only encoded Δ_k cross: the drift metric needs x̄, one bookkeeping all-reduce (now, of the
            # tensors as they are: they may move on before the sync lands)
            exact = None if self.point.forms_mean else self.point.average_copy(chosen, "metrics")
        return pending.then(lambda result: (result, self._drift(before, exact if result.mean is None else result.mean,
                                                                present)))

    def start_mean_of_deltas(self, deltas: Sequence[torch.Tensor], sync: int,
                             params: Sequence[int]) -> Flight[tuple[DeltaResult, torch.Tensor]]:
        """Each worker's own pseudo-gradient Δ_k [K_local, ...] (float64) of the tensors ``params`` (indices)
        averaged through the point, in flight until ``wait()`` (eager updates, whose workers each have their
        own anchor); as :meth:`start_pseudo_gradient`, it also gives the drift term when it lands."""
        with torch.no_grad():
            chosen = [self.params[i] for i in params]
            before = _flat64(chosen)
            pending = self.point.start_mean(deltas, sync, params)
            exact = self.point.average_copy(chosen, "metrics")  # x̄ is not sent: the drift metric's own
        return pending.then(lambda result: (result, self._drift(before, exact)))

    @torch.no_grad()
    def _drift(self, before: torch.Tensor, mean: Sequence[torch.Tensor],
               present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This process's drift term; ``present`` (elastic workers): over the workers in the run only."""
        if present is None:
            return drift_term(before, _flat64(mean)[0], self.K)
        mine = present[self.point.comm.rank * self.k_local:][: self.k_local]
        return drift_term(before, _flat64(mean)[0], max(int(present.sum()), 1), mine)

    def sync(self, overlap_steps: int = 0) -> Any:
        """``with workers.sync(overlap_steps):`` the collectives inside are one sync of the model
        (:meth:`dpl.comm.point.CommPoint.sync`)."""
        return self.point.sync(overlap_steps)

    def average_(self, tensors: Sequence[torch.Tensor], kind: str) -> None:
        """Tensors stacked like the workers' [K_local, ...] replaced by their mean over all K workers, through
        the point (``kind``: what they are, e.g. ``state`` for the inner optimizer's, ``buffers``)."""
        with torch.no_grad():
            self.point.average_(tensors, kind)

    def average_grads_(self) -> None:
        """Synchronous data parallelism: every worker steps with the mean gradient.

        One worker has nothing to average, but the step still counts as a synchronous round.
        Under DistributedDataParallel the backward has averaged (and counted) them already.
        """
        if self.reduces_in_backward:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        with torch.no_grad():
            self.point.average_(grads, "grads")

    def replica(self, k: int = 0) -> dict[str, torch.Tensor]:
        """Worker k's weights as a plain ``state_dict`` of the model (detached copies)."""
        names = self.param_names + self.buffer_names
        return {n: t[k].detach().clone() for n, t in zip(names, self.params + self.buffers)}

    def mean_replica(self, kind: str = "eval") -> dict[str, torch.Tensor]:
        """The average of every worker's weights (all equal right after a sync), through the point
        (``kind``: ``eval``, or ``checkpoint`` for the model a checkpoint stores)."""
        names = self.param_names + self.buffer_names
        return {n: t[0] for n, t in zip(names, self.point.average_copy(self.params + self.buffers, kind))}

    def load_replica_(self, state: dict[str, torch.Tensor]) -> None:
        """Set every worker to the same weights (pretrained initialisation)."""
        names = self.param_names + self.buffer_names
        missing = [n for n in names if n not in state]
        if missing:
            raise KeyError(f"weights lack {len(missing)} tensors of the model, e.g. {missing[0]!r}")
        with torch.no_grad():
            for n, t in zip(names, self.params + self.buffers):
                t.copy_(state[n].to(t.device, t.dtype).unsqueeze(0).expand_as(t))

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        """Every per-worker tensor ([K_local, ...]): parameters, buffers and, with error feedback,
        the compression residuals (the multi-process engine stacks each key's tensors over ranks)."""
        return {"params": [p.detach().clone() for p in self.params], "buffers": [b.clone() for b in self.buffers],
                **self.point.state_dict()}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        with torch.no_grad():
            for dst, src in zip(self.params + self.buffers, state["params"] + state["buffers"]):
                if dst.shape != src.shape:
                    raise ValueError(f"checkpoint holds workers of shape {tuple(src.shape)}, this run {tuple(dst.shape)}")
                dst.copy_(src)
        self.point.load_state_dict(state)

    @torch.no_grad()
    def evaluate(self, batches, weights: dict[str, torch.Tensor] | None = None) -> tuple[float, float]:
        """Mean loss and accuracy over (x, y) batches of ``weights`` (default: the averaged model).

        Each process evaluates every ``processes``-th batch (all of them in the simulation); the
        sums are added over the processes through the point."""
        weights = self.mean_replica() if weights is None else weights
        comm = self.point.comm
        mine = (b for i, b in enumerate(batches) if i % comm.processes == comm.rank)
        loss_sum, correct, count = self.point.all_sum(self.eval_sums(mine, weights), "eval")
        return loss_sum / max(count, 1.0), correct / max(count, 1.0)

    @torch.no_grad()
    def eval_sums(self, batches, weights: dict[str, torch.Tensor]) -> tuple[float, float, int]:
        """Summed loss, correct count and sample count of ``weights`` over (x, y) batches.

        The sums stay on the device until the last batch is done (one read, not one per batch).
        """
        loss_sum = correct = None
        count = 0
        self.model.eval()
        try:
            for x, y in batches:
                logits = functional_call(self.model, weights, (self._layout(x),))
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
                hits = (logits.argmax(-1) == y).sum()
                loss_sum = loss if loss_sum is None else loss_sum + loss
                correct = hits if correct is None else correct + hits
                count += y.numel()
        finally:
            self.model.train()
        if loss_sum is None:
            return 0.0, 0.0, 0
        sums = torch.stack([loss_sum.double(), correct.double()]).tolist()  # the evaluation's one read
        return sums[0], sums[1], count

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """One batch of images [B, C, H, W] in the memory format the convolutions get (the same
        numbers either way; only the order in memory, and so the kernels picked, differ)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def _autocast(device: torch.device, precision: str, cache: bool = True):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()  # fp32: not even a disabled autocast, so the maths is untouched


def _flat64(stacked: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every worker's tensors flattened together in float64, [K_local, n]."""
    return torch.cat([t.detach().reshape(t.shape[0], -1).double() for t in stacked], dim=1)


def _stack(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.detach().unsqueeze(0).repeat(k, *([1] * t.dim())).contiguous()


def packed_losses(members: Sequence[StackedWorkers], x: torch.Tensor,
                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The workers of several runs of one model as one stacked batch: each worker's mean loss and
    correct count [R·K] for inputs x [R·K, B, ...] (run r's workers are rows r·K .. r·K + K − 1).

    The runs' stacked parameters are concatenated along the worker dimension and the model runs
    once, vmapped over all R·K workers (HFTA's fused array of jobs, Wang et al. 2021, as dpl's K
    workers are fused already); the concatenation's backward hands each run's leaf tensors exactly
    their own gradients, as each worker's loss depends only on its own slice. BatchNorm's buffers
    take their new values run by run afterwards.
    """
    lead = members[0]
    params = tuple(torch.cat([m.params[i] for m in members]) for i in range(len(lead.params)))
    buffers = tuple(torch.cat([m.buffers[i] for m in members]) for i in range(len(lead.buffers)))
    with _autocast(x.device, lead.precision, lead.autocast_cache):
        logits, new = lead.vmapped(params, buffers, x)
        with torch.no_grad():
            for i, stacked in enumerate(new):
                for m, part in zip(members, stacked.split([m.k_local for m in members])):
                    m.buffers[i].copy_(part)
        losses = worker_losses(logits, y)
    return losses, worker_correct(logits, y)


def worker_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each worker's mean cross-entropy [K] of logits [K, B, (T,) classes] against targets [K, B, (T,)]:
    over its B images, or its B·T next-byte predictions."""
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return flat.view(y.shape).flatten(1).mean(1)


def worker_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each worker's correct predictions [K] (images, or bytes of its windows)."""
    return (logits.detach().argmax(-1) == y).flatten(1).sum(1)
