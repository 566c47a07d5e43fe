"""The local step (dpl.core.step): torch.compile and the CUDA graph give eager's numbers."""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest
import torch

from dpl.components.optim import OPTIMIZERS, OptimizerFacts
from dpl.core import step as step_module
from dpl.core.engines import compile_mode
from dpl.core.step import CompiledStep, GraphStep, LocalStep
from dpl.run.build import build_trainer
from tests.conftest import compose_cfg

CPU = torch.device("cpu")
RECORDED = ("train_loss", "train_acc", "val_loss", "val_acc", "drift")


def _run(*overrides: str, device: torch.device = CPU):
    t = build_trainer(compose_cfg("epochs=1", *overrides), device)
    t.fit()
    return t


def _assert_same_run(a, b, rel: float, atol: float = 1e-5) -> None:
    for ra, rb in zip(a.state.history, b.state.history, strict=True):
        for key in RECORDED:
            assert rb[key] == pytest.approx(ra[key], rel=rel, abs=1e-6), key
    for pa, pb in zip(a.workers.params + a.workers.buffers, b.workers.params + b.workers.buffers, strict=True):
        torch.testing.assert_close(pb.float(), pa.float(), rtol=rel, atol=atol)


@pytest.mark.parametrize("overrides", [
    # the K=4 case compiles the same step (K stacked workers, the shorter last batch too): the
    # centralized one repeats it at ~25 s of compile time on 2 cores, so it is in the slow set
    pytest.param(("K=1", "method=centralized"), marks=pytest.mark.slow),
    ("K=4", "method=localsgd", "H=4", "engine.simulate=loop"),
    # the clip compiles with the optimizer's step; 0.65 clips some workers' steps and not others' (norms ~0.6-0.9)
    ("K=4", "method=localsgd", "H=4", "engine.simulate=loop", "optimizer.grad_clip_norm=0.65"),
], ids=["centralized", "localsgd-K4", "localsgd-K4-clip"])
def test_compile_equals_eager(overrides):
    eager = _run(*overrides, "engine.compile=none")
    compiled = _run(*overrides, "engine.compile=compile")
    step = compiled.local_step.fast  # (the self-checked step: dpl.core.selfcheck)
    assert isinstance(eager.local_step, LocalStep) and type(eager.local_step) is LocalStep
    assert compiled.local_step.checked and compiled.local_step.largest < 1e-4  # its first step matched eager's
    assert isinstance(step, CompiledStep) and step._losses is not None and step._update is not None  # no fallback
    # 900 training images: the epoch's last batch is shorter and got its own compiled graph
    b = compiled.cfg.batch_size
    assert {s[1] for s in step.shapes} == {b, (900 // compiled.cfg.K) % b}
    _assert_same_run(eager, compiled, rel=1e-4)


@pytest.mark.slow
def test_compile_equals_eager_resnet20_under_vmap():
    ov = ("K=2", "method=localsgd", "H=2", "model=resnet20", "engine.simulate=vmap", "dataset.num_train=300")
    eager, compiled = _run(*ov, "engine.compile=none"), _run(*ov, "engine.compile=compile")
    assert compiled.local_step._losses is not None
    # BatchNorm statistics included (buffers); a BatchNorm ResNet's early training amplifies rounding
    # (measured: 3e-5 at most after an epoch)
    _assert_same_run(eager, compiled, rel=1e-3, atol=1e-4)


@pytest.mark.slow  # inductor compiles LAMB's update for ~30 s on 2 CPU cores
def test_compile_equals_eager_lamb_compiled_once_per_batch_shape():
    """LAMB's step count is a device tensor: its compiled update is not recompiled every step."""
    from torch._dynamo.utils import counters

    ov = ("K=2", "method=localsgd", "H=2", "optimizer=lamb", "epochs=2")
    eager = _run(*ov, "engine.compile=none")
    counters.clear()
    compiled = _run(*ov, "engine.compile=compile")
    step = compiled.local_step.fast
    assert step._losses is not None and step._update is not None  # both parts compiled, no fallback
    # two epochs of two batch shapes: forward+loss and the update, once per shape (a Python step
    # count would have compiled the update again at every step, up to the recompile limit)
    assert counters["stats"]["unique_graphs"] <= 2 * len(step.shapes)
    # LAMB's trust ratios amplify float rounding (measured: 1e-4 at most after two epochs)
    _assert_same_run(eager, compiled, rel=1e-3, atol=3e-4)


@pytest.mark.slow  # as above; LAMB resuming its device step count is in test_optim (default run)
def test_compiled_lamb_run_resumes_exactly(make_cfg, tmp_path, monkeypatch):
    """A compiled run resumes to the very numbers of an uninterrupted compiled run: the checkpoint
    holds LAMB's device step count, and the resumed process compiles the same step again."""
    from tests.resume import assert_resume_is_exact

    overrides = ["optimizer=lamb", "engine.compile=compile", "method=localsgd", "K=2", "H=3", "epochs=2",
                 "checkpoint_every=5", "dataset.num_train=600", "logger=none"]
    assert_resume_is_exact(make_cfg, overrides, tmp_path, monkeypatch, stop_at=7)


def _recording(t):
    """Every step's gradients as the inner optimizer steps with them (its step wrapped: the eager step)."""
    seen = []
    step = t.optimizer.step

    def record(*args, **kwargs):
        seen.append([p.grad.clone() for p in t.workers.params])
        return step(*args, **kwargs)

    t.optimizer.step = record
    return seen


def _worker_norms(grads):
    return torch.stack([g.reshape(g.shape[0], -1).square().sum(1) for g in grads]).sum(0).sqrt()


def test_grad_clip_norm_clips_each_workers_gradient_before_the_step():
    ov = ("epochs=1", "K=4", "method=localsgd", "H=4")
    plain = build_trainer(compose_cfg(*ov), CPU)
    raw = _recording(plain)
    plain.step()
    norms = _worker_norms(raw[0])
    c = float(norms.sort().values[1:3].mean())  # two workers over the threshold, two under it
    clipped = build_trainer(compose_cfg(*ov, f"optimizer.grad_clip_norm={c}"), CPU)
    seen = _recording(clipped)
    clipped.step()
    after = _worker_norms(seen[0])
    for k in range(4):  # each worker by its own norm
        if norms[k] <= c:  # untouched, bit for bit
            assert all(torch.equal(a[k], b[k]) for a, b in zip(seen[0], raw[0]))
        else:  # min(||g||, c) = c, to rounding, in the gradient's own direction
            assert after[k] <= c * (1 + 1e-5) and float(after[k]) == pytest.approx(c, rel=1e-5)
            for a, b in zip(seen[0], raw[0]):
                torch.testing.assert_close(a[k], b[k] * (c / (norms[k] + 1e-6)))


def test_a_synchronous_method_clips_the_averaged_gradient():
    """The clip comes after the gradient hook: every worker clips the one all-reduced gradient alike,
    as data parallelism with clip_grad_norm_ after DDP's all-reduce does."""
    t = build_trainer(compose_cfg("epochs=1", "K=2", "method=centralized", "optimizer.grad_clip_norm=0.1"), CPU)
    seen = _recording(t)
    t.step()
    assert all(torch.equal(g[0], g[1]) for g in seen[0])
    assert float(_worker_norms(seen[0])[0]) == pytest.approx(0.1, rel=1e-5)  # the gradients' norm is ~0.6


def _failing_backend(gm, example_inputs):
    raise RuntimeError("this backend compiles nothing")


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(step_module, "BACKEND", _failing_backend)
    ov = ("K=2", "method=localsgd", "H=3", "dataset.num_train=300")
    with caplog.at_level(logging.WARNING, logger="dpl.core.step"):
        compiled = _run(*ov, "engine.compile=compile")
    warnings = [r for r in caplog.records if r.name == "dpl.core.step"]
    assert len(warnings) == 1 and "runs eagerly" in warnings[0].getMessage()
    assert compiled.local_step._losses is None and compiled.local_step._update is None
    eager = _run(*ov, "engine.compile=none")
    for rc, re in zip(compiled.state.history, eager.state.history, strict=True):
        assert all(rc[k] == re[k] for k in RECORDED)
    for pc, pe in zip(compiled.workers.params, eager.workers.params):
        assert torch.equal(pc, pe)  # the eager maths exactly: nothing the failed compile touched remains


def test_compile_mode_auto_and_what_a_graph_needs(monkeypatch):
    t = build_trainer(compose_cfg("K=2", "method=localsgd"), CPU)
    assert compile_mode("auto", CPU, t.workers, "sgdm") == ("none", "")
    assert compile_mode("compile", CPU, t.workers, "lamb") == ("compile", "")
    mode, why = compile_mode("graph", CPU, t.workers, "sgdm")
    assert mode == "none" and "needs CUDA" in why
    cuda = torch.device("cuda")
    capturable = [n for n, o in OPTIMIZERS.items() if o.facts.capturable]
    for name in capturable:  # these keep their per-step values on the device (LAMB's count too)
        assert compile_mode("auto", cuda, t.workers, name) == ("graph", "")
    assert set(OPTIMIZERS) - set(capturable) == {"muon"}  # its momentum step and AdamW part count on the host
    assert compile_mode("auto", cuda, t.workers, "muon")[0] == "none"
    assert "optimizer=muon keeps a host step count" in compile_mode("graph", cuda, t.workers, "muon")[1]
    # an optimizer that counts on the host
    monkeypatch.setitem(OPTIMIZERS, "lamb", dataclasses.replace(OPTIMIZERS["lamb"], facts=OptimizerFacts()))
    assert compile_mode("auto", cuda, t.workers, "lamb")[0] == "none"  # would be frozen by a capture
    assert "host step count" in compile_mode("graph", cuda, t.workers, "lamb")[1]
    assert t.compile == "none"  # the trainer's resolution of the default (auto) on CPU


def test_engine_compile_is_checked_at_startup():
    from dpl.config.store import to_schema
    from dpl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"engine.compile='jit' is invalid: allowed one of auto, none, graph, compile"):
        to_schema(compose_cfg("engine.compile=jit"))
    with pytest.raises(ConfigError, match="engine.eval_batch_size"):
        to_schema(compose_cfg("engine.eval_batch_size=0"))


# ----------------------------------------------------------------------------- CUDA only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("overrides", [
    ("K=1", "method=centralized"),
    ("K=4", "method=localsgd", "H=4"),
    ("K=4", "method=slowmo", "H=4", "optimizer=adamw"),
    ("K=4", "method=localsgd", "H=4", "optimizer=lamb"),
    ("K=2", "method=localsgd", "H=2", "model=resnet20", "precision=bf16"),
    # the clip inside the captured step; centralized edits gradients: the clip is in the graph after its hook
    ("K=4", "method=localsgd", "H=4", "optimizer.grad_clip_norm=0.65"),
    ("K=2", "method=centralized", "optimizer=adamw", "optimizer.grad_clip_norm=0.65"),
], ids=["centralized", "localsgd-K4", "slowmo-adamw", "localsgd-lamb", "resnet20-bf16", "localsgd-clip",
        "centralized-adamw-clip"])
def test_cuda_graph_equals_eager(overrides):
    dev = torch.device("cuda")
    # three epochs: the shorter last batch of an epoch warms up twice, then is captured too
    graph = _run(*overrides, "engine.compile=graph", "device=cuda", "epochs=3", device=dev)
    eager = _run(*overrides, "engine.compile=none", "device=cuda", "epochs=3", device=dev)
    step = graph.local_step.fast
    assert graph.local_step.checked and not graph.local_step.eager_only  # its first replay matched eager
    assert isinstance(step, GraphStep) and not step.failed  # replayed, no fallback
    assert len(step.captured) == 2  # the full batch and the epoch's shorter last batch
    resnet = "model=resnet20" in overrides
    _assert_same_run(eager, graph, rel=1e-3 if resnet else 1e-4, atol=1e-4 if resnet else 1e-5)


@pytest.mark.gpu
@cuda
def test_cuda_graph_recaptures_after_the_optimizer_state_restarts():
    ov = ("K=2", "method=localsgd", "H=3", "restart_inner_each_epoch=true", "device=cuda", "epochs=3")
    dev = torch.device("cuda")
    graph, eager = _run(*ov, "engine.compile=graph", device=dev), _run(*ov, "engine.compile=none", device=dev)
    assert not graph.local_step.failed
    _assert_same_run(eager, graph, rel=1e-4)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("clip", [(), ("optimizer.grad_clip_norm=0.65",)], ids=["", "clip"])
@pytest.mark.parametrize("mode", ["graph", "none"])
def test_training_steps_do_not_synchronize_with_the_host(mode, clip):
    t = build_trainer(compose_cfg("K=4", "method=localsgd", "H=4", "device=cuda", f"engine.compile={mode}", *clip),
                      torch.device("cuda"))
    for _ in range(4):  # warm-up and capture may allocate and synchronise
        t.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):  # replays, a sync every 4 steps, the device sums
            t.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _tensors(trainer) -> list[torch.Tensor]:
    """Everything a step leaves behind: parameters, buffers and every tensor of the optimizer's state."""
    w, opt = trainer.workers, trainer.optimizer
    state = [t for p in w.params for _, t in sorted(opt.state.get(p, {}).items()) if torch.is_tensor(t)]
    return [p.detach() for p in w.params] + list(w.buffers) + state


@pytest.mark.parametrize("optimizer", ["sgdm", "adamw", "lamb", "muon"])
@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_an_idle_step_leaves_what_a_computed_step_given_back_leaves(optimizer, first):
    """LocalStep.idle computes nothing: with every row given back afterwards (the method's job), the workers,
    the optimizer's state and its shared step count are exactly what the computed step leaves, whether the
    step creates the optimizer's state or finds it (AdamW and LAMB count steps, SGD's momentum is made lazily)."""
    from dpl.core.methods import rows

    ov = ("K=2", "method=localsgd", "H=4", f"optimizer={optimizer}", "optimizer.grad_clip_norm=0.5")
    computed, idle = (build_trainer(compose_cfg(*ov), CPU) for _ in range(2))
    for t in (computed, idle):
        if not first:  # both take two real steps: the state exists and has counted them
            for _ in range(2):
                t.step()
    inputs = computed.next_inputs()
    assert torch.equal(inputs.idx, idle.next_inputs().idx)
    step = computed.state.global_step
    for t, call in ((computed, computed.local_step), (idle, idle.local_step.idle)):
        kept = rows.keep(t.workers, t.optimizer, range(t.workers.k_local))
        losses, correct = call(inputs.idx, step, inputs.lr_i, 0)
        kept.give_back(t.workers, t.optimizer)
    assert not losses.any() and not correct.any() and correct.dtype == torch.long
    a, b = _tensors(computed), _tensors(idle)
    assert len(a) == len(b) > len(computed.workers.params) + len(computed.workers.buffers)  # the state too
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


class _Timed:
    """A local step, each computed call timed and each idle call counted."""

    def __init__(self, step) -> None:
        self.step, self.computed_s, self.idles = step, [], 0

    def __call__(self, *args):
        t0 = time.perf_counter()
        out = self.step(*args)
        self.computed_s.append(time.perf_counter() - t0)
        return out

    def idle(self, *args):
        self.idles += 1
        return self.step.idle(*args)


def test_a_slowed_step_takes_its_factor_times_as_long_and_an_idle_one_is_not_slowed():
    """clock.emulate's SlowedStep: after a computed step it sleeps (factor − 1) times the step's own time,
    so the call lasts at least factor times it; an idle step (nothing computed) goes through as it is."""
    from dpl.core.step import SlowedStep

    trainer = build_trainer(compose_cfg("K=1", "method=localsgd"), CPU)
    timed = _Timed(trainer.local_step)
    slowed = SlowedStep(timed, 3.0, CPU)
    inputs = trainer.next_inputs()
    t0 = time.perf_counter()
    slowed(inputs.idx, 0, inputs.lr_i, 0)
    assert time.perf_counter() - t0 >= 3.0 * timed.computed_s[0]
    slowed.idle(inputs.idx, 1, inputs.lr_i, 0)
    assert len(timed.computed_s) == 1 and timed.idles == 1
