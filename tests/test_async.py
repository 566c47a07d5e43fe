"""Asynchronous DiLoCo (dpl/core/methods/asynchronous.py): the ticks of the modelled clock against an
event-by-event simulation written out here, delayed Nesterov against its formulas, dynamic local updates,
staleness, the stated identities (K = 1 is DiLoCo; the first round of equal workers is LocalSGD's sync),
loop ≡ vmap, and a resume mid-flight."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dpl.comm.clock import WorkerClock
from dpl.comm.stacked import StackedComm
from dpl.core.loop import WALL_CLOCK_FIELDS
from dpl.core.methods import build_method
from dpl.core.methods.asynchronous import EPS, AsyncDiLoCo, DelayedNesterov, local_steps
from dpl.core.methods.base import Now
from dpl.core.workers import StackedWorkers
from dpl.errors import ConfigError
from dpl.run import checkpoint
from dpl.run.build import build_trainer
from tests.conftest import TINY, compose_cfg
from tests.processes import run_cli
from tests.resume import assert_resume_is_exact

INNER_LR = 0.1


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def batch(tick: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker k's batch of tick ``tick``: a pure function of both, as the trainer's are."""
    gen = torch.Generator().manual_seed(1000 * tick + k)
    return torch.randn(6, 5, generator=gen), torch.randn(6, 2, generator=gen)


def async_method(K: int, *overrides: str, speeds=None, message_s: float = 0.0) -> AsyncDiLoCo:
    method = build_method(compose_cfg("method=async_diloco", f"K={K}", *overrides).method, "keep")
    method.timeline(WorkerClock(tuple(speeds or [1.0] * K), 1.0, message_s))
    return method


def run_ticks(method: AsyncDiLoCo, K: int, H: int, ticks: int):
    """Drive the method as the loop does: every tick every worker steps (stacked, momentum SGD), then the sync."""
    workers = StackedWorkers(make_model(), K, StackedComm(K))
    optimizer = torch.optim.SGD(workers.params, lr=INNER_LR, momentum=0.5)
    method.start(workers, optimizer)
    for i in range(ticks):
        xs, ys = zip(*(batch(i, k) for k in range(K)))
        out = workers.forward(torch.stack(xs))
        ((out - torch.stack(ys)) ** 2).mean((1, 2)).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if method.syncs_after(Now(epoch=0, period=1, H=H, step=i + 1)):
            method.sync(workers, optimizer, INNER_LR)
    return workers


def reference(K: int, H: int, ticks: int, u: list[float], message: float, outer_step, dynamic: bool = False):
    """The algorithm event by event, one model per worker, no ticks and no stacking: each worker's steps at
    A_k + n u_k (on the batch of the tick that time falls in), its arrival at A_k + H_k u_k + m applied in
    time order (ties: the lower worker), its pull, its next round from r + m. Returns x and the order."""
    models = [make_model() for _ in range(K)]
    inner = [torch.optim.SGD(m.parameters(), lr=INNER_LR, momentum=0.5) for m in models]
    x = [p.detach().double().clone() for p in models[0].parameters()]
    pulled = [[t.clone() for t in x] for _ in range(K)]
    Hk = [max(1, int(H * min(u) / s + EPS)) for s in u] if dynamic else [H] * K
    start, done, order = [0.0] * K, [0] * K, []
    while True:
        events = []
        for k in range(K):
            if done[k] < Hk[k]:
                events.append((start[k] + (done[k] + 1) * u[k], 0, k))
            else:
                events.append((start[k] + Hk[k] * u[k] + message, 1, k))
        t, kind, k = min(events, key=lambda e: (e[0], e[1], e[2]))
        if t > ticks + EPS:
            return x, order
        if kind == 0:  # a local step, on the batch of the tick it completes in
            xb, yb = batch(math.ceil(t - EPS) - 1, k)
            ((models[k](xb) - yb) ** 2).mean().backward()
            inner[k].step()
            inner[k].zero_grad(set_to_none=True)
            done[k] += 1
        else:  # the arrival, then the pull
            mine = [p.detach().double() for p in models[k].parameters()]
            outer_step(x, [a - b for a, b in zip(pulled[k], mine)])
            with torch.no_grad():
                for p, xi in zip(models[k].parameters(), x):
                    p.copy_(xi)
            pulled[k] = [t.clone() for t in x]
            start[k], done[k] = t + message, 0
            order.append(k)


def nesterov(lr: float, beta: float):
    """Nesterov SGD without dampening, written out: m <- beta m + g; x <- x − lr (g + beta m)."""
    state = {}

    def step(x, g):
        for i, (xi, gi) in enumerate(zip(x, g)):
            m = state[i] = beta * state.get(i, torch.zeros_like(gi)) + gi
            xi.sub_(lr * (gi + beta * m))

    return step


def delayed_nesterov(lr: float, beta: float, N: int, c: float):
    """Liu et al. 2024's delayed Nesterov, written out from its formulas (see DelayedNesterov's doc)."""
    m, d, t = {}, {}, [0]

    def step(x, g):
        t[0] += 1
        for i, (xi, gi) in enumerate(zip(x, g)):
            d[i] = d.get(i, torch.zeros_like(gi)) + gi
            m.setdefault(i, torch.zeros_like(gi))
            if t[0] % N == 0:
                m[i] = beta * m[i] + d[i] / N
                xi.sub_(lr * ((1 - c * N + c) * beta * m[i] + gi / N))
                d[i] = torch.zeros_like(gi)
            else:
                xi.sub_(lr * (c * beta * m[i] + gi / N))

    return step


# ----------------------------------------------------------------------------- the clock


@pytest.mark.parametrize("speeds,message,extra,outer", [
    ([1.0, 1.5, 2.2], 0.0, [], nesterov(0.7, 0.9)),
    ([1.3, 1.3, 2.6], 0.7, [], nesterov(0.7, 0.9)),  # equal speeds: ties broken by the worker index
    ([1.0, 1.7, 3.1], 1.4, ["method.dynamic_local_updates=true"], nesterov(0.7, 0.9)),
    ([1.0, 1.5, 2.2], 0.3, ["method.nesterov_every=3", "method.momentum_activation=0.2"],
     delayed_nesterov(0.7, 0.9, 3, 0.2)),
])
def test_ticks_equal_the_algorithm_simulated_event_by_event(speeds, message, extra, outer):
    """The stacked ticks (every worker computes every tick, the idle rows given back) and the arrivals at
    the ends of the ticks give the global model of a plain event-by-event simulation with one model per
    worker, arrival order, staleness and the inner momentum included."""
    K, H, ticks = 3, 3, 23
    method = async_method(K, f"H={H}", *extra, speeds=speeds, message_s=message * min(speeds))
    order = []
    arrive = method._arrive
    method._arrive = lambda w, o, k, at: (order.append(k), arrive(w, o, k, at))[1]
    run_ticks(method, K, H, ticks)
    u = [s / min(speeds) for s in speeds]
    x, expected = reference(K, H, ticks, u, message, outer, dynamic="method.dynamic_local_updates=true" in extra)
    assert order == expected and len(order) >= 5
    for a, b in zip(method.anchor, x):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_arrival_order_and_staleness_follow_the_modelled_clock():
    """Speeds 1 and 1.5, H = 2, free messages: worker 0 arrives at 2, 4, 6, 8, worker 1 at 3, 6, 9 (after
    worker 0 at 6: the lower index); each arrival's staleness is the updates since its worker's pull."""
    method = async_method(2, "H=2", speeds=[1.0, 1.5])
    log = []
    arrive = method._arrive
    method._arrive = lambda w, o, k, at: (log.append((at, k, method.version - method.rounds[k].version)),
                                          arrive(w, o, k, at))[1]
    run_ticks(method, 2, 2, 9)
    assert log == [(2.0, 0, 0), (3.0, 1, 1), (4.0, 0, 1), (6.0, 0, 0), (6.0, 1, 2), (8.0, 0, 1), (9.0, 1, 1)]
    assert method.record() == {"arrivals": 7, "staleness_mean": 6 / 7, "staleness_max": 2}
    assert method.record()["arrivals"] == 0  # the interval starts over


def test_idle_rows_are_given_back():
    """Speeds 1 and 2: worker 1's first step completes at 2, in tick 1, so in tick 0 it computes a step that
    is thrown away: its parameters and its inner momentum are what they were, worker 0's moved."""
    method = async_method(2, "H=4", speeds=[1.0, 2.0])
    assert method.stepped() == []  # before start: no workers yet
    initial = [p.detach().clone() for p in make_model().parameters()]
    workers = StackedWorkers(make_model(), 2, StackedComm(2))
    optimizer = torch.optim.SGD(workers.params, lr=INNER_LR, momentum=0.5)
    method.start(workers, optimizer)
    assert method.stepped() == [True, False]
    xs, ys = zip(*(batch(0, k) for k in range(2)))
    ((workers.forward(torch.stack(xs)) - torch.stack(ys)) ** 2).mean((1, 2)).sum().backward()
    optimizer.step()
    method.syncs_after(Now(epoch=0, period=1, H=4, step=1))
    method.sync(workers, optimizer, INNER_LR)
    assert all(torch.equal(p.detach()[1], x) for p, x in zip(workers.params, initial))
    assert not any(torch.equal(p.detach()[0], x) for p, x in zip(workers.params, initial))
    assert all(not optimizer.state[p]["momentum_buffer"][1].any() for p in workers.params)
    assert method.stepped() == [True, True] and [r.done for r in method.rounds] == [1, 0]


def test_dynamic_local_updates_scale_each_workers_h_by_its_speed():
    assert local_steps(8, [1.0, 2.0, 3.0, 1.0], dynamic=True) == [8, 4, 2, 8]
    assert local_steps(8, [0.5, 2.0, 9.0], dynamic=True) == [8, 2, 1]  # at least one step
    assert local_steps(8, [1.0, 2.0], dynamic=False) == [8, 8]


# ----------------------------------------------------------------------------- delayed Nesterov


@pytest.mark.parametrize("N,c", [(1, 0.0), (2, 0.0), (3, 0.2), (4, 0.25)])
def test_delayed_nesterov_follows_its_formulas(N, c):
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(9)]
    x = torch.zeros(3, dtype=torch.float64)
    opt = DelayedNesterov([x], lr=0.7, momentum=0.9, every=N, activation=c)
    ref, step = [torch.zeros(3, dtype=torch.float64)], delayed_nesterov(0.7, 0.9, N, c)
    for g in grads:
        x.grad = g.clone()
        opt.step()
        step(ref, [g])
        torch.testing.assert_close(x, ref[0], atol=1e-12, rtol=0)


def test_delayed_nesterov_with_n1_is_torchs_nesterov_sgd():
    gen = torch.Generator().manual_seed(5)
    a, b = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    mine, torchs = DelayedNesterov([a], 0.7, 0.9, 1), torch.optim.SGD([b], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(5):
        g = torch.randn(4, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        torchs.step()
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- identities, end to end

SMALL = ["scheduler=constant", "epochs=2"]


def final_model(cfg):
    trainer = build_trainer(cfg, torch.device("cpu"))
    trainer.fit()
    return trainer, trainer.method.global_model(trainer.workers)


def test_one_worker_at_no_network_cost_is_diloco_step_for_step():
    """K = 1, N = 1, free messages: the worker's round ends, its Δ lands and it pulls within the tick of its
    H-th step, so every step is DiLoCo's (the same batch, lr, inner state and outer Nesterov step)."""
    sync, x_sync = final_model(compose_cfg("method=diloco", "K=1", "H=4", *SMALL))
    asyn, x_async = final_model(compose_cfg("method=async_diloco", "K=1", "H=4", "method.blocking_comm=false", *SMALL))
    for name in x_sync:
        torch.testing.assert_close(x_async[name], x_sync[name], atol=1e-6, rtol=0)
    assert asyn.state.history[-1]["val_loss"] == pytest.approx(sync.state.history[-1]["val_loss"], abs=1e-5)
    assert sum(r["arrivals"] for r in asyn.state.history) == sync.ledger.rounds_total


def test_first_round_of_equal_workers_is_localsgds_sync_at_outer_lr_over_k():
    """K equal workers with free messages arrive together after H steps; with an outer SGD of lr 1/K the K
    arrivals, each Δ_k from the same x, add up to x − mean_k Δ_k = x̄: LocalSGD's first sync."""
    K, H = 4, 3
    common = [f"K={K}", f"H={H}", f"max_steps={H}", "optimizer.momentum=0", "weight_decay=0", "scheduler=constant"]
    _, x_sync = final_model(compose_cfg("method=localsgd", *common))
    asyn, x_async = final_model(compose_cfg("method=async_localsgd", f"method.outer.lr={1 / K}",
                                            "method.blocking_comm=false", *common))
    for name in x_sync:
        torch.testing.assert_close(x_async[name], x_sync[name], atol=1e-6, rtol=0)
    assert asyn.state.history[-1]["arrivals"] == K
    assert asyn.state.history[-1]["staleness_mean"] == (K - 1) / 2


@pytest.mark.slow  # ~11 s; the stacked step's identity is tests/test_workers.py's, on the workers' function
def test_loop_and_vmap_give_the_same_run():
    """To float tolerance (vmap's batched kernels sum in another order), with an inner SGD: AdamW's division by
    the root of its second moment magnifies those last bits on a weight that has barely moved."""
    common = ["method=async_diloco", "optimizer=sgdm", "K=3", "H=3", "clock.speed=lognormal", "clock.spread=0.4",
              "network.bandwidth_gbps=1000", *SMALL]
    a, xa = final_model(compose_cfg(*common, "engine.simulate=loop"))
    b, xb = final_model(compose_cfg(*common, "engine.simulate=vmap"))
    for name in xa:
        torch.testing.assert_close(xa[name], xb[name], atol=1e-5, rtol=1e-4)
    assert [r["arrivals"] for r in a.state.history] == [r["arrivals"] for r in b.state.history]


def test_records_count_only_the_workers_that_stepped_and_the_ticks_as_time():
    trainer, _ = final_model(compose_cfg("method=async_diloco", "K=3", "H=2", "clock.speed=slow",
                                         "clock.slow_fraction=0.34", "clock.slow_factor=3",
                                         "network.bandwidth_gbps=1000", *SMALL))
    history = trainer.state.history
    steps = history[-1]["step"]
    assert history[-1]["samples_total"] < 3 * steps * 32  # the slow worker stepped every third tick
    # every tick the fastest worker's step: its samples' cost at its factor (1), the last short batch's too
    assert trainer.ledger.step_factor == 1.0
    per_worker = trainer.shards.shape[1] * trainer.epochs  # every tick's batch, whole epochs
    assert per_worker % 32  # (a last, shorter batch per epoch)
    assert history[-1]["modelled_time_s"] == pytest.approx(per_worker * trainer.ledger.sample_cost_s, rel=1e-9)
    assert sum(r["arrivals"] for r in history) > 0 and history[-1]["comm_bytes"] > 0


@pytest.mark.slow  # ~15 s: two runs through python -m dpl; the identity itself is the test above
def test_one_worker_async_and_diloco_through_the_cli(tmp_path):
    args = [*TINY, "K=1", "H=4", "epochs=1", "scheduler=constant"]
    weights = []
    for name, extra in (("diloco", ["method=diloco"]), ("async", ["method=async_diloco", "method.blocking_comm=false"])):
        proc = run_cli(tmp_path, [*args, *extra, f"hydra.run.dir={tmp_path / name}"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        weights.append(checkpoint.load(tmp_path / name)["model"])
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-6, rtol=0)


def test_a_tick_with_no_worker_due_computes_nothing_and_changes_no_number():
    """In most ticks of this run both workers wait (their messages take longer than a step): the loop then
    computes nothing (LocalStep.idle), and the run is the run that computed those ticks and threw them away."""
    ov = ("method=async_diloco", "K=2", "H=2", "clock.speed=lognormal", "epochs=1")
    skipping, computing = (build_trainer(compose_cfg(*ov), torch.device("cpu")) for _ in range(2))
    idle, calls = skipping.local_step.idle, []
    skipping.local_step.idle = lambda *args: (calls.append(args[1]), idle(*args))[1]
    computing.local_step.idle = computing.local_step  # the full step, its rows given back by the method
    for t in (skipping, computing):
        t.fit()
    assert 0 < len(calls) < skipping.total_steps
    for a, b in zip(skipping.workers.params + skipping.method.anchor, computing.workers.params + computing.method.anchor):
        assert torch.equal(a, b)
    for ra, rb in zip(skipping.state.history, computing.state.history, strict=True):
        assert {k: v for k, v in ra.items() if k not in WALL_CLOCK_FIELDS} == \
            {k: v for k, v in rb.items() if k not in WALL_CLOCK_FIELDS}


def test_an_interval_in_which_no_worker_stepped_records_no_training_loss():
    """H = 1 on a 10 Gb/s network: a round is one step then six ticks on the network each way, so the second
    epoch's four ticks hold no step of either worker: its training metrics are nan (no sample), not 0, and the
    run goes on (a nan from no samples is not a divergence)."""
    trainer = build_trainer(compose_cfg("method=async_diloco", "K=2", "H=1", "clock.speed=slow", "clock.slow_fraction=0.5",
                                        "clock.slow_factor=3", "dataset.num_train=512", "batch_size=64", "epochs=2",
                                        "clock.sample_cost_us=1.3", "network.bandwidth_gbps=10"), torch.device("cpu"))
    trainer.fit()
    first, second = trainer.state.history
    assert first["train_loss"] > 0 and math.isnan(second["train_loss"]) and math.isnan(second["train_acc"])
    assert second["samples_total"] == first["samples_total"] and math.isfinite(second["val_loss"])


def test_resume_mid_flight_is_exact(make_cfg, tmp_path, monkeypatch):
    """Stopped between ticks with rounds half done, idle rows kept aside and arrivals pending."""
    assert_resume_is_exact(make_cfg, ["method=async_diloco", "K=3", "H=3", "clock.speed=lognormal",
                                      "network.bandwidth_gbps=1000", "checkpoint_every=5",
                                      "method.nesterov_every=2"], tmp_path, monkeypatch, stop_at=11)


@pytest.mark.parametrize("overrides,message", [
    (["method.nesterov_every=0"], "method.nesterov_every=0 is invalid"),
    (["method.nesterov_every=2", "method.momentum_activation=0.6"], "method.momentum_activation=0.6 is invalid"),
    (["method.nesterov_every=2", "method.outer.name=adam"], "method.outer.name='adam' is invalid"),
    (["compression=int8"], "compression=int8 is invalid with method=async_diloco"),
    (["faults.drop_prob=0.1"], "faults.drop_prob=0.1 is invalid with method=async_diloco"),
    (["sync_at_epoch_end=true"], "sync_at_epoch_end=true is invalid with method=async_diloco"),
    (["local_momentum=average"], "local_momentum=average is invalid with method=async_diloco"),
    (["clock.device=measured"], "clock.device=measured is invalid with method=async_diloco"),
])
def test_bad_values_fail_at_startup_in_one_line(overrides, message):
    from dpl.config.validate import validate

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")) as e:
        validate(compose_cfg("method=async_diloco", *overrides))
    assert "\n" not in str(e.value)
