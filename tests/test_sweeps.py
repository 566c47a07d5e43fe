"""Sweeps as one command each: every sweep composes, a grid and an Optuna search run for real.

The end-to-end tests run ``python -m dpl``'s command line (as a user would type it, from a
directory outside the repository and without ``--config-dir``: the sweep configs are found
wherever the command runs) on tiny synthetic data and read the results back from the MLflow
and Optuna SQLite files. They run it in this process (``tests.processes.run_cli``: the same
``__main__``, its output captured), without a new interpreter's start-up per command.
"""

from __future__ import annotations

import csv
import itertools
import math
import subprocess
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, IntervalSweep
from omegaconf import OmegaConf

from dpl.config.overrides import group_options
from dpl.config.store import register_configs
from dpl.config.validate import validate
from dpl.core.schedules import scaled_lr
from dpl.errors import ConfigError
from dpl.run.build import build_trainer
from dpl.tracking.sweep import PARENT_TAG
from tests.conftest import CONF, compose_cfg
from tests.processes import optuna_trials, run_cli

ROOT = CONF.parent
SWEEPS = ROOT / "sweeps"
TINY = ["dataset=synthetic", "dataset.num_train=400", "dataset.num_test=100", "epochs=1", "progress=false",
        "device=cpu"]


def sweep_names() -> list[str]:
    return sorted(p.stem for p in SWEEPS.glob("*.yaml") if not p.stem.startswith("_"))


def compose_sweep(name: str, *overrides: str):
    """The sweep's config with its hydra node, as `python -m dpl --config-dir sweeps --config-name <name>`."""
    register_configs()
    with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
        return compose(name, overrides=[f"hydra.searchpath=[file://{CONF}]", *overrides], return_hydra_config=True)


def job_config(full):
    """What a job receives: the config without its hydra node, validated."""
    cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
    validate(cfg)
    return cfg


def grid(full) -> dict[str, list]:
    """Each swept key and its values (a glob over a group expands to its YAML files; an interval to its ends)."""
    out = {}
    for o in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in full.hydra.sweeper.params.items()]):
        value = o.value()
        if isinstance(value, Glob):
            out[o.key_or_group] = [n for n in group_options(o.key_or_group)
                                   if any(fnmatch(n, p) for p in value.include)
                                   and not any(fnmatch(n, p) for p in value.exclude)]
        elif isinstance(value, IntervalSweep):
            out[o.key_or_group] = [value.start, value.end]
        else:
            out[o.key_or_group] = list(o.sweep_iterator())
    return out


def test_the_issue_sweeps_exist():
    assert set(sweep_names()) == {"localsgd_grid", "large_batch", "optuna_lr", "slowmo", "dynamic_h", "study_ablation", "outer_optimizers",
                                 "compression", "compression_dense", "streaming", "streaming_dp", "diloco_lm",
                                 "diloco_lm_dp", "async", "async_sync"}


@pytest.mark.parametrize("name", sweep_names())
def test_every_sweep_composes_and_every_value_validates(name):
    full = compose_sweep(name)
    # compression_dense adds the dense formats to the compression sweep's experiment
    assert full.hydra.mode.name == "MULTIRUN" and \
        full.sweep == {"compression_dense": "compression", "streaming_dp": "streaming",
                      "diloco_lm_dp": "diloco_lm", "async_sync": "async"}.get(name, name)
    assert full.hydra.callbacks.mlflow_parent._target_ == "dpl.tracking.sweep.MlflowParentRun"
    cfg = job_config(full)
    assert cfg.logger.experiment == full.sweep  # one MLflow experiment per sweep
    values = grid(full)
    assert values
    for key, choices in values.items():  # every value of every axis makes a valid job
        for v in choices:
            job_config(compose_sweep(name, f"{key}={v}"))


def test_sweep_grids_are_the_issue_grids():
    assert grid(compose_sweep("localsgd_grid")) == {"K": [2, 4, 8], "H": [4, 8, 16, 32, 64]}
    assert grid(compose_sweep("large_batch"))["batch_size"] == [512, 1024, 2048, 4096, 8192, 16384]
    dyn = grid(compose_sweep("dynamic_h"))
    assert dyn["K"] == [2, 4, 8] and dyn["dynamic_h"] == group_options("dynamic_h")
    slowmo = compose_sweep("slowmo")
    assert slowmo.method.name == "slowmo" and set(grid(slowmo)) == {"method.outer.momentum", "method.outer.lr"}
    optuna = compose_sweep("optuna_lr", "optimizer=adamw")
    assert optuna.hydra.sweeper.direction == "maximize" and optuna.hydra.sweeper.storage.startswith("sqlite:///")
    assert optuna.hydra.sweeper.study_name == "optuna_lr-adamw"  # one resumable study per optimizer
    assert optuna.hydra.sweeper.seeds is None  # one job per trial unless asked (hydra.sweeper.seeds=[0,1,2])
    assert grid(optuna) == {"lr": [1e-4, 1.0], "weight_decay": [1e-6, 1e-2]}
    compression = compose_sweep("compression")
    assert (compression.method.name, compression.K, compression.H) == ("localsgd", 4, 8)
    assert grid(compression) == {"compression": ["topk", "randomk"], "compression.ratio": [0.001, 0.01, 0.1],
                                 "compression.error_feedback": [False, True]}
    assert compression.compression.name == "topk"  # the base job has the axes' keys
    dense = compose_sweep("compression_dense")
    assert grid(dense) == {"compression": ["none", "sign", "int8", "fp16", "bf16"]}
    assert (dense.method.name, dense.K, dense.H, dense.sweep) == ("localsgd", 4, 8, "compression")
    streaming = compose_sweep("streaming")
    assert (streaming.method.name, streaming.K, streaming.H) == ("streaming_diloco", 4, 8)
    assert grid(streaming) == {"method.fragments": [1, 2, 4], "method.delay": [0, 1],
                               "compression": ["none", "fp8", "fp4"], "seed": [0, 1, 2]}
    dp = compose_sweep("streaming_dp")  # the data-parallel baseline, into the same experiment
    assert (dp.method.name, dp.optimizer.name, dp.K, dp.sweep) == ("centralized", "adamw", 4, "streaming")
    for lossy in ("sign", "int8", "fp16", "bf16"):  # the header's second command
        assert job_config(compose_sweep("compression_dense", f"compression={lossy}",
                                        "compression.error_feedback=true")).compression.error_feedback


def test_large_batch_scales_the_lr_of_each_experiment():
    for experiment, optimizer in (("study/lars_bs512", "lars"), ("study/lamb_bs2048", "lamb")):
        cfg = job_config(compose_sweep("large_batch", f"experiment={experiment}", "batch_size=8192"))
        assert cfg.optimizer.name == optimizer and cfg.lr_scaling == "sqrt" and cfg.warmup_epochs > 0
    cfg = job_config(compose_sweep("large_batch", "experiment=study/lamb_bs2048", "batch_size=8192", "lr_scaling=linear"))
    assert (cfg.lr, cfg.base_batch_size, cfg.lr_scaling) == (0.008, 2048, "linear")


def test_scaled_lr_rules():
    assert scaled_lr(0.008, "none", 8192, 2048) == 0.008
    assert scaled_lr(0.008, "linear", 8192, 2048) == pytest.approx(0.032)
    assert scaled_lr(0.008, "sqrt", 8192, 2048) == pytest.approx(0.016)
    assert scaled_lr(0.01, "linear", 4 * 64, 64) == pytest.approx(0.04)  # the study's LocalSGD lr for K=4
    with pytest.raises(ValueError, match="lr_scaling='cubic'"):
        scaled_lr(0.1, "cubic", 1, 1)


def test_lr_scaling_is_validated_and_reaches_the_optimizer():
    bad = compose_cfg("lr_scaling=cubic")
    with pytest.raises(ConfigError, match="lr_scaling='cubic'"):
        validate(bad)
    cfg = compose_cfg("K=2", "batch_size=32", "base_batch_size=16", "lr=0.01", "lr_scaling=linear",
                      "scheduler=constant")
    trainer = build_trainer(cfg, torch.device("cpu"))
    assert trainer.base_lr == pytest.approx(0.04)  # 0.01 * (2 * 32) / 16
    assert trainer.lr(0) == pytest.approx(0.04)
    assert all(g["lr"] == pytest.approx(0.04) for g in trainer.optimizer.param_groups)


# ----------------------------------------------------------------------------- end to end


def _dpl(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    assert not (Path(cwd) / "sweeps").exists() and not Path(cwd).resolve().is_relative_to(ROOT)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HYDRA_FULL_ERROR", "1")
        env.delenv("DPL_SWEEP_PARENT_RUN_ID", raising=False)
        proc = run_cli(cwd, list(args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _client(path: Path):
    from dpl.tracking.store import mlflow_client

    return mlflow_client(f"sqlite:///{path}")


def _runs(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if PARENT_TAG in r.data.tags]
    return [r for r in runs if PARENT_TAG not in r.data.tags], parents


def test_grid_sweep_makes_one_child_run_per_cell_and_the_report_matches(tmp_path):
    _dpl(tmp_path, "--config-name", "localsgd_grid", *TINY, "K=2,4", "H=2,4", f"hydra.sweep.dir={tmp_path / 'mr'}")
    client = _client(tmp_path / "mlflow.db")  # the default store, in the launch directory
    jobs, parents = _runs(client, "localsgd_grid")
    assert len(jobs) == 4 and len(parents) == 1
    parent = parents[0]
    assert {(r.data.params["K"], r.data.params["H"]) for r in jobs} == set(itertools.product("24", "24"))
    for r in jobs:
        assert r.info.status == "FINISHED" and r.data.tags["sweep"] == "localsgd_grid"
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.params["method.name"] == "localsgd"
        # named by the sweep, the job number and the config; MLflow's source tag
        num = int(r.data.params["K"] == "4") * 2 + int(r.data.params["H"] == "4")  # K outer, H inner
        assert r.info.run_name == f"localsgd-K{r.data.params['K']}-H{r.data.params['H']}-sgdm-s0-#{num}"
        assert r.data.tags["mlflow.source.name"] == "python -m dpl"
    assert parent.info.run_name == "localsgd_grid"
    # the parent's params are the sweep's settings, not a job's K and H
    assert {k: v for k, v in parent.data.params.items() if k != "overrides"} == \
        {"sweep": "localsgd_grid", "sweeper": "BasicSweeper", "swept.K": "2,4", "swept.H": "2,4", "jobs": "4"}
    assert parent.data.params["overrides"] == " ".join(TINY)
    assert parent.info.status == "FINISHED" and parent.data.tags[PARENT_TAG] == "localsgd_grid"
    assert parent.data.metrics["jobs"] == 4 and parent.data.metrics["jobs_finished"] == 4
    assert parent.data.metrics["best_val_acc"] == max(r.data.metrics["best_val_acc"] for r in jobs)
    assert len(list((tmp_path / "mr").glob("*/checkpoint.pt"))) == 4  # one job dir each
    for log in (tmp_path / "mr").glob("*/dpl.log"):  # one line per epoch in each job's log (progress=false)
        assert sum(" - epoch 1/1 train_loss=" in line for line in log.read_text().splitlines()) == 1
    assert len(list((tmp_path / "mr").glob("*/dpl.log"))) == 4

    from dpl.report.cli import main as report

    out = tmp_path / "report"
    assert report(["--sweep", "localsgd_grid", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 4  # the parent run is not a row
    by_cell = {(r.data.params["K"], r.data.params["H"]): r for r in jobs}
    for row in rows:
        run = by_cell[(row["K"], row["H"])]
        assert row["n"] == "1" and row["failed"] == "0"
        for metric in ("test_acc", "best_val_acc", "sync_rounds_total", "comm_bytes_total"):
            assert float(row[f"{metric}_mean"]) == run.data.metrics[metric]
    assert (out / "report.md").is_file() and (out / "acc_vs_H.png").is_file() and (out / "pareto.png").is_file()


def test_optuna_search_reports_the_best_resumes_and_survives_divergence(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["--config-name", "optuna_lr", *TINY, f"hydra.sweeper.storage={storage}"]
    _dpl(tmp_path, *common, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'first'}")
    trials = optuna_trials(storage, "optuna_lr-sgdm")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    best = yaml.safe_load((tmp_path / "first" / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(t.value for t in trials)
    assert best["best_params"] in [t.params for t in trials if t.value == best["best_value"]]  # ties are possible
    client = _client(tmp_path / "mlflow.db")
    jobs, parents = _runs(client, "optuna_lr")
    assert len(jobs) == 3 and all(r.data.tags["sweep"] == "optuna_lr" for r in jobs)
    by_lr = {float(r.data.params["lr"]): r for r in jobs}
    for t in trials:  # the objective Optuna saw is the job's best validation accuracy in MLflow
        assert by_lr[t.params["lr"]].data.metrics["best_val_acc"] == t.value
    assert parents[0].data.metrics["best_val_acc"] == best["best_value"]

    # Resume the same study with a range of lrs that diverge: the trials are added as FAIL (never
    # a value that could be best), the MLflow runs are FAILED with the reason, and the sweep finishes.
    resumed = _dpl(tmp_path, *common, "hydra.sweeper.n_trials=2", "lr=tag(log, interval(1e8, 1e9))",
         f"hydra.sweep.dir={tmp_path / 'second'}")
    trials = optuna_trials(storage, "optuna_lr-sgdm")
    assert len(trials) == 5 and [t.state.name for t in trials[3:]] == ["FAIL"] * 2
    assert yaml.safe_load((tmp_path / "second" / "optimization_results.yaml").read_text())["best_value"] == \
        best["best_value"]  # still the best of the first three
    jobs, parents = _runs(client, "optuna_lr")
    failed = [r for r in jobs if r.info.status == "FAILED"]
    assert len(jobs) == 5 and len(failed) == 2 and len(parents) == 2
    assert all(("nan" in r.data.tags["failure_reason"] or "inf" in r.data.tags["failure_reason"]) for r in failed)
    assert all("test_acc" not in r.data.metrics for r in failed)
    second = max(parents, key=lambda r: r.info.start_time)
    assert second.data.metrics["jobs_failed"] == 2 and "best_val_acc" not in second.data.metrics
    # Optuna's lines go through Hydra's plain handlers: no ANSI colour codes in a captured console
    # (a SLURM or `tee` log) nor in the job logs.
    console = resumed.stdout + resumed.stderr
    assert "Using an existing study" in console and "\x1b[" not in console
    for path in tmp_path.glob("*/*/dpl.log"):
        assert "\x1b[" not in path.read_text(), path

    from dpl.report.cli import main as report

    out = tmp_path / "report"
    assert report(["--experiment", "optuna_lr", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert sum(int(r["failed"]) for r in rows) == 2 and sum(int(r["n"]) for r in rows) == 3
    diverged = [r for r in rows if r["failed"] == "1"]
    assert all(r["test_acc_mean"] == "" for r in diverged)
    assert "## Failed runs" in (out / "report.md").read_text()
    assert not math.isnan(max(float(r["best_val_acc_mean"]) for r in rows if r["n"] == "1"))
    assert (out / "acc_vs_lr.png").is_file()  # an Optuna search: accuracy against the sampled lr

    # A search where every trial diverges says so plainly, with no best parameters.
    proc = _dpl(tmp_path, *common, "hydra.sweeper.study_name=all_diverge", "hydra.sweeper.n_trials=2",
                "lr=tag(log, interval(1e8, 1e9))", f"hydra.sweep.dir={tmp_path / 'third'}")
    assert [t.state.name for t in optuna_trials(storage, "all_diverge")] == ["FAIL"] * 2
    assert "no trial of study all_diverge completed" in proc.stdout + proc.stderr
    third = yaml.safe_load((tmp_path / "third" / "optimization_results.yaml").read_text())
    assert third["best_params"] is None and third["best_value"] is None


def test_optuna_seeds_per_trial_are_jobs_scored_by_their_mean(tmp_path):
    """2 trials x 2 seeds: four ordinary jobs, one trial told the mean of its seeds, and one
    trial FAIL because one of its seeds diverged (the other did not)."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # lr=3 is at the edge of divergence for this tiny net: there one seed diverges and the other
    # does not (which one is chaotic, so the checks below hold for whichever). A seeded random
    # sampler over the two values gives each trial one of them.
    _dpl(tmp_path, "--config-name", "optuna_lr", *TINY, f"hydra.sweeper.storage={storage}",
         "hydra.sweeper.seeds=[0,1]", "hydra.sweeper.n_trials=2", "hydra/sweeper/sampler=random",
         "hydra.sweeper.sampler.seed=0", "lr=choice(0.05,3)", "hydra.sweeper.params.weight_decay=5e-4",
         f"hydra.sweep.dir={tmp_path / 'mr'}")
    trials = optuna_trials(storage, "optuna_lr-sgdm")
    assert sorted(t.params["lr"] for t in trials) == [0.05, 3]

    # Trial t's seeds are jobs 2t and 2t+1: their own job dirs, seed added to the trial's overrides.
    dirs = sorted((tmp_path / "mr").glob("[0-9]*"), key=lambda p: int(p.name))
    assert [p.name for p in dirs] == ["0", "1", "2", "3"]
    for num, d in enumerate(dirs):
        overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
        assert overrides[-1] == f"seed={num % 2}"
        assert f"lr={trials[num // 2].params['lr']}" in overrides

    # Each job is its own MLflow run under the sweep's one parent.
    jobs, parents = _runs(_client(tmp_path / "mlflow.db"), "optuna_lr")
    assert len(parents) == 1 and len(jobs) == 4
    assert parents[0].data.params["jobs"] == "4"  # 2 trials x 2 seeds
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in jobs)
    by_job = {(float(r.data.params["lr"]), int(r.data.params["seed"])): r for r in jobs}
    assert set(by_job) == {(lr, s) for lr in (0.05, 3.0) for s in (0, 1)}

    mixed = 0
    for t in trials:
        runs = [by_job[(t.params["lr"], s)] for s in (0, 1)]
        values = [r.data.metrics["best_val_acc"] if r.info.status == "FINISHED" else None for r in runs]
        assert t.user_attrs["seeds"] == [0, 1] and t.user_attrs["seed_values"] == values
        if None in values:  # a diverged seed: the trial is FAIL, whatever the other seed scored
            assert t.state.name == "FAIL" and t.value is None
            mixed += values.count(None) == 1
        else:
            assert t.state.name == "COMPLETE" and t.value == pytest.approx(sum(values) / 2)
    (small,) = [t for t in trials if t.params["lr"] == 0.05]
    assert small.state.name == "COMPLETE"
    assert mixed == 1, "lr=3 no longer splits its two seeds here: pick another lr at the edge (2 to 16)"
    best = yaml.safe_load((tmp_path / "mr" / "optimization_results.yaml").read_text())
    assert best["best_value"] == small.value and best["best_params"]["lr"] == 0.05

    # Three rows in results.csv (the diverged job has none), and the report groups a trial's seeds.
    assert len(list(csv.DictReader(open(tmp_path / "results.csv")))) == 3
    from dpl.report.cli import main as report

    out = tmp_path / "report"
    assert report(["--experiment", "optuna_lr", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "--out", str(out)]) == 0
    rows = {float(r["lr"]): r for r in csv.DictReader(open(out / "summary.csv"))}
    assert (rows[0.05]["n"], rows[0.05]["failed"]) == ("2", "0")
    assert (rows[3.0]["n"], rows[3.0]["failed"]) == ("1", "1")
    assert float(rows[0.05]["best_val_acc_mean"]) == pytest.approx(small.value)


def test_a_trial_is_its_failed_or_diverged_seed_or_the_mean():
    from hydra.core.utils import JobReturn, JobStatus

    from hydra_plugins.dpl_sweepers._seeds import fold

    def job(value, status=JobStatus.COMPLETED):
        return JobReturn(overrides=["lr=0.1", "seed=0"], status=status, _return_value=value)

    assert fold(["lr=0.1"], [job(0.25), job(0.5)], [0, 1]).return_value == 0.375
    assert fold(["lr=0.1"], [job(0.25), job(0.5)], [0, 1]).overrides == ["lr=0.1"]
    assert fold(["lr=0.1"], [job(0.25), job("diverged")], [3, 7]).return_value == "diverged (seed 7)"
    assert fold(["lr=0.1"], [job(math.nan), job(0.5)], [3, 7]).return_value == "diverged (seed 3)"
    crashed = job(RuntimeError("out of memory"), JobStatus.FAILED)
    assert fold(["lr=0.1"], [job(0.25), crashed], [0, 1]) is crashed  # the sweeper raises its error


# ----------------------------------------------------------------------------- command-line sweeps


def test_a_command_line_sweep_is_named_and_laid_out_as_a_sweep_config():
    from dpl.__main__ import as_sweep
    from dpl.config.overrides import SWEEPS_DIR

    shared = yaml.safe_load((SWEEPS_DIR / "_sweep.yaml").read_text())
    extra = as_sweep(["-m", "method=localsgd", "K=2", "H=1,8", "seed=0,1,2"])[5:]
    assert extra[0] == "sweep=sweep-H-seed"  # derived from the swept keys, in command-line order
    assert f"hydra.sweep.dir='{shared['hydra']['sweep']['dir']}'" in extra  # multirun/${sweep}/<time>
    assert "++hydra.callbacks.mlflow_parent._target_='dpl.tracking.sweep.MlflowParentRun'" in extra
    assert "logger.experiment='${sweep}'" in extra and not any("hydra.mode" in o for o in extra)
    # a given name is the sweep's; the command line's own settings win over _sweep.yaml's
    given = as_sweep(["-m", "K=1,2", "sweep=h_sweep", "hydra.sweep.dir=elsewhere", "logger.experiment=mine"])
    assert not any(o.startswith(("sweep=", "hydra.sweep.dir=", "logger.experiment=")) for o in given[5:])
    # a sweep config, or a single run, is left as it is
    assert as_sweep(["-m", "--config-name", "localsgd_grid", "K=1,2"]) == ["-m", "--config-name", "localsgd_grid",
                                                                        "K=1,2"]
    assert as_sweep(["K=1"]) == ["K=1"]
    assert as_sweep(["-m", "K=1"])[2] == "sweep=sweep"  # nothing swept: one job, still a sweep
    with pytest.raises(ConfigError, match=r"^sweep=a,b is invalid under -m: allowed one name"):
        as_sweep(["-m", "K=1,2", "sweep=a,b"])


LAUNCHERS = {"basic": [], "packed": ["hydra/launcher=packed"], "local": ["hydra/launcher=local"]}


# measured on 2 cores: basic and packed ~10 s, local ~25 s (each job a submitit process that imports torch)
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_command_line_sweep_has_its_parent_run_experiment_and_folder(launcher, tmp_path):
    """``python -m dpl -m ...`` with each launcher: one parent run in the sweep's experiment, the jobs its
    children, their job dirs in multirun/<sweep>/<time>/ (the store: mlflow.db in the launch dir)."""
    named = launcher == "packed"  # a given name; the others derived from the swept key
    sweep = "h_sweep" if named else "sweep-seed"
    _dpl(tmp_path, "-m", *LAUNCHERS[launcher], *TINY, "dataset.num_train=200", "dataset.num_test=50",
         "logger.plots=false", "method=localsgd", "K=2", "H=2", "seed=0,1", *(["sweep=h_sweep"] if named else []))
    jobs, parents = _runs(_client(tmp_path / "mlflow.db"), sweep)
    assert len(parents) == 1 and len(jobs) == 2
    (parent,) = parents
    assert parent.info.run_name == sweep and parent.data.tags[PARENT_TAG] == sweep
    assert parent.info.status == "FINISHED" and parent.data.params["swept.seed"] == "0,1"
    assert parent.data.metrics["jobs_finished"] == 2
    (folder,) = (tmp_path / "multirun" / sweep).iterdir()  # one sweep: multirun/<sweep>/<time>/
    assert (tmp_path / parent.data.tags["sweep_dir"]).resolve() == folder.resolve()  # (relative to the launch dir)
    assert {r.data.tags["dpl.job_dir"] for r in jobs} == {str((folder / n).resolve()) for n in ("0", "1")}
    for r in jobs:
        assert r.info.status == "FINISHED" and r.data.tags["sweep"] == sweep
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert sorted(r.info.run_name for r in jobs) == ["localsgd-K2-H2-sgdm-s0-#0", "localsgd-K2-H2-sgdm-s1-#1"]
