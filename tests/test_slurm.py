"""Sweeps through Hydra's submitit launchers, preemption that resumes, ranks from Slurm.

``hydra/launcher=local`` runs every job as real processes of submitit's local executor: the
same pickled job, signal handling, requeue and task variables as on Slurm, without a queue
(no Slurm cluster is reachable here). A preemption is the real signal (SIGUSR2) sent to the
job's process, as Slurm sends it; ``srun`` is stood in for by its environment variables, set
on two plain ``python -m dpl`` processes.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpl.errors import ConfigError
from dpl.launch.slurm import ENV_KEYS, RANKS_FROM_ENV, export_ranks, in_srun_step
from dpl.run import preempt
from dpl.tracking.store import check_store_for_launcher
from tests.conftest import compose_cfg
from tests.processes import run_cli

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items()
       if not k.startswith(("SLURM_", "SUBMITIT_")) and k not in (*ENV_KEYS, RANKS_FROM_ENV, "DPL_SWEEP_PARENT_RUN_ID")}
ENV.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
TINY = ["dataset=synthetic", "dataset.num_train=400", "dataset.num_test=100", "epochs=1", "progress=false",
        "device=cpu"]
LINUX = pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="finds the job's process in /proc")


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def runs(db: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, [r for r in client.search_runs(experiments) if "sweep_parent" not in r.data.tags]  # the jobs


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- sweeps


def test_local_launcher_sweep_lands_every_job_and_a_rerun_skips_them(tmp_path):
    grid = ["-m", "hydra/launcher=local", *TINY, "method=localsgd", "K=1,2", "H=1,2"]
    done = run_cli(tmp_path, [*grid, f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    table = rows(tmp_path / "results.csv")
    assert sorted((r["K"], r["H"]) for r in table) == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    _, found = runs(tmp_path / "mlflow.db")
    assert len(found) == 4 and {r.info.status for r in found} == {"FINISHED"}
    jobs = {Path(r.data.tags["dpl.job_dir"]) for r in found}
    assert jobs == {(tmp_path / "sweep" / str(n)).resolve() for n in range(4)}
    for job in jobs:  # each job ran in its own submitit process, in its own job dir
        assert (job / ".hydra" / "config.yaml").is_file() and "test_acc=" in (job / "dpl.log").read_text()
        assert "test_acc=" in (job / "console.log").read_text()  # what its process printed, kept there
    assert not (tmp_path / "sweep" / ".submitit").exists()  # submitit's pickles, gone with the sweep

    # the sweep again (its K=1 half): each job finds its finished run in its own process and is skipped
    # (K still swept, with one value: the same keys give the same derived sweep name, sweep-K-H)
    again = run_cli(tmp_path, [*grid[:-2], "K=choice(1)", "H=1,2", f"hydra.sweep.dir={tmp_path / 'again'}"])
    assert again.returncode == 0, again.stderr[-3000:]
    outs = [p.read_text() for p in (tmp_path / "again").glob("*/console.log")]
    assert len(outs) == 2 and all("already finished as MLflow run" in out for out in outs), outs
    assert len(rows(tmp_path / "results.csv")) == 4 and len(runs(tmp_path / "mlflow.db")[1]) == 4


def test_a_job_refused_in_its_process_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    done = run_cli(tmp_path, ["-m", "hydra/launcher=local", *TINY[3:], "dataset=cifar100",
                              f"dataset.root={tmp_path / 'empty'}", "dataset.download=false",
                              f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert done.returncode == 2  # found only in the job's process, reported by the launching one
    line = one_error_line(done.stderr)
    assert line.startswith("error: job epochs=1") and "CIFAR-100 not found in" in line, line


def test_slurm_launcher_refuses_a_relative_store_and_a_machine_without_slurm(tmp_path):
    relative = run_cli(tmp_path, ["-m", "hydra/launcher=slurm", *TINY, "K=1,2"])
    assert relative.returncode == 2
    assert "logger.tracking_uri='sqlite:///mlflow.db' is invalid under hydra/launcher=slurm" in \
        one_error_line(relative.stderr)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()
    if shutil.which("srun") is None:
        absolute = run_cli(tmp_path, ["-m", "hydra/launcher=slurm", *TINY, "K=1,2",
                                      f"logger.tracking_uri=sqlite:///{tmp_path / 'shared.db'}"])
        assert absolute.returncode == 2 and "Slurm's commands" in one_error_line(absolute.stderr)


def test_store_under_slurm_is_absolute_or_a_server():
    for ok in ("sqlite:////shared/dpl/mlflow.db", "http://login1:5000", "sqlite:///:memory:"):
        check_store_for_launcher(ok, "SlurmLauncher")
    check_store_for_launcher("sqlite:///mlflow.db", "LocalLauncher")  # one machine: the launch dir is shared
    with pytest.raises(ConfigError, match="relative SQLite path is resolved on each job's node"):
        check_store_for_launcher("sqlite:///runs/mlflow.db", "SlurmLauncher")


# ----------------------------------------------------------------------------- preemption


def _signalled_sweep(tmp_path: Path, args: list[str], started) -> subprocess.CompletedProcess:
    """``python -m dpl -m hydra/launcher=local *args`` into ``tmp_path/sweep``, its job's rank-0 task sent
    SIGUSR2 (what Slurm sends before preempting a job or at its time limit; Slurm signals every task,
    submitit acts on rank 0's) once ``started(job dir)`` holds: its exit status and output."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "dpl", "-m", "hydra/launcher=local", *args,
                             f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not started(sweep / "0"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.02)
        while not (rank0 := [pid for pid in _task_pids(sweep) if _task_rank(pid) == 0]):
            assert time.monotonic() < deadline, "no submitit task started"
            time.sleep(0.05)
        os.kill(rank0[0], signal.SIGUSR2)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _task_pids(sweep: Path) -> list[int]:
    """The submitit tasks running jobs of ``sweep`` (their command names the sweep's folder)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "submitit.core._submit" in text and str(sweep) in text:
            pids.append(int(cmdline.parent.name))
    return pids


def _task_rank(pid: int) -> int:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode()
    except OSError:  # exited meanwhile
        return -1
    env = dict(line.split("=", 1) for line in environ.split("\0") if "=" in line)
    return int(env.get("SUBMITIT_LOCAL_GLOBALID", env.get("SLURM_PROCID", -1)))


def _has_run_file(job: Path) -> bool:  # the run has started: it trains from here on
    return (job / "run.json").is_file()


@LINUX
def test_a_preempted_job_is_requeued_and_ends_as_if_uninterrupted(tmp_path):
    config = ["dataset=synthetic", "dataset.num_train=2000", "dataset.num_test=200", "epochs=2", "progress=false",
              "device=cpu", "method=localsgd", "K=2", "H=2"]
    done = _signalled_sweep(tmp_path, config, _has_run_file)
    assert done.returncode == 0, done.stderr[-3000:]
    job = tmp_path / "sweep" / "0"
    log = (job / "dpl.log").read_text()
    assert re.search(r"stopped by the scheduler \(preemption or time limit\) at epoch 1, step \d+; requeued", log), log
    assert re.search(r"resume: .* from epoch 1, step [1-9]", log), log  # mid-epoch, where it stopped
    assert "this job is preempted" in log and "Requeued job" in log  # submitit's lines, in the job's log too

    plain = tmp_path / "plain"
    plain.mkdir()
    alone = run_cli(plain, [*config, f"hydra.run.dir={plain / 'job'}"])  # the same run, never interrupted
    assert alone.returncode == 0, alone.stderr[-3000:]
    learned = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "H", "drift", "comm_bytes")
    curve = lambda path: [{k: r[k] for k in learned} for r in rows(path / "history.csv")]  # noqa: E731
    assert len(curve(job)) == 2 and curve(job) == curve(plain / "job")  # every epoch's numbers, to the digit
    (mine,), (theirs,) = rows(tmp_path / "results.csv"), rows(plain / "results.csv")
    for key in ("test_acc", "test_acc_best", "best_val_acc", "test_loss"):
        assert mine[key] == theirs[key], key
    client, (run,) = runs(tmp_path / "mlflow.db")  # one MLflow run, continued by the requeued job
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]


@LINUX
def test_a_job_past_its_requeues_is_one_line_and_stays_resumable(tmp_path):
    # timeout_min=1: every signal reads as the time limit (submitit: past min(80%, limit - 10 min))
    done = _signalled_sweep(tmp_path, ["hydra.launcher.timeout_min=1", "hydra.launcher.max_num_timeout=0", *TINY[:3],
                                       "epochs=5", "progress=false"], _has_run_file)
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert re.search(r"^error: job .*: stopped at epoch 1, step \d+ and not requeued: .*timed-out too many times "
                     r"\(hydra.launcher.max_num_timeout=0: raise it or timeout_min; resume with: python -m dpl "
                     r"resume=", line), line
    assert (tmp_path / "sweep" / "0" / "checkpoint.pt").is_file()
    _, (run,) = runs(tmp_path / "mlflow.db")
    assert run.info.status == "KILLED"


def test_the_resubmission_resumes_the_job_dir_once_there_is_something_to_resume(tmp_path):
    from hydra_plugins.dpl_launchers.slurm import LocalLauncher

    launcher = LocalLauncher(submitit_folder=str(tmp_path / ".submitit"))
    args = (["K=2"], "hydra.sweep.dir", 3, "job_id_for_3", {})
    launcher._job_dir = tmp_path / "3"
    (tmp_path / "3").mkdir()
    again = launcher.checkpoint(*args)  # preempted before dpl wrote anything: the same job, from the start
    assert again.function is launcher and again.args == args and again.kwargs == {"resume_dir": None}
    (tmp_path / "3" / "run.json").write_text("{}")
    assert launcher.checkpoint(*args).kwargs == {"resume_dir": str(tmp_path / "3")}


def test_a_deferred_signal_is_noted_then_handed_to_the_replaced_handler():
    calls = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        assert preempt.defer(signal.SIGUSR2)
        signal.raise_signal(signal.SIGUSR2)
        assert preempt.requested() and calls == []  # only noted: the step in progress finishes first
        preempt.requeue()
        assert calls == [signal.SIGUSR2]
        preempt.reset()
        assert not preempt.requested()
        signal.raise_signal(signal.SIGUSR2)  # the replaced handler is back
        assert calls == [signal.SIGUSR2, signal.SIGUSR2]
    finally:
        preempt.reset()
        signal.signal(signal.SIGUSR2, before)


# ----------------------------------------------------------------------------- ranks


def test_ranks_from_slurm_variables(monkeypatch):
    for key in (*ENV_KEYS, RANKS_FROM_ENV):  # set, then deleted: monkeypatch puts back what was there
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    slurm = dict(SLURM_JOB_ID="91", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="8", SLURM_NTASKS="9",
                 SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NODEID="1", SLURM_JOB_NUM_NODES="2",
                 SLURM_JOB_NODELIST="gpu[03-04]")
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert in_srun_step()
    got = export_ranks()
    assert {k: got[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == \
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu03"}
    port = got["MASTER_PORT"]
    assert 20000 <= int(port) < 60000 and os.environ[RANKS_FROM_ENV] == "slurm"
    monkeypatch.setenv("SLURM_PROCID", "0")  # another task of the job: the same master, without talking
    assert export_ranks()["MASTER_PORT"] == port
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.setenv("SLURM_JOB_ID", "92")
    monkeypatch.setenv("MASTER_PORT", "29555")  # the user's own port wins
    assert export_ranks()["MASTER_PORT"] == "29555"
    monkeypatch.delenv("SLURM_STEP_ID")  # a batch script itself (no srun step) is one process
    assert not in_srun_step()


def test_an_engine_of_one_process_is_refused_when_started_as_ranks(monkeypatch):
    from dpl.config.validate import check_processes

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="engine=simulated is invalid with 2 processes started as ranks"):
        check_processes(compose_cfg())
    check_processes(compose_cfg("engine=distributed", "K=2"))


def _srun(cwd: Path, args: list[str], tasks: int = 2) -> list[subprocess.CompletedProcess]:
    """``srun --ntasks=<tasks> python -m dpl *args`` as Slurm would start it: one process per task, each
    with the step's variables."""
    cwd.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(tasks):
        env = {**ENV, "SLURM_JOB_ID": f"{os.getpid()}{tasks}", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": str(tasks),
               "SLURM_NTASKS": str(tasks), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
               "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost"}
        procs.append(subprocess.Popen([sys.executable, "-m", "dpl", *args], cwd=cwd, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def test_slurm_tasks_give_the_distributed_run_of_spawn(tmp_path):
    common = [*TINY, "method=localsgd", "H=2", "engine=distributed", "K=2"]
    (tmp_path / "spawn").mkdir()
    spawned = run_cli(tmp_path / "spawn", [*common, "engine.spawn=true"])
    assert spawned.returncode == 0, spawned.stderr[-3000:]
    reference = rows(tmp_path / "spawn" / "results.csv")[0]

    for r in _srun(tmp_path / "srun", common):  # no torchrun: the ranks from Slurm's variables
        assert r.returncode == 0, r.stderr[-3000:]
    (srun,) = rows(tmp_path / "srun" / "results.csv")
    assert len(list((tmp_path / "srun" / "outputs").glob("*/*"))) == 1  # one job dir, rank 0's

    (tmp_path / "tasks").mkdir()  # a job of the submitit launcher with two tasks: its ranks
    tasks = run_cli(tmp_path / "tasks", ["-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", *common,
                                         f"hydra.sweep.dir={tmp_path / 'tasks' / 'sweep'}"])
    assert tasks.returncode == 0, tasks.stderr[-3000:]
    (submitted,) = rows(tmp_path / "tasks" / "results.csv")
    for key in ("test_acc", "test_acc_best", "best_val_acc", "comm_bytes"):
        if key in reference:
            assert srun[key] == reference[key] == submitted[key], key

    wrong = _srun(tmp_path / "wrong", [*common[:-1], "K=3"])  # K other than the tasks: one line on each
    for r in wrong:
        assert r.returncode == 2
        assert "K=3 is invalid: engine=distributed runs K = world size = 2 workers (the Slurm job's tasks" in \
            one_error_line(r.stderr)


@LINUX
@pytest.mark.slow  # ~1 min on 2 cores: a job of two tasks, requeued once, and its spawned reference
def test_a_preempted_job_of_two_tasks_resumes_from_its_last_checkpoint(tmp_path):
    from dpl.run import checkpoint

    config = ["dataset=synthetic", "dataset.num_train=2000", "dataset.num_test=200", "epochs=3", "progress=false",
              "device=cpu", "method=localsgd", "H=2", "engine=distributed", "K=2"]
    def an_epoch_done(job: Path) -> bool:  # in the checkpoint: what the requeued job resumes from
        try:
            return checkpoint.load(job)["state"]["epoch"] >= 1
        except checkpoint.CheckpointError:
            return False

    done = _signalled_sweep(tmp_path, ["hydra.launcher.tasks_per_node=2", *config], an_epoch_done)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "sweep" / "0" / "dpl.log").read_text()
    assert "Requeued job" in log and "resume: " in log, log
    (tmp_path / "spawn").mkdir()
    alone = run_cli(tmp_path / "spawn", [*config, "engine.spawn=true"])
    assert alone.returncode == 0, alone.stderr[-3000:]
    (mine,), (theirs,) = rows(tmp_path / "results.csv"), rows(tmp_path / "spawn" / "results.csv")
    for key in ("test_acc", "test_acc_best", "best_val_acc", "test_loss"):
        assert mine[key] == theirs[key], key

