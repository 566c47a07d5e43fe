"""The reference study, reproduced: its rows as configs, and each of its behaviours held to
FIDELITY.md (lr per epoch with a 0.1 warmup start, state restarts per epoch, augmented
validation, fixed centralized order, sync counts) next to dpl's paper defaults."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from dpl.components.data.sharding import make_shards, steps_per_epoch
from dpl.config.overrides import group_options
from dpl.config.study import ABLATIONS
from dpl.config.validate import validate
from dpl.core import loop as train_mod
from dpl.core.schedules import lr_table
from dpl.run.build import build_trainer
from dpl.run.job import run
from tests.conftest import CONF, compose_cfg
from tests.resume import assert_resume_is_exact

CPU = torch.device("cpu")

# ----------------------------------------------------------------------------- the study's rows

STUDY = {  # RESULTS.md / FIDELITY.md: the hyperparameters of each row (and the published defaults)
    "sgdm_wd4e-4": dict(method="centralized", optimizer="sgdm", lr=0.01, weight_decay=4e-4, batch_size=64, epochs=150),
    "sgdm_wd4e-3": dict(method="centralized", optimizer="sgdm", lr=0.01, weight_decay=4e-3, batch_size=64, epochs=150),
    "adamw_wd1e-2": dict(method="centralized", optimizer="adamw", lr=1e-3, weight_decay=0.01, epochs=150),
    "adamw_wd4e-2": dict(method="centralized", optimizer="adamw", lr=1e-3, weight_decay=0.04, epochs=150),
    "lamb_bs2048": dict(optimizer="lamb", lr=0.008, batch_size=2048, epochs=150, warmup_epochs=15),
    "lamb_bs8192": dict(optimizer="lamb", lr=0.032, batch_size=8192, epochs=100, warmup_epochs=5),
    "lamb_bs16384": dict(optimizer="lamb", lr=0.032, batch_size=16384, epochs=150, warmup_epochs=15),
    "lars_bs512": dict(optimizer="lars", lr=15.0, batch_size=512, epochs=150, warmup_epochs=15),
    "lars_bs1024": dict(optimizer="lars", lr=15.0, batch_size=1024, epochs=150, warmup_epochs=15),
    "lars_bs2048": dict(optimizer="lars", lr=15.0, batch_size=2048, epochs=150, warmup_epochs=15),
    "centralized": dict(method="centralized", optimizer="sgdm", lr=0.01, weight_decay=1e-3, batch_size=64),
    "localsgd": dict(method="localsgd", K=4, H=4),
    "slowmo": dict(method="slowmo", K=4, H=8),
    "dynamic": dict(method="slowmo", K=4, H=8),
    **{f"localsgd_{s}_k{K}": dict(method="localsgd", K=K, H=4) for s in ("loss", "avg_loss") for K in (2, 4, 8)},
}


def test_every_study_row_has_a_config_with_its_settings():
    assert set(group_options("experiment")) == {f"study/{n}" for n in STUDY} | {"lm/diloco"}
    for name, expected in STUDY.items():
        cfg = compose_cfg(f"experiment=study/{name}", tiny=False)
        validate(cfg)
        got = {k: cfg[k] if k in cfg else None for k in expected}
        got.update(method=cfg.method.name, optimizer=cfg.optimizer.name)
        assert {k: got[k] for k in expected} == expected, name
        assert cfg.dataset.name == "cifar100" and cfg.model.name == "lenet5" and cfg.scheduler.name == "cosine"
        # the study's behaviours, set explicitly by every row
        assert (cfg.scheduler.interval, cfg.scheduler.warmup_start_factor, cfg.dataset.augment_val) == \
            ("epoch", 0.1, True), name
        local = cfg.method.name != "centralized"
        assert cfg.shuffle == ("epoch" if local else "once"), name
        assert cfg.restart_inner_each_epoch is local, name
        if cfg.method.name == "slowmo":
            assert (cfg.method.outer.lr, cfg.method.outer.momentum, cfg.method.restart_each_epoch) == (1.0, 0.6, True)
        if local:  # the study's distributed defaults
            assert (cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.optimizer.momentum) == (64, 0.04, 1e-3, 0.9)
            assert cfg.sharding == "iid"  # the study's iid_sharding (tests/test_data_sharding.py)
        if cfg.optimizer.name == "lars":
            o = cfg.optimizer
            assert (o.trust_coefficient, o.eps, o.wd_in_grad_norm, o.exclude_1d) == (0.3, 1e-6, True, False)
        if cfg.optimizer.name == "lamb":
            o = cfg.optimizer
            assert (o.grad_clip_norm, o.bias_correction, o.trust_ratio_only_with_wd, o.eps) == (1.0, False, True, 1e-6)
        if cfg.dynamic_h.name != "constant":
            d = cfg.dynamic_h
            assert (d.h_min, d.h_max, d.n_losses) == (4, 64, 10 if d.name == "avg_loss" else 3), name


def test_every_study_file_names_its_row_and_accuracy():
    for name in STUDY:
        text = (CONF / "experiment" / "study" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n# The study's row: ")
        assert "test accuracy" in text and f"experiment=study/{name}" in text


# Rows that differ from another row only in a number (batch size, warmup, weight decay, K) train
# through the same code as it: one row of each optimizer, method and H strategy trains in the
# default run, the others in the slow set (each row's numbers: test_every_study_row_has_a_config_with_its_settings).
SAME_CODE_AS_ANOTHER_ROW = {"sgdm_wd4e-3", "adamw_wd4e-2", "lamb_bs2048", "lamb_bs16384", "lars_bs512", "lars_bs2048",
                            "localsgd_loss_k4", "localsgd_loss_k8", "localsgd_avg_loss_k2", "localsgd_avg_loss_k4"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SAME_CODE_AS_ANOTHER_ROW else n
                                  for n in sorted(STUDY)])
def test_every_study_row_trains_on_synthetic_data(make_cfg, tmp_path, name):
    """Each row runs end to end (tiny: the LAMB/LARS batches exceed the data and give one step)."""
    cfg = make_cfg(f"experiment=study/{name}", "dataset=synthetic", "dataset.num_train=400", "dataset.num_test=100",
                   "epochs=2", "logger=none")
    final = run(cfg, out_dir=tmp_path)
    assert final["epochs_run"] == 2 and math.isfinite(final["test_loss"])


# LARS at the study's lr 15 (bs 512, the shortest warmup in epochs of these three steps) blows up on the
# synthetic data (docs/study.md): its loss reaches 1e24 by epoch 3, and whether it is still a
# finite number there or already nan depends on float rounding (the convolutions' memory format, say).
DIVERGES_ON_SYNTHETIC = {"lars_bs512"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STUDY))
def test_study_row_command_runs(tmp_path, name):
    """`python -m dpl experiment=study/<row> dataset=synthetic epochs=3`, as docs/study.md gives it: it
    trains to the end, or (a row known to blow up here) stops with the one-line divergence error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dpl", f"experiment=study/{name}", "dataset=synthetic", "epochs=3",
                           "logger=none", "progress=false"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    if name in DIVERGES_ON_SYNTHETIC and proc.returncode != 0:
        assert proc.stderr.strip().splitlines()[-1].startswith("error: diverged: training loss is"), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- learning rate


@pytest.mark.parametrize("epochs,warmup", [(150, 0), (150, 15), (100, 5), (10, 3), (7, 1)])
def test_per_epoch_lr_equals_pytorchs_chained_schedulers(epochs, warmup):
    """FIDELITY: LinearLR(start_factor=0.1, total_iters=W) then CosineAnnealingLR(T_max=E-W),
    chained by SequentialLR([W]), stepped once per epoch; epoch e uses the value before its step."""
    base = 0.04
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    if warmup:
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt, [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warmup),
                  torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs - warmup)], milestones=[warmup])
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    expected = []
    for _ in range(epochs):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cfg = compose_cfg("scheduler.interval=epoch", "scheduler.warmup_start_factor=0.1", tiny=False).scheduler
    assert lr_table(cfg, base, epochs, steps_per_epoch=176, warmup_epochs=warmup) == pytest.approx(expected, rel=1e-12)
    if warmup:
        assert expected[0] == pytest.approx(0.1 * base) and expected[warmup] == pytest.approx(base)


def test_per_step_lr_keeps_the_papers_closed_form():
    """dpl's default: warmup (t+1)/W, then cosine over the remaining steps (Goyal et al. 2017; SGDR)."""
    cfg = compose_cfg(tiny=False).scheduler
    E, S, W, base = 4, 10, 5, 0.1
    table = lr_table(cfg, base, E, S, warmup_epochs=W / S)
    T = E * S - W
    expected = [base * (t + 1) / W if t < W else base * 0.5 * (1 + math.cos(math.pi * (t - W) / T))
                for t in range(E * S)]
    assert table == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_trainer_holds_the_lr_for_a_whole_epoch_with_interval_epoch(make_cfg):
    trainer = build_trainer(make_cfg("scheduler.interval=epoch", "epochs=3", "warmup_epochs=1",
                                     "scheduler.warmup_start_factor=0.1"), CPU)
    S = trainer.steps_per_epoch
    lrs = [trainer.lr(t) for t in range(3 * S)]
    assert len(set(lrs[:S])) == len(set(lrs[S:2 * S])) == 1
    assert lrs[0] == pytest.approx(0.1 * trainer.base_lr) and lrs[S] == pytest.approx(trainer.base_lr)


def test_fractional_warmup_with_epoch_interval_is_one_clear_error():
    from dpl.errors import ConfigError

    with pytest.raises(ConfigError, match="warmup_epochs=0.5 is invalid"):
        validate(compose_cfg("scheduler.interval=epoch", "warmup_epochs=0.5"))


# ----------------------------------------------------------------------------- state lifetime


def _final_params(cfg):
    trainer = build_trainer(cfg, CPU)
    trainer.fit()
    return [p.detach().clone() for p in trainer.workers.params]


def test_inner_restart_with_one_step_per_epoch_is_sgd_without_momentum(make_cfg):
    """With one step per epoch, a fresh momentum buffer every epoch means the heavy-ball term
    never acts: the run equals momentum 0 (torch's SGD seeds the buffer with the first gradient)."""
    common = ["batch_size=2000", "epochs=3", "scheduler=constant", "dataset.augment=false", "dataset.num_train=400",
              "dataset.num_test=50"]
    restarted = _final_params(make_cfg(*common, "restart_inner_each_epoch=true"))
    plain = _final_params(make_cfg(*common, "optimizer.momentum=0.0"))
    kept = _final_params(make_cfg(*common))
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(restarted, plain))
    assert not all(torch.allclose(a, b, atol=1e-7) for a, b in zip(restarted, kept))


def test_slowmo_buffer_restart_with_one_sync_per_epoch_is_beta_zero(make_cfg):
    """One sync per epoch (H >= steps) and a zeroed slow momentum every epoch: u never carries
    over, so SlowMo acts as with beta = 0."""
    common = ["method=slowmo", "K=2", "H=100", "epochs=3", "method.outer.lr=1.5", "scheduler=constant",
              "dataset.num_train=400", "dataset.num_test=50", "sync_at_epoch_end=true"]  # 6 steps an epoch: one sync
    restarted = _final_params(make_cfg(*common, "method.outer.momentum=0.6", "method.restart_each_epoch=true"))
    beta0 = _final_params(make_cfg(*common, "method.outer.momentum=0.0"))
    kept = _final_params(make_cfg(*common, "method.outer.momentum=0.6"))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(restarted, beta0))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(restarted, kept))


@pytest.mark.parametrize("row", ["slowmo", "sgdm_wd4e-3"])
def test_study_rows_resume_exactly(make_cfg, tmp_path, monkeypatch, row):
    """Mid-epoch resume of a study-exact run (restarts, epoch lr, augmented validation)."""
    overrides = [f"experiment=study/{row}", "dataset=synthetic", "dataset.num_train=1000", "dataset.num_test=200",
                 "epochs=3", "checkpoint_every=5", "logger=none", "batch_size=32", "K=2"]
    assert_resume_is_exact(make_cfg, overrides, tmp_path, monkeypatch, stop_at=22)


# ----------------------------------------------------------------------------- data


def test_augmented_validation_is_redrawn_each_evaluation_and_reproducible(make_cfg):
    trainer = build_trainer(make_cfg("dataset.augment_val=true"), CPU)
    clean = trainer.evaluate("val")
    first = trainer.evaluate("val", augment_key=(0, 0))
    assert trainer.evaluate("val", augment_key=(0, 0)) == first  # seeded
    assert trainer.evaluate("val", augment_key=(0, 1)) != first  # redrawn at the next evaluation
    assert first != clean


def test_validation_record_uses_augmentation_only_when_asked(make_cfg):
    seen = []
    for flag in ("false", "true"):
        trainer = build_trainer(make_cfg(f"dataset.augment_val={flag}", "epochs=1"), CPU)
        trainer.fit()
        rec = trainer.state.history[0]
        clean_loss, _ = trainer.evaluate("val")
        seen.append(rec["val_loss"] == pytest.approx(clean_loss, rel=1e-6))
    assert seen == [True, False]


def test_fixed_order_reads_the_same_batches_every_epoch(make_cfg, monkeypatch):
    calls: list[list[int]] = []
    real = train_mod.batch_indices

    def spy(order, step, batch_size):
        idx = real(order, step, batch_size)
        calls.append(idx.flatten().tolist())
        return idx

    monkeypatch.setattr(train_mod, "batch_indices", spy)
    for shuffle in ("once", "epoch"):
        calls.clear()
        trainer = build_trainer(make_cfg(f"shuffle={shuffle}", "epochs=2"), CPU)
        trainer.fit()
        S = trainer.steps_per_epoch
        assert (calls[:S] == calls[S:2 * S]) is (shuffle == "once")


def test_steps_per_epoch_is_the_studys_budget():
    """45,000 training images dealt to K workers as the study does, batch 64: the budgets of golden/dynamic_h.json."""
    labels = torch.randint(0, 100, (45_000,))
    for K, budget in ((2, 352), (4, 176), (8, 88)):
        shards = make_shards(labels, K, "iid", seed=0)
        assert shards.shape == (K, 45_000 // K)  # equal: the largest shard is every shard
        assert steps_per_epoch(shards.shape[1], 64) == budget


# ----------------------------------------------------------------------------- communication


def test_sync_rounds_equal_the_studys_count(make_cfg):
    """FIDELITY: sync steps = sum over epochs of ceil(budget / H_epoch), with dynamic H."""
    trainer = build_trainer(make_cfg("method=localsgd", "K=2", "H=4", "epochs=4", "dynamic_h=asc_pow2",
                                     "batch_size=16", "sync_at_epoch_end=true"), CPU)
    trainer.fit()
    S, hist = trainer.steps_per_epoch, trainer.state.history
    assert [r["sync_rounds"] for r in hist] == [math.ceil(S / r["H"]) for r in hist]
    assert hist[-1]["sync_rounds_total"] == sum(math.ceil(S / r["H"]) for r in hist)
    assert len({r["H"] for r in hist}) > 1  # H changed, so the count is not a multiple of one period


def test_averaging_the_momentum_is_counted(make_cfg):
    """local_momentum=average all-reduces the SGD momentum (one replica's size) at every sync."""
    runs = {}
    for mode in ("keep", "average"):
        trainer = build_trainer(make_cfg("method=localsgd", "K=2", "H=4", "epochs=1", f"local_momentum={mode}"), CPU)
        trainer.fit()
        runs[mode] = trainer.state.history[0]
    keep, avg = runs["keep"], runs["average"]
    assert keep["collectives"] == keep["sync_rounds"] and avg["collectives"] == 2 * avg["sync_rounds"]
    assert avg["comm_bytes"] == pytest.approx(2 * keep["comm_bytes"])
    assert avg["comm_time_s"] > keep["comm_time_s"]


# ----------------------------------------------------------------------------- ablation


def test_every_ablation_file_switches_exactly_its_departure_to_the_paper():
    for name, departure in ((n, o.facts) for n, o in ABLATIONS.items()):
        data = yaml.safe_load((CONF / "ablation" / f"{name}.yaml").read_text())
        assert data.pop("ablation") == name
        flat = {k: v for k, v in OmegaConf.to_container(OmegaConf.create(data)).items()}
        flat = _flatten(flat)
        assert flat == departure.paper_values, name
        row = {"paper_lars": "lars_bs512"}.get(name, "slowmo")  # a row whose options have its keys
        cfg = compose_cfg(f"experiment=study/{row}", f"ablation={name}", tiny=False)
        validate(cfg)
        for key, value in departure.paper_values.items():
            assert OmegaConf.select(cfg, key) == value, (name, key)


def test_the_study_rows_hold_the_study_side_of_each_departure():
    """Each departure undone by an ablation is really set (to the study's value) by some row."""
    rows = [compose_cfg(f"experiment=study/{n}", tiny=False) for n in ("slowmo", "sgdm_wd4e-3", "lars_bs512")]
    for name, departure in ((n, o.facts) for n, o in ABLATIONS.items()):
        for key, paper in departure.paper_values.items():
            assert any(OmegaConf.select(cfg, key) != paper for cfg in rows), (name, key)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
