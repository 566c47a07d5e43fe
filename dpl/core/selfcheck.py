"""The fast paths check themselves: the first time a run takes a compiled step, a replayed CUDA graph or a
fused packed step, the same step is also taken eagerly (each run alone, for a fused one) on the same batch
from the same state, and the two are compared.

A fast path that fails to build falls back with a warning already (:mod:`dpl.core.step`); one that runs and
computes something else would otherwise go unnoticed, on the devices where it is used and tests never run
(CUDA graphs, packed sweeps on a GPU). The comparison: each worker's loss and every parameter after the
step, to a tolerance of the run's precision, relative to the larger of 1 and the eager value. On a mismatch
one warning line names the largest difference, the step's state is the eager one, and the run goes on
eagerly. What the step counts as traffic (a synchronous method averages gradients through the
communication point) is counted once.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Optional, Sequence

import torch

from dpl.core.step import LocalStep, Outputs, restore_state, snapshot_state

log = logging.getLogger(__name__)

# relative tolerance of one step's results per precision: fused and compiled kernels sum in other orders
# (fp32: ~1e-6 relative); bf16 autocast rounds to 8 bits of mantissa (~4e-3) before the sums
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}
Step = Callable[[torch.Tensor, int, int, int], Outputs]


class SelfCheckedStep:
    """``fast`` as it is, but for its first fast call, which is compared with ``reference`` (see the module doc).

    ``owners``: the eager steps whose workers and optimizers the step changes (``fast`` itself, or a fused
    step's members); ``is_fast(idx)``: whether ``fast`` takes its fast path on this batch (a CUDA graph
    replays only after its warm-up steps). Every other attribute is ``fast``'s.
    """

    def __init__(self, fast: LocalStep, reference: Step, owners: Sequence[LocalStep], what: str,
                 is_fast: Optional[Callable[[torch.Tensor], bool]] = None) -> None:
        self.fast, self.reference, self.owners, self.what = fast, reference, list(owners), what
        self.is_fast = is_fast or (lambda idx: True)
        self.checked = False
        self.eager_only = False  # a mismatch was found: the reference from now on
        self.largest: Optional[float] = None  # the largest relative difference found (tests, logs)

    def __getattr__(self, name: str) -> Any:  # only for what is not set above
        return getattr(self.fast, name)

    def __call__(self, idx: torch.Tensor, step: int, lr_i: int, epoch: int) -> Outputs:
        if self.eager_only:
            return self.reference(idx, step, lr_i, epoch)
        if self.checked or not self.is_fast(idx):
            return self.fast(idx, step, lr_i, epoch)
        self.checked = True
        before = self._state()
        ref_losses, ref_correct = self.reference(idx, step, lr_i, epoch)
        expected = [ref_losses.detach().clone(), *(p.detach().clone() for o in self.owners for p in o.workers.params)]
        after_reference = self._state()
        self._load(before)
        out = self.fast(idx, step, lr_i, epoch)
        found = [out[0].detach(), *(p.detach() for o in self.owners for p in o.workers.params)]
        self.largest = max(_relative(a, b) for a, b in zip(found, expected))
        tolerance = TOLERANCE.get(self.owners[0].workers.precision, TOLERANCE["fp32"])
        if self.largest <= tolerance:
            return out
        log.warning("%s: the fast step differs from the eager step on its first batch (largest relative "
                    "difference %.3g in the loss or parameters, tolerance %.0e); the run goes on eagerly",
                    self.what, self.largest, tolerance)
        self.eager_only = True
        self._load(after_reference)
        return ref_losses, ref_correct

    def _state(self) -> list[Any]:
        return [(snapshot_state(o.workers, o.optimizer), _point_state(o.workers.point)) for o in self.owners]

    def _load(self, state: list[Any]) -> None:
        for o, (tensors, point) in zip(self.owners, state):
            restore_state(o.workers, o.optimizer, tensors)
            _load_point(o.workers.point, point)


def _relative(found: torch.Tensor, expected: torch.Tensor) -> float:
    if found.shape != expected.shape:
        return float("inf")
    e = expected.double()
    return float(((found.double() - e).abs() / e.abs().clamp(min=1.0)).max()) if e.numel() else 0.0


def _point_state(point: Any) -> dict[str, Any]:
    """What a step adds to the communication point's counts (a synchronous method's gradient average)."""
    return {k: copy.deepcopy(getattr(point, k)) for k in ("traffic", "_sync", "wall_s", "_ddp_bytes")
            if hasattr(point, k)}


def _load_point(point: Any, state: dict[str, Any]) -> None:
    for k, v in state.items():
        setattr(point, k, copy.deepcopy(v))


def self_checked(step: LocalStep, mode: str) -> Any:
    """``step`` of a resolved ``engine.compile`` ``mode``, its first fast call checked against its eager one."""
    from dpl.core.engines import EAGER

    if mode == EAGER:
        return step
    return SelfCheckedStep(step, lambda idx, s, lr_i, epoch: LocalStep.__call__(step, idx, s, lr_i, epoch), [step],
                           f"engine.compile={mode}", step.takes_fast_path)


def self_checked_fused(fused: Any, members: Sequence[Any]) -> SelfCheckedStep:
    """A fused packed step, its first fast call checked against each member's eager step alone."""
    alone = [m.fast if isinstance(m, SelfCheckedStep) else m for m in members]

    def one_by_one(idx: torch.Tensor, step: int, lr_i: int, epoch: int) -> Outputs:
        outs = [LocalStep.__call__(m, idx[r], step, lr_i, epoch) for r, m in enumerate(alone)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    return SelfCheckedStep(fused, one_by_one, alone, "the fused packed step", fused.takes_fast_path)
