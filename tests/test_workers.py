"""Stacked workers: per-worker gradients, averaging of parameters and buffers."""

from __future__ import annotations

import torch
from torch import nn

from dpl.engine.workers import LocalComm, StackedWorkers
from dpl.models import LeNet5


def test_each_slice_gets_its_own_workers_gradient():
    torch.manual_seed(0)
    model = LeNet5(3, 10, 32)
    workers = StackedWorkers(model, 3, LocalComm(3))
    x, y = torch.randn(3, 4, 3, 32, 32), torch.randint(0, 10, (3, 4))
    workers.forward_backward(x, y)
    for k in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[k]), y[k]).backward()
        for p, ref in zip(workers.params, model.parameters()):
            torch.testing.assert_close(p.grad[k], ref.grad, atol=1e-6, rtol=1e-5)


class TinyBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_buffers_are_per_worker_and_averaged_at_sync():
    workers = StackedWorkers(TinyBN(), 2, LocalComm(2), mode="loop")
    x = torch.stack([torch.randn(8, 3, 6, 6), 3 + 2 * torch.randn(8, 3, 6, 6)])
    workers.forward_backward(x, torch.randint(0, 5, (2, 8)))
    mean, var = workers.buffers[0], workers.buffers[1]
    assert not torch.allclose(mean[0], mean[1])  # each worker tracked its own statistics
    expected = mean.mean(0)
    workers.average_params_()
    torch.testing.assert_close(mean[0], expected)
    torch.testing.assert_close(mean[1], expected)
    assert torch.equal(var[0], var[1])


def test_average_grads_makes_every_worker_step_alike():
    workers = StackedWorkers(LeNet5(3, 10, 32), 4, LocalComm(4))
    workers.forward_backward(torch.randn(4, 2, 3, 32, 32), torch.randint(0, 10, (4, 2)))
    expected = [p.grad.mean(0) for p in workers.params]
    workers.average_grads_()
    for p, e in zip(workers.params, expected):
        for k in range(4):
            torch.testing.assert_close(p.grad[k], e)


def test_replica_roundtrip_and_pretrained_load():
    model = LeNet5(1, 10, 28)
    workers = StackedWorkers(model, 2, LocalComm(2))
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    workers.load_replica_(state)
    for k in (0, 1):
        for name, t in workers.replica(k).items():
            assert torch.equal(t, state[name])
