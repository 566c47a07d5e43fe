"""A whole run tracked in MLflow, read back with MlflowClient."""

from __future__ import annotations

import csv

from mlflow.tracking import MlflowClient

from dpl.run.job import run


def test_run_contents_in_mlflow(make_cfg, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_cfg("logger=mlflow", f"logger.tracking_uri={uri}", "logger.experiment=e2e", "logger.plots=true",
                   "method=localsgd", "K=2", "H=1", "dynamic_h=asc_pow2", "epochs=2", "sweep=tiny")
    final = run(cfg, out_dir=tmp_path / "job")
    client = MlflowClient(uri)
    (r,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert r.info.status == "FINISHED"
    assert r.data.params["K"] == "2" and r.data.params["optimizer.momentum"] == "0.9"
    assert r.data.params["method.name"] == "localsgd" and float(r.data.params["lr"]) == cfg.lr
    assert {k: r.data.tags[k] for k in ("method", "optimizer", "dataset", "sweep")} == \
        {"method": "localsgd", "optimizer": "sgdm", "dataset": "synthetic", "sweep": "tiny"}
    # a descriptive name, and MLflow's own source tags (the UI's Source and Version columns)
    assert r.info.run_name == "localsgd-K2-H1-asc_pow2-sgdm-s0"  # no Hydra overrides: the base name
    assert r.data.tags["dpl.job_dir"] == str((tmp_path / "job").resolve())  # what resume= is told
    assert r.data.tags["mlflow.source.name"] == "python -m dpl"
    assert len(r.data.tags["mlflow.source.git.commit"]) == 40
    experiment = client.get_experiment_by_name("e2e")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs
    assert "metrics.`test_acc`" in experiment.tags["mlflow.sharedViewState.dpl"]
    # asc_pow2 trains epoch 0 with the configured H=1, then (the study's one-epoch lag) 2^2 = 4:
    # the H trained with is recorded per epoch, and summarised, not the configured 1
    assert [m.value for m in client.get_metric_history(r.info.run_id, "H")] == [1, 4]
    assert (r.data.metrics["H_first"], r.data.metrics["H_last"], r.data.metrics["H_mean"]) == (1, 4, 2.5)
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "samples_per_s", "H",
                "sync_rounds", "sync_rounds_total", "comm_bytes", "comm_bytes_total", "rounds_vs_sync",
                "modelled_time_s", "drift"):
        assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [1, 2], key  # epochs from 1
    # 450 images per worker / batch 32 = 15 steps: H=1 -> 15 syncs, then H=4 -> 3 (steps 4, 8, 12 of the epoch)
    assert [m.value for m in client.get_metric_history(r.info.run_id, "sync_rounds_total")] == [15, 18]
    assert r.data.metrics["test_acc"] == final["test_acc"]
    assert r.data.metrics["test_acc_best"] == final["test_acc_best"]
    assert r.data.metrics["best_val_acc"] == final["best_val_acc"]
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "history.csv", "result.csv", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
    assert {"plots/loss.png", "plots/accuracy.png", "plots/lr.png", "plots/comm.png", "plots/h.png"} <= plots
    with open(tmp_path / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["run_id"] == r.info.run_id and float(row["test_acc"]) == final["test_acc"]
    assert row["K"] == "2" and row["method.name"] == "localsgd"
    assert (row["H"], row["H_first"], row["H_last"], row["H_mean"]) == ("1", "1.0", "4.0", "2.5")
    # epochs from 1 in history.csv and best_epoch too, as in the log's "epoch 1/2"
    with open(tmp_path / "job" / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert [h["epoch"] for h in history] == ["1", "2"]
    best = final["best_epoch"]
    assert best in (1, 2) and float(history[best - 1]["val_acc"]) == final["best_val_acc"]
    assert r.data.metrics["best_epoch"] == best


def test_resume_logs_into_the_same_run(make_cfg, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["logger=mlflow", f"logger.tracking_uri={uri}", "logger.experiment=resume"]
    run(make_cfg(*base, "epochs=1"), out_dir=tmp_path / "job")
    # Extend the finished run by one epoch: the resumed job continues the same MLflow run.
    from dpl.run import checkpoint

    ckpt = checkpoint.load(tmp_path / "job")
    ckpt["config"]["epochs"] = 2
    checkpoint.save({k: v for k, v in ckpt.items() if k != "format"}, tmp_path / "job" / "checkpoint.pt")
    run(make_cfg(*base, f"resume={tmp_path / 'job'}"))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_acc")] == [1, 2]
