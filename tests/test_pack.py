"""A sweep packed into one process (dpl.pack): packed ≡ alone, the grouping rules, failures per run."""

from __future__ import annotations

import math

import pytest
import torch

from dpl.core.loop import WALL_CLOCK_FIELDS
from dpl.core.packed import PackedStep
from dpl.errors import Diverged
from dpl.pack.groups import differing_keys, group_jobs, packs
from dpl.pack.lockstep import Lockstep
from dpl.run.build import build_trainer
from dpl.tracking.params import flatten_config
from tests.conftest import compose_cfg

SMALL = ["dataset.num_train=400", "dataset.num_test=100", "batch_size=16"]
CPU = torch.device("cpu")


def alone(cfg):
    trainer = build_trainer(cfg, CPU)
    trainer.fit()
    return trainer


def packed(cfgs, fuse=True, on_diverged=None):
    trainers = [build_trainer(c, CPU) for c in cfgs]
    Lockstep(trainers, fuse=fuse, on_diverged=on_diverged).fit()
    return trainers


def history(trainer):
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK_FIELDS} for row in trainer.state.history]


def assert_same(a, b):
    """Bit for bit: the same records and the same weights of every worker."""
    assert history(a) == history(b)
    for x, y in zip(a.workers.params + a.workers.buffers, b.workers.params + b.workers.buffers):
        assert torch.equal(x, y)


def assert_close(a, b, tol=1e-3):
    """To float tolerance: vmap's batched kernels over R·K workers sum in another order than over K, and
    training amplifies the last bits (an accuracy may flip a borderline sample: the losses are compared)."""
    for ra, rb in zip(history(a), history(b)):
        for k in ("train_loss", "val_loss"):
            assert math.isclose(ra[k], rb[k], rel_tol=tol, abs_tol=tol), (k, ra[k], rb[k])
    # AdamW moves a weight with a near-zero gradient by ±lr whatever its size: a few single elements may
    # differ by more than the rest; the weights as a whole stay within tol (relative, in norm)
    x = torch.cat([t.flatten() for t in a.workers.params + a.workers.buffers])
    y = torch.cat([t.flatten() for t in b.workers.params + b.workers.buffers])
    assert (x - y).norm() <= tol * x.norm()


def test_packed_losses_give_each_run_its_own_losses_and_gradients():
    """The identity the fused step carries, on the function that carries it: one vmapped call over R·K
    workers gives every run the losses and gradients of its own K workers' call."""
    cfgs = [compose_cfg(*SMALL, "K=2", "engine.simulate=vmap", *m) for m in MEMBERS]
    trainers = [build_trainer(c, CPU) for c in cfgs]
    steps = [t.local_step for t in trainers]
    idx = torch.stack([t.step_inputs(t.epoch_order()).idx for t in trainers])
    own = []
    for r, step in enumerate(steps):
        step.set_inputs(0, 0)
        total, losses, correct = step.batch_losses(idx[r], step.key)
        total.backward()
        own.append((losses, correct, [p.grad.clone() for p in step.workers.params]))
        step.clear_grads(set_to_none=True)
    fused = PackedStep(steps)
    fused.set_inputs(0, 0)
    total, losses, correct = fused.batch_losses(idx, fused.key)
    total.backward()
    for r, (step, l, c) in enumerate(zip(steps, fused.split(losses), fused.split(correct))):
        torch.testing.assert_close(l, own[r][0], atol=1e-6, rtol=1e-5)
        assert torch.equal(c, own[r][1])
        for p, g in zip(step.workers.params, own[r][2]):
            torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


METHOD_RUNS = {
    "centralized": ["method=centralized", "K=2"],
    "localsgd": ["method=localsgd", "K=2", "H=4"],
    "slowmo": ["method=slowmo", "K=2", "H=2"],
    "diloco": ["method=diloco", "K=2", "H=4"],
    "fp8": ["method=diloco", "K=2", "H=4", "compression=fp8", "compression.error_feedback=true"],
}
# what the runs of a group differ in: their seed and their hyperparameters
MEMBERS = [["seed=0"], ["seed=1", "lr=0.02"], ["seed=2", "weight_decay=0.001"]]


@pytest.mark.parametrize("name", list(METHOD_RUNS))
def test_packed_runs_equal_each_run_alone_bit_for_bit_in_loop_mode(name):
    cfgs = [compose_cfg(*SMALL, *METHOD_RUNS[name], "engine.simulate=loop", *m) for m in MEMBERS]
    for by_itself, together in zip([alone(c) for c in cfgs], packed(cfgs)):
        assert_same(by_itself, together)


# What the fused step is checked on: its losses and gradients (the identity above, exact on the function
# that carries it) and the method's syncs and outer step around it. DiLoCo runs here with an inner SGDM:
# AdamW moves a weight whose gradient is near zero by about ±lr whatever the gradient's size, so the
# last-bit differences of the fused kernels grow step by step into weights ~2e-3 apart in norm on some
# CPUs (torch 2.14.1+cu130), which says nothing about the fusion. Loop mode holds AdamW bit for bit.
FUSED_INNER = {"diloco": ["optimizer=sgdm"]}


@pytest.mark.parametrize("name", ["centralized", pytest.param("localsgd", marks=pytest.mark.slow), "diloco"])
def test_fused_vmap_runs_equal_each_run_alone_to_float_tolerance(name):
    cfgs = [compose_cfg(*SMALL, *METHOD_RUNS[name], *FUSED_INNER.get(name, []), "engine.simulate=vmap", *m)
            for m in MEMBERS[:2]]
    trainers = [build_trainer(c, CPU) for c in cfgs]
    group = Lockstep(trainers)
    fused = []
    original = group._run
    group._run = lambda members, inputs: (fused.append(len(members)), original(members, inputs))
    group.fit()
    assert fused and set(fused) == {2}  # every step of the two ran as one
    for cfg, together in zip(cfgs, trainers):
        assert_close(alone(cfg), together)


@pytest.mark.slow  # ResNet-20's BatchNorm buffers through the fused step (~3 s)
def test_fused_step_keeps_each_runs_batchnorm_statistics():
    base = [*SMALL, "model=resnet20", "dataset.image_size=32", "epochs=1", "dataset.num_train=200",
            "method=localsgd", "K=2", "H=2", "engine.simulate=vmap"]
    cfgs = [compose_cfg(*base, *m) for m in MEMBERS[:2]]
    for cfg, together in zip(cfgs, packed(cfgs)):
        assert together.workers.buffers
        assert_close(alone(cfg), together)


def test_runs_with_their_own_H_and_dynamic_H_pack_and_sync_on_their_own_schedule():
    base = [*SMALL, "method=localsgd", "K=2", "engine.simulate=loop", "epochs=3"]
    cfgs = [compose_cfg(*base, "H=2"), compose_cfg(*base, "H=8", "seed=1"),
            compose_cfg(*base, "H=2", "dynamic_h=asc_pow2", "seed=2")]
    runs = packed(cfgs)
    assert [r["H"] for r in runs[2].state.history] != [r["H"] for r in runs[0].state.history]
    for cfg, together in zip(cfgs, runs):
        assert_same(alone(cfg), together)


@pytest.mark.slow  # the Lockstep side of test_a_diverging_member_ends_failed_with_its_reason_and_the_others_finish
def test_a_diverging_run_leaves_the_group_and_the_others_go_on():
    base = [*SMALL, "method=localsgd", "K=2", "H=2", "engine.simulate=loop", "epochs=3"]
    cfgs = [compose_cfg(*base), compose_cfg(*base, "lr=1e9", "seed=1"), compose_cfg(*base, "seed=2")]
    lost = []
    runs = packed(cfgs, on_diverged=lambda i, e: lost.append((i, e)))
    assert [i for i, _ in lost] == [1] and isinstance(lost[0][1], Diverged)
    assert runs[1].state.epoch < 3
    for i in (0, 2):
        assert runs[i].state.epoch == 3
        assert_same(alone(cfgs[i]), runs[i])


def test_early_stopping_runs_stop_taking_steps_alone():
    base = [*SMALL, "method=localsgd", "K=2", "H=2", "engine.simulate=loop", "epochs=4"]
    cfgs = [compose_cfg(*base, "patience=1", "lr=1e-6"), compose_cfg(*base, "seed=1")]
    runs = packed(cfgs)
    assert runs[0].state.stopped_early and runs[0].state.epoch < 4 and runs[1].state.epoch == 4
    for cfg, together in zip(cfgs, runs):
        assert_same(alone(cfg), together)


def test_runs_at_different_points_catch_up_before_stepping_together():
    """A resumed group whose runs were checkpointed at different steps: the one behind steps alone first."""
    base = [*SMALL, "method=localsgd", "K=2", "H=4", "engine.simulate=vmap"]
    cfgs = [compose_cfg(*base, *m) for m in MEMBERS[:2]]
    ahead = build_trainer(cfgs[0], CPU)
    for _ in range(5):
        ahead.step()
    behind = build_trainer(cfgs[1], CPU)
    stepped = []
    group = Lockstep([ahead, behind])
    original = group._run
    group._run = lambda members, inputs: (stepped.append(tuple(members)), original(members, inputs))
    group.fit()
    assert stepped[:5] == [(1,)] * 5 and stepped[5] == (0, 1)
    assert_close(alone(cfgs[1]), behind)


def test_grouping_rules():
    def flat(*overrides):
        return flatten_config(compose_cfg(*overrides))

    jobs = [flat("seed=0"), flat("seed=1", "lr=0.3"), flat("K=2"), flat("seed=2", "weight_decay=0"),
            flat("method=localsgd", "H=4", "dynamic_h=asc_pow2"), flat("method=localsgd", "H=8"),
            flat("engine=distributed", "K=2"), flat("batch_size=16"), flat("seed=3", "sweep=a", "progress=true")]
    assert group_jobs(jobs, max_pack=8) == [[0, 1, 3, 8], [2], [4, 5], [6], [7]]
    assert group_jobs(jobs, max_pack=2) == [[0, 1], [2], [3, 8], [4, 5], [6], [7]]
    assert group_jobs(jobs, max_pack=1) == [[i] for i in range(len(jobs))]
    assert packs(jobs[6]) == "engine.name=distributed"
    assert packs(flat("resume=/x")) == "resume=/x"
    assert differing_keys([jobs[0], jobs[1]]) == ["lr", "seed"]
    with pytest.raises(ValueError, match="max_pack=0 is invalid"):
        group_jobs(jobs, max_pack=0)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["centralized", "localsgd", "diloco"])
def test_fused_cuda_graph_of_packed_runs_equals_each_run_alone(name):
    from dpl.core.packed import PackedGraphStep

    dev = torch.device("cuda")
    cfgs = [compose_cfg(*SMALL, *METHOD_RUNS[name], "device=cuda", "engine.compile=graph", "epochs=3", *m)
            for m in MEMBERS[:2]]
    trainers = [build_trainer(c, dev) for c in cfgs]
    group = Lockstep(trainers)
    group.fit()
    (checked,) = group._fused.values()
    step = checked.fast
    assert checked.checked and not checked.eager_only  # its first replay matched the runs alone
    assert isinstance(step, PackedGraphStep) and not step.failed and step.captured
    for cfg, together in zip(cfgs, trainers):
        run = build_trainer(cfg, dev)
        run.fit()
        assert_close(run, together)

# ---------------------------------------------------------------------- the launcher, end to end
import csv  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from dpl.run import checkpoint  # noqa: E402
from dpl.run.job import run  # noqa: E402
from dpl.tracking.store import mlflow_client  # noqa: E402
from tests.processes import run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ENV.pop("DPL_SWEEP_PARENT_RUN_ID", None)
SWEEP = ["dataset=synthetic", "dataset.num_train=400", "dataset.num_test=100", "batch_size=32", "progress=false",
         "logger.plots=false", "device=cpu", "method=localsgd", "K=2", "H=4", "sweep=packed"]


def finished_runs(db: Path):
    client = mlflow_client(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("packed")  # a sweep's experiment is its name, as a sweep config's
    return [r for r in client.search_runs([exp.experiment_id], filter_string="tags.sweep = 'packed'")
            if "sweep_parent" not in r.data.tags]


def test_packed_sweep_lands_each_run_as_its_own_job_and_mlflow_run(tmp_path):
    proc = run_cli(tmp_path, ["-m", "hydra/launcher=packed", *SWEEP, "epochs=2", "seed=0,1", "lr=0.05,0.1",
                              "hydra.launcher.max_pack=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a group of three, and a group of one (an ordinary run)
    assert "packed launcher: 4 jobs in 2 groups (sizes 3 1; max_pack=3); packed runs differ in lr, seed" in proc.stdout + proc.stderr
    runs = finished_runs(tmp_path / "mlflow.db")
    assert sorted((r.data.params["seed"], r.data.params["lr"]) for r in runs) == \
        sorted((str(s), str(lr)) for s in range(2) for lr in (0.05, 0.1))
    assert {r.info.status for r in runs} == {"FINISHED"}
    names = sorted(r.data.tags["mlflow.runName"] for r in runs)  # named as today: by what the sweep varies, #job
    assert names[0].startswith("localsgd-K2-H4-sgdm-s0-") and len(set(names)) == 4
    assert sorted(int(n.rsplit("#", 1)[1]) for n in names) == list(range(4))
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    jobs = {r["job_dir"] for r in rows}
    assert len(rows) == 4 and len(jobs) == 4 and {r.data.tags["dpl.job_dir"] for r in runs} == jobs
    for row in rows:  # each job dir: its own config, log, checkpoint and history
        job = Path(row["job_dir"])
        assert (job / ".hydra" / "config.yaml").is_file() and (job / "history.csv").is_file()
        assert (job / "checkpoint.pt").is_file() and (job / "result.csv").is_file()
        assert f"test_acc={float(row['test_acc']):.4f}" in (job / "dpl.log").read_text()
    # each one is the job run alone (engine.simulate=loop on CPU: bit for bit)
    from tests.conftest import compose_cfg

    row = next(r for r in rows if r["seed"] == "1" and r["lr"] == "0.05")  # packed with two others
    cfg = compose_cfg(*SWEEP, "epochs=2", "seed=1", "lr=0.05", "logger=none", f"results_csv={tmp_path / 'alone.csv'}")
    assert run(cfg, out_dir=tmp_path / "alone")["test_acc"] == float(row["test_acc"])
    # a re-run skips every finished run
    again = run_cli(tmp_path, ["-m", "hydra/launcher=packed", *SWEEP, "epochs=2", "seed=0,1", "lr=0.05,0.1"])
    assert again.returncode == 0 and again.stdout.count("already finished") == 4, again.stdout[-2000:]
    sweeps = [p.parent for p in (tmp_path / "multirun").glob("*/*/multirun.yaml")]
    assert len(sweeps) == 2  # the re-run made no job dirs for the runs it skipped
    assert sorted(len([d for d in s.iterdir() if d.is_dir()]) for s in sweeps) == [0, 4]


def test_a_member_refused_for_a_bad_value_ends_alone_in_one_line(tmp_path):
    bad_root = tmp_path / "file"
    bad_root.write_text("")
    proc = run_cli(tmp_path, ["-m", "hydra/launcher=packed", *SWEEP, "epochs=1", "seed=0,1",
                              f"results_csv={bad_root}/x.csv", "logger=none"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("error: job ") == 2 and "results_csv" in proc.stderr


def _history(job: Path):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in csv.DictReader((job / "history.csv").open())]


def test_a_killed_packed_sweep_re_run_resumes_every_unfinished_run_exactly(tmp_path):
    args = ["-m", "hydra/launcher=packed", *SWEEP, "epochs=3", "seed=0,1", "checkpoint_every=3"]
    (tmp_path / "full").mkdir()
    full = run_cli(tmp_path / "full", [*args, f"hydra.sweep.dir={tmp_path / 'full' / 'sweep'}"])
    assert full.returncode == 0, full.stderr[-2000:]
    work = tmp_path / "cut"
    work.mkdir()
    sweep = work / "first"
    proc = subprocess.Popen([sys.executable, "-m", "dpl", *args, f"hydra.sweep.dir={sweep}"], cwd=work, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            states = []
            for n in (0, 1):
                try:
                    states.append(checkpoint.load(sweep / str(n))["state"])
                except checkpoint.CheckpointError:
                    states.append(None)
            if all(s is not None and (s["epoch"] >= 1 and s["step"] > 0) for s in states):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the packed sweep never got past its first epoch")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    # re-run with a new sweep dir: both runs resume in their own job dirs, in their own MLflow runs
    again = run_cli(work, args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("resuming") + again.stderr.count("resuming") == 2
    runs = {r.data.params["seed"]: r for r in finished_runs(work / "mlflow.db")}
    assert len(runs) == 2 and {r.info.status for r in runs.values()} == {"FINISHED"}
    for n in (0, 1):
        assert _history(sweep / str(n)) == _history(tmp_path / "full" / "sweep" / str(n))


def _members(tmp_path, *variants):
    from dpl.pack.job import Member
    from tests.conftest import compose_cfg

    db = tmp_path / "mlflow.db"
    return [Member(compose_cfg(*SWEEP, "epochs=3", "logger=mlflow", f"logger.tracking_uri=sqlite:///{db}",
                               f"results_csv={tmp_path / 'results.csv'}", *v), tmp_path / f"job{i}", f"#{i}")
            for i, v in enumerate(variants)], db


def test_a_diverging_member_ends_failed_with_its_reason_and_the_others_finish(tmp_path):
    from dpl.pack.job import run_group

    members, db = _members(tmp_path, ["seed=0"], ["seed=1", "lr=1e9"], ["seed=2"])
    outcomes = run_group(members)
    assert outcomes[1]["diverged"] and "best_val_acc" in outcomes[0] and "best_val_acc" in outcomes[2]
    runs = {r.data.params["seed"]: r for r in finished_runs_all(db)}
    assert runs["1"].info.status == "FAILED" and runs["1"].data.tags["failure_reason"].startswith("diverged")
    assert runs["0"].info.status == runs["2"].info.status == "FINISHED"
    assert len(list(csv.DictReader((tmp_path / "results.csv").open()))) == 2


def test_ctrl_c_ends_every_unfinished_member_killed_and_they_resume(tmp_path, monkeypatch):
    from dpl.pack import job as pack_job
    from dpl.pack.lockstep import Lockstep

    members, db = _members(tmp_path, ["seed=0"], ["seed=1"])
    original = Lockstep.step

    def interrupted(self, front):
        if self.trainers[0].state.global_step == 8:  # mid-epoch 2
            raise KeyboardInterrupt
        original(self, front)

    monkeypatch.setattr(Lockstep, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack_job.run_group(members)
    assert {r.info.status for r in finished_runs_all(db)} == {"KILLED"}
    monkeypatch.setattr(Lockstep, "step", original)
    again, _ = _members(tmp_path, ["seed=0"], ["seed=1"])  # the same job dirs: each resumes from its checkpoint
    outcomes = pack_job.run_group(again)
    runs = finished_runs_all(db)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    from tests.conftest import compose_cfg

    alone_cfg = compose_cfg(*SWEEP, "epochs=3", "seed=1", "logger=none", f"results_csv={tmp_path / 'alone.csv'}")
    assert outcomes[1]["test_acc"] == run(alone_cfg, out_dir=tmp_path / "alone")["test_acc"]


def finished_runs_all(db: Path):
    client = mlflow_client(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("dpl")
    return client.search_runs([exp.experiment_id])


@pytest.mark.slow  # the command as it is (4 runs of the study's LocalSGD row, ~40 s) and its report
def test_the_study_row_packed_over_four_seeds_lands_four_runs_that_the_report_groups(tmp_path):
    from dpl.report.cli import main as report

    proc = run_cli(tmp_path, ["-m", "hydra/launcher=packed", "experiment=study/localsgd", "seed=range(4)",
                              "dataset=synthetic", "epochs=2", "progress=false", "logger.plots=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 jobs in 1 groups (sizes 4; max_pack=8); packed runs differ in seed" in proc.stdout + proc.stderr
    out = tmp_path / "report"
    report(["--experiment", "study", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--out", str(out)])
    text = (out / "report.md").read_text()
    assert "4 finished, 0 failed" in text
    table = [line for line in text.splitlines() if line.startswith("| synthetic | localsgd |")]
    assert table and "(4)" in table[0]
