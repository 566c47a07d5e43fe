"""``engine=distributed``: one process per worker on torch.distributed (K = world size).

Every rank holds a :class:`~dpl.core.workers.StackedWorkers` with K_local = 1 whose point
talks through a :class:`~dpl.comm.process_group.ProcessGroupComm`; methods, loop and
checkpoint format are the simulation's. Only the communicator differs,
and with it one thing here: ``centralized`` runs its forward through DistributedDataParallel,
whose bucketed all-reduce averages the gradients during backward, each bucket through the
point's DDP hook (:meth:`dpl.comm.point.CommPoint.ddp_hook`), so ``average_grads_`` has
nothing left to do.

How the processes start (torchrun, Slurm or ``engine.spawn``) is :mod:`dpl.launch`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dpl.comm.drops import Drops
from dpl.comm.process_group import ProcessGroupComm
from dpl.core.workers import StackedWorkers


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

    def __init__(self, model: nn.Module, comm: ProcessGroupComm, ddp: bool, codec: Any = None,
                 drops: Optional[Drops] = None, seed: int = 0) -> None:
        # vmap over one worker would only add overhead
        super().__init__(model, 1, comm, mode="loop", codec=codec, drops=drops, seed=seed)
        self.ddp: Optional[DistributedDataParallel] = None
        if ddp:
            self.params = [nn.Parameter(p.detach()) for p in self.params]
            device_ids = [comm.device.index] if comm.device.type == "cuda" else None
            # init_sync=False: DDP's own broadcast of rank 0's weights would bypass the point, and every
            # rank builds the same weights from the seed already, as the simulation's workers do
            self.ddp = DistributedDataParallel(_StackedModule(self), device_ids=device_ids, init_sync=False)
            self.ddp.register_comm_hook(None, self.point.ddp_hook)  # each bucket through the one point
            self.reduces_in_backward = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ddp is not None and torch.is_grad_enabled():
            return self.ddp(x)  # registers the backward hooks that all-reduce the gradient buckets
        return super().forward(x)
