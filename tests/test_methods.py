"""Identities between methods that must hold exactly (to float tolerance)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from dpl.comm.stacked import StackedComm
from dpl.core.loop import WALL_CLOCK_FIELDS
from dpl.core.methods import METHODS, build_method
from dpl.core.methods.base import Method, Now
from dpl.core.methods.outer import OuterStep
from dpl.core.workers import StackedWorkers
from dpl.run.build import build_trainer
from tests.conftest import compose_cfg
from tests.resume import assert_resume_is_exact


def train(cfg, epochs: int | None = None):
    if epochs is not None:
        cfg.epochs = epochs
    trainer = build_trainer(cfg, torch.device("cpu"))
    trainer.fit()
    return trainer


def params(trainer):
    return [p.detach().clone() for p in trainer.workers.params]


def assert_params_close(a, b, atol=1e-6):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


PLAIN_SGD = ["optimizer.momentum=0", "weight_decay=0", "scheduler=constant"]


def test_one_worker_localsgd_sync_and_centralized_gradient_hook_change_nothing():
    """K=1: LocalSGD's sync gives back the worker's weights bit for bit (x − (x − x_0) = x_0 in
    float64) and centralized's gradient average leaves the gradients as they are, so with the
    same steps in between the two methods train alike (end to end: the slow test below)."""
    workers = tiny_workers(K=1)
    optimizer = torch.optim.SGD(workers.params, lr=INNER_LR, momentum=0.9)
    local = method_of("method=localsgd", "K=1")
    local.start(workers)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        move_apart(workers, gen)
        before = [p.detach().clone() for p in workers.params]
        local.sync(workers, optimizer, INNER_LR)
        assert all(torch.equal(a, b) for a, b in zip(before, workers.params))
    for p in workers.params:
        p.grad = torch.randn(p.shape, generator=gen)
    grads = [p.grad.clone() for p in workers.params]
    method_of("method=centralized", "K=1").on_gradients(workers, 0)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, workers.params))
    assert workers.point.take().syncs == 3  # two syncs and one synchronous round, each counted


def test_localsgd_h1_with_plain_sgd_is_a_step_on_the_mean_gradient():
    """H=1 with plain SGD: averaging x_k − γ g_k over the workers is x − γ mean_k g_k, the
    synchronous step (equal x_k before the step), up to float rounding; the end-to-end run of
    both methods is the slow test below."""
    def step(average_grads: bool):
        workers = tiny_workers(K=4)
        optimizer = torch.optim.SGD(workers.params, lr=INNER_LR)
        gen = torch.Generator().manual_seed(3)
        for p in workers.params:
            p.grad = torch.randn(p.shape, generator=gen)
        method = method_of("method=centralized" if average_grads else "method=localsgd", "K=4", "H=1")
        method.start(workers)
        method.on_gradients(workers, 0)
        optimizer.step()
        if method.syncs_after(Now(epoch=0, period=1, H=1, step=1)):
            method.sync(workers, optimizer, INNER_LR)
        return [p.detach().clone() for p in workers.params]

    synchronous, local = step(average_grads=True), step(average_grads=False)
    assert_params_close(synchronous, local, atol=1e-6)
    assert all(torch.equal(p[0], p[3]) for p in synchronous)  # synchronous workers never drift apart


@pytest.mark.slow
def test_localsgd_with_one_worker_equals_centralized(make_cfg):
    central = train(make_cfg("method=centralized", "K=1"))
    local = train(make_cfg("method=localsgd", "K=1", "H=4"))
    assert_params_close(params(central), params(local), atol=0)
    assert central.state.history[-1]["val_acc"] == local.state.history[-1]["val_acc"]


@pytest.mark.slow
def test_localsgd_h1_plain_sgd_equals_synchronous_sgd(make_cfg):
    central = train(make_cfg("method=centralized", "K=4", *PLAIN_SGD), epochs=1)
    local = train(make_cfg("method=localsgd", "K=4", "H=1", *PLAIN_SGD), epochs=1)
    assert_params_close(params(central), params(local))
    # and synchronous workers never drift apart
    p = params(central)[0]
    assert torch.equal(p[0], p[3])


@pytest.mark.slow
def test_slowmo_momentum0_lr1_equals_localsgd_end_to_end(make_cfg):
    local = train(make_cfg("method=localsgd", "K=2", "H=3"), epochs=1)
    slow = train(make_cfg("method=slowmo", "method.outer.momentum=0", "method.outer.lr=1", "K=2", "H=3"), epochs=1)
    assert_params_close(params(local), params(slow), atol=1e-5)


def _momentum_after_sync(mode):
    """The inner SGD momentum of 2 workers after one step on their own gradients and a LocalSGD sync."""
    workers = tiny_workers(K=2)
    optimizer = torch.optim.SGD(workers.params, lr=INNER_LR, momentum=0.9)
    gen = torch.Generator().manual_seed(4)
    for p in workers.params:
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    method = build_method(compose_cfg("method=localsgd").method, mode)
    method.start(workers)
    method.sync(workers, optimizer, INNER_LR)
    return optimizer.state.get(workers.params[0], {}).get("momentum_buffer"), workers.point.take()


def test_local_momentum_modes():
    keep, traffic = _momentum_after_sync("keep")
    assert keep is not None and not torch.allclose(keep[0], keep[1])  # each worker its own
    assert traffic.collectives == 1
    avg, traffic = _momentum_after_sync("average")
    torch.testing.assert_close(avg[0], avg[1], atol=0, rtol=0)
    assert (traffic.syncs, traffic.collectives) == (1, 2)  # the state's all-reduce is counted, not a round
    assert _momentum_after_sync("reset")[0] is None  # cleared at the sync


@pytest.mark.slow  # the same identity on the workers' function: tests/test_workers.py, twenty steps in float64
def test_vmap_and_loop_give_equal_results(make_cfg):
    loop = train(make_cfg("method=localsgd", "K=3", "H=2", "engine.simulate=loop"), epochs=1)
    vmap = train(make_cfg("method=localsgd", "K=3", "H=2", "engine.simulate=vmap"), epochs=1)
    assert_params_close(params(loop), params(vmap), atol=1e-5)


def test_workers_start_from_identical_weights(make_cfg):
    trainer = build_trainer(make_cfg("method=localsgd", "K=4"), torch.device("cpu"))
    for p in trainer.workers.params:
        assert all(torch.equal(p[0], p[k]) for k in range(4))


def test_sync_counts_and_epoch_end_sync(make_cfg):
    # 900 train images / K=2 -> 450 per worker, batch 32 -> 15 steps; H=4 -> syncs at 4, 8, 12 (the papers)
    trainer = train(make_cfg("method=localsgd", "K=2", "H=4"), epochs=1)
    rec = trainer.state.history[0]
    assert rec["sync_rounds"] == rec["syncs"] == 3 and rec["H"] == 4
    p = trainer.workers.params[0]
    assert not torch.equal(p[0], p[1])  # 3 steps since the last sync: validation left the workers apart
    # the study's code: and at 15, the epoch's end
    trainer = train(make_cfg("method=localsgd", "K=2", "H=4", "sync_at_epoch_end=true"), epochs=1)
    rec = trainer.state.history[0]
    assert rec["sync_rounds"] == rec["syncs"] == 4
    p = trainer.workers.params[0]
    assert torch.equal(p[0], p[1])


# ----------------------------------------------------------------------------- outer optimizers


# The identities of the outer step, on the sync itself: K workers of a tiny model, moved
# apart by a seeded perturbation (what their local steps would do), then method.sync.

INNER_LR = 0.05  # γ: SlowMo scales its outer step by it


def tiny_workers(K: int = 3) -> StackedWorkers:
    torch.manual_seed(0)
    return StackedWorkers(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)), K, StackedComm(K))


def move_apart(workers: StackedWorkers, gen: torch.Generator) -> None:
    """What local steps do to the workers: each moves its own way (a seeded perturbation)."""
    with torch.no_grad():
        for p in workers.params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)


def run_syncs(method: Method, syncs: int = 2, inner: str = "sgd", K: int = 3):
    """The workers' parameters after each of ``syncs`` syncs of ``method`` (and the method)."""
    workers = tiny_workers(K)
    optimizer = (torch.optim.AdamW if inner == "adamw" else torch.optim.SGD)(workers.params, lr=INNER_LR)
    method.start(workers)
    gen = torch.Generator().manual_seed(1)
    after = []
    for _ in range(syncs):
        move_apart(workers, gen)
        method.sync(workers, optimizer, INNER_LR)
        after.append([p.detach().clone() for p in workers.params])
    return after, method


def method_of(*overrides: str) -> Method:
    return build_method(compose_cfg(*overrides).method, "keep")


def pseudo_gradients(syncs: int = 2, K: int = 3) -> list[list[torch.Tensor]]:
    """Δ = x − x̄ (float64) at each sync of LocalSGD, whose x after a sync is x̄: the same Δ any
    outer optimizer sees at its first sync, and the Δ of later syncs where x stays x̄."""
    workers = tiny_workers(K)
    x = [p.detach()[0].double().clone() for p in workers.params]
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(syncs):
        move_apart(workers, gen)
        out.append([xi - p.detach().double().mean(0) for xi, p in zip(x, workers.params)])
    return out


def _by_hand_anchor(step, syncs: int = 2) -> list[torch.Tensor]:
    """x after ``syncs`` outer steps x ← step(x, Δ, t), Δ = x − x̄ recomputed from the workers."""
    workers = tiny_workers()
    x = [p.detach()[0].double().clone() for p in workers.params]
    state: dict = {}
    gen = torch.Generator().manual_seed(1)
    for t in range(1, syncs + 1):
        move_apart(workers, gen)
        # x̄ as the comm point computes it: the float32 mean (the anchor and Δ are float64)
        delta = [xi - p.detach().mean(0).double() for xi, p in zip(x, workers.params)]
        x = step(x, delta, t, state)
        with torch.no_grad():
            for xi, p in zip(x, workers.params):
                p.copy_(xi.expand_as(p))  # every worker restarts from x
    return x


class PlainAveraging(Method):
    """LocalSGD as dpl computed it before the outer step existed: x_k <- mean_j x_j."""

    def syncs_after(self, now):
        return self.period_ends(now)

    def sync(self, workers, optimizer, lr):
        workers.average_params_()
        return workers.drift


def test_localsgd_through_the_outer_sgd_equals_plain_averaging_bit_for_bit():
    outer, method = run_syncs(method_of("method=localsgd"), syncs=3)
    assert type(method) is OuterStep and isinstance(method.outer, torch.optim.SGD)
    plain, _ = run_syncs(PlainAveraging(None), syncs=3)
    for a, b in zip(outer, plain):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_slowmo_with_momentum_0_and_lr_1_equals_localsgd():
    """x − 1·γ·(Δ/γ) = x̄ up to the rounding of /γ and ·γ in float64."""
    local, _ = run_syncs(method_of("method=localsgd"))
    slow, _ = run_syncs(method_of("method=slowmo", "method.outer.momentum=0", "method.outer.lr=1"))
    for a, b in zip(local, slow):
        assert_params_close(a, b, atol=1e-7)


def test_slowmo_is_sgd_with_momentum_beta_lr_alpha_gamma_on_delta_over_gamma():
    """Wang et al. 2020, Alg. 1, lines 8-9: u ← β u + Δ/γ; x ← x − α γ u, by hand for two syncs."""
    alpha, beta = 1.5, 0.6

    def slowmo(x, delta, t, state):
        u = state["u"] = [beta * ui + d / INNER_LR for ui, d in zip(state.get("u", [0.0] * len(delta)), delta)]
        return [xi - alpha * INNER_LR * ui for xi, ui in zip(x, u)]

    _, method = run_syncs(method_of("method=slowmo", f"method.outer.lr={alpha}", f"method.outer.momentum={beta}"))
    for a, e in zip(method.anchor, _by_hand_anchor(slowmo)):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)
    _, moved = run_syncs(method_of("method=slowmo", "method.outer.momentum=0.6"))
    _, local = run_syncs(method_of("method=localsgd"))
    assert max((a - b).abs().max().item() for a, b in zip(moved.anchor, local.anchor)) > 1e-4


def test_diloco_with_outer_lr_1_and_no_momentum_equals_localsgd_with_the_same_inner_optimizer():
    """Same inner AdamW; outer SGD lr 1 without momentum (Nesterov on: with momentum 0 the plain
    step) is plain averaging."""
    local, _ = run_syncs(method_of("method=localsgd"), inner="adamw")
    diloco, method = run_syncs(method_of("method=diloco", "method.outer.lr=1.0", "method.outer.momentum=0.0"),
                               inner="adamw")
    assert method.cfg.outer.nesterov  # the preset's, kept
    for a, b in zip(local, diloco):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def _adam_step(lr, betas, eps, decoupled_wd=0.0):
    """Kingma & Ba 2015, Alg. 1 (with bias correction); AdamW's decay x ← x − lr·λ·x first
    (Loshchilov & Hutter 2019, Alg. 2)."""
    b1, b2 = betas

    def step(x, g, t, state):
        m = state["m"] = [b1 * mi + (1 - b1) * gi for mi, gi in zip(state.get("m", [0.0] * len(g)), g)]
        v = state["v"] = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(state.get("v", [0.0] * len(g)), g)]
        return [xi * (1 - lr * decoupled_wd) - lr * (mi / (1 - b1**t)) / ((vi / (1 - b2**t)).sqrt() + eps)
                for xi, mi, vi in zip(x, m, v)]

    return step


@pytest.mark.parametrize("name,wd", [("adam", 0.0), ("adamw", 0.1)])
def test_outer_adam_is_adam_on_the_pseudo_gradient(name, wd):
    lr, betas, eps = 0.02, (0.8, 0.99), 1e-8
    _, method = run_syncs(method_of("method=diloco", f"method.outer.name={name}", f"method.outer.lr={lr}",
                                    "method.outer.momentum=0", "method.outer.betas=[0.8,0.99]",
                                    f"method.outer.weight_decay={wd}"))
    assert type(method.outer) is (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)
    expected = _by_hand_anchor(_adam_step(lr, betas, eps, decoupled_wd=wd))
    for a, e in zip(method.anchor, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


def test_adamw_decay_is_decoupled_from_the_moments():
    """AdamW with weight decay: the same moments as without, and the anchor further scaled by
    (1 − lr·λ) at each step; with Adam's coupled decay the moments see λ x instead."""
    common = ["method=diloco", "method.outer.lr=0.02", "method.outer.momentum=0"]
    _, plain = run_syncs(method_of(*common, "method.outer.name=adamw"), syncs=1)
    _, decayed = run_syncs(method_of(*common, "method.outer.name=adamw", "method.outer.weight_decay=0.5"), syncs=1)
    _, coupled = run_syncs(method_of(*common, "method.outer.name=adam", "method.outer.weight_decay=0.5"), syncs=1)
    x0 = [p.detach()[0].double() for p in tiny_workers().params]
    for x, a, b in zip(x0, plain.anchor, decayed.anchor):
        torch.testing.assert_close(b, a - 0.02 * 0.5 * x, rtol=0, atol=1e-12)
    moments = lambda m: [s["exp_avg"] for s in m.outer.state.values()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(moments(plain), moments(decayed)))
    assert not all(torch.equal(a, b) for a, b in zip(moments(plain), moments(coupled)))


def test_an_outer_sgd_state_saved_before_method_outer_loads_unchanged():
    """DiLoCo's outer optimizer as the code before method.outer built it (torch SGD, lr 0.7,
    momentum 0.9, Nesterov): its state_dict loads into the new one, which then steps the same."""
    _, new = run_syncs(method_of("method=diloco"), syncs=1)
    anchor = [x.clone() for x in new.anchor]
    old = torch.optim.SGD(anchor, lr=0.7, momentum=0.9, nesterov=True)
    for x, buf in zip(anchor, (new.outer.state[x]["momentum_buffer"] for x in new.anchor)):
        old.state[x]["momentum_buffer"] = buf.clone()
    saved = {"anchor": anchor, "outer": old.state_dict(), "syncs": 1, "in_flight": {}}  # as checkpoint.upgrade gives it
    assert saved["outer"]["param_groups"] == new.state_dict()["outer"]["param_groups"]
    resumed = method_of("method=diloco")
    resumed.start(tiny_workers())
    resumed.load_state_dict(saved)
    for m in (new, resumed):
        for x in m.anchor:
            x.grad = torch.full_like(x, 0.01)
        m.outer.step()
    assert all(torch.equal(a, b) for a, b in zip(new.anchor, resumed.anchor))


@pytest.mark.slow
def test_localsgd_through_the_outer_sgd_equals_plain_averaging_end_to_end(make_cfg, monkeypatch):
    outer = train(make_cfg("method=localsgd", "K=3", "H=3", "epochs=2"))
    monkeypatch.setitem(METHODS, "localsgd", dataclasses.replace(METHODS["localsgd"], build=PlainAveraging))
    plain = train(make_cfg("method=localsgd", "K=3", "H=3", "epochs=2"))
    assert_params_close(params(outer), params(plain), atol=0)
    timing = WALL_CLOCK_FIELDS  # wall clock differs, nothing else may
    assert [{k: v for k, v in r.items() if k not in timing} for r in outer.state.history] == \
        [{k: v for k, v in r.items() if k not in timing} for r in plain.state.history]


@pytest.mark.slow
def test_diloco_with_outer_lr_1_and_no_momentum_equals_localsgd_end_to_end(make_cfg):
    """Same inner AdamW; outer SGD lr 1 without momentum is plain averaging."""
    local = train(make_cfg("method=localsgd", "optimizer=adamw", "K=2", "H=4"), epochs=1)
    diloco = train(make_cfg("method=diloco", "method.outer.lr=1.0", "method.outer.momentum=0.0", "K=2", "H=4"),
                   epochs=1)
    assert diloco.cfg.optimizer.name == "adamw"  # method=diloco brings the paper's inner optimizer
    assert_params_close(params(local), params(diloco), atol=0)


def test_diloco_outer_step_is_nesterov_sgd_on_the_pseudo_gradient():
    """Two syncs by hand: Δ = x − x̄ (sign: from the average back to the anchor), then
    Nesterov SGD with the paper's lr 0.7 and momentum 0.9: b ← 0.9 b + Δ; x ← x − 0.7 (Δ + 0.9 b)."""
    def nesterov(x, delta, t, state):
        buf = state["b"] = delta if t == 1 else [0.9 * b + d for b, d in zip(state["b"], delta)]
        return [xi - 0.7 * (d + 0.9 * b) for xi, d, b in zip(x, delta, buf)]

    after, method = run_syncs(method_of("method=diloco"))
    for a, e in zip(method.anchor, _by_hand_anchor(nesterov)):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)
    for a, p in zip(method.anchor, after[-1]):
        assert torch.equal(p[0], p[1]) and torch.equal(p[0], a.float())  # every worker restarts from x


def test_post_local_is_synchronous_before_the_switch_and_local_after(make_cfg):
    post = train(make_cfg("method=post_local", "method.switch_epoch=1", "K=2", "H=4", *PLAIN_SGD), epochs=2)
    central = train(make_cfg("method=centralized", "K=2", *PLAIN_SGD), epochs=1)
    first, second = post.state.history
    # epoch 0 is synchronous SGD exactly (the same gradient all-reduce every step)
    assert first["val_acc"] == central.state.history[0]["val_acc"]
    assert first["train_loss"] == central.state.history[0]["train_loss"]
    S = post.steps_per_epoch
    # the first local period starts with the switch: syncs every 4 steps of the run from there
    assert first["sync_rounds"] == S and second["sync_rounds"] == S // 4
    assert first["drift"] == 0.0 and second["drift"] > 0.0
    bytes_per_round = first["comm_bytes"] / S
    assert second["comm_bytes"] == pytest.approx(bytes_per_round * (S // 4))  # same replica size
    assert second["sync_rounds_total"] == S + S // 4


def test_post_local_resumes_exactly_across_the_switch(make_cfg, tmp_path, monkeypatch):
    """Interrupted in epoch 1 (the first local epoch), resumed from its checkpoint at step 16."""
    overrides = ["method=post_local", "method.switch_epoch=1", "K=2", "H=4", "epochs=3", "checkpoint_every=4"]
    assert_resume_is_exact(make_cfg, overrides, tmp_path, monkeypatch, stop_at=18)


def test_every_method_declares_how_it_communicates():
    for name, option in METHODS.items():
        # localsgd: OuterStep with its preset of method.outer; diloco: streaming DiLoCo with one fragment
        assert isinstance(build_method(compose_cfg(f"method={name}").method, "keep"), Method), name
        facts = option.facts
        assert facts.synchronous or facts.local_steps, name  # it communicates somehow
        assert not (facts.synchronous and facts.local_steps), name  # DDP only for all-synchronous runs
        assert facts.averages_gradients or not facts.synchronous, name
