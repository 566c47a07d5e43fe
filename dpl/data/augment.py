"""Batched augmentation and normalisation of uint8 image tensors.

Every image in a batch gets its own crop offset and flip, but the work is a couple of
tensor ops over the whole batch (as in KellerJordan/cifar10-airbench): no per-image
Python, no PIL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None,
                     draws: int | None = None, span: slice | None = None) -> torch.Tensor:
    """Random crop after zero padding, then horizontal flip with p=0.5, independently per image.

    ``x`` is uint8 ``[N, C, H, W]``; the result has the same shape and dtype.  Zero padding
    matches torchvision's ``RandomCrop(padding=p)`` default.  Random numbers are drawn on
    the generator's device (so a seeded generator gives the same crops on CPU and CUDA)
    and then moved to ``x``'s device.

    ``draws``/``span``: draw offsets for ``draws`` images and use those in ``span`` for ``x``
    (one process's share of a batch whose randomness is drawn jointly for all workers).
    """
    n, c, h, w = x.shape
    dy, dx, flip = _draw_offsets(draws or n, padding, generator, x.device)
    if span is not None:
        dy, dx, flip = dy[span], dx[span], flip[span]
    padded = F.pad(x, (padding, padding, padding, padding)) if padding > 0 else x
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [N, H] rows of the padded image
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [N, W]
    # A flipped crop reads its window's columns right to left: an exact mirror of the crop.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    # Two gathers with expanded (stride-0) index views: no [N, C, H, W] int64 index is materialised.
    wp = padded.shape[3]
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, wp))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _draw_offsets(
    n: int, padding: int, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    draw_on = generator.device if generator is not None else device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=draw_on)
    flip = torch.randint(0, 2, (n,), generator=generator, device=draw_on).bool()
    return offsets[0].to(device), offsets[1].to(device), flip.to(device)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., C, H, W]`` -> float32 ``(x / 255 - mean) / std`` with per-channel ``mean``, ``std`` ``[C]``."""
    mean = mean.to(device=x.device, dtype=torch.float32).view(-1, 1, 1)
    std = std.to(device=x.device, dtype=torch.float32).view(-1, 1, 1)
    return x.to(torch.float32).div_(255.0).sub_(mean).div_(std)
