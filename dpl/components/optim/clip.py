"""Gradient clipping by the global norm, per worker: ``optimizer.grad_clip_norm`` for every inner optimizer.

Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural networks", Algorithm 1:
when the norm of the whole gradient exceeds a threshold c, rescale it to norm c, keeping its direction.
As ``torch.nn.utils.clip_grad_norm_`` does for one model (and nanoGPT at c = 1.0, Karpathy's ``train.py``):

    g ← g · min(1, c / (‖g‖ + eps)),   ‖g‖ the 2-norm over all of the model's gradients.

dpl's parameters are stacked [K, ...], one slice per worker, so every worker clips its own gradient by its
own norm (K separate ``clip_grad_norm_`` calls). The local step (:mod:`dpl.core.step`) clips once, after
the method's gradient hook and before the inner optimizer's step, for every optimizer alike. Only tensor ops:
nothing is read on the host, so the clip is compiled and captured in a CUDA graph with the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

TORCH_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: the scale is max_norm / (total_norm + 1e-6)


def grad_norms(grads: Sequence[torch.Tensor], per_worker: bool) -> torch.Tensor:
    """The 2-norm over all of ``grads``: a scalar, or one per worker [K] (the leading dimension) in per-worker
    mode. Per tensor first, then over the tensors, as ``clip_grad_norm_`` reduces (the same numbers per slice
    as on the slices alone)."""
    if per_worker:
        norms = [torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) for g in grads]
    else:
        norms = [torch.linalg.vector_norm(g) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms), dim=0)


@dataclass(frozen=True)
class GradClip:
    """Clip to ``max_norm`` with ``eps`` added to the norm (the ``optimizer`` node's grad_clip_norm and
    grad_clip_eps). ``eps`` = 0 is min(1, c / ‖g‖) = c / max(‖g‖, c), the clip of NVIDIA apex's FusedLAMB."""

    max_norm: float
    eps: float = TORCH_EPS

    def __call__(self, grads: Sequence[torch.Tensor], per_worker: bool = True) -> torch.Tensor:
        """Scale ``grads`` in place (each worker's slices by its own factor in per-worker mode); returns the
        norms before the clip. A worker under the threshold is multiplied by exactly 1: untouched, bit for bit."""
        grads = list(grads)
        if not grads:
            return torch.zeros(())
        total = grad_norms(grads, per_worker)
        # a clamp, not a branch on the norm: no host read (a zero norm gives inf, clamped to 1)
        scale = (self.max_norm / (total + self.eps)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.reshape(scale.shape + (1,) * (g.ndim - scale.ndim)))
        return total


def grad_clip(cfg: Any) -> GradClip | None:
    """The clip of an ``optimizer`` node (None when its grad_clip_norm is null)."""
    max_norm = getattr(cfg, "grad_clip_norm", None)
    return None if max_norm is None else GradClip(float(max_norm), float(getattr(cfg, "grad_clip_eps", TORCH_EPS)))
