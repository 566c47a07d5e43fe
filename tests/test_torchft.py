"""dpl's local methods held to pytorch/torchft 0.2.0's own ``LocalSGD`` and ``DiLoCo`` (``torchft.local_sgd``).

torchft runs one replica per process under a ``Manager`` that all-reduces across replica groups. Here the
K replicas are K threads of this process, each with its own torchft wrapper, inner optimizer and a stand-in
manager whose all-reduce waits for all K contributions and gives each the mean (what torchft's manager
computes: a sum divided by the participants). dpl runs the same model, batches and inner optimizer as K
stacked workers; after every step each worker's parameters must equal its torchft replica's to float
rounding. Streaming runs under ``method.schedule=torchft`` (torchft's anchor for the delay).
"""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpl.comm.stacked import StackedComm
from dpl.core.methods import build_method
from dpl.core.methods.base import Now
from dpl.core.workers import StackedWorkers
from tests.conftest import compose_cfg

local_sgd = pytest.importorskip("torchft.local_sgd")

K, STEPS, BATCH = 2, 24, 4
OUTER = {"lr": 0.7, "momentum": 0.9, "nesterov": True}  # DiLoCo's outer step, dpl's preset
INNER_LR = 0.05


class _Group:
    """The K replicas' collective: the i-th all-reduce of every replica averages their i-th tensors."""

    def __init__(self, k: int) -> None:
        self.k, self.cond = k, threading.Condition()
        self.sent: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
        self.means: dict[int, torch.Tensor] = {}


class _Work:
    def __init__(self, group: _Group, seq: int, tensor: torch.Tensor) -> None:
        self.group, self.seq, self.tensor = group, seq, tensor

    def wait(self, timeout=None) -> bool:
        g = self.group
        with g.cond:
            if not g.cond.wait_for(lambda: len(g.sent[self.seq]) == g.k, timeout=60):
                raise TimeoutError(f"all-reduce {self.seq}: a replica never sent")
            if self.seq not in g.means:
                g.means[self.seq] = torch.stack([g.sent[self.seq][r] for r in range(g.k)]).sum(0) / g.k
        with torch.no_grad():
            self.tensor.copy_(g.means[self.seq])
        return True


class _Manager:
    """What torchft's LocalSGD and DiLoCo call on their Manager, for one replica of a fixed quorum."""

    _use_async_quorum = False

    def __init__(self, group: _Group, rank: int) -> None:
        self.group, self.rank, self.calls, self.step = group, rank, 0, 0

    def allreduce(self, tensor: torch.Tensor, should_quantize: bool = False) -> _Work:
        seq, self.calls = self.calls, self.calls + 1
        with self.group.cond:
            self.group.sent[seq][self.rank] = tensor.detach().clone()
            self.group.cond.notify_all()
        return _Work(self.group, seq, tensor)

    def should_commit(self) -> bool:
        self.step += 1
        return True

    def current_step(self) -> int:
        return self.step

    def start_quorum(self) -> None: ...
    def allow_state_dict_read(self) -> None: ...
    def disallow_state_dict_read(self) -> None: ...
    def register_state_dict_fn(self, *args) -> None: ...


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 4)).double()


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(STEPS, K, BATCH, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (STEPS, K, BATCH), generator=gen))


def _inner(params, name: str):
    return torch.optim.SGD(params, lr=INNER_LR, momentum=0.9) if name == "sgdm" else \
        torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def run_torchft(kind: str, H: int, inner: str, P: int = 1, delay: int = 0, alpha: float = 0.0,
                layers: list[list[int]] | None = None) -> list[list[list[torch.Tensor]]]:
    """Every replica's parameters after every step: [step][replica][tensor]."""
    x, y = _batches()
    group = _Group(K)
    seen: list[list] = [[None] * K for _ in range(STEPS)]
    errors: list[BaseException] = []
    models = [_model() for _ in range(K)]  # here, not in the threads: initialising draws from torch's global RNG

    def replica(rank: int) -> None:
        try:
            model = models[rank]
            opt = _inner(model.parameters(), inner)
            manager = _Manager(group, rank)
            if kind == "localsgd":
                wrapper = local_sgd.LocalSGD(manager, model, opt, sync_every=H)
            else:
                parts = [nn.ModuleList([model[j] for j in idx]) for idx in layers]
                outers = [torch.optim.SGD(p.parameters(), **OUTER) for p in parts]
                wrapper = local_sgd.DiLoCo(manager, parts, opt, outers, sync_every=H, fragment_sync_delay=delay,
                                           fragment_update_alpha=alpha)
            with wrapper:
                for t in range(STEPS):
                    opt.zero_grad()
                    F.cross_entropy(model(x[t, rank]), y[t, rank]).backward()
                    opt.step()  # torchft syncs in the optimizer's post-step hook
                    seen[t][rank] = [p.detach().clone() for p in model.parameters()]
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=replica, args=(r,)) for r in range(K)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return seen


def run_dpl(overrides: list[str], H: int, inner: str) -> tuple[list[list[list[torch.Tensor]]], list]:
    """dpl's method on K stacked workers: every worker's parameters after every step, and its fragments."""
    x, y = _batches()
    workers = StackedWorkers(_model(), K, StackedComm(K))
    opt = _inner(workers.params, inner)
    method = build_method(compose_cfg(*overrides, f"H={H}").method, "keep")
    method.start(workers)
    seen, period = [], 0
    for t in range(STEPS):
        opt.zero_grad()
        workers.forward_backward(x[t], y[t])
        opt.step()
        period += 1
        now = Now(epoch=0, period=period, H=H, step=t + 1)
        if method.syncs_after(now):
            method.sync(workers, opt, INNER_LR)
        if method.period_ends(now):
            period = 0
        seen.append([[p.detach()[k].clone() for p in workers.params] for k in range(K)])
    return seen, getattr(method, "fragments", [])


def _largest_difference(a, b) -> float:
    return max((u - v).abs().max().item() for sa, sb in zip(a, b) for ra, rb in zip(sa, sb) for u, v in zip(ra, rb))


def _layers_of(fragments, model: nn.Sequential) -> list[list[int]]:
    """dpl's fragments (parameter indices) as the Sequential's layer indices, for torchft's model_fragments."""
    owner = [j for j, m in enumerate(model) for _ in m.parameters()]
    return [sorted({owner[i] for i in f.params}) for f in fragments]


# float64 on both sides: the identity shows as rounding of the last bits, not float32's
TOL = 1e-12


@pytest.mark.parametrize("inner", ["sgdm", "adamw"])
def test_localsgd_equals_torchft_after_every_step(inner):
    ours, _ = run_dpl(["method=localsgd"], H=4, inner=inner)
    theirs = run_torchft("localsgd", H=4, inner=inner)
    assert _largest_difference(ours, theirs) < TOL


@pytest.mark.parametrize("inner", ["sgdm", "adamw"])
def test_diloco_equals_torchft_after_every_step(inner):
    ours, fragments = run_dpl(["method=diloco"], H=4, inner=inner)
    theirs = run_torchft("diloco", H=4, inner=inner, layers=_layers_of(fragments, _model()))
    assert _largest_difference(ours, theirs) < TOL


@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("delay", [0, 1])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_streaming_diloco_equals_torchft_after_every_step(P, delay, alpha):
    H = 8
    ours, fragments = run_dpl(["method=streaming_diloco", f"method.fragments={P}", f"method.delay={delay}",
                               f"method.alpha={alpha}", "method.schedule=torchft"], H=H, inner="sgdm")
    theirs = run_torchft("diloco", H=H, inner="sgdm", P=P, delay=delay, alpha=alpha,
                         layers=_layers_of(fragments, _model()))
    assert _largest_difference(ours, theirs) < TOL


def test_the_paper_schedule_is_torchfts_shifted_by_the_delay():
    """With tau > 0 the default (paper) schedule is not torchft's: it takes the pseudo-gradient at the slot."""
    H, P = 8, 2
    ours, fragments = run_dpl(["method=streaming_diloco", f"method.fragments={P}", "method.delay=1"], H=H,
                              inner="sgdm")
    theirs = run_torchft("diloco", H=H, inner="sgdm", P=P, delay=1, layers=_layers_of(fragments, _model()))
    assert _largest_difference(ours, theirs) > 1e-4
