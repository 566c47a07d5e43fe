"""Identities between methods that must hold exactly (to float tolerance)."""

from __future__ import annotations

import math

import pytest
import torch

from dpl.build import build_trainer
from dpl.methods import METHODS, Method
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


def test_localsgd_with_one_worker_equals_centralized(make_cfg):
    central = train(make_cfg("method=centralized", "K=1"))
    local = train(make_cfg("method=localsgd", "K=1", "H=4"))
    assert_params_close(params(central), params(local), atol=0)
    assert central.state.history[-1]["val_acc"] == local.state.history[-1]["val_acc"]


def test_localsgd_h1_plain_sgd_equals_synchronous_sgd(make_cfg):
    central = train(make_cfg("method=centralized", "K=4", *PLAIN_SGD), epochs=1)
    local = train(make_cfg("method=localsgd", "K=4", "H=1", *PLAIN_SGD), epochs=1)
    assert_params_close(params(central), params(local))
    # and synchronous workers never drift apart
    p = params(central)[0]
    assert torch.equal(p[0], p[3])


def test_slowmo_beta0_alpha1_equals_localsgd(make_cfg):
    local = train(make_cfg("method=localsgd", "K=2", "H=3"), epochs=1)
    slow = train(make_cfg("method=slowmo", "method.beta=0", "method.alpha=1", "K=2", "H=3"), epochs=1)
    assert_params_close(params(local), params(slow), atol=1e-5)


def test_slowmo_momentum_changes_the_trajectory(make_cfg):
    local = train(make_cfg("method=localsgd", "K=2", "H=3"), epochs=1)
    slow = train(make_cfg("method=slowmo", "method.beta=0.6", "K=2", "H=3"), epochs=1)
    assert max((a - b).abs().max().item() for a, b in zip(params(local), params(slow))) > 1e-4


def _momentum_after_sync(make_cfg, mode):
    trainer = build_trainer(make_cfg("method=localsgd", "K=2", "H=4", f"local_momentum={mode}"), torch.device("cpu"))
    trainer.cfg.epochs = 1
    trainer.fit()
    p = trainer.workers.params[0]
    return trainer.optimizer.state.get(p, {}).get("momentum_buffer")


def test_local_momentum_modes(make_cfg):
    keep = _momentum_after_sync(make_cfg, "keep")
    assert keep is not None and not torch.allclose(keep[0], keep[1])  # each worker its own
    avg = _momentum_after_sync(make_cfg, "average")
    torch.testing.assert_close(avg[0], avg[1], atol=0, rtol=0)
    assert _momentum_after_sync(make_cfg, "reset") is None  # cleared at the last sync


def test_vmap_and_loop_give_equal_results(make_cfg):
    loop = train(make_cfg("method=localsgd", "K=3", "H=2", "engine.simulate=loop"), epochs=1)
    vmap = train(make_cfg("method=localsgd", "K=3", "H=2", "engine.simulate=vmap"), epochs=1)
    assert_params_close(params(loop), params(vmap), atol=1e-5)


def test_workers_start_from_identical_weights(make_cfg):
    trainer = build_trainer(make_cfg("method=localsgd", "K=4"), torch.device("cpu"))
    for p in trainer.workers.params:
        assert all(torch.equal(p[0], p[k]) for k in range(4))


def test_sync_counts_and_epoch_end_sync(make_cfg):
    # 900 train images / K=2 -> 450 per worker, batch 32 -> 15 steps; H=4 -> syncs at 4, 8, 12, 15
    trainer = train(make_cfg("method=localsgd", "K=2", "H=4"), epochs=1)
    rec = trainer.state.history[0]
    assert rec["sync_rounds"] == 4 and rec["H"] == 4
    p = trainer.workers.params[0]
    assert torch.equal(p[0], p[1])  # validation saw the averaged model


# ----------------------------------------------------------------------------- outer optimizers


class PlainAveraging(Method):
    """LocalSGD as dpl computed it before the outer step existed: x_k <- mean_j x_j."""

    has_local_steps = True

    def syncs_after(self, epoch, period, H, last_step):
        return period == H or last_step

    def sync(self, workers, optimizer, lr):
        workers.average_params_()


def test_localsgd_through_the_outer_sgd_equals_plain_averaging_bit_for_bit(make_cfg, monkeypatch):
    outer = train(make_cfg("method=localsgd", "K=3", "H=3", "epochs=2"))
    monkeypatch.setitem(METHODS, "localsgd", PlainAveraging)
    plain = train(make_cfg("method=localsgd", "K=3", "H=3", "epochs=2"))
    assert_params_close(params(outer), params(plain), atol=0)
    timing = {"epoch_time_s", "samples_per_s", "modelled_time_s", "compute_time_s"}  # wall clock differs, nothing else may
    assert [{k: v for k, v in r.items() if k not in timing} for r in outer.state.history] == \
        [{k: v for k, v in r.items() if k not in timing} for r in plain.state.history]


def test_diloco_with_outer_lr_1_and_no_momentum_equals_localsgd(make_cfg):
    """Same inner AdamW; outer SGD lr 1 without momentum is plain averaging."""
    local = train(make_cfg("method=localsgd", "optimizer=adamw", "K=2", "H=4"), epochs=1)
    diloco = train(make_cfg("method=diloco", "method.outer_lr=1.0", "method.outer_momentum=0.0", "K=2", "H=4"),
                   epochs=1)
    assert diloco.cfg.optimizer.name == "adamw"  # method=diloco brings the paper's inner optimizer
    assert_params_close(params(local), params(diloco), atol=0)


def test_diloco_outer_step_is_nesterov_sgd_on_the_pseudo_gradient(make_cfg):
    """Two syncs by hand: Δ = x − x̄ (sign: from the average back to the anchor), then
    Nesterov SGD with the paper's lr 0.7 and momentum 0.9: b ← 0.9 b + Δ; x ← x − 0.7 (Δ + 0.9 b)."""
    trainer = build_trainer(make_cfg("method=diloco", "K=2", "H=2"), torch.device("cpu"))
    workers, method = trainer.workers, trainer.method
    x = [a.clone() for a in method.anchor]
    buf = None
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        with torch.no_grad():  # the workers moved apart during their local steps
            for p in workers.params:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        mean = [p.detach().double().mean(0) for p in workers.params]
        method.sync(workers, trainer.optimizer, lr=1e-3)
        delta = [xi - m for xi, m in zip(x, mean)]
        buf = delta if buf is None else [0.9 * b + d for b, d in zip(buf, delta)]
        x = [xi - 0.7 * (d + 0.9 * b) for xi, d, b in zip(x, delta, buf)]
        for a, e, p in zip(method.anchor, x, workers.params):
            torch.testing.assert_close(a, e, rtol=0, atol=1e-6)
            assert torch.equal(p[0], p[1]) and torch.equal(p[0], a.float())  # every worker restarts from x


def test_post_local_is_synchronous_before_the_switch_and_local_after(make_cfg):
    post = train(make_cfg("method=post_local", "method.switch_epoch=1", "K=2", "H=4", *PLAIN_SGD), epochs=2)
    central = train(make_cfg("method=centralized", "K=2", *PLAIN_SGD), epochs=1)
    first, second = post.state.history
    # epoch 0 is synchronous SGD exactly (the same gradient all-reduce every step)
    assert first["val_acc"] == central.state.history[0]["val_acc"]
    assert first["train_loss"] == central.state.history[0]["train_loss"]
    S = post.steps_per_epoch
    assert first["sync_rounds"] == S and second["sync_rounds"] == math.ceil(S / 4)
    assert first["drift"] == 0.0 and second["drift"] > 0.0
    bytes_per_round = first["comm_bytes"] / S
    assert second["comm_bytes"] == pytest.approx(bytes_per_round * math.ceil(S / 4))  # same replica size
    assert second["sync_rounds_total"] == S + math.ceil(S / 4)


def test_post_local_resumes_exactly_across_the_switch(make_cfg, tmp_path, monkeypatch):
    """Interrupted in epoch 1 (the first local epoch), resumed from its checkpoint at step 16."""
    overrides = ["method=post_local", "method.switch_epoch=1", "K=2", "H=4", "epochs=3", "checkpoint_every=4"]
    assert_resume_is_exact(make_cfg, overrides, tmp_path, monkeypatch, stop_at=18)


def test_every_method_declares_how_it_communicates():
    for name, cls in METHODS.items():
        assert cls.name == name
        assert cls.synchronous or cls.has_local_steps, name  # it communicates somehow
        assert not (cls.synchronous and cls.has_local_steps), name  # DDP only for all-synchronous runs
