"""Extension from outside the package (tests/extension.py, docs/extending.md): a codec, an outer optimizer,
a dataset and a per-step metric, each registered there, run through ``python -m dpl`` to a finished run
whose history.csv and MLflow run carry them."""

from __future__ import annotations

import copy
import csv
import math
import sys

import pytest

from dpl.core.state import STEP_METRICS
from dpl.registry import REGISTRIES
from tests.processes import run_cli

RUN = ["dataset=blobs", "model=lenet5", "method=diloco", "optimizer=sgdm", "K=2", "H=2", "epochs=2", "batch_size=32",
       "compression=halves", "compression.stride=3", "method.outer.name=rmsprop", "method.outer.lr=0.0003",
       "progress=false", "device=cpu"]


@pytest.fixture
def extended(monkeypatch):
    """``DPL_PLUGINS=tests.extension`` for the command; afterwards every registry, the step metrics and Hydra's
    ConfigStore as they were (the options stay registered in this process otherwise)."""
    from hydra.core.config_store import ConfigStore

    from dpl import plugins

    options = {k: dict(r._options) for k, r in REGISTRIES.items()}
    metrics, store = dict(STEP_METRICS), copy.deepcopy(ConfigStore.instance().repo)
    monkeypatch.setenv(plugins.ENV, "tests.extension")
    yield
    for k, r in REGISTRIES.items():
        r._options = options.get(k, {})
    STEP_METRICS.clear()
    STEP_METRICS.update(metrics)
    ConfigStore.instance().repo = store
    plugins._loaded.discard("tests.extension")
    sys.modules.pop("tests.extension", None)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_codec_an_outer_optimizer_a_dataset_and_a_step_metric_from_outside_run_to_a_finished_run(extended,
                                                                                                   tmp_path):
    db = tmp_path / "mlflow.db"
    proc = run_cli(tmp_path, [*RUN, f"logger.tracking_uri=sqlite:///{db}", f"hydra.run.dir={tmp_path / 'job'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = _rows(tmp_path / "job" / "history.csv")
    assert len(history) == 2
    # the step metric: a column of history.csv, one value per epoch, the mean over the steps of the worst worker
    worst = [float(r["worst_worker_loss"]) for r in history]
    assert all(math.isfinite(w) and w >= float(r["train_loss"]) * 0.5 for w, r in zip(worst, history))
    assert "worst_worker_loss=" in proc.stdout + proc.stderr  # and in the epoch's log line

    from mlflow.tracking import MlflowClient

    (run,) = MlflowClient(f"sqlite:///{db}").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{db}").search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.params["dataset.name"] == "blobs" and run.data.params["compression.stride"] == "3"
    assert run.data.params["method.outer.name"] == "rmsprop"
    assert run.data.metrics["worst_worker_loss"] == pytest.approx(worst[-1])
    # the codec: every sync sent every third element of the parameters, fp32, all-reduced on a ring of 2
    from dpl.components.models.lenet import LeNet5

    sizes = [p.numel() for p in LeNet5(3, 4, 16).parameters()]
    payload = sum(4 * math.ceil(n / 3) for n in sizes)
    for r in history:
        assert float(r["comm_bytes"]) == pytest.approx(int(r["sync_rounds"]) * payload)  # 2 (K-1)/K = 1 at K=2


def test_an_unknown_plugin_module_is_one_line(monkeypatch, tmp_path):
    from dpl import plugins

    monkeypatch.setenv(plugins.ENV, "no_such_module_here")
    proc = run_cli(tmp_path, ["dataset=synthetic", "logger=none"])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no_such_module_here" in lines[0]
    monkeypatch.setenv(plugins.ENV, "../../x")
    proc = run_cli(tmp_path, ["dataset=synthetic", "logger=none"])
    assert proc.returncode == 2 and "allowed dotted module names" in proc.stderr
