"""Streaming DiLoCo (dpl/methods/streaming.py): fragments, their schedule, the delayed and mixed
outer step against a hand-written reference, and DiLoCo as its P=1, τ=0, α=0 case."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpl.comm.stacked import StackedComm
from dpl.components.models import build_model
from dpl.core.loop import WALL_CLOCK_FIELDS
from dpl.core.methods import build_method
from dpl.core.methods.base import Now
from dpl.core.methods.streaming import balanced_split, fragments
from dpl.core.workers import StackedWorkers
from dpl.errors import ConfigError
from dpl.run import checkpoint
from dpl.run.build import build_trainer
from tests.conftest import TINY, compose_cfg
from tests.processes import run_cli
from tests.resume import assert_resume_is_exact

# ----------------------------------------------------------------------------- fragments


@pytest.mark.parametrize("sizes,parts,starts", [
    ([5, 5, 5, 5], 2, [0, 2]),
    ([1, 1, 10, 1, 1], 3, [0, 2, 3]),  # the big layer alone; its neighbours split around it
    ([3, 1, 1, 1], 2, [0, 1]),
    ([4, 4, 4], 3, [0, 1, 2]),
    ([7], 1, [0]),
])
def test_balanced_split_minimises_the_largest_fragment(sizes, parts, starts):
    assert balanced_split(sizes, parts) == starts


def test_balanced_split_is_optimal_against_every_contiguous_split():
    import itertools

    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        sizes = torch.randint(1, 50, (7,), generator=gen).tolist()
        for parts in (2, 3, 4):
            largest = lambda starts: max(sum(sizes[a:b]) for a, b in zip(starts, [*starts[1:], len(sizes)]))  # noqa: E731, B023
            best = min(largest([0, *cuts]) for cuts in itertools.combinations(range(1, len(sizes)), parts - 1))
            assert largest(balanced_split(sizes, parts)) == best


def _layers(model: nn.Module, P: int):
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    buffers = [n for n, _ in model.named_buffers()]
    return names, buffers, fragments(names, sizes, buffers, P)


def test_fragments_are_contiguous_layers_covering_the_model_once():
    names, _, parts = _layers(build_model("lenet5", 3, 10, 32), 3)
    flat = [i for f in parts for i in f.params]
    assert flat == list(range(len(names)))  # every tensor once, in model order
    layer = lambda i: names[i].rpartition(".")[0]  # noqa: E731
    # a layer's weight and bias never split
    assert all(layer(i) != layer(j) for a in parts for b in parts if a is not b for i in a.params for j in b.params)


def test_batchnorm_statistics_travel_with_their_layer():
    names, buffers, parts = _layers(build_model("resnet20", 3, 10, 12), 4)
    assert sorted(i for f in parts for i in f.buffers) == list(range(len(buffers)))
    for f in parts:
        layers = {names[i].rpartition(".")[0] for i in f.params}
        assert all(buffers[i].rpartition(".")[0] in layers for i in f.buffers)


def test_more_fragments_than_layers_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"method.fragments=6 is invalid: allowed at most 5"):
        _layers(build_model("lenet5", 3, 10, 32), 6)


@pytest.mark.parametrize("schedule,delay,starts", [
    ("paper", 0, {0: [2], 1: [4], 2: [6], 3: [8]}),
    ("paper", 1, {0: [2], 1: [4], 2: [6], 3: [8]}),  # taken at the slot, landed tau steps later
    ("torchft", 1, {0: [1], 1: [3], 2: [5], 3: [7]}),  # taken tau steps before the slot, landed at it
])
def test_fragment_0_goes_first_and_the_last_at_the_period_end(schedule, delay, starts):
    method = build_method(compose_cfg("method=streaming_diloco", "method.fragments=4", f"method.delay={delay}",
                                      f"method.schedule={schedule}", "H=8").method, "keep")
    method.fragments = [None] * 4
    assert {p: [t for t in range(1, 9) if p in method.due(t, 8)] for p in range(4)} == starts


@pytest.mark.parametrize("overrides,message", [
    (["H=6", "method.fragments=4"], r"H=6 is invalid with method.fragments=4: allowed a multiple of 4"),
    (["H=8", "method.fragments=4", "method.delay=2"], r"method.delay=2 is invalid with H=8 and method.fragments=4: "
                                                      r"allowed at most 1"),
    (["H=8", "method.fragments=2", "dynamic_h=loss"], r"dynamic_h='loss' is invalid with method.fragments=2"),
])
def test_what_torchft_refuses_is_one_clear_error(overrides, message):
    from dpl.config.validate import validate

    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg("method=streaming_diloco", *overrides))


# ----------------------------------------------------------------------------- the algorithm, by hand


def tiny_workers(K: int = 3) -> StackedWorkers:
    torch.manual_seed(0)
    return StackedWorkers(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
                          K, StackedComm(K))


def drive(method, workers, steps: int, H: int, gen_seed: int = 1, end_sync: bool = True):
    """The loop's calls for ``steps`` inner steps of one epoch (its end a sync with ``end_sync``, as with
    ``sync_at_epoch_end``); each step moves every worker its own way."""
    optimizer = torch.optim.SGD(workers.params, lr=0.05)
    gen = torch.Generator().manual_seed(gen_seed)
    period = 0
    for t in range(1, steps + 1):
        with torch.no_grad():
            for p in workers.params:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        period += 1
        now = Now(epoch=0, period=period, H=H, step=t, epoch_end=end_sync and t == steps)
        if method.syncs_after(now):
            method.sync(workers, optimizer, 0.05)
        if method.period_ends(now):
            period = 0
    return [p.detach().clone() for p in workers.params]


def by_hand(P: int, H: int, tau: int, alpha: float, steps: int, K: int = 3, lr=0.7, mu=0.9,
            torchft: bool = False, end_sync: bool = True):
    """Streaming DiLoCo written out: fragment p's slot is t ≡ (p + 1) H / P (mod H); Δ_p = x_p − mean_k x_{k,p}
    (float64) is taken at the slot (``torchft``: τ steps before it), and τ steps later x_p ← Nesterov(x_p, Δ_p),
    x_{k,p} ← α x_{k,p} + (1 − α) x_p. With ``end_sync`` the last step lands everything and syncs every
    fragment at once."""
    workers = tiny_workers(K)
    names = [n for n, _ in workers.model.named_parameters()]
    sizes = [p[0].numel() for p in workers.params]
    parts = [f.params for f in fragments(names, sizes, [], P)]
    x = [p.detach()[0].double().clone() for p in workers.params]
    buf = [None] * len(x)
    flying: dict[int, tuple[int, list]] = {}
    gen = torch.Generator().manual_seed(1)

    def land(p):
        _, deltas = flying.pop(p)
        for i, d in zip(parts[p], deltas):
            buf[i] = d.clone() if buf[i] is None else mu * buf[i] + d
            x[i] = x[i] - lr * (d + mu * buf[i])
            w = workers.params[i]
            with torch.no_grad():
                w.copy_(x[i].expand_as(w) if alpha == 0 else alpha * w.double() + (1 - alpha) * x[i])

    for t in range(1, steps + 1):
        with torch.no_grad():
            for w in workers.params:
                w.add_(torch.randn(w.shape, generator=gen) * 0.01)
        last = end_sync and t == steps
        start = [(p + 1) * H // P - (tau if torchft else 0) for p in range(P)]
        starting = list(range(P)) if last else [p for p in range(P) if (t - start[p]) % H == 0]
        for p in sorted(p for p, (at, _) in flying.items() if at <= t or p in starting):
            land(p)
        for p in starting:
            flying[p] = (t + (0 if last else tau), [x[i] - workers.params[i].detach().mean(0).double() for i in parts[p]])
            if last or tau == 0:
                land(p)
    return [w.detach().clone() for w in workers.params]


@pytest.mark.parametrize("P,H,tau,alpha,schedule,end_sync", [
    (1, 6, 0, 0.0, "paper", True), (3, 6, 0, 0.0, "paper", True), (3, 12, 2, 0.0, "paper", True),
    (2, 6, 1, 0.5, "paper", True), (3, 12, 3, 0.25, "paper", False), (2, 6, 2, 0.5, "torchft", False),
    (3, 12, 3, 0.25, "torchft", True),
])
def test_streaming_equals_the_algorithm_written_out(P, H, tau, alpha, schedule, end_sync):
    method = build_method(compose_cfg("method=streaming_diloco", f"method.fragments={P}", f"method.delay={tau}",
                                      f"method.alpha={alpha}", f"method.schedule={schedule}", f"H={H}").method,
                          "keep")
    workers = tiny_workers()
    method.start(workers)
    got = drive(method, workers, steps=21, H=H, end_sync=end_sync)
    for a, b in zip(got, by_hand(P, H, tau, alpha, steps=21, torchft=schedule == "torchft", end_sync=end_sync)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_fragment_in_flight_overlaps_compute_and_the_largest_sync_is_one_fragment():
    method = build_method(compose_cfg("method=streaming_diloco", "method.fragments=3", "method.delay=2",
                                      "H=12").method, "keep")
    workers = tiny_workers()
    method.start(workers)
    drive(method, workers, steps=24, H=12)
    traffic = workers.point.take()
    # fragments start at t = 4, 8, 12, 16, 20 with τ = 2, then all three at once at the epoch's end, τ = 0
    assert (traffic.syncs, traffic.overlap_syncs, traffic.overlap_steps) == (8, 5, 10)
    sizes = [sum(workers.params[i][0].numel() * 4 for i in f.params) for f in method.fragments]
    assert traffic.peak_replica_bytes == max(sizes)
    assert traffic.peak_overlap_steps == 2  # its first sync was in flight for τ steps
    assert traffic.replica_bytes == sum(sizes[p] for p in (0, 1, 2, 0, 1)) + sum(sizes)


# ----------------------------------------------------------------------------- through the trainer and the CLI


def test_one_fragment_without_delay_or_mixing_is_diloco_bit_for_bit(make_cfg):
    common = ["K=2", "H=3", "epochs=2"]
    runs = []
    for method in (["method=diloco"], ["method=streaming_diloco", "method.fragments=1"]):
        trainer = build_trainer(make_cfg(*method, *common), torch.device("cpu"))
        trainer.fit()
        runs.append(trainer)
    diloco, streaming = runs
    assert all(torch.equal(a, b) for a, b in zip(diloco.workers.params, streaming.workers.params))
    timing = WALL_CLOCK_FIELDS  # wall clock differs, nothing else may
    assert [{k: v for k, v in r.items() if k not in timing} for r in diloco.state.history] == \
        [{k: v for k, v in r.items() if k not in timing} for r in streaming.state.history]


def test_streaming_and_diloco_through_the_cli(tmp_path):
    """The identity through ``python -m dpl`` (the runs' checkpoints), and P=2 with a delay trains."""
    args = [*TINY, "K=2", "H=4", "epochs=1"]
    weights = []
    for name, extra in (("diloco", ["method=diloco"]), ("p1", ["method=streaming_diloco", "method.fragments=1"]),
                        ("p2", ["method=streaming_diloco", "method.delay=1", "method.alpha=0.5"])):
        proc = run_cli(tmp_path, [*args, *extra, f"hydra.run.dir={tmp_path / name}"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        weights.append(checkpoint.load(tmp_path / name)["workers"]["params"])
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], weights[2]))


@pytest.mark.parametrize("extra", [
    ["H=8", "method.fragments=2", "method.delay=3", "method.alpha=0.5"],  # stopped with fragment 0 in flight
    # compressed, with error feedback and dropped workers: ~13 s on 2 cores, so in the slow set (the error
    # feedback's resume is tests/test_compression.py's too)
    pytest.param(["H=6", "method.fragments=3", "method.delay=1", "compression=int8", "compression.error_feedback=true",
                  "faults.drop_prob=0.3"], marks=pytest.mark.slow),
])
def test_resume_with_a_fragment_in_flight_is_exact(make_cfg, tmp_path, monkeypatch, extra):
    # 15 steps per epoch at K=2; H=8: fragment 0 starts at step 4 and lands at 7 (τ=3): stop at 5
    assert_resume_is_exact(make_cfg, ["method=streaming_diloco", "K=2", "checkpoint_every=1", *extra],
                           tmp_path, monkeypatch, stop_at=5)


# ----------------------------------------------------------------------------- eager updates


def by_hand_eager(P: int, H: int, steps: int, K: int = 3, lr=0.7, mu=0.9):
    """Kale et al. 2025's eager outer step written out, per worker m with its own anchor x_m and
    Nesterov buffer: at a sync of fragment p, Δ_m = x_m − θ_m; with Δ^prev the average of the previous
    sync's Δ_m (sent as fp32; 0 before the first lands), Δ̃_m = Δ^prev + (Δ_m − Δ_m^prev) / K, and
    x_m ← Nesterov(x_m, Δ̃_m), θ_m ← x_m."""
    workers = tiny_workers(K)
    names = [n for n, _ in workers.model.named_parameters()]
    parts = [f.params for f in fragments(names, [p[0].numel() for p in workers.params], [], P)]
    x = [p.detach().double().clone() for p in workers.params]  # [K, ...]: every worker's own
    buf: list = [None] * len(x)
    stale: dict[int, list] = {}
    old: dict[int, list] = {}
    gen = torch.Generator().manual_seed(1)
    for t in range(1, steps + 1):
        with torch.no_grad():
            for w in workers.params:
                w.add_(torch.randn(w.shape, generator=gen) * 0.01)
        starting = list(range(P)) if t == steps else [p for p in range(P) if (t - (p + 1) * H // P) % H == 0]
        for p in starting:
            own = [x[i] - workers.params[i].detach().double() for i in parts[p]]
            prev = stale.get(p, [torch.zeros_like(d[0]) for d in own])
            before = old.get(p, [torch.zeros_like(d) for d in own])
            for i, d, m, b in zip(parts[p], own, prev, before):
                g = m + (d - b) / K
                buf[i] = g.clone() if buf[i] is None else mu * buf[i] + g
                x[i] = x[i] - lr * (g + mu * buf[i])
                with torch.no_grad():
                    workers.params[i].copy_(x[i])
            stale[p], old[p] = [d.float().mean(0).double() for d in own], own
    return [w.detach().clone() for w in workers.params], x


@pytest.mark.parametrize("P", [1, 3])
def test_eager_updates_equal_the_algorithm_written_out(P):
    method = build_method(compose_cfg("method=streaming_diloco", f"method.fragments={P}", "method.eager=true").method,
                          "keep")
    workers = tiny_workers()
    method.start(workers)
    got = drive(method, workers, steps=20, H=6)
    params, anchors = by_hand_eager(P, 6, steps=20)
    for a, b in zip(got, params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(method.anchor, anchors):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    assert not torch.equal(got[0][0], got[0][1])  # every worker its own global model
    traffic = workers.point.take()
    assert traffic.overlap_syncs == traffic.syncs and traffic.overlap_steps == 6 * traffic.syncs


def test_eager_diloco_resumes_exactly_with_every_workers_own_anchor(make_cfg, tmp_path, monkeypatch):
    # checkpoint_every=6: the cut at step 6 is mid-period, right after a checkpoint (one per step costs ~12 s)
    assert_resume_is_exact(make_cfg, ["method=diloco", "method.eager=true", "K=2", "H=4", "checkpoint_every=6"],
                           tmp_path, monkeypatch, stop_at=6)


def test_eager_with_a_delay_is_one_clear_error():
    from dpl.config.validate import validate

    with pytest.raises(ConfigError, match=r"method.delay=2 is invalid with method.eager=true"):
        validate(compose_cfg("method=streaming_diloco", "method.eager=true", "method.delay=2"))
