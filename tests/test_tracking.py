"""Tracking: MLflow runs read back through MlflowClient, config flattening, URIs, results CSV."""

from __future__ import annotations

import csv
import math
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dpl.tracking.loggers import LOGGERS, MlflowLogger, NullLogger, make_logger
from dpl.tracking.params import flatten_config, git_commit
from dpl.tracking.results import append_result_row
from dpl.tracking.store import resolve_tracking_uri

TAGS = {"method": "localsgd", "optimizer": "sgdm", "dataset": "synthetic", "git_commit": "abc1234", "sweep": None}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One sqlite store per module: creating MLflow's tables takes seconds."""
    return tmp_path_factory.mktemp("mlflow")


def _uri(store: Path) -> str:
    return f"sqlite:///{store}/mlflow.db"


def _client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(_uri(store))


def _run_cfg(store: Path, tracking_uri: str | None = None, run_name: str | None = None, **extra):
    return OmegaConf.create(
        {
            "K": 4,
            "lr": "${optimizer.lr}",
            "optimizer": {"name": "sgdm", "lr": 0.1, "betas": [0.9, 0.999]},
            "logger": {
                "name": "mlflow",
                "tracking_uri": tracking_uri or _uri(store),
                "experiment": "test",
                "run_name": run_name,
                "plots": True,
            },
            "hydra": {"run": {"dir": "outputs/${now:%Y}"}},  # only resolvable inside Hydra
            **extra,
        }
    )


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ----------------------------------------------------------------------------- mlflow


def test_run_end_to_end(store, tmp_path):
    cfg = _run_cfg(store, run_name="e2e")
    logger = make_logger(cfg.logger)
    assert isinstance(logger, MlflowLogger)
    run_id = logger.start(cfg, TAGS)
    assert run_id == logger.run_id and run_id
    for step in range(3):
        logger.log_metrics({"val_acc": 0.25 * step, "train_loss": 1.0 / (step + 1)}, step)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    logger.log_artifact(notes)
    logger.log_artifact(notes, "extra")
    logger.finish()

    client = _client(store)
    run = client.get_run(run_id)
    params = run.data.params
    assert params["K"] == "4"
    assert params["lr"] == "0.1"  # interpolation resolved
    assert params["optimizer.lr"] == "0.1"
    assert params["optimizer.betas"] == "[0.9, 0.999]"
    assert params["logger.run_name"] == "e2e"
    assert not any(k.startswith("hydra") for k in params)
    assert _history(client, run_id, "val_acc") == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert _history(client, run_id, "train_loss") == [(0, 1.0), (1, 0.5), (2, 1.0 / 3.0)]
    tags = run.data.tags
    assert {k: tags[k] for k in ("method", "optimizer", "dataset", "git_commit")} == {
        k: v for k, v in TAGS.items() if v is not None
    }
    assert "sweep" not in tags  # a None tag is left out, not logged as "None"
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "e2e"
    assert run.info.experiment_id == client.get_experiment_by_name("test").experiment_id

    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "notes.txt", "extra"}
    assert [a.path for a in client.list_artifacts(run_id, "extra")] == ["extra/notes.txt"]
    # Artifacts live beside the sqlite store, not in the cwd.
    artifact_dir = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifact_dir.is_relative_to(store / "mlartifacts")
    logged = OmegaConf.load(artifact_dir / "config.yaml")
    assert OmegaConf.to_container(logged) == {
        "K": 4,
        "lr": 0.1,
        "optimizer": {"name": "sgdm", "lr": 0.1, "betas": [0.9, 0.999]},
        "logger": dict(cfg.logger),
    }


def test_resume_logs_into_the_same_run(store):
    cfg = _run_cfg(store)
    first = make_logger(cfg.logger)
    run_id = first.start(cfg, TAGS)
    first.log_metrics({"val_acc": 0.1}, 0)
    first.log_metrics({"val_acc": 0.2}, 1)
    first.finish("KILLED")

    client = _client(store)
    assert client.get_run(run_id).info.status == "KILLED"
    second = make_logger(cfg.logger)
    assert second.start(cfg, TAGS, resume_run_id=run_id) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    second.log_metrics({"val_acc": 0.3}, 2)
    second.finish()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _history(client, run_id, "val_acc") == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert run.data.params["optimizer.lr"] == "0.1"
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "config_resumed.yaml"}


def test_failed_run_records_reason(store):
    cfg = _run_cfg(store)
    logger = make_logger(cfg.logger)
    run_id = logger.start(cfg, TAGS)
    logger.finish("FAILED", reason="loss diverged at epoch 3")
    run = _client(store).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "loss diverged at epoch 3"


def test_finish_rejects_unknown_status(store):
    logger = make_logger(_run_cfg(store).logger)
    with pytest.raises(ValueError, match="status='DONE'"):
        logger.finish("DONE")


def test_long_param_truncated_and_nonfinite_metrics_logged(store):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    cfg = _run_cfg(store, note="x" * (MAX_PARAM_VAL_LENGTH + 1000))
    logger = make_logger(cfg.logger)
    run_id = logger.start(cfg, TAGS)
    logger.log_metrics({"train_loss": float("nan"), "val_loss": None, "lr": 0.5}, 0)
    logger.finish()

    client = _client(store)
    note = client.get_run(run_id).data.params["note"]
    assert len(note) == MAX_PARAM_VAL_LENGTH and note.startswith("xxx") and note.endswith("[truncated]")
    (nan,) = client.get_metric_history(run_id, "train_loss")
    assert math.isnan(nan.value)
    assert client.get_metric_history(run_id, "val_loss") == []
    assert _history(client, run_id, "lr") == [(0, 0.5)]


def test_relative_sqlite_uri_resolves_against_launch_dir(store, tmp_path, monkeypatch):
    monkeypatch.chdir(store)  # outside Hydra the launch dir is the cwd
    cfg = _run_cfg(store, tracking_uri="sqlite:///mlflow.db")
    logger = make_logger(cfg.logger)
    run_id = logger.start(cfg, TAGS)
    logger.finish()
    assert _client(store).get_run(run_id).info.status == "FINISHED"
    assert not (store / "mlruns").exists()


def test_resolve_tracking_uri(tmp_path):
    base = tmp_path.resolve()
    assert resolve_tracking_uri("sqlite:///mlflow.db", base) == f"sqlite:///{base}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///runs/m.db", base) == f"sqlite:////{str(base)[1:]}/runs/m.db"
    for unchanged in ("sqlite:////abs/m.db", "sqlite://", "sqlite:///:memory:", "file:///abs/mlruns",
                      "http://host:5000", "https://host/mlflow"):
        assert resolve_tracking_uri(unchanged, base) == unchanged
    assert resolve_tracking_uri("mlruns", base) == str(base / "mlruns")


# ----------------------------------------------------------------------------- none logger, registry


def test_null_logger_accepts_every_call(tmp_path):
    logger = make_logger(OmegaConf.create({"name": "none", "plots": True}))
    assert isinstance(logger, NullLogger)
    assert logger.start(OmegaConf.create({"K": 1}), TAGS, resume_run_id="abc") is None
    logger.log_metrics({"val_acc": float("nan")}, 0)
    logger.log_artifact(tmp_path / "missing.txt", "x")
    logger.finish("FAILED", reason="why")
    assert logger.run_id is None


def test_none_logger_does_not_import_mlflow():
    code = (
        "import sys; from omegaconf import OmegaConf; from dpl.tracking.loggers import make_logger; "
        "log = make_logger(OmegaConf.create({'name': 'none'})); log.start(OmegaConf.create({}), {}); "
        "log.log_metrics({'a': 1.0}, 0); log.finish(); "
        "assert 'mlflow' not in sys.modules, 'mlflow imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_registry_matches_conf_logger_folder():
    conf = Path(__file__).resolve().parents[1] / "conf" / "logger"
    assert set(LOGGERS) == {p.stem for p in conf.glob("*.yaml")}
    with pytest.raises(KeyError, match="logger='wandb' is unknown"):
        make_logger(OmegaConf.create({"name": "wandb"}))


# ----------------------------------------------------------------------------- helpers


def test_flatten_config_nested_lists_interpolations():
    cfg = OmegaConf.create(
        {
            "K": 2,
            "lr": "${optimizer.lr}",
            "name": "run-${K}",
            "optimizer": {"lr": 0.05, "betas": [0.9, 0.99], "extra": {"deep": None}},
            "schedule": [{"epoch": 1}, {"epoch": 2}],
            "todo": "???",
            "hydra": {"job": {"num": "${now:%H}"}},
        }
    )
    assert flatten_config(cfg) == {
        "K": "2",
        "lr": "0.05",
        "name": "run-2",
        "optimizer.lr": "0.05",
        "optimizer.betas": "[0.9, 0.99]",
        "optimizer.extra.deep": "None",
        "schedule": "[{'epoch': 1}, {'epoch': 2}]",
        "todo": "???",
    }


def test_git_commit_of_this_repo():
    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert git_commit().removesuffix("-dirty") == head.stdout.strip()


def test_git_commit_dirty_and_unknown(tmp_path):
    assert git_commit(tmp_path) == "unknown"
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("ignored")
    assert git_commit(tmp_path / "a.txt") == sha
    (tmp_path / "a.txt").write_text("2")
    assert git_commit(tmp_path) == sha + "-dirty"


# ----------------------------------------------------------------------------- results CSV


def test_append_result_row_widens_header(tmp_path):
    path = tmp_path / "sub" / "results.csv"
    append_result_row(path, {"a": 1, "b": 2.5})
    assert path.read_text().splitlines() == ["a,b", "1,2.5"]
    append_result_row(path, {"b": 3, "c": "x,y", "d": None})
    assert path.read_text().splitlines() == ["a,b,c,d", "1,2.5,,", ',3,"x,y",']
    append_result_row(path, {"a": 4})
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"a": "1", "b": "2.5", "c": "", "d": ""},
        {"a": "", "b": "3", "c": "x,y", "d": ""},
        {"a": "4", "b": "", "c": "", "d": ""},
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.csv", "results.csv.lock"]


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")


def test_append_result_row_failure_leaves_file_intact(tmp_path):
    path = tmp_path / "results.csv"
    append_result_row(path, {"a": 1})
    with pytest.raises(RuntimeError):
        append_result_row(path, {"a": _Unprintable()})
    assert path.read_text().splitlines() == ["a", "1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.csv.lock"]


def _append_many(args: tuple[str, int, int]) -> None:
    path, worker, n = args
    for i in range(n):
        append_result_row(path, {"worker": worker, "i": i, f"only_{worker}": worker * 100 + i})


def test_append_result_row_concurrent_processes(tmp_path):
    path = tmp_path / "results.csv"
    workers, per_worker = 4, 8
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_append_many, [(str(path), w, per_worker) for w in range(workers)])
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames[:2] == ["worker", "i"]
    assert set(reader.fieldnames) == {"worker", "i"} | {f"only_{w}" for w in range(workers)}
    assert sorted((int(r["worker"]), int(r["i"])) for r in rows) == [
        (w, i) for w in range(workers) for i in range(per_worker)
    ]
    for r in rows:  # each row's own column carries its value; the others are empty
        w = int(r["worker"])
        assert r[f"only_{w}"] == str(w * 100 + int(r["i"]))
        assert all(r[f"only_{o}"] == "" for o in range(workers) if o != w)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.csv.lock"]


def test_run_names_say_the_method_and_H_only_where_there_are_local_steps():
    from omegaconf import OmegaConf

    from dpl.tracking.run_names import run_name

    cfg = OmegaConf.create({"method": {"name": "localsgd"}, "K": 4, "H": 8, "optimizer": {"name": "sgdm"},
                            "seed": 0, "dynamic_h": {"name": "constant"}})
    assert run_name(cfg) == "localsgd-K4-H8-sgdm-s0"
    cfg.method.name = "centralized"
    assert run_name(cfg, local_steps=False) == "centralized-K4-sgdm-s0"


def test_run_names_tell_runs_apart_by_their_overrides_and_job_number():
    """Seven runs once all named localsgd-K2-H4-sgdm-s0: the overrides that differ now name them,
    K and H first so a narrow column still shows them, a sweep's job number last."""
    from omegaconf import OmegaConf

    from dpl.tracking.run_names import run_name, short_override

    cfg = OmegaConf.create({"method": {"name": "localsgd"}, "K": 2, "H": 4, "optimizer": {"name": "sgdm"},
                            "seed": 0, "dynamic_h": {"name": "constant"}, "engine": {"name": "distributed"}})
    overrides = ["engine=distributed", "epochs=3", "dataset.num_train=2000", "progress=false",
                 "logger.tracking_uri=sqlite:///x.db", "K=2", "+compression.error_feedback=true", "lr=0.012345"]
    name = run_name(cfg, overrides=overrides, job=None)
    assert name == "localsgd-K2-H4-sgdm-s0-distributed-epochs3-num_train2k-error_feedback=true-lr0.0123"
    assert run_name(cfg, overrides=["H=4", "lr=0.1"], job=7) == "localsgd-K2-H4-sgdm-s0-lr0.1-#7"
    names = {run_name(cfg, overrides=o, job=None) for o in
             (["engine=distributed"], ["epochs=3"], ["dataset.num_train=2000"], ["epochs=3", "dataset.num_train=45000"])}
    assert len(names) == 4 and all(n.startswith("localsgd-K2-H4-") for n in names)
    assert short_override("dataset.num_train=1500") == "num_train1.5k"


def test_runs_link_opens_the_runs_table_in_the_saved_view():
    from dpl.tracking.store import link_line, runs_link

    assert runs_link("sqlite:////a/mlflow.db", "3") == "http://127.0.0.1:5000/#/experiments/3/runs?viewStateShareKey=dpl"
    assert runs_link("http://mlflow.lab:8080/", "12") == "http://mlflow.lab:8080/#/experiments/12/runs?viewStateShareKey=dpl"
    assert runs_link("sqlite:////a/mlflow.db", None) is None
    assert link_line("sqlite:////a/mlflow.db", "3").endswith("(serve it with: mlflow ui --backend-store-uri "
                                                               "sqlite:////a/mlflow.db)")


def test_resume_hint_names_the_job_dir(tmp_path):
    from dpl.run.interrupt import resume_hint

    assert resume_hint(tmp_path / "job 1") == f"resume with: python -m dpl resume='{tmp_path / 'job 1'}'"
    assert resume_hint(None) == "resume with: python -m dpl resume=<job dir>"
