"""Communication accounting: how many bytes a run sends and how long that would take.

The simulation runs the K workers in one process, so nothing is really sent; this
module models what a cluster would send. Each sync round is one ring all-reduce of
a full replica (LocalSGD / SlowMo average the parameters; synchronous training
all-reduces gradients, which have the same size, at every step). In a ring
all-reduce (Patarasuk & Yuan 2009) each worker sends 2 (K - 1) / K of the buffer:
K - 1 chunks of size n / K in the reduce-scatter phase and as many in the
all-gather phase. The time of one all-reduce follows the latency-bandwidth (alpha-beta)
model: each of its 2 (K - 1) ring steps pays the latency alpha once, so
T = 2 (K - 1) alpha + n_sent / beta (Thakur, Rabenseifner & Gropp 2005, Sec. 4.4 for
the reduce-scatter + all-gather ring; Patarasuk & Yuan 2009).

Compressed syncs (``compression``, :mod:`dpl.comm.codecs`) send a payload of p bytes per
worker instead of the n bytes of the replica. A payload the workers can sum as it is (fp16,
bf16, int8 through a quantized reduce-scatter/all-gather, random-k on shared coordinates)
is all-reduced as above, with p in place of n. A payload that is each worker's own (top-k
values with their indices, scaled signs) must reach every other worker: a ring all-gather
(Thakur et al. 2005, Sec. 4.1) takes K - 1 steps, in each of which every worker forwards one
payload to its neighbour, so each worker sends (K - 1) p and the time is
T = (K - 1) alpha + (K - 1) p / beta. Through a parameter server each worker pushes its p and
pulls the K - 1 others: 2 alpha + K * K p / beta on the server's link (K p in, K (K - 1) p out).

Every collective passes :class:`dpl.comm.point.CommPoint`, which counts it in a
:class:`Traffic`: the traffic a real cluster sends for the algorithm (the syncs of the model,
gradients or parameters, and anything sent with them: the inner optimizer's state with
``local_momentum=average``, the model's buffers) apart from bookkeeping (the epoch's metric
sums, evaluation, the exact average a compressed sync's drift metric needs).
:class:`CommLedger` turns the algorithm's counts into bytes and modelled time per epoch, and
reports the bookkeeping bytes beside them (never in the modelled time: a cluster could log
less often, the algorithm could not sync less).

A sync whose communication overlaps later inner steps (streaming DiLoCo's delay τ, an eager sync's
next period; Douillard et al. 2025, Sec. 2.3 / 4) hides up to w·t_step of its time behind them, w the
steps it overlaps and t_step one worker's modelled compute of a step: per epoch, with C_o the modelled
time of the overlapped syncs and W_o = Σ w · t_step, ``comm_hidden_s`` = min(C_o, W_o) (exact when the
epoch's overlapped syncs are alike: balanced fragments, one delay) and ``modelled_time_s`` leaves it
out. ``peak_sync_bytes`` is what one worker sends in the epoch's largest sync, and
``peak_bandwidth_gbps`` the bandwidth at which that sync holds training back by at most one step: its
busiest-link bits over (w + 1) · t_step (a blocking sync, w = 0, must fit in one step's time).

Everything here is a pure function or a ledger of plain numbers, so the totals
survive a checkpoint and a resumed run reports the same curves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional

from dpl.config.schema import at_least, key, one_of, positive

TOPOLOGIES = ("ring", "ps")


@dataclass
class NetworkConfig:
    """``network``: the modelled cluster network of the communication-time estimate."""

    bandwidth_gbps: float = key(10.0, "bandwidth of each worker's link in Gb/s (beta)")
    latency_us: float = key(50.0, "latency of one message in microseconds (alpha)")
    topology: str = key("ring", "ring (a ring all-reduce) | ps (one parameter server)")

    def __post_init__(self) -> None:
        positive("network.bandwidth_gbps", self.bandwidth_gbps)
        at_least("network.latency_us", self.latency_us, 0.0)
        one_of("network.topology", self.topology, TOPOLOGIES)

# The fields of :meth:`CommLedger.record_epoch` that follow the compute time, and so the first epoch's
# measured compute with ``clock.device=measured``: two such runs of the same maths differ only here (by
# default the compute is counted from the model's FLOPs, and these fields are as reproducible as the rest).
CLOCKED_FIELDS = frozenset({"compute_time_s", "modelled_time_s", "comm_hidden_s", "peak_bandwidth_gbps",
                            "overlap_window_s"})
# What :func:`epoch_time_at` reads of an epoch's record.
RESCALED_FIELDS = ("compute_time_s", "comm_time_s", "comm_transfer_s", "overlap_latency_s", "overlap_transfer_s",
                   "overlap_window_s")


def bytes_sent(nbytes: float, K: int, topology: str = "ring") -> float:
    """Bytes one worker sends in one all-reduce of an ``nbytes`` buffer: 2 (K - 1) / K * nbytes
    on a ring (K - 1 chunks of n / K in each of its two phases); n to a parameter server."""
    if K < 1:
        raise ValueError(f"K={K} is invalid: allowed an integer >= 1")
    if K == 1:
        return 0.0
    return 2.0 * (K - 1) / K * nbytes if _topology(topology) == "ring" else float(nbytes)


def latency_s(K: int, latency_us: float, topology: str = "ring") -> float:
    """The latency part of one all-reduce: one per step, 2 (K - 1) on a ring, 2 (push, pull)
    through a parameter server; 0 when K = 1."""
    if K <= 1:
        return 0.0
    steps = 2 * (K - 1) if _topology(topology) == "ring" else 2
    return steps * latency_us * 1e-6


def transfer_s(nbytes: float, K: int, bandwidth_gbps: float, topology: str = "ring") -> float:
    """Seconds on the busiest link for all-reducing ``nbytes`` per replica (Gb/s = 1e9 bits/s):
    a ring worker's 2 (K - 1) / K n; a parameter server's link carries every worker's push
    and pull, 2 K n."""
    if K <= 1:
        return 0.0
    on_link = bytes_sent(nbytes, K, "ring") if _topology(topology) == "ring" else 2.0 * K * nbytes
    return on_link * 8.0 / (bandwidth_gbps * 1e9)


def sync_time_s(nbytes: float, K: int, bandwidth_gbps: float, latency_us: float, topology: str = "ring") -> float:
    """Modelled seconds of one all-reduce of ``nbytes`` per replica among K workers: the
    alpha-beta model, latency per step + bytes over the busiest link."""
    return latency_s(K, latency_us, topology) + transfer_s(nbytes, K, bandwidth_gbps, topology)


def message_s(nbytes: float, bandwidth_gbps: float, latency_us: float) -> float:
    """Modelled seconds of one point-to-point message of ``nbytes`` over one link: α + 8 n / β (an
    asynchronous worker's push to the holder of the global model, or its pull)."""
    return latency_us * 1e-6 + nbytes * 8.0 / (bandwidth_gbps * 1e9)


def gather_bytes_sent(nbytes: float, K: int, topology: str = "ring") -> float:
    """Bytes one worker sends in one all-gather of an ``nbytes`` payload per worker: (K - 1) p on
    a ring (it forwards every other worker's payload once); p to a parameter server; 0 when K = 1."""
    if K <= 1:
        return 0.0
    return (K - 1) * float(nbytes) if _topology(topology) == "ring" else float(nbytes)


def gather_latency_s(K: int, latency_us: float, topology: str = "ring") -> float:
    """The latency part of one all-gather: K - 1 ring steps; 2 (push, pull) through a server."""
    if K <= 1:
        return 0.0
    steps = K - 1 if _topology(topology) == "ring" else 2
    return steps * latency_us * 1e-6


def gather_transfer_s(nbytes: float, K: int, bandwidth_gbps: float, topology: str = "ring") -> float:
    """Seconds on the busiest link for all-gathering ``nbytes`` per worker: a ring worker's (K - 1) p;
    the server's link K p in and K (K - 1) p out, K * K p."""
    if K <= 1:
        return 0.0
    on_link = gather_bytes_sent(nbytes, K, "ring") if _topology(topology) == "ring" else float(K * K) * nbytes
    return on_link * 8.0 / (bandwidth_gbps * 1e9)


def epoch_time_at(record: Mapping[str, float], bandwidth_gbps: float, recorded_gbps: float) -> float:
    """The modelled seconds of one epoch's ``record`` (its :data:`RESCALED_FIELDS`, logged at
    ``recorded_gbps``) on a network of ``bandwidth_gbps``, latency and compute unchanged.

    Only the transfer parts scale, as 1 / bandwidth (every formula above is latency + bytes / β):
    C = (C − C_β) + C_β · β₀/β for the epoch's communication and for its overlapped syncs, whose
    time hides behind at most the steps they overlap (the ``comm_hidden_s`` of :class:`CommLedger`).
    At ``bandwidth_gbps == recorded_gbps`` the epochs add up to the run's ``modelled_time_s``.
    """
    if bandwidth_gbps <= 0 or recorded_gbps <= 0:
        raise ValueError(f"bandwidth_gbps={bandwidth_gbps}, recorded_gbps={recorded_gbps}: both must be > 0")
    scale = recorded_gbps / bandwidth_gbps
    comm = record["comm_time_s"] + record["comm_transfer_s"] * (scale - 1.0)
    hidden = min(record["overlap_latency_s"] + record["overlap_transfer_s"] * scale, record["overlap_window_s"])
    return record["compute_time_s"] + comm - hidden


def _topology(name: str) -> str:
    if name not in TOPOLOGIES:
        raise ValueError(f"network.topology={name!r} is invalid: allowed {', '.join(TOPOLOGIES)}")
    return name


def param_bytes(tensors: Iterable[Any], per_worker: bool = False) -> int:
    """Bytes of one replica's parameters.

    With ``per_worker`` the tensors are stacked [K, ...] over workers and one replica
    holds numel / shape[0] elements of each.
    """
    total = 0
    for t in tensors:
        numel = t.numel() // t.shape[0] if per_worker else t.numel()
        total += numel * t.element_size()
    return total


@dataclass
class Traffic:
    """What crossed workers since the last epoch end, as counted by :class:`dpl.comm.point.CommPoint`."""

    syncs: int = 0  # syncs of the model: gradients (synchronous) or parameters / pseudo-gradients (local methods)
    collectives: int = 0  # every collective: the syncs plus optimizer state (local_momentum=average), buffers
    replica_bytes: float = 0.0  # one worker's bytes of the all-reduces among them, before the ring's 2 (K - 1) / K
    # compressed payloads that are each worker's own (top-k, sign): all-gathers, among the collectives
    gathers: int = 0
    gathered_bytes: float = 0.0  # one worker's payload of all of them, before the ring's K - 1
    # bookkeeping, not the algorithm: metric sums, evaluation (all-reduces; one worker's bytes, as above)
    bookkeeping_collectives: int = 0
    bookkeeping_bytes: float = 0.0
    # syncs whose communication overlaps later compute (streaming DiLoCo's delay, eager updates): how
    # many, the inner steps each overlaps (summed), and their share of the counts above (included there)
    overlap_syncs: int = 0
    overlap_steps: int = 0
    overlap_collectives: int = 0
    overlap_gathers: int = 0
    overlap_replica_bytes: float = 0.0
    overlap_gathered_bytes: float = 0.0
    # the epoch's largest sync (one worker's bytes, all-reduced and all-gathered parts) and the steps it overlaps
    peak_replica_bytes: float = 0.0
    peak_gathered_bytes: float = 0.0
    peak_overlap_steps: int = 0
    dropped: int = 0  # workers' contributions to syncs dropped (faults.drop_prob)
    # point-to-point messages between one worker and the holder of the global model (asynchronous methods:
    # each arrival's push and the pull after it) and their bytes, all workers' together; their time is on
    # the method's own timeline (a worker waits for its messages while the others compute), not the ledger's
    messages: int = 0
    message_bytes: float = 0.0


@dataclass
class CommLedger:
    """Running communication and modelled-time totals of one run; plain fields, so it
    round-trips through a checkpoint.

    Each epoch's :class:`Traffic` becomes bytes sent per worker and modelled communication
    time (:func:`sync_time_s` per all-reduce), and its steps become modelled compute time
    (:mod:`dpl.comm.clock`): ``samples x sample_cost_s x step_factor`` with ``step_factor`` the time factor
    a step of the loop takes: the largest worker's (a step ends when the slowest worker's does), or the
    fastest worker's for a method that keeps its own timeline (an asynchronous method's tick).
    ``sample_cost_s`` comes from the config (:func:`dpl.comm.clock.sample_cost_s`: the
    model's FLOPs on the modelled GPU, or ``clock.sample_cost_us``); None (``clock.device=measured``) is
    measured from the first epoch, then fixed. A checkpoint restores it as it was, measured or counted.
    With K == 1 nothing is sent, so bytes and communication time stay 0, but rounds are
    still counted (a 1-worker LocalSGD run still has its sync points, they are just free).
    """

    K: int
    bandwidth_gbps: float
    latency_us: float
    topology: str = "ring"
    sample_cost_s: Optional[float] = None  # compute seconds per sample (text: token) of one worker at speed 1
    step_factor: float = 1.0  # the time factor of one step of the loop (see the class doc)
    rounds_total: int = 0
    collectives_total: int = 0
    steps_total: int = 0
    bytes_total: float = 0.0
    comm_time_total_s: float = 0.0
    compute_time_total_s: float = 0.0
    bookkeeping_bytes_total: float = 0.0  # bytes sent per worker for metrics and evaluation (not modelled as time)
    comm_hidden_total_s: float = 0.0  # modelled communication overlapped by compute (streaming, eager syncs)

    def record_epoch(self, traffic: Traffic, steps: int, samples: float, measured_compute_s: float) -> dict[str, float]:
        """Add one epoch of ``traffic`` over ``steps`` local steps on ``samples`` samples per worker;
        return this epoch's metrics. ``measured_compute_s`` (one worker's measured compute of the
        epoch) only calibrates ``sample_cost_s`` when it is not set.

        ``sync_rounds`` counts the syncs of the model, ``collectives`` every all-reduce.
        ``rounds_vs_sync`` is rounds / steps over the run so far: 1.0 for synchronous
        training (a round every step), about 1 / H for LocalSGD. ``bookkeeping_bytes`` is what
        the epoch's metrics and evaluation sent per worker, beside the algorithm's ``comm_bytes``.
        """
        if self.sample_cost_s is None:
            self.sample_cost_s = measured_compute_s / max(samples, 1)
        comm_bytes = bytes_sent(traffic.replica_bytes, self.K, self.topology)
        # the latency of every collective, then all of the epoch's bytes over the busiest link
        comm_transfer = self._transfer_s(traffic.replica_bytes, traffic.gathered_bytes, self.bandwidth_gbps)
        comm_time = self._latency_s(traffic.collectives, traffic.gathers) + comm_transfer
        if traffic.gathers:  # compressed payloads that are each worker's own (dpl.comm.codecs)
            comm_bytes += gather_bytes_sent(traffic.gathered_bytes, self.K, self.topology)
        if traffic.messages:  # bytes per worker, as the all-reduces' are counted
            comm_bytes += traffic.message_bytes / self.K
        # the slowest worker ends each step (an asynchronous method's tick: the fastest's)
        compute_time = samples * self.sample_cost_s * self.step_factor
        # one worker's modelled compute of one step: what an overlapped sync can hide behind
        step_s = compute_time / steps if steps else 0.0
        # the overlapped syncs' time as latency + transfer (the part that scales with 1 / bandwidth), and
        # the steps' compute they overlap: kept per epoch, so the time at another bandwidth follows
        # (:func:`epoch_time_at`)
        overlap_latency = self._latency_s(traffic.overlap_collectives, traffic.overlap_gathers)
        overlap_transfer = self._transfer_s(traffic.overlap_replica_bytes, traffic.overlap_gathered_bytes,
                                            self.bandwidth_gbps)
        overlap_window = traffic.overlap_steps * step_s
        hidden = min(overlap_latency + overlap_transfer, overlap_window)
        # the largest sync: its bytes, and the bandwidth at which it holds training back by at most one step
        peak_bytes = bytes_sent(traffic.peak_replica_bytes, self.K, self.topology) + \
            gather_bytes_sent(traffic.peak_gathered_bytes, self.K, self.topology)
        peak_at_1gbps = self._transfer_s(traffic.peak_replica_bytes, traffic.peak_gathered_bytes, 1.0)
        window = (traffic.peak_overlap_steps + 1) * step_s
        peak_gbps = peak_at_1gbps / window if window > 0 else 0.0
        self.rounds_total += traffic.syncs
        self.collectives_total += traffic.collectives
        self.steps_total += steps
        self.bytes_total += comm_bytes
        self.comm_time_total_s += comm_time
        self.compute_time_total_s += compute_time
        self.comm_hidden_total_s += hidden
        bookkeeping = bytes_sent(traffic.bookkeeping_bytes, self.K, self.topology)
        self.bookkeeping_bytes_total += bookkeeping
        return {
            "sync_rounds": traffic.syncs,
            "sync_rounds_total": self.rounds_total,
            "collectives": traffic.collectives,
            "comm_bytes": comm_bytes,
            "comm_bytes_total": self.bytes_total,
            "rounds_vs_sync": self.rounds_total / self.steps_total if self.steps_total else 0.0,
            "comm_time_s": comm_time,
            "compute_time_s": compute_time,
            "comm_hidden_s": hidden,
            "comm_transfer_s": comm_transfer,
            "overlap_latency_s": overlap_latency,
            "overlap_transfer_s": overlap_transfer,
            "overlap_window_s": overlap_window,
            "modelled_time_s": self.compute_time_total_s + self.comm_time_total_s - self.comm_hidden_total_s,
            "peak_sync_bytes": peak_bytes,
            "peak_bandwidth_gbps": peak_gbps,
            "bookkeeping_bytes": bookkeeping,
            "bookkeeping_bytes_total": self.bookkeeping_bytes_total,
        }

    def _latency_s(self, collectives: int, gathers: int) -> float:
        """The latency part of ``collectives`` (``gathers`` of them all-gathers): the same at any bandwidth."""
        return (collectives - gathers) * latency_s(self.K, self.latency_us, self.topology) + \
            gathers * gather_latency_s(self.K, self.latency_us, self.topology)

    def _transfer_s(self, replica_bytes: float, gathered_bytes: float, bandwidth_gbps: float) -> float:
        """Seconds on the busiest link for these all-reduced and all-gathered bytes per worker."""
        return transfer_s(replica_bytes, self.K, bandwidth_gbps, self.topology) + \
            gather_transfer_s(gathered_bytes, self.K, bandwidth_gbps, self.topology)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> CommLedger:
        """A ledger from :meth:`state_dict`. Its step factor is a function of the config and seed, which the
        caller builds again: the names an older checkpoint held it in (``slowest``, an asynchronous run's
        ``tick_s``) are dropped."""
        return cls(**{k: v for k, v in d.items() if k not in ("slowest", "tick_s")})
