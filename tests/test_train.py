"""End-to-end training on synthetic data, checkpoints and exact resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dpl.core.loop import WALL_CLOCK_FIELDS
from dpl.run import checkpoint
from dpl.run.job import run
from tests.processes import run_cli


def test_synthetic_run_learns(make_cfg, tmp_path):
    final = run(make_cfg("epochs=3", "lr=0.05"), out_dir=tmp_path)
    assert final["test_acc"] > 0.6  # chance is 0.1
    assert final["test_acc_best"] > 0.6
    assert (tmp_path / "checkpoint.pt").is_file()
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and "test_acc" in rows[0]


class Interrupt(BaseException):
    pass


def _interrupt_at(step):
    def hook(trainer):
        if trainer.state.global_step == step:
            raise Interrupt()
    return hook


# localsgd (with a dynamic H) is the hardest case; the other two repeat the same path end to end.
@pytest.mark.parametrize("method", [pytest.param("centralized", marks=pytest.mark.slow), "localsgd",
                                    pytest.param("slowmo", marks=pytest.mark.slow)])
def test_resume_mid_period_equals_uninterrupted(make_cfg, tmp_path, method, monkeypatch):
    overrides = [f"method={method}", "K=2", "H=4", "epochs=3", "checkpoint_every=5",
                 "dynamic_h=loss" if method == "localsgd" else "dynamic_h=constant"]
    full = run(make_cfg(*overrides), out_dir=tmp_path / "full")

    # Kill after step 22 (epoch 1, mid-period); the last checkpoint is at step 20, mid-period too.
    from dpl.core import loop as train_mod

    original_fit = train_mod.Trainer.fit

    def fit_with_interrupt(self):
        self.on_step.append(_interrupt_at(22))
        original_fit(self)

    monkeypatch.setattr(train_mod.Trainer, "fit", fit_with_interrupt)
    with pytest.raises(Interrupt):
        run(make_cfg(*overrides), out_dir=tmp_path / "cut")
    monkeypatch.setattr(train_mod.Trainer, "fit", original_fit)
    saved = checkpoint.load(tmp_path / "cut")
    assert saved["state"]["global_step"] == 20 and saved["state"]["step"] == 5
    resumed = run(make_cfg(f"resume={tmp_path / 'cut'}"))
    for key in ("test_acc", "test_acc_best", "best_val_acc", "test_loss"):
        assert resumed[key] == full[key], key


def test_sigkill_then_resume_gives_the_same_final_metrics(tmp_path):
    args = ["dataset=synthetic", "dataset.num_train=1000", "dataset.num_test=200", "epochs=4", "batch_size=32",
            "logger=none", "progress=false", "device=cpu", "K=2", "method=localsgd", "H=3", "checkpoint_every=3",
            f"results_csv={tmp_path / 'r.csv'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"  # the run that is not killed, and the resume, need no process of their own
    assert run_cli(tmp_path, [*args, f"hydra.run.dir={full}"]).returncode == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "dpl", *args, f"hydra.run.dir={cut}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill as soon as a checkpoint from the second epoch exists
        try:
            if checkpoint.load(cut)["state"]["epoch"] >= 1:
                break
        except checkpoint.CheckpointError:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = run_cli(tmp_path, [f"resume={cut}", f"hydra.run.dir={tmp_path / 'again'}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = checkpoint.load(full)
    b = checkpoint.load(cut)
    timing = WALL_CLOCK_FIELDS  # wall clock differs, nothing else may
    assert [{k: v for k, v in r.items() if k not in timing} for r in a["state"]["history"]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in b["state"]["history"]]
    for x, y in zip(a["workers"]["params"], b["workers"]["params"]):
        assert torch.equal(x, y)


def test_missing_and_corrupt_checkpoints_are_one_clear_error(tmp_path, make_cfg):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        run(make_cfg(f"resume={tmp_path / 'nowhere'}"))
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        run(make_cfg(f"resume={tmp_path}"))


def test_test_only_and_pretrained(make_cfg, tmp_path):
    final = run(make_cfg("epochs=1"), out_dir=tmp_path / "a")
    again = run(make_cfg("test_only=true", f"checkpoint={tmp_path / 'a' / 'checkpoint.pt'}"))
    assert again["test_acc"] == final["test_acc"] and again["test_acc_best"] == final["test_acc_best"]
    warm = run(make_cfg("epochs=1", f"pretrained={tmp_path / 'a' / 'checkpoint.pt'}", "lr=1e-6",
                        "scheduler=constant"), out_dir=tmp_path / "b")
    assert abs(warm["test_acc"] - final["test_acc"]) < 0.05  # started from the trained weights


@pytest.mark.slow
def test_fashion_mnist_end_to_end(make_cfg, tmp_path):
    """Real Fashion-MNIST (Debian's files when offline) through LeNet-5 on 1x28x28 inputs."""
    final = run(make_cfg("dataset=fashion_mnist", f"dataset.root={tmp_path / 'data'}", "epochs=1", "batch_size=128",
                         "lr=0.05"), out_dir=tmp_path)
    assert final["test_acc"] > 0.7


def test_the_inner_lr_is_a_device_tensor_filled_from_the_table():
    """Setting the lr is a device-side copy from the table: no Python float reaches the optimizer."""
    from dpl.run.build import build_trainer
    from tests.conftest import compose_cfg

    t = build_trainer(compose_cfg("scheduler=cosine", "epochs=2", "method=localsgd", "K=2"), torch.device("cpu"))
    lr = t.schedule
    for _ in range(3):
        t.step()
        assert all(g["lr"] is lr.now for g in t.optimizer.param_groups)
        assert lr.now.item() == lr.table[lr.index(t.state.global_step - 1)] == t.state.lr
    # loading an optimizer state (which holds the checkpoint's lr object) re-points the groups
    t.load_state_dict(t.state_dict())
    assert all(g["lr"] is lr.now for g in t.optimizer.param_groups)


def test_bf16_runs_and_learns_with_fp32_weights(make_cfg, tmp_path):
    """precision=bf16: autocast forward, but the stacked weights (and so the optimizer state) stay fp32."""
    final = run(make_cfg("epochs=3", "lr=0.05", "precision=bf16"), out_dir=tmp_path)
    assert final["test_acc"] > 0.6  # chance is 0.1
    ckpt = checkpoint.load(tmp_path / "checkpoint.pt")
    assert all(p.dtype == torch.float32 for p in ckpt["workers"]["params"])


def test_bf16_forward_runs_in_bf16_and_fp32_is_untouched():
    from dpl.run.build import build_trainer
    from tests.conftest import compose_cfg

    t = build_trainer(compose_cfg("precision=bf16"), torch.device("cpu"))
    x = torch.randn(1, 4, *t.data.train_x.shape[1:])
    y = torch.zeros(1, 4, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert t.workers.forward(x).dtype == torch.bfloat16
    losses, _ = t.workers.forward_backward(x, y)
    assert losses.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in t.workers.params)
    fp32 = build_trainer(compose_cfg(), torch.device("cpu"))
    bf = t.workers.forward_backward(x, y)[0]
    assert fp32.workers.precision == "fp32" and not torch.equal(fp32.workers.forward_backward(x, y)[0], bf)


def test_a_checkpoint_with_epochs_from_0_resumes_counting_from_1():
    from dpl.run.checkpoint import FORMAT_VERSION, upgrade

    def format_1(state):  # a checkpoint of format 1, as far as the upgrade reads one
        return {"format": 1, "config": {"method": {"name": "centralized"}}, "method": {},
                "optimizer": {"param_groups": []}, "state": state}

    old = {"epoch": 2, "best_epoch": 1, "history": [{"epoch": 0, "val_acc": 0.1}, {"epoch": 1, "val_acc": 0.2}]}
    new = upgrade(format_1(old))["state"]
    assert [r["epoch"] for r in new["history"]] == [1, 2] and new["best_epoch"] == 2 and new["epoch"] == 2
    from_1 = upgrade(format_1({**old, "history": new["history"], "best_epoch": 2}))["state"]
    assert from_1["history"] == new["history"] and from_1["best_epoch"] == 2  # already from 1: unchanged
    empty = upgrade(format_1({"history": [], "best_epoch": -1}))["state"]
    assert empty["history"] == [] and empty["best_epoch"] == -1
    current = upgrade(format_1(old))
    assert current["format"] == FORMAT_VERSION and upgrade(current) is current


# ----------------------------------------------------------------------------- periods across epochs


@pytest.mark.parametrize("method,extra,syncs", [
    ("localsgd", [], [0, 1, 1]),  # syncs at steps 20 and 40
    ("diloco", [], [0, 1, 1]),
    ("streaming_diloco", ["method.fragments=2"], [1, 2, 1]),  # a fragment at steps 10, 20, 30, 40
])
def test_a_period_longer_than_an_epoch_syncs_every_h_steps_of_the_run(make_cfg, method, extra, syncs):
    """15 steps an epoch at K=2, H=20: the papers' schedule, which has no epochs; the study's epoch-end sync
    (sync_at_epoch_end) is an option."""
    from dpl.run.build import build_trainer

    overrides = [f"method={method}", "K=2", "H=20", "epochs=3", *extra]
    trainer = build_trainer(make_cfg(*overrides), torch.device("cpu"))
    trainer.fit()
    assert [r["syncs"] for r in trainer.state.history] == syncs
    # the run ended 5 steps after its last sync, and its validations left the workers as they were
    assert not torch.equal(trainer.workers.params[0][0], trainer.workers.params[0][1])
    study = build_trainer(make_cfg(*overrides, "sync_at_epoch_end=true"), torch.device("cpu"))
    study.fit()
    # streaming: a fragment 10 steps into each epoch, then every fragment at its end
    assert [r["syncs"] for r in study.state.history] == [1 + (method == "streaming_diloco")] * 3
    assert torch.equal(study.workers.params[0][0], study.workers.params[0][1])


def test_validation_reads_the_outer_model_of_diloco_and_the_average_of_localsgd(make_cfg):
    from dpl.run.build import build_trainer

    for method, expect in (("diloco", "anchor"), ("localsgd", "average")):
        trainer = build_trainer(make_cfg(f"method={method}", "K=2", "H=20", "epochs=1"), torch.device("cpu"))
        trainer.fit()
        model = trainer.method.global_model(trainer.workers)
        params = [model[n] for n in trainer.workers.param_names]
        want = ([x.float() for x in trainer.method.anchor] if expect == "anchor"
                else [p.detach().mean(0) for p in trainer.workers.params])
        for got, w in zip(params, want):
            torch.testing.assert_close(got, w, rtol=0, atol=1e-6)
        assert trainer.state.history[-1]["val_loss"] == trainer.evaluate("val", model)[0]


def test_resume_with_a_fragment_in_flight_across_an_epoch_end_is_exact(make_cfg, tmp_path, monkeypatch):
    from tests.resume import assert_resume_is_exact

    # 15 steps an epoch; fragment 0 starts at step 30 (an epoch's last) and lands at 33; checkpoint at 32
    assert_resume_is_exact(make_cfg, ["method=streaming_diloco", "method.fragments=2", "method.delay=3", "K=2",
                                      "H=20", "epochs=3", "checkpoint_every=16"], tmp_path, monkeypatch, stop_at=32)
