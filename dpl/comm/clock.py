"""A modelled clock: how long a run would take on a cluster, as a function of the config and seed.

The simulation's own wall time is noise (K workers share one machine that is busy with
other things), so time-to-accuracy is modelled instead, with the usual decomposition of a
data-parallel step into compute and communication (the alpha-beta model of Hockney 1994,
as in the DiLoCo line of work, Douillard et al. 2023 / 2025):

- compute: each worker processes a sample in ``c`` seconds times its own speed factor
  s_k (1 = nominal, 2 = twice as slow). A period of local steps ends when the slowest
  worker has finished it, so a period of P steps of batch B costs P · B · c · max_k s_k;
- communication (:func:`dpl.comm.cost.sync_time_s`): every all-reduce of n bytes per replica
  costs, on a ring, 2 (K − 1) α + 2 (K − 1)/K · n / β; through one parameter server,
  2 α + 2 K n / β (the server's link carries every worker's push and pull);
- modelled time = Σ over the run of compute + communication.

``c`` is a pure function of the config, counted once per run: c = F / (P · u), with F the model's
FLOPs of one training sample (forward and backward, :func:`training_flops`; a text window's divided
by its tokens, the samples an epoch counts), P the dense peak of the modelled GPU ``clock.device`` at
the run's ``precision`` (:data:`DEVICES`) and u the model FLOPs utilisation ``clock.mfu`` (MFU, the
share of the peak that training attains: Chowdhery et al. 2022, "PaLM", Sec. 4.1 and App. B).
The default device is ``a100``, at ``clock.mfu=0.4``: the A100 is the GPU most published training
throughputs and MFU figures are quoted against (Megatron-LM, Narayanan et al. 2021, reports its
utilisation, 52 %, against the A100's 312 TFLOP/s half-precision peak; PaLM's Table 3 lists MFUs of
0.21 to 0.46),
and the same run on ``h100`` models about a third of its compute time. Small models (LeNet-5 or
ResNet-20 at batch 64) reach far less than 0.4 on such a GPU, so their modelled compute is a lower
bound on a real cluster's, and communication weighs more in the modelled time than it would.
``clock.sample_cost_us`` set explicitly wins over the device. ``clock.device=measured`` measures this
machine instead: the mean compute time per sample and worker of the first epoch, then fixed (and
checkpointed); two runs of the same config then differ in their modelled time.

The speed factors are drawn once per run from the seed (``clock.speed``): all 1
(``constant``), lognormal with median 1 and ``clock.spread`` the sigma of log s, or a
``clock.slow_fraction`` of the workers ``clock.slow_factor`` times slower (``slow``).

They only act on the modelled clock, unless ``clock.emulate`` (``engine=distributed``) slows the ranks for
real: each rank sleeps after every step it computes, (s_k / min_j s_j − 1) times that step's measured
time (:class:`dpl.core.step.SlowedStep`), so on equal hardware worker k takes s_k / min_j s_j as long
per step as the fastest, and the measured time of a method that waits for its slowest worker (every
synchronous one) grows with it, while an asynchronous method's does not.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from dpl.config.schema import at_least, check, finite, key, one_of, positive
from dpl.errors import ConfigError, first_line

SPEEDS = ("constant", "lognormal", "slow")
MEASURED = "measured"  # clock.device: this machine's first epoch, not a modelled GPU


@dataclass(frozen=True)
class DeviceProfile:
    """A GPU's peak dense throughput in FLOP/s at each ``precision`` (None: no fast path for it).

    Dense peaks (not the 2:4-sparsity figures NVIDIA also quotes) of the SXM boards, from NVIDIA's datasheets:

    - a100: NVIDIA A100 Tensor Core GPU datasheet (A100 SXM): TF32 Tensor Core 156 TFLOPS, BF16 Tensor Core
      312 TFLOPS (312 and 624 "with sparsity").
    - h100: NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): TF32 Tensor Core 989 and BF16 Tensor Core 1,979
      TFLOPS, both "with sparsity"; dense is half, 494.7 and 989.4 (the dense column of NVIDIA's H100 Tensor
      Core GPU Architecture whitepaper).
    - v100: NVIDIA Tesla V100 datasheet (V100 SXM2): single precision 15.7 TFLOPS; its Tensor Cores take FP16
      only (125 TFLOPS), so it has neither TF32 nor BF16.

    ``precision=fp32`` is modelled at the TF32 Tensor Core rate where the GPU has one: cuDNN runs fp32
    convolutions in TF32 by default on Ampere and later, and a cluster training in fp32 lets its matmuls do
    the same (``torch.backends.cuda.matmul.allow_tf32``).
    """

    fp32: float
    bf16: Optional[float]


DEVICES = {
    "a100": DeviceProfile(fp32=156e12, bf16=312e12),
    "h100": DeviceProfile(fp32=494.7e12, bf16=989.4e12),
    "v100": DeviceProfile(fp32=15.7e12, bf16=None),
}


@dataclass
class ClockConfig:
    """``clock``: the modelled compute time of the workers: the GPU and utilisation (or a given per-sample
    cost) and the workers' speed spread."""

    device: str = key("a100", "the modelled GPU, whose dense peak at the run's precision sets the compute: a100 "
                              "(default: what published MFU figures are quoted against) | h100 | v100 | measured "
                              "(this machine's first epoch; not reproducible)")
    mfu: float = key(0.4, "model FLOPs utilisation: the share of the device's dense peak that training attains")
    sample_cost_us: Optional[float] = key(None, "compute per sample (text: per token) and worker at speed 1, "
                                                "in microseconds; null: the model's FLOPs on clock.device")
    speed: str = key("constant", "the workers' time factors, drawn from the seed: constant (all 1) | lognormal | "
                                 "slow (a share of them slower)")
    spread: float = key(0.5, "lognormal: sigma of the log time factor (median 1)")
    slow_fraction: float = key(0.25, "slow: this share of the workers ...")
    slow_factor: float = key(2.0, "... takes this many times longer per sample")
    emulate: bool = key(False, "engine=distributed: slow each rank for real by its worker's time factor against "
                               "the fastest's (it sleeps after each step it computes), so the measured time "
                               "shows what the modelled clock models")

    def __post_init__(self) -> None:
        one_of("clock.device", self.device, (*DEVICES, MEASURED))
        check(finite(self.mfu) and 0.0 < self.mfu <= 1.0, "clock.mfu", self.mfu, "0 < x <= 1")
        if self.sample_cost_us is not None:
            positive("clock.sample_cost_us", self.sample_cost_us)
        one_of("clock.speed", self.speed, SPEEDS)
        at_least("clock.spread", self.spread, 0.0)
        check(0.0 <= self.slow_fraction <= 1.0, "clock.slow_fraction", self.slow_fraction, "0 <= x <= 1")
        at_least("clock.slow_factor", self.slow_factor, 1.0)

    def check_precision(self, precision: str) -> None:
        """The modelled GPU has a peak for the run's ``precision`` (a V100 has no bf16), unless the cost is
        given or measured; called by the root config, which holds both keys."""
        if self.sample_cost_us is None and self.device != MEASURED:
            peak_flops(self.device, precision)


@dataclass(frozen=True)
class WorkerClock:
    """The workers' modelled clock, as a method that keeps its own timeline reads it
    (:meth:`dpl.core.methods.base.Method.timeline`): each worker's time factor s_k, the modelled seconds of
    one local step at speed 1 (the batch's samples times the per-sample cost), and of one message of the
    model's parameters between one worker and the holder of the global model (the alpha-beta model of one
    point-to-point transfer, :func:`dpl.comm.cost.message_s`)."""

    speeds: tuple[float, ...]
    step_s: float
    message_s: float


def peak_flops(device: str, precision: str) -> float:
    """The dense peak FLOP/s of ``device`` (:data:`DEVICES`) at ``precision``; one line if it has none."""
    peak = getattr(DEVICES[device], precision)
    if peak is None:
        have = [f.name for f in fields(DeviceProfile) if getattr(DEVICES[device], f.name) is not None]
        others = [d for d, p in DEVICES.items() if getattr(p, precision) is not None]
        raise ConfigError(f"clock.device={device!r} is invalid with precision={precision}: allowed precision="
                          f"{' | '.join(have)} on it, or clock.device={' | '.join(others)}")
    return peak


def sample_cost_s(clock: Any, precision: str, model: Any, example: Any, tokens_per_sample: int = 1) -> Optional[float]:
    """Modelled compute seconds per sample and worker at speed 1: ``clock.sample_cost_us`` when set; None
    for ``clock.device=measured`` (the ledger measures the first epoch); else F / (P · u) as in the module
    doc, F from one sample ``example`` (a batch of one) through ``model``, divided by ``tokens_per_sample``
    because an epoch counts a text window's tokens as its samples."""
    if clock.sample_cost_us is not None:
        return clock.sample_cost_us * 1e-6
    if clock.device == MEASURED:
        return None
    try:
        flops = training_flops(model, example) / tokens_per_sample
    except (RuntimeError, NotImplementedError, TypeError) as e:  # a model that reads its values (.item())
        raise ConfigError(f"clock.device={clock.device!r} is invalid for this model, whose FLOPs cannot be counted "
                          f"on the meta device ({type(e).__name__}: {first_line(e)[:160]}): allowed "
                          f"clock.sample_cost_us=<us>, or clock.device={MEASURED}") from None
    return flops / (peak_flops(clock.device, precision) * clock.mfu)


def training_flops(model: Any, example: Any) -> int:
    """FLOPs of one training step of ``model`` on ``example`` (a batch of one sample): forward and backward,
    as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matrix products, convolutions and attention,
    2 per multiply-add; the elementwise rest is left out, as in the 6N-per-token rule of Kaplan et al. 2020,
    "Scaling Laws for Neural Language Models", Sec. 2.1). The backward forms every weight's gradient and every
    activation's except the input's, as training does: a Linear(i, o) counts 2·i·o forward, 2·i·o for its
    weight gradient and, unless it is the first layer, 2·i·o for its input's.

    Counted on a copy on the meta device, which has shapes but no data: nothing is computed or allocated, no
    random number is drawn, the model is untouched, and the count is the same whatever device the run
    trains on (attention is counted in full, causal or not, as torch's math path computes it)."""
    from torch.utils.flop_counter import FlopCounterMode

    twin = _meta_copy(model).eval()  # eval: dropout draws nothing; its FLOPs are elementwise anyway
    with FlopCounterMode(display=False) as counter:
        twin(example.to("meta")).sum().backward()  # the loss's own FLOPs are elementwise: not counted
    return int(counter.get_total_flops())


def _meta_copy(model: Any) -> Any:
    """A deep copy of ``model`` with its parameters and buffers on the meta device, made without copying
    their data: deepcopy takes each from the memo, keyed by identity, so tied weights stay tied."""
    import copy

    import torch

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def worker_speeds(K: int, speed: str, seed: int, spread: float = 0.5, slow_fraction: float = 0.25,
                  slow_factor: float = 2.0) -> Any:
    """Per-worker time factors s_k >= 0 (1 = nominal) as a NumPy array, a pure function of the arguments."""
    import numpy as np

    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, 4]))
    if speed == "constant":
        return np.ones(K)
    if speed == "lognormal":
        return np.exp(rng.normal(0.0, spread, size=K))
    if speed == "slow":
        s = np.ones(K)
        slow = rng.permutation(K)[: int(round(slow_fraction * K))]
        s[slow] = slow_factor
        return s
    raise ValueError(f"clock.speed={speed!r} is invalid: allowed {', '.join(SPEEDS)}")
