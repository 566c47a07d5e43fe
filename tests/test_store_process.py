"""MLflow's side of a ``python -m dpl`` run in a process of its own (dpl.tracking.store_process): the run it
records equals the run recorded in the training process, its errors are the same line, and it ends with
the run however the run ends. Real processes: the store process is forked only by the command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpl.tracking.store import PID_TAG, mlflow_client

ROOT = Path(__file__).resolve().parent.parent
TINY = ["dataset=synthetic", "dataset.num_train=96", "dataset.num_test=32", "batch_size=32", "epochs=2",
        "device=cpu", "progress=false", "seed=3"]
FORKED = "store process forked"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DPL_TIMELINE": "1", **extra}


def _dpl(cwd: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpl", *args], cwd=cwd, env=_env(**env), capture_output=True,
                          text=True, timeout=600)


def _only_run(db: Path):
    client = mlflow_client(f"sqlite:///{db}")
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
               for k in run.data.metrics}
    artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
    return run, history, artifacts


def test_a_run_recorded_by_the_store_process_equals_one_recorded_in_the_training_process(tmp_path):
    runs = {}
    for mode, env in (("forked", {}), ("in process", {"DPL_STORE_PROCESS": "0"})):
        cwd = tmp_path / mode.replace(" ", "_")
        cwd.mkdir()
        proc = subprocess.Popen([sys.executable, "-m", "dpl", *TINY], cwd=cwd, env=_env(**env),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        assert (FORKED in err) == (mode == "forked")
        run, history, artifacts = _only_run(cwd / "mlflow.db")
        assert run.info.status == "FINISHED"
        assert run.data.tags[PID_TAG] == str(proc.pid)  # the training process's, not the store process's
        assert "MLflow: " in err + out  # the link to the run's view, from the store's answers
        runs[mode] = run, history, artifacts
    (a, history_a, artifacts_a), (b, history_b, artifacts_b) = runs["forked"], runs["in process"]
    assert a.data.params == b.data.params
    assert a.info.run_name == b.info.run_name
    timing = {k for k in history_a if "time" in k or k.endswith("_per_s")}  # wall-clock metrics differ
    assert history_a.keys() == history_b.keys() and timing
    assert {k: v for k, v in history_a.items() if k not in timing} == \
        {k: v for k, v in history_b.items() if k not in timing}
    assert set(a.data.tags) == set(b.data.tags)
    assert artifacts_a == artifacts_b and "history.csv" in artifacts_a


def test_a_store_that_cannot_be_opened_is_the_same_one_line_error_from_the_store_process(tmp_path):
    (tmp_path / "mlflow.db").write_text("not a database\n")
    forked = _dpl(tmp_path, TINY)
    alone = _dpl(tmp_path, TINY, DPL_STORE_PROCESS="0")
    assert FORKED in forked.stderr and FORKED not in alone.stderr
    errors = [[line for line in p.stderr.splitlines() if line.startswith("error:")] for p in (forked, alone)]
    assert forked.returncode == alone.returncode == 2
    assert errors[0] == errors[1] and len(errors[0]) == 1 and "not an SQLite file" in errors[0][0]
    assert "Traceback" not in forked.stderr


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _gone(pid: int, timeout: float = 30) -> bool:
    """The process has ended (gone, or a zombie nobody reaps yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def _started(cwd: Path, epochs: int = 200):
    """A run that trains long enough to be stopped, returned once its first step ran, with its store process."""
    proc = subprocess.Popen([sys.executable, "-m", "dpl", *TINY, f"epochs={epochs}"], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stderr:
        if line.startswith("[timeline]") and line.rstrip().endswith("first step"):
            break
    else:
        pytest.fail(f"the run ended before its first step (status {proc.wait()})")
    (store_process,) = _children(proc.pid)
    return proc, store_process


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs /proc/<pid>/task/<tid>/children")
def test_a_run_stopped_by_its_group_is_recorded_killed_and_its_store_process_ends(tmp_path):
    proc, store_process = _started(tmp_path)
    os.killpg(proc.pid, signal.SIGTERM)  # as Slurm or a terminal stops a job: every process of the group
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, err[-2000:]
    assert _gone(store_process)
    run, _, _ = _only_run(tmp_path / "mlflow.db")
    assert run.info.status == "KILLED"  # recorded through the store process, which outlived the signal


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs /proc/<pid>/task/<tid>/children")
def test_the_store_process_ends_when_the_training_process_is_killed(tmp_path):
    proc, store_process = _started(tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    assert _gone(store_process)
