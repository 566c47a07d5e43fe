"""The codecs' formats (:mod:`dpl.comm.codecs`): each encodes rows [W, n] (a tensor of every local worker,
flattened; float64) into a payload and decodes it back, every row on its own, so one call serves the K
stacked workers of the simulation and the one worker of a rank alike."""

from __future__ import annotations

import math

import torch

from dpl.comm.codecs import Codec
from dpl.hashing import mix


class NoCompression(Codec):
    """fp32 values as they are: the payload of ``compression=none``, which the point sends as the parameters
    themselves (this codec states its size and carries the compressed path's identity tests)."""


    def encode(self, x, key, dropped=None):
        return (x.float(),)

    def decode(self, payload, n, key):
        return payload[0].double()

    def payload_bytes(self, n: int) -> int:
        return 4 * n


def kept(n: int, ratio: float) -> int:
    """Coordinates a sparsifier keeps of n: k = max(1, floor(ratio n)), at most n."""
    return min(n, max(1, math.floor(ratio * n)))


def index_bytes(n: int) -> int:
    """Bytes of one coordinate of a tensor of n elements: int32 while it fits, else int64."""
    return 4 if n < 2**31 else 8


def _scatter(values: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(values.shape[0], n, dtype=torch.float64, device=values.device)
    return out.scatter_(1, idx.long(), values.double())


class TopK(Codec):
    """Top-k sparsification per tensor (Stich et al. 2018; Lin et al. 2018, "Deep gradient
    compression"): the k entries of largest magnitude, as fp32 values and their indices.
    Round trip: the kept entries exact up to fp32 rounding, the others 0, so
    ||x − D(C(x))||² <= (1 − k/n) ||x||² (a δ-contraction with δ = k/n)."""

    collective = "allgather"

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def encode(self, x, key, dropped=None):
        k = kept(x.shape[1], self.ratio)
        idx = x.abs().topk(k, dim=1, sorted=False).indices
        dtype = torch.int32 if index_bytes(x.shape[1]) == 4 else torch.int64
        return x.gather(1, idx).float(), idx.to(dtype)

    def decode(self, payload, n, key):
        values, idx = payload
        return _scatter(values, idx, n)

    def payload_bytes(self, n: int) -> int:
        return kept(n, self.ratio) * (4 + index_bytes(n))


class RandomK(Codec):
    """Random-k sparsification (Stich et al. 2018): k coordinates drawn uniformly without
    replacement, the same on every worker, from a generator seeded by (seed, sync, tensor).
    Only the k fp32 values are sent; with shared coordinates the workers' values can be summed,
    so the payload is all-reduced. Not rescaled by n/k (the biased form, meant for error feedback;
    E||x − D(C(x))||² = (1 − k/n) ||x||²)."""


    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def coordinates(self, n: int, key: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        gen = torch.Generator().manual_seed(mix(*key))  # on the CPU: the same draw on every device
        return torch.randperm(n, generator=gen)[: kept(n, self.ratio)].to(device)

    def encode(self, x, key, dropped=None):
        idx = self.coordinates(x.shape[1], key, x.device)
        return (x[:, idx].float(),)

    def decode(self, payload, n, key):
        (values,) = payload
        idx = self.coordinates(n, key, values.device)
        return _scatter(values, idx.unsqueeze(0).expand_as(values), n)

    def payload_bytes(self, n: int) -> int:
        return 4 * kept(n, self.ratio)


_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


class Sign(Codec):
    """Scaled sign (Karimireddy et al. 2019, Alg. 2 with C(x) = (||x||_1 / n) sign(x); Bernstein
    et al. 2018 for signSGD): one bit per element (x >= 0 is +) packed into bytes, and one fp32
    scale, the mean |x|. Round trip: every element becomes ± mean|x|."""

    collective = "allgather"

    def encode(self, x, key, dropped=None):
        W, n = x.shape
        scale = x.abs().mean(1, keepdim=True).float()
        bits = torch.zeros(W, 8 * math.ceil(n / 8), dtype=torch.uint8, device=x.device)
        bits[:, :n] = x >= 0
        packed = (bits.view(W, -1, 8) * _BITS.to(x.device)).sum(2, dtype=torch.uint8)
        return packed, scale

    def decode(self, payload, n, key):
        packed, scale = payload
        bits = (packed.unsqueeze(2) & _BITS.to(packed.device)) > 0
        signs = bits.reshape(packed.shape[0], -1)[:, :n].double() * 2.0 - 1.0
        return signs * scale.double()

    def payload_bytes(self, n: int) -> int:
        return math.ceil(n / 8) + 4


class Int8(Codec):
    """Linear int8 quantization with one fp32 scale per chunk of ``chunk`` consecutive elements
    (``chunk`` 0: one scale per tensor): s = max|x| / 127 over the chunk, q = round(x / s) in
    [−127, 127]. Round trip: |x − q s| <= s / 2 per element (up to the scale's fp32 rounding)."""


    def __init__(self, chunk: int) -> None:
        self.chunk = chunk

    def _chunk(self, n: int) -> int:
        return n if self.chunk <= 0 else min(self.chunk, n)

    def encode(self, x, key, dropped=None):
        W, n = x.shape
        c = self._chunk(n)
        chunks = math.ceil(n / c)
        padded = torch.zeros(W, chunks * c, dtype=torch.float64, device=x.device)
        padded[:, :n] = x
        padded = padded.view(W, chunks, c)
        scale = (padded.abs().amax(2) / 127.0).float()  # the fp32 scale that is sent ...
        safe = torch.where(scale > 0, scale, 1.0).double().unsqueeze(2)  # ... is what the values are divided by
        q = torch.round(padded / safe).clamp_(-127, 127).to(torch.int8)
        return q.view(W, -1)[:, :n].contiguous(), scale

    def decode(self, payload, n, key):
        q, scale = payload
        W, c = q.shape[0], self._chunk(n)
        chunks = scale.shape[1]
        padded = torch.zeros(W, chunks * c, dtype=torch.float64, device=q.device)
        padded[:, :n] = q.double()
        return (padded.view(W, chunks, c) * scale.double().unsqueeze(2)).view(W, -1)[:, :n]

    def payload_bytes(self, n: int) -> int:
        return n + 4 * math.ceil(n / self._chunk(n))


def _chunked(x: torch.Tensor, c: int) -> torch.Tensor:
    """Rows [W, n] zero-padded to whole chunks of c elements: [W, chunks, c]."""
    W, n = x.shape
    chunks = math.ceil(n / c)
    padded = torch.zeros(W, chunks * c, dtype=torch.float64, device=x.device)
    padded[:, :n] = x
    return padded.view(W, chunks, c)


class Fp8(Int8):
    """fp8 e4m3 (``torch.float8_e4m3fn``: 4 exponent bits, 3 mantissa bits, largest finite 448) with one
    fp32 scale per chunk, s = max|x| / 448, as pytorch/torchft's ``quantization.py`` quantizes DiLoCo's
    pseudo-gradients. Round trip: x/s rounded to nearest even among e4m3 values, so |x − D(C(x))| <=
    2^-4 |x| in e4m3's normal range (|x/s| >= 2^-6) and <= 2^-10 s below it (its subnormal step 2^-9, halved)."""

    top = 448.0

    def encode(self, x, key, dropped=None):
        W, n = x.shape
        chunks = _chunked(x, self._chunk(n))
        scale = (chunks.abs().amax(2) / self.top).float()
        safe = torch.where(scale > 0, scale, 1.0).double().unsqueeze(2)
        q = (chunks / safe).clamp_(-self.top, self.top).to(torch.float8_e4m3fn)
        return q.view(W, -1)[:, :n].contiguous().view(torch.uint8), scale  # the bytes that travel

    def decode(self, payload, n, key):
        q, scale = payload
        c = self._chunk(n)
        values = _chunked(q.view(torch.float8_e4m3fn).double(), c)
        return (values * scale.double().unsqueeze(2)).view(q.shape[0], -1)[:, :n]


# e2m1's magnitudes (OCP Microscaling formats v1.0, FP4): code i (3 bits) is E2M1[i]; the 4th bit the sign
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


class Fp4(Int8):
    """fp4 e2m1 (OCP MX FP4: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6) with one fp32 scale per chunk,
    s = max|x| / 6; two 4-bit codes packed per byte (sign bit, then the index of the magnitude).
    x/s is rounded to the nearest magnitude, a tie to the lower one; round trip: |x − D(C(x))| <= half
    the gap around x/s times s (0.25 s below 2, 0.5 s to 4, s to 6)."""

    top = 6.0

    def encode(self, x, key, dropped=None):
        W, n = x.shape
        chunks = _chunked(x, self._chunk(n))
        scale = (chunks.abs().amax(2) / self.top).float()
        safe = torch.where(scale > 0, scale, 1.0).double().unsqueeze(2)
        y = (chunks / safe).view(W, -1)[:, :n]
        grid = E2M1.to(x.device)
        # nearest magnitude; on a tie argmin takes the first, the lower one
        idx = (y.abs().clamp(max=self.top).unsqueeze(-1) - grid).abs().argmin(-1).to(torch.uint8)
        codes = idx | ((y < 0).to(torch.uint8) << 3)
        if n % 2:
            codes = torch.cat([codes, torch.zeros(W, 1, dtype=torch.uint8, device=x.device)], 1)
        return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), scale

    def decode(self, payload, n, key):
        packed, scale = payload
        codes = torch.stack([packed & 0xF, packed >> 4], dim=2).view(packed.shape[0], -1)[:, :n]
        magnitude = E2M1.to(packed.device)[(codes & 7).long()]
        values = torch.where((codes & 8) > 0, -magnitude, magnitude)
        c = self._chunk(n)
        return (_chunked(values, c) * scale.double().unsqueeze(2)).view(packed.shape[0], -1)[:, :n]

    def payload_bytes(self, n: int) -> int:
        return math.ceil(n / 2) + 4 * math.ceil(n / self._chunk(n))


class HalfPrecision(Codec):
    """Values rounded to a 16-bit float (round to nearest even): relative error <= 2^-11 (fp16) or
    2^-8 (bf16) in the normal range; fp16 flushes below 2^-24 and overflows above 65504."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def encode(self, x, key, dropped=None):
        return (x.to(self.dtype),)

    def decode(self, payload, n, key):
        return payload[0].double()

    def payload_bytes(self, n: int) -> int:
        return 2 * n
