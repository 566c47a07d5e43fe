"""Identities between methods that must hold exactly (to float tolerance)."""

from __future__ import annotations

import torch

from dpl.app import build_trainer


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
