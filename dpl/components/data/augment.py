"""Batched augmentation and normalisation of uint8 image tensors.

Every image in a batch gets its own crop offset and flip, but the work is a couple of
tensor ops over the whole batch (as in KellerJordan/cifar10-airbench): no per-image
Python, no PIL.

The randomness is counter-based (Salmon et al. 2011, "Parallel random numbers: as easy
as 1, 2, 3"): an image's crop and flip are a hash of a key and a counter, here the
SplitMix64 output function (Steele, Lea & Flood 2014) of ``key + counter * golden``.
The key is (seed, what, step) mixed on the host; the counter is the image's position in
the step's full [K, B] batch, hashed on the device with int64 tensor ops. So the draws are
a pure function of (seed, step, worker, sample): no generator state, exact on resume,
the same for a rank cutting its rows as for the simulation holding all K, and safe to
replay in a captured graph (nothing is read back to the host).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
# key domains: the training batches and the augmented validation batches never share a stream
TRAIN, EVAL = 1, 3


def signed64(v: int) -> int:
    """A 64-bit pattern as the int64 value torch stores."""
    v &= _M64
    return v - (1 << 64) if v >= 1 << 63 else v


def _mix_int(z: int) -> int:
    """The SplitMix64 output function on a Python int (exact, mod 2^64)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: mask off the copied sign bits)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 output function on int64 tensors; multiplication wraps mod 2^64."""
    z = (z ^ _shr(z, 30)) * signed64(_C1)
    z = (z ^ _shr(z, 27)) * signed64(_C2)
    return z ^ _shr(z, 31)


def stream_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, domain, step, ...), mixed on the host: a few
    Python int ops, no device work and no sync."""
    h = 0
    for p in parts:
        h = _mix_int(h ^ _mix_int(p + _GOLDEN))
    return h


def draw_bits(key: int | torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """int64 hash of each counter under ``key`` (a host int, an int64 device scalar, or one int64 key per counter)."""
    if isinstance(key, int):
        key = signed64(key)
    return _mix(counters * signed64(_GOLDEN) + key)


def crop_flip_draws(bits: torch.Tensor, padding: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx, flip) from 64 random bits per image: offsets uniform over 0..2p from two
    24-bit fields by multiply-shift (bias below 2^-20), the flip from the top bit (p = 0.5)."""
    span = 2 * padding + 1
    field = (1 << 24) - 1
    dy = ((bits & field) * span) >> 24
    dx = ((_shr(bits, 24) & field) * span) >> 24
    return dy, dx, bits < 0


def augment_bits(key: int | torch.Tensor, first: int, n: int, device: torch.device) -> torch.Tensor:
    """Random bits of the images at positions ``first .. first + n - 1`` of a batch under ``key``."""
    return draw_bits(key, torch.arange(first, first + n, device=device))


def random_crop_flip(x: torch.Tensor, padding: int, bits: torch.Tensor) -> torch.Tensor:
    """Random crop after zero padding, then horizontal flip with p=0.5, independently per image.

    ``x`` is uint8 ``[N, C, H, W]``; the result has the same shape and dtype.  Zero padding
    matches torchvision's ``RandomCrop(padding=p)`` default.  ``bits`` (int64 ``[N]``, e.g.
    from :func:`augment_bits`) decide each image's crop and flip; the same bits give the same
    crops on every device.
    """
    n, c, h, w = x.shape
    dy, dx, flip = crop_flip_draws(bits.to(x.device), padding)
    padded = F.pad(x, (padding, padding, padding, padding)) if padding > 0 else x
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [N, H] rows of the padded image
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [N, W]
    # A flipped crop reads its window's columns right to left: an exact mirror of the crop.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    # Two gathers with expanded (stride-0) index views: no [N, C, H, W] int64 index is materialised.
    wp = padded.shape[3]
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, wp))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., C, H, W]`` -> float32 ``(x / 255 - mean) / std`` with per-channel ``mean``, ``std`` ``[C]``."""
    mean = mean.to(device=x.device, dtype=torch.float32).view(-1, 1, 1)
    std = std.to(device=x.device, dtype=torch.float32).view(-1, 1, 1)
    return x.to(torch.float32).div_(255.0).sub_(mean).div_(std)
