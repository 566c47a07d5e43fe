"""The [limit] baseline runs the workers' real step on pre-made tensors (eager on CPU)."""

from __future__ import annotations

import torch

from dpl.app import build_trainer
from dpl.bench import limit_fn
from tests.conftest import compose_cfg


def test_limit_baseline_trains_the_stacked_workers_on_cpu():
    t = build_trainer(compose_cfg("K=2", "method=localsgd", "precision=bf16"), torch.device("cpu"))
    before = [p.detach().clone() for p in t.workers.params]
    step = limit_fn(t, 8)
    step()
    step()
    assert all(not torch.equal(a, p) for a, p in zip(before, t.workers.params))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in t.workers.params)
