"""A fast path checks its first step against the eager step (dpl.core.selfcheck): a faithful one goes on,
one that computes something else is caught in one warning and the run goes on eagerly, as a wholly eager
run would. (A compiled step passing its check: tests/test_step.py; a CUDA graph's and a fused packed step's:
the GPU tests there and in tests/test_pack.py.)"""

from __future__ import annotations

import logging

import pytest
import torch

from dpl.core.selfcheck import SelfCheckedStep
from dpl.core.step import LocalStep
from dpl.run.build import build_trainer
from tests.conftest import compose_cfg

CPU = torch.device("cpu")
SMALL = ("epochs=1", "dataset.num_train=300", "K=2", "method=localsgd", "H=3")


class _WrongStep(LocalStep):
    """A "fast" step that runs and computes something else: eager's step, then its parameters scaled."""

    def takes_fast_path(self, idx: torch.Tensor) -> bool:
        return True

    def __call__(self, idx: torch.Tensor, step: int, lr_i: int, epoch: int):
        out = super().__call__(idx, step, lr_i, epoch)
        with torch.no_grad():
            for p in self.workers.params:
                p.mul_(1.5)
        return out


def _trainer(*overrides: str, wrong: bool = False):
    t = build_trainer(compose_cfg(*SMALL, *overrides), CPU)
    if wrong:  # an eager step made "fast" and wrong, checked as build_trainer checks a compiled one
        inner = t.local_step
        inner.__class__ = _WrongStep
        t.local_step = SelfCheckedStep(inner, lambda idx, s, lr_i, e: LocalStep.__call__(inner, idx, s, lr_i, e),
                                       [inner], "a wrong step", inner.takes_fast_path)
    return t


def test_a_step_that_computes_something_else_warns_once_and_the_run_goes_on_eagerly(caplog):
    eager = _trainer("engine.compile=none")
    eager.fit()
    with caplog.at_level(logging.WARNING, logger="dpl.core.selfcheck"):
        wrong = _trainer("engine.compile=none", wrong=True)
        wrong.fit()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "dpl.core.selfcheck"]
    assert warning.startswith("a wrong step: the fast step differs from the eager step on its first batch")
    assert wrong.local_step.eager_only and wrong.local_step.largest > 1e-3
    for a, b in zip(eager.workers.params, wrong.workers.params):
        assert torch.equal(a, b)  # the eager maths exactly, from the first step on
    assert eager.state.history[0]["train_loss"] == wrong.state.history[0]["train_loss"]
    for key in ("comm_bytes", "collectives", "sync_rounds"):  # the check's extra step is not counted
        assert eager.state.history[0][key] == wrong.state.history[0][key], key


@pytest.mark.parametrize("method", ["centralized", "localsgd"])
def test_the_check_leaves_the_run_as_an_unchecked_one(method):
    """The eager step taken for the comparison is undone: a checked run equals an unchecked one bit for bit
    (here the check of a faithful "fast" step that is eager's own maths)."""
    plain = _trainer(f"method={method}", "engine.compile=none")
    plain.fit()
    checked = _trainer(f"method={method}", "engine.compile=none")
    inner = checked.local_step
    checked.local_step = SelfCheckedStep(inner, lambda idx, s, lr_i, e: LocalStep.__call__(inner, idx, s, lr_i, e),
                                         [inner], "eager as fast", lambda idx: True)
    checked.fit()
    assert checked.local_step.checked and checked.local_step.largest == 0.0
    for a, b in zip(plain.workers.params, checked.workers.params):
        assert torch.equal(a, b)
    for key in ("train_loss", "val_acc", "comm_bytes", "collectives", "sync_rounds", "modelled_time_s"):
        assert plain.state.history[0][key] == checked.state.history[0][key], key
