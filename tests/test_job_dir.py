"""A job dir is data, not code: resuming or testing a job dir someone else made writes only where this
command says, contacts nothing the file names, resolves nothing from this user's environment, and refuses
a stored config that does not fit the schemas, in one line.

Each case plants one thing in the config a real job stored (its ``checkpoint.pt`` and ``run.json``, both of
which a resume reads) and resumes it from another folder, as a researcher who was sent the job dir would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dpl.run import checkpoint
from tests.processes import run_cli
from tests.test_failures import TRACKED, job_runs, one_error_line

SECRET = "s3cr3t-value-of-the-victim"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A finished one-epoch job dir, made by someone else in their own folder."""
    theirs = tmp_path_factory.mktemp("theirs")
    proc = run_cli(theirs, [*TRACKED, "epochs=1", f"hydra.run.dir={theirs / 'job'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return theirs / "job"


def received(made: Path, tmp_path: Path, **planted) -> Path:
    """A copy of the job dir in ``tmp_path/inbox``, its stored config changed by ``planted`` (dotted keys;
    ``extras.<k>``: a key beside the config) in both files a resume reads."""
    job = tmp_path / "inbox" / "job"
    shutil.copytree(made, job)

    def plant(state: dict) -> dict:
        for dotted, value in planted.items():
            *path, last = dotted.replace("extras.", "", 1).split(".") if dotted.startswith("extras.") \
                else ["config", *dotted.split(".")]
            node = state
            for k in path:
                node = node[k]
            node[last] = value
        return state

    ckpt = torch.load(job / checkpoint.FILENAME, weights_only=True)
    torch.save(plant(ckpt), job / checkpoint.FILENAME)
    run_file = job / checkpoint.RUN_FILE
    run_file.write_text(json.dumps(plant(json.loads(run_file.read_text()))))
    return job


def everything_under(d: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in d.rglob("*") if p.is_file() and p.suffix != ".db")


def test_stored_destinations_are_not_used_the_command_s_are(made, tmp_path):
    outside = tmp_path / "outside"
    job = received(made, tmp_path, results_csv=str(outside / "site-packages" / "evil.pth"),
                   **{"logger.tracking_uri": f"sqlite:///{outside / 'theirs.db'}",
                      "extras.tracking_uri": f"sqlite:///{outside / 'theirs.db'}",
                      "extras.launch_dir": str(outside)})
    here = tmp_path / "here"
    here.mkdir()
    proc = run_cli(here, [f"resume={job}", "epochs=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not outside.exists()  # nothing written, no store opened, no folder made
    assert "a stored config does not choose where a run writes" in proc.stdout + proc.stderr
    assert len((here / "results.csv").read_text().splitlines()) == 2  # the row, where this command says
    (run,) = job_runs(here / "mlflow.db")
    assert run.info.status == "FINISHED" and "resumed_from" in run.data.tags


def test_a_job_dir_still_in_its_launch_dir_records_there(made, tmp_path):
    """The file's launch dir is believed where the job dir itself lies below it: a job resumed from another
    folder records where it was launched (its row and MLflow run), not in the current folder."""
    job = received(made, tmp_path, **{"extras.launch_dir": str(tmp_path / "inbox"),
                                      "extras.tracking_uri": f"sqlite:///{tmp_path / 'inbox' / 'mlflow.db'}"})
    here = tmp_path / "here"
    here.mkdir()
    proc = run_cli(here, [f"resume={job}", "epochs=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "inbox" / "results.csv").is_file() and (tmp_path / "inbox" / "mlflow.db").is_file()
    assert not (here / "results.csv").exists() and not (here / "mlflow.db").exists()


@pytest.mark.parametrize("command", [["resume={job}"], ["test_only=true", "checkpoint={job}/checkpoint.pt"]],
                         ids=["resume", "test_only"])
def test_an_interpolation_in_a_stored_config_is_refused_unresolved(made, tmp_path, monkeypatch, command):
    monkeypatch.setenv("SECRET_TOKEN", SECRET)
    job = received(made, tmp_path, **{"logger.experiment": "${oc.env:SECRET_TOKEN}"})
    here = tmp_path / "here"
    here.mkdir()
    proc = run_cli(here, [a.replace("{job}", str(job)) for a in command])
    assert proc.returncode == 2
    assert "its stored config has an interpolation at logger.experiment" in one_error_line(proc)
    assert SECRET not in proc.stdout + proc.stderr + everything_under(tmp_path)
    assert not any(here.iterdir())


@pytest.mark.parametrize("key, value, expect", [
    ("sweep", "x\nimport os; os.system('touch PWNED')", "a control character in sweep"),
    ("K", "abc", "does not fit dpl's schema"),
    ("batch_size", 0, "batch_size=0 is invalid"),
    ("nonsense", 1, "does not fit dpl's schema"),
])
def test_a_stored_config_is_checked_as_the_command_line_is(made, tmp_path, key, value, expect):
    job = received(made, tmp_path, **{key: value})
    here = tmp_path / "here"
    here.mkdir()
    proc = run_cli(here, [f"resume={job}", "epochs=2"])
    assert proc.returncode == 2 and expect in one_error_line(proc)
    assert not any(here.iterdir()) and not (here / "PWNED").exists()


def test_a_run_file_alone_with_a_bad_config_is_one_line(made, tmp_path):
    """A job killed before its first checkpoint has only ``run.json``: read the same way."""
    job = received(made, tmp_path, K="abc")
    (job / checkpoint.FILENAME).unlink()
    proc = run_cli(tmp_path, [f"resume={job}"])
    assert proc.returncode == 2 and "does not fit dpl's schema" in one_error_line(proc)
