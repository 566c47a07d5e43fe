"""The simulation's communicator: K workers in one process, as the leading dimension of each tensor.

A collective is a reduction over that dimension. Nothing crosses a wire, so what the point
measures is the in-process reduction; what a cluster would send is modelled by
:mod:`dpl.comm.cost` from the point's counts, the same counts the process group's runs give.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import torch

from dpl.comm.flight import Flight

T = TypeVar("T")


class StackedComm:
    """The K workers are rows 0..K-1 of every tensor; one process holds them all."""

    rank, processes = 0, 1
    device = torch.device("cpu")  # host numbers (already complete in one process)
    graph_blocker = ""

    def __init__(self, world: int) -> None:
        self.world = self.k_local = world

    def all_reduce_(self, tensors: Sequence[torch.Tensor], op: str) -> None:
        if op not in ("mean", "sum"):
            raise ValueError(f"op={op!r} is invalid: allowed mean, sum")
        for t in tensors:
            if op == "sum":
                t.copy_(t.sum(0, keepdim=True))
            else:  # integer buffers (BatchNorm's num_batches_tracked) average in float, then truncate
                t.copy_(t.mean(0, keepdim=True) if t.is_floating_point() else t.double().mean(0, keepdim=True))

    def all_reduce_async_(self, tensors: Sequence[torch.Tensor], op: str) -> Flight[None]:
        self.all_reduce_(tensors, op)  # landed as it is issued: one process holds every worker
        return Flight.landed()

    # One process holds every worker: payloads and states are already complete.
    def all_gather(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(tensors)

    def all_gather_async(self, tensors: Sequence[torch.Tensor]) -> Flight[list[torch.Tensor]]:
        return Flight.landed(list(tensors))

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            t.copy_(t[:1].clone().expand_as(t))

    def broadcast_from_(self, tensors: Sequence[torch.Tensor], worker: int) -> None:
        """One process holds every worker: its tensors are worker ``worker``'s already."""

    def settle(self) -> None:
        """Nothing in flight but the device's own queue, which the host does not wait for."""

    def gather_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return state

    def local_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return state

    def rank0_first(self, load: Callable[[bool], T]) -> T:
        return load(True)
