"""The collectives an engine provides: the only thing that differs between the engines.

:class:`dpl.comm.point.CommPoint` calls these and counts and times what they move; nothing
else in dpl calls them. Every tensor a collective takes is stacked over this process's
workers, [K_local, ...]: K_local = K in the simulation (:class:`dpl.comm.stacked.StackedComm`),
1 on each process of torch.distributed (:class:`dpl.comm.process_group.ProcessGroupComm`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar

import torch

from dpl.comm.flight import Flight

T = TypeVar("T")


class Communicator(Protocol):
    world: int  # K: every worker of the run
    k_local: int  # the workers this process holds (the leading dimension of its tensors)
    rank: int  # this process among ``processes``
    processes: int
    device: torch.device  # where host numbers are reduced (the process group's device)
    graph_blocker: str  # why a local step cannot be captured as a CUDA graph beside these collectives ('' if it can)

    def all_reduce_(self, tensors: Sequence[torch.Tensor], op: str) -> None:
        """Every tensor [K_local, ...] replaced, in place, by its ``op`` (mean | sum) over all workers
        (integer tensors: the mean in float, truncated)."""

    def all_reduce_async_(self, tensors: Sequence[torch.Tensor], op: str) -> Flight[None]:
        """:meth:`all_reduce_` started, not waited for: the tensors hold the result once ``wait()``
        returns (a streaming sync keeps training meanwhile)."""

    def all_gather(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every tensor [K_local, ...] of every worker as [K, ...], in worker order."""

    def all_gather_async(self, tensors: Sequence[torch.Tensor]) -> Flight[list[torch.Tensor]]:
        """:meth:`all_gather` started, not waited for: ``wait()`` returns its list."""

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Every tensor [K_local, ...] set to worker 0's values, in place."""

    def broadcast_from_(self, tensors: Sequence[torch.Tensor], worker: int) -> None:
        """Tensors of one worker's shape (no worker dimension) set, on every process, to the values they hold
        on the process of worker ``worker``, in place."""

    def settle(self) -> None:
        """Return once the collectives issued so far have completed (for timing them)."""

    def gather_state(self, state: dict[str, Any]) -> Optional[dict[str, Any]]:
        """A trainer state of every worker, stacked [K, ...]; None on processes that do not write it."""

    def local_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """This process's part of a state of every worker (the inverse of ``gather_state``)."""

    def rank0_first(self, load: Callable[[bool], T]) -> T:
        """``load(download)`` on the first process before the others, which then load without downloading."""
