"""Dropped workers (dpl.comm.drops, faults.drop_prob): the draw, the average over the workers
that arrived, and the two ends: p = 0 is today's run, p = 1 never moves the global model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpl.comm.codecs.feedback import ErrorFeedback
from dpl.comm.codecs.formats import Int8
from dpl.comm.drops import Drops
from dpl.comm.stacked import StackedComm
from dpl.config.validate import validate
from dpl.core.workers import StackedWorkers
from dpl.errors import ConfigError
from dpl.run.build import build_trainer
from tests.conftest import compose_cfg


def test_the_draw_is_a_pure_function_of_seed_sync_and_worker():
    drops = Drops(0.3, seed=5)
    assert torch.equal(drops.arrived(7, 8), Drops(0.3, seed=5).arrived(7, 8))
    assert not torch.equal(drops.arrived(7, 8), drops.arrived(8, 8)) or not torch.equal(
        drops.arrived(9, 8), drops.arrived(10, 8))
    assert torch.equal(drops.arrived(7, 4), drops.arrived(7, 8)[:4])  # worker k's draw does not depend on K
    share = torch.stack([drops.arrived(s, 16) for s in range(400)]).float().mean().item()
    assert share == pytest.approx(0.7, abs=0.03)
    assert Drops(0.0).arrived(3, 4) is None  # nothing drawn: today's path
    assert not Drops(1.0).arrived(3, 4).any()


def tiny_workers(K: int) -> StackedWorkers:
    torch.manual_seed(0)
    workers = StackedWorkers(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), K, StackedComm(K))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in workers.params:
            p.add_(torch.randn(p.shape, generator=gen))
    return workers


def _arrived_at(drops: Drops, K: int) -> tuple[int, torch.Tensor]:
    """A sync number whose draw drops some but not all of the K workers."""
    for sync in range(100):
        a = drops.arrived(sync, K)
        if 0 < int(a.sum()) < K:
            return sync, a
    raise AssertionError("no partial drop in 100 syncs")


def test_the_average_is_over_the_workers_that_arrived():
    workers = tiny_workers(K=4)
    workers.point.drops = Drops(0.5, seed=3)
    sync, arrived = _arrived_at(workers.point.drops, 4)
    anchor = [p.detach()[0].double().clone() for p in workers.params]
    result = workers.point.start_pseudo_gradient(anchor, workers.params, [], sync).wait()
    assert result.arrived == int(arrived.sum())
    for x, p, d in zip(anchor, workers.params, result.deltas):
        torch.testing.assert_close(d, x - p.detach()[arrived].double().mean(0), rtol=0, atol=1e-6)
    assert workers.point.take().dropped == 4 - int(arrived.sum())


def test_a_compressed_sync_decodes_the_arrived_payloads_and_a_dropped_worker_keeps_its_residual():
    workers = tiny_workers(K=4)
    workers.point.drops = Drops(0.5, seed=3)
    workers.point.codec = compression = ErrorFeedback(Int8(0))
    workers.point.start(workers.params)
    sync, arrived = _arrived_at(workers.point.drops, 4)
    anchor = [torch.zeros_like(p[0], dtype=torch.float64) for p in workers.params]
    result = workers.point.start_pseudo_gradient(anchor, workers.params, [], sync).wait()
    for p, d, e in zip(workers.params, result.deltas, compression.residuals):
        u = -p.detach().double()  # Δ_k = x − x_k with x = 0
        assert torch.equal(e[~arrived], u[~arrived])  # nothing of theirs was sent
        sent = u[arrived] - e[arrived]
        torch.testing.assert_close(d, sent.mean(0), rtol=0, atol=1e-12)


def _fit(make_cfg, *overrides):
    trainer = build_trainer(make_cfg(*overrides), torch.device("cpu"))
    start = [p.detach()[0].clone() for p in trainer.workers.params]
    trainer.fit()
    return trainer, start


@pytest.mark.parametrize("method", ["method=diloco", "method=streaming_diloco"])
def test_p0_is_todays_run_and_p1_never_moves_the_global_model(make_cfg, method):
    common = [method, "K=2", "H=4", "epochs=1"]
    today, _ = _fit(make_cfg, *common)
    p0, _ = _fit(make_cfg, *common, "faults.drop_prob=0")
    assert all(torch.equal(a, b) for a, b in zip(today.workers.params, p0.workers.params))
    assert today.state.history[0]["dropped"] == 0
    p1, start = _fit(make_cfg, *common, "faults.drop_prob=1")
    for x, x0 in zip(p1.method.anchor, start):  # every sync lost: the global model is the initial one
        assert torch.equal(x.float(), x0)
    rec = p1.state.history[0]
    assert rec["dropped"] == 2 * rec["sync_rounds"]  # both workers at every sync


def test_drops_on_a_method_without_local_syncs_fail_at_startup():
    with pytest.raises(ConfigError, match=r"faults.drop_prob=0.2 is invalid with method='centralized'"):
        validate(compose_cfg("method=centralized", "faults.drop_prob=0.2"))
    with pytest.raises(ConfigError, match=r"faults.drop_prob=1.5 is invalid"):
        validate(compose_cfg("method=diloco", "faults.drop_prob=1.5"))
