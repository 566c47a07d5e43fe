"""What a local method's sync sends: the ``compression`` group's options, each a codec registered here.

A sync yields the pseudo-gradient of the outer step (:mod:`dpl.core.methods.outer`), Δ = mean_k Δ_k with
Δ_k = x − x_k (x the anchor, x_k worker k's parameters). ``compression=none`` sends the parameters
themselves, all-reduced, so Δ = x − x̄ exactly; it has no codec. Any other option is a :class:`Codec`:
every worker k sends its Δ_k encoded, and the mean over workers of the decoded Δ_k is the
pseudo-gradient. A codec knows nothing of the communication point (:mod:`dpl.comm.point`), which runs
the sync: it only turns rows into a payload and back, and says what the payload costs. Error feedback
(:class:`dpl.comm.codecs.feedback.ErrorFeedback`) wraps any codec.

Codecs (``compression.name``), with what one worker sends for a tensor of n elements
(:meth:`Codec.payload_bytes`) and the collective a cluster would move it with (``collective``):

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

The formats are :mod:`dpl.comm.codecs.formats`; this module imports no torch, so the registry loads
without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

from omegaconf import MISSING

from dpl.config.schema import at_least, check, finite, key
from dpl.registry import Registry


@dataclass(frozen=True)
class CodecFacts:
    exact: bool = False  # the parameters themselves, averaged exactly (no codec)


CODECS = Registry("compression", "what a sync of a local method sends", facts=CodecFacts())

Payload = tuple  # the parts of one payload, each [W, ...]: one row per local worker


class Key(NamedTuple):
    """What a codec's randomness (and an error-feedback residual) is keyed by: a pure function of these."""

    seed: int
    sync: int  # the sync's number in the run
    tensor: int  # the tensor's place among the model's parameters


class Codec:
    """Encode and decode one compression scheme on rows [W, n] (one row per worker; float64 in and out).

    ``collective`` is what a cluster would send the payload with: ``allreduce`` when the payloads of
    the workers can be summed as they are (dense formats, shared coordinates), ``allgather`` when each
    worker's payload must reach every other (own coordinates, own scale). ``dropped`` (a bool per row)
    marks the rows whose payload will not arrive (``faults.drop_prob``): a stateless codec ignores it.
    """

    collective = "allreduce"

    def encode(self, rows: Any, key: Key, dropped: Any = None) -> Payload:
        """The payload of rows ``rows`` [W, n]; ``key`` seeds any randomness."""
        raise NotImplementedError

    def decode(self, payload: Payload, n: int, key: Key) -> Any:
        """Rows [W, n] (float64) from a payload of W workers."""
        raise NotImplementedError

    def payload_bytes(self, n: int) -> int:
        """Bytes one worker sends for a tensor of ``n`` elements."""
        raise NotImplementedError

    # what a codec keeps per worker between syncs (error feedback's residuals): nothing, for a plain codec
    def start(self, like: Any) -> None:
        """Make what is kept, shaped like the workers' stacked parameters ``like``."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing kept: nothing to load."""


# ----------------------------------------------------------------------------- schemas


@dataclass
class CompressionBase:
    name: str = key(MISSING, "what a sync sends (an option of the group; none: the parameters, exactly)")


@dataclass
class CodecConfig(CompressionBase):
    """A lossy codec of each worker's pseudo-gradient."""

    error_feedback: bool = key(False, "keep what was not sent in a per-worker residual and add it at the next sync "
                                      "(Stich et al. 2018; Karimireddy et al. 2019)")


@dataclass
class SparseConfig(CodecConfig):
    """top-k / random-k: a fraction of each tensor's elements."""

    ratio: float = key(0.01, "share of each tensor's elements sent")

    def __post_init__(self) -> None:
        check(finite(self.ratio) and 0.0 < self.ratio <= 1.0, "compression.ratio", self.ratio, "0 < x <= 1")


@dataclass
class ChunkedConfig(CodecConfig):
    chunk: int = key(1024, "elements per fp32 scale: an outlier coarsens only its own chunk (0: one per tensor)")

    def __post_init__(self) -> None:
        at_least("compression.chunk", self.chunk, 0, "an integer")


# ----------------------------------------------------------------------------- options


@CODECS.register("none", CompressionBase, facts=CodecFacts(exact=True))
def none(cfg: Any) -> Optional[Codec]:
    """No codec: the parameters are all-reduced as they are, so Δ = x − x̄ exactly."""
    return None


@CODECS.register("topk", SparseConfig)
def topk(cfg: Any) -> Codec:
    """The largest ``ratio`` of each tensor's entries with their indices (Stich et al. 2018)."""
    from dpl.comm.codecs.formats import TopK

    return TopK(cfg.ratio)


@CODECS.register("randomk", SparseConfig)
def randomk(cfg: Any) -> Codec:
    """A random ``ratio`` of each tensor's entries, the same coordinates on every worker (Stich et al. 2018)."""
    from dpl.comm.codecs.formats import RandomK

    return RandomK(cfg.ratio)


@CODECS.register("sign", CodecConfig)
def sign(cfg: Any) -> Codec:
    """Signs scaled by the mean magnitude (Karimireddy et al. 2019)."""
    from dpl.comm.codecs.formats import Sign

    return Sign()


@CODECS.register("int8", ChunkedConfig)
def int8(cfg: Any) -> Codec:
    """Linear int8 with an fp32 scale per chunk."""
    from dpl.comm.codecs.formats import Int8

    return Int8(cfg.chunk)


@CODECS.register("fp8", ChunkedConfig)
def fp8(cfg: Any) -> Codec:
    """fp8 e4m3 with an fp32 scale per chunk, as torchft's DiLoCo quantizes its pseudo-gradients."""
    from dpl.comm.codecs.formats import Fp8

    return Fp8(cfg.chunk)


@CODECS.register("fp4", ChunkedConfig)
def fp4(cfg: Any) -> Codec:
    """fp4 e2m1 (OCP MX) with an fp32 scale per chunk."""
    from dpl.comm.codecs.formats import Fp4

    return Fp4(cfg.chunk)


@CODECS.register("fp16", CodecConfig)
def fp16(cfg: Any) -> Codec:
    """Half precision."""
    import torch

    from dpl.comm.codecs.formats import HalfPrecision

    return HalfPrecision(torch.float16)


@CODECS.register("bf16", CodecConfig)
def bf16(cfg: Any) -> Codec:
    """bfloat16."""
    import torch

    from dpl.comm.codecs.formats import HalfPrecision

    return HalfPrecision(torch.bfloat16)


def build_codec(cfg: Any) -> Any:
    """The codec of the ``compression`` config node, wrapped in error feedback where it asks for it; None
    for the exact average of the parameters (``compression=none``)."""
    codec = CODECS.build(cfg.name, cfg)
    if codec is not None and cfg.error_feedback:
        from dpl.comm.codecs.feedback import ErrorFeedback

        return ErrorFeedback(codec)
    return codec
