"""What a local method's sync sends through the one communication point, with error feedback.

A sync yields the pseudo-gradient of the outer step (:mod:`dpl.core.methods.outer`), Δ = mean_k Δ_k
with Δ_k = x − x_k (x the anchor, x_k the worker's parameters). ``compression=none``
(:class:`PlainAverage`) all-reduces the parameters themselves, so Δ = x − x̄ exactly. Any other
compressor has every worker k send its Δ_k compressed; the mean over workers of the decoded Δ_k
is the pseudo-gradient (:class:`Compression`). Both answer :meth:`PlainAverage.start_mean_delta`, so
the outer step has one path. Each compressor below
works on a batch of rows [W, n] (a tensor of every local worker, flattened), so one call
serves the K stacked workers of the simulation and the one worker of a rank alike; every
row is compressed on its own.

Compressors (``compression.name``), with what one worker sends for a tensor of n elements
(:meth:`Compressor.payload_bytes`) and the collective a cluster would move it with
(``collective``; :mod:`dpl.comm.point` counts its bytes):

========= ===================================================== ===========================
name      payload of n elements                                 collective
========= ===================================================== ===========================
none      4 n (fp32: the parameters themselves)                 all-reduce
topk      k = max(1, floor(ratio n)) fp32 values + k int32       all-gather (each worker's
          indices (int64 when n >= 2^31): 8 k                   coordinates differ)
randomk   k fp32 values; the k coordinates are drawn from        all-reduce (every worker
          (seed, sync, tensor) and never sent: 4 k              draws the same coordinates)
sign      1 bit per element + one fp32 scale: ceil(n/8) + 4      all-gather (scales differ)
int8      1 byte per element + one fp32 scale per chunk of      all-reduce (quantized, as a
          ``chunk`` elements: n + 4 ceil(n/chunk)               reduce-scatter/all-gather)
fp8       e4m3 bytes + one fp32 scale per chunk: n + 4 ceil(n/chunk) all-reduce (quantized)
fp4       e2m1, two per byte + one fp32 scale per chunk:         all-reduce (quantized)
          ceil(n/2) + 4 ceil(n/chunk)
fp16/bf16 2 n                                                   all-reduce
========= ===================================================== ===========================

Error feedback (Stich, Cordonnier & Jaggi 2018, "Sparsified SGD with memory"; Karimireddy et
al. 2019, "Error feedback fixes SignSGD and other gradient compression schemes", Alg. 2):
worker k keeps a residual e_k, compresses u_k = Δ_k + e_k instead of Δ_k, and keeps what was
not sent, e_k <- u_k − D(C(u_k)). The residuals are per worker ([K_local, ...], float64) and
live in the workers' checkpoint state, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from dpl.comm.cost import param_bytes
from dpl.errors import CheckpointError
from dpl.registry import lookup

Payload = tuple[torch.Tensor, ...]  # every part [W, ...]: one row per local worker


@dataclass
class DeltaResult:
    """A local method's sync, landed: the pseudo-gradient Δ per tensor (float64, one worker's shape),
    the exact average x̄ of the parameters when it was formed (None when only compressed Δ_k crossed),
    the averaged buffers, and how many workers' contributions arrived (K without drops)."""

    deltas: list[torch.Tensor]
    mean: Optional[list[torch.Tensor]]
    buffers: list[torch.Tensor]
    arrived: int


class Compressor:
    """C and D of one compression scheme on rows [W, n] (float64 in, float64 out).

    ``collective`` is what a cluster would send the payload with: ``allreduce`` when the
    payloads of the workers can be summed as they are (dense formats, shared coordinates),
    ``allgather`` when each worker's payload must reach every other (own coordinates, own scale).
    """

    name = "base"
    collective = "allreduce"

    def compress(self, x: torch.Tensor, key: tuple[int, int, int]) -> Payload:
        """The payload of rows ``x`` [W, n]; ``key`` (seed, sync, tensor) seeds any randomness."""
        raise NotImplementedError

    def decompress(self, payload: Payload, n: int, key: tuple[int, int, int]) -> torch.Tensor:
        """Rows [W, n] (float64) from a payload of W workers."""
        raise NotImplementedError

    def payload_bytes(self, n: int) -> int:
        """Bytes one worker sends for a tensor of ``n`` elements."""
        raise NotImplementedError


class NoCompression(Compressor):
    """fp32 values as they are: the payload size of ``compression=none``, which :class:`PlainAverage`
    sends as the parameters themselves (this class states its size and serves the compressors' tests)."""

    name = "none"

    def compress(self, x, key):
        return (x.float(),)

    def decompress(self, payload, n, key):
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


class TopK(Compressor):
    """Top-k sparsification per tensor (Stich et al. 2018; Lin et al. 2018, "Deep gradient
    compression"): the k entries of largest magnitude, as fp32 values and their indices.
    Round trip: the kept entries exact up to fp32 rounding, the others 0, so
    ||x − D(C(x))||² <= (1 − k/n) ||x||² (a δ-contraction with δ = k/n)."""

    name = "topk"
    collective = "allgather"

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def compress(self, x, key):
        k = kept(x.shape[1], self.ratio)
        idx = x.abs().topk(k, dim=1, sorted=False).indices
        dtype = torch.int32 if index_bytes(x.shape[1]) == 4 else torch.int64
        return x.gather(1, idx).float(), idx.to(dtype)

    def decompress(self, payload, n, key):
        values, idx = payload
        return _scatter(values, idx, n)

    def payload_bytes(self, n: int) -> int:
        return kept(n, self.ratio) * (4 + index_bytes(n))


def mix(*ints: int) -> int:
    """A 63-bit seed from integers (splitmix64 finalizer over their sequence): randomness as a pure
    function of (seed, sync, tensor), so a resumed run and every rank draw the same coordinates."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class RandomK(Compressor):
    """Random-k sparsification (Stich et al. 2018): k coordinates drawn uniformly without
    replacement, the same on every worker, from a generator seeded by (seed, sync, tensor).
    Only the k fp32 values are sent; with shared coordinates the workers' values can be summed,
    so the payload is all-reduced. Not rescaled by n/k (the biased form, meant for error feedback;
    E||x − D(C(x))||² = (1 − k/n) ||x||²)."""

    name = "randomk"

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def coordinates(self, n: int, key: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        gen = torch.Generator().manual_seed(mix(*key))  # on the CPU: the same draw on every device
        return torch.randperm(n, generator=gen)[: kept(n, self.ratio)].to(device)

    def compress(self, x, key):
        idx = self.coordinates(x.shape[1], key, x.device)
        return (x[:, idx].float(),)

    def decompress(self, payload, n, key):
        (values,) = payload
        idx = self.coordinates(n, key, values.device)
        return _scatter(values, idx.unsqueeze(0).expand_as(values), n)

    def payload_bytes(self, n: int) -> int:
        return 4 * kept(n, self.ratio)


_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


class Sign(Compressor):
    """Scaled sign (Karimireddy et al. 2019, Alg. 2 with C(x) = (||x||_1 / n) sign(x); Bernstein
    et al. 2018 for signSGD): one bit per element (x >= 0 is +) packed into bytes, and one fp32
    scale, the mean |x|. Round trip: every element becomes ± mean|x|."""

    name = "sign"
    collective = "allgather"

    def compress(self, x, key):
        W, n = x.shape
        scale = x.abs().mean(1, keepdim=True).float()
        bits = torch.zeros(W, 8 * math.ceil(n / 8), dtype=torch.uint8, device=x.device)
        bits[:, :n] = x >= 0
        packed = (bits.view(W, -1, 8) * _BITS.to(x.device)).sum(2, dtype=torch.uint8)
        return packed, scale

    def decompress(self, payload, n, key):
        packed, scale = payload
        bits = (packed.unsqueeze(2) & _BITS.to(packed.device)) > 0
        signs = bits.reshape(packed.shape[0], -1)[:, :n].double() * 2.0 - 1.0
        return signs * scale.double()

    def payload_bytes(self, n: int) -> int:
        return math.ceil(n / 8) + 4


class Int8(Compressor):
    """Linear int8 quantization with one fp32 scale per chunk of ``chunk`` consecutive elements
    (``chunk`` 0: one scale per tensor): s = max|x| / 127 over the chunk, q = round(x / s) in
    [−127, 127]. Round trip: |x − q s| <= s / 2 per element (up to the scale's fp32 rounding)."""

    name = "int8"

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk

    def _chunk(self, n: int) -> int:
        return n if self.chunk <= 0 else min(self.chunk, n)

    def compress(self, x, key):
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

    def decompress(self, payload, n, key):
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

    name = "fp8"
    top = 448.0

    def compress(self, x, key):
        W, n = x.shape
        chunks = _chunked(x, self._chunk(n))
        scale = (chunks.abs().amax(2) / self.top).float()
        safe = torch.where(scale > 0, scale, 1.0).double().unsqueeze(2)
        q = (chunks / safe).clamp_(-self.top, self.top).to(torch.float8_e4m3fn)
        return q.view(W, -1)[:, :n].contiguous().view(torch.uint8), scale  # the bytes that travel

    def decompress(self, payload, n, key):
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

    name = "fp4"
    top = 6.0

    def compress(self, x, key):
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

    def decompress(self, payload, n, key):
        packed, scale = payload
        codes = torch.stack([packed & 0xF, packed >> 4], dim=2).view(packed.shape[0], -1)[:, :n]
        magnitude = E2M1.to(packed.device)[(codes & 7).long()]
        values = torch.where((codes & 8) > 0, -magnitude, magnitude)
        c = self._chunk(n)
        return (_chunked(values, c) * scale.double().unsqueeze(2)).view(packed.shape[0], -1)[:, :n]

    def payload_bytes(self, n: int) -> int:
        return math.ceil(n / 2) + 4 * math.ceil(n / self._chunk(n))


class HalfPrecision(Compressor):
    """Values rounded to a 16-bit float (round to nearest even): relative error <= 2^-11 (fp16) or
    2^-8 (bf16) in the normal range; fp16 flushes below 2^-24 and overflows above 65504."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype

    def compress(self, x, key):
        return (x.to(self.dtype),)

    def decompress(self, payload, n, key):
        return payload[0].double()

    def payload_bytes(self, n: int) -> int:
        return 2 * n


def _fp16(cfg: Any) -> Compressor:
    return HalfPrecision("fp16", torch.float16)


def _bf16(cfg: Any) -> Compressor:
    return HalfPrecision("bf16", torch.bfloat16)


# compression.name -> builder from the compression config (conf/compression/<name>.yaml)
COMPRESSORS = {
    "none": lambda cfg: NoCompression(),
    "topk": lambda cfg: TopK(cfg.ratio),
    "randomk": lambda cfg: RandomK(cfg.ratio),
    "sign": lambda cfg: Sign(),
    "int8": lambda cfg: Int8(cfg.chunk),
    "fp8": lambda cfg: Fp8(cfg.chunk),
    "fp4": lambda cfg: Fp4(cfg.chunk),
    "fp16": _fp16,
    "bf16": _bf16,
}


class PlainAverage:
    """``compression=none``: the parameters (and buffers) all-reduced as they are, x_k <- x̄, and the
    pseudo-gradient Δ = x − x̄ taken in float64 from the float64 anchor x. x − x̄ of float32 values is
    exact in float64, so an outer SGD with lr 1 gives back x̄ bit for bit (plain LocalSGD)."""

    name = "none"
    forms_mean = True  # the sync forms the exact x̄ (the drift metric needs nothing more)

    def start(self, like: Sequence[torch.Tensor]) -> None:
        """Nothing to set up: no residuals."""

    def payload_bytes(self, tensors: Sequence[torch.Tensor]) -> int:
        """Bytes one worker sends for stacked tensors [K_local, ...]: the tensors themselves."""
        return param_bytes(tensors, per_worker=True)

    @torch.no_grad()
    def start_mean_delta(self, point: Any, anchor: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                         buffers: Sequence[torch.Tensor], sync: int, arrived: Optional[torch.Tensor],
                         indices: Optional[Sequence[int]] = None) -> Any:
        """Copies of the parameters and buffers all-reduced (one collective, in flight until ``wait()``);
        landed: Δ = x − x̄ per tensor, x̄ and the averaged buffers (over the workers that ``arrived``)."""
        copies = [t.detach().clone() for t in (*params, *buffers)]
        n = len(params)
        count = point.world if arrived is None else int(arrived.sum())

        def landed(_: Any) -> DeltaResult:
            means = copies[:n]
            return DeltaResult([x - m[0] for x, m in zip(anchor, means)], means, copies[n:], count)

        pending = point.average_async_(copies, "params", arrived)
        return Then(pending, landed)

    @torch.no_grad()
    def start_mean(self, point: Any, deltas: Sequence[torch.Tensor], sync: int, arrived: Optional[torch.Tensor],
                   indices: Optional[Sequence[int]] = None) -> Any:
        """mean_k Δ_k of each worker's own float64 Δ_k [K_local, ...] (eager updates, whose workers have
        anchors of their own), sent as fp32 like the parameters; landed: float64, one worker's shape."""
        copies = [d.float() for d in deltas]
        return Then(point.average_async_(copies, "params", arrived), lambda _: [c[0].double() for c in copies])

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing is kept between syncs."""


class Compression:
    """The compressor of a run and, with error feedback, each local worker's residual per tensor.

    :meth:`encode` turns every worker's tensors into payloads (and updates the residuals);
    :meth:`decode_mean` turns the payloads of all K workers into the mean of the decoded
    tensors, taken in worker order, so the simulation and the ranks (which all-gather the
    payloads and decode them the same way) compute the same numbers.
    """

    forms_mean = False  # only compressed Δ_k cross

    def __init__(self, compressor: Compressor, error_feedback: bool, seed: int) -> None:
        self.compressor, self.error_feedback, self.seed = compressor, error_feedback, seed
        self.residuals: Optional[list[torch.Tensor]] = None  # [K_local, ...] float64 per tensor

    def start(self, like: Sequence[torch.Tensor]) -> None:
        """Zero residuals shaped like the stacked tensors ``like`` (error feedback only)."""
        if self.error_feedback:
            self.residuals = [torch.zeros(t.shape, dtype=torch.float64, device=t.device) for t in like]

    def payload_bytes(self, tensors: Sequence[torch.Tensor]) -> int:
        """Bytes one worker sends for stacked tensors [K_local, ...]."""
        return sum(self.compressor.payload_bytes(t[0].numel()) for t in tensors)

    @torch.no_grad()
    def encode(self, tensors: Sequence[torch.Tensor], sync: int, arrived: Optional[torch.Tensor] = None,
               indices: Optional[Sequence[int]] = None) -> list[Payload]:
        """Payloads of the stacked float64 tensors [K_local, ...] at sync number ``sync``. ``arrived``
        (a bool per local worker): a worker whose payload is dropped keeps all of u_k as its residual.
        ``indices``: each tensor's place among the model's parameters (its residual and its randomness;
        default 0, 1, ...: the whole model)."""
        payloads = []
        for i, t in zip(_places(indices, tensors), tensors):
            u = t.reshape(t.shape[0], -1)
            if self.residuals is not None:
                u = u + self.residuals[i].view_as(u)  # u_k = Δ_k + e_k
            key = (self.seed, sync, i)
            payload = self.compressor.compress(u, key)
            if self.residuals is not None:  # e_k <- u_k − D(C(u_k)): what was not sent waits for the next sync
                sent = self.compressor.decompress(payload, u.shape[1], key)
                if arrived is not None:
                    sent = sent * arrived.to(sent.device, sent.dtype).unsqueeze(1)
                self.residuals[i].copy_((u - sent).view_as(self.residuals[i]))
            payloads.append(payload)
        return payloads

    @torch.no_grad()
    def decode_mean(self, payloads: Sequence[Payload], shapes: Sequence[torch.Size], sync: int,
                    arrived: Optional[torch.Tensor] = None, indices: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
        """mean_k D(payload_k) per tensor (float64, shaped like one worker's tensor), from the
        payloads of every worker ([K, ...] parts); over the workers that ``arrived`` ([K] bools; none
        arrived: zeros). ``indices`` as :meth:`encode`'s."""
        out = []
        for i, payload, shape in zip(_places(indices, shapes), payloads, shapes):
            decoded = self.compressor.decompress(payload, math.prod(shape), (self.seed, sync, i))
            if arrived is None:
                out.append(decoded.mean(0).view(shape))
            else:
                keep = arrived.to(decoded.device)
                out.append((decoded[keep].sum(0) / max(int(keep.sum()), 1)).view(shape))
        return out

    @torch.no_grad()
    def start_mean_delta(self, point: Any, anchor: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                         buffers: Sequence[torch.Tensor], sync: int, arrived: Optional[torch.Tensor],
                         indices: Optional[Sequence[int]] = None) -> Any:
        """Δ = mean_k D(C(Δ_k (+ e_k))) per tensor, each worker's Δ_k = x − x_k sent compressed through
        ``point`` (:meth:`dpl.comm.point.CommPoint.exchange_async`); copies of the buffers (BatchNorm
        statistics) are averaged as they are, one more all-reduce. No exact x̄ is formed (None)."""
        deltas = [x.unsqueeze(0) - p.detach().double() for x, p in zip(anchor, params)]
        count = point.world if arrived is None else int(arrived.sum())
        exchanged = self.start_mean(point, deltas, sync, arrived, indices)
        copies = [b.clone() for b in buffers]
        averaged = point.average_async_(copies, "buffers", arrived) if copies else None

        def landed(mean: list[torch.Tensor]) -> DeltaResult:
            if averaged is not None:
                averaged.wait()
            return DeltaResult(mean, None, copies, count)

        return Then(exchanged, landed)

    def start_mean(self, point: Any, deltas: Sequence[torch.Tensor], sync: int, arrived: Optional[torch.Tensor],
                   indices: Optional[Sequence[int]] = None) -> Any:
        """mean_k D(C(Δ_k (+ e_k))) of each worker's float64 Δ_k [K_local, ...], in flight until ``wait()``."""
        return point.exchange_async(self, deltas, sync, arrived, indices)

    # ------------------------------------------------------------------ checkpoints (per worker)
    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {} if self.residuals is None else {"residuals": [e.clone() for e in self.residuals]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.residuals is None:
            return
        saved = state.get("residuals")
        if saved is None:
            raise CheckpointError("the checkpoint holds no error-feedback residuals: it was written by a run "
                                  "without compression.error_feedback=true")
        with torch.no_grad():
            for e, s in zip(self.residuals, saved):
                e.copy_(s)


def _places(indices: Optional[Sequence[int]], tensors: Sequence[Any]) -> Sequence[int]:
    return range(len(tensors)) if indices is None else indices


class Then:
    """A pending collective and what its result becomes once it has landed (``wait()`` runs it once)."""

    def __init__(self, pending: Any, then: Any) -> None:
        self.pending, self.then, self.done, self.result = pending, then, False, None

    def wait(self) -> Any:
        if not self.done:
            self.result, self.done = self.then(self.pending.wait()), True
        return self.result


def build_compression(cfg: Any, seed: int) -> PlainAverage | Compression:
    """The run's compression from the ``compression`` config node; :class:`PlainAverage` for ``none``
    (or no node)."""
    if cfg is None or cfg.name == "none":
        return PlainAverage()
    return Compression(lookup(COMPRESSORS, "compression", cfg.name)(cfg), bool(cfg.error_feedback), seed)
