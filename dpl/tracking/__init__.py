"""Experiment tracking behind one small interface, plus the results CSV.

The trainer talks to a :class:`Logger` (``start`` / ``log_metrics`` / ``log_artifact`` /
``finish``) chosen by the ``logger`` config group; it never imports mlflow itself.
``mlflow`` is imported only when an :class:`MlflowLogger` starts, because the import
is slow and the ``none`` logger must work without it.

:func:`append_result_row` keeps one CSV row per finished job (config + final metrics),
safe for the jobs of a parallel sweep appending at the same time.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from omegaconf import DictConfig, OmegaConf

from dpl.errors import ConfigError, TrackingError
from dpl.run.interrupt import resume_hint
from dpl.io import write_csv
from dpl.registry import lookup
from dpl.tracking.run_names import BOOKKEEPING, in_multirun, run_name  # noqa: F401 - in_multirun: dpl.tracking's API

log = logging.getLogger("dpl")

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
RUN_NAME_TAG = "mlflow.runName"  # MLflow's own tag for the run name
HOST_TAG, PID_TAG = "dpl.host", "dpl.pid"  # where a run's process lives: dpl.report tells a dead RUNNING run
JOB_DIR_TAG = "dpl.job_dir"  # where its checkpoint is: what resume= of a run found dead is given
MULTIRUN_TAG = "dpl.multirun"  # a job of a multirun without a sweep name: a re-run skips what finished
FAILURE_TAG = "failure_reason"  # why a run ended FAILED or KILLED (removed when it is resumed)
INTERRUPTED_TAG = "dpl.interrupted"  # set on a run ended KILLED because its process had died (end_if_dead)
CONFIG_HASH_TAG = "dpl.config_hash"  # the resolved config's digest: a re-run sweep skips what finished
RESUMED_FROM_TAG = "resumed_from"
PROBE_TIMEOUT_S = 5  # a remote tracking server gets this long to answer before training starts
NOT_HASHED = BOOKKEEPING  # keys that change how a job runs or is displayed, not what it computes


SOURCE_NAME = "python -m dpl"  # the Source column of the MLflow UI
# MLflow 3's UI opens an experiment on its GenAI "Traces" tab unless the experiment's kind says
# it holds model-training runs (the tag the UI itself sets when one picks "Machine learning").
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A saved runs-table view (the UI's "Share" state, an experiment tag): open the experiment's runs
# table with ``?viewStateShareKey=dpl`` to see these columns without adding them by hand.
VIEW_KEY = "dpl"
UI_URL = "http://127.0.0.1:5000"  # where ``mlflow ui`` serves a local store by default
VIEW_COLUMNS = ("params.`dataset.name`", "params.`method.name`", "params.`K`", "params.`H`",
                "params.`dynamic_h.name`", "params.`optimizer.name`", "params.`lr`", "params.`seed`",
                "metrics.`test_acc`", "metrics.`best_val_acc`", "metrics.`H_mean`", "metrics.`comm_bytes_total`")
_PARAM_LIMIT_FALLBACK = 6000  # MLflow's MAX_PARAM_VAL_LENGTH in 2.x / 3.x
_TRUNCATED = "...[truncated]"


class Logger(Protocol):
    run_id: str | None
    tracking_uri: str | None
    experiment_id: str | None

    def start(self, cfg: DictConfig, tags: Mapping[str, str], resume_run_id: str | None = None) -> str | None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None: ...


# ----------------------------------------------------------------------------- helpers


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as ``{"optimizer.lr": "0.1", "K": "4", ...}``; ``hydra`` is skipped.

    Lists stay whole (``"[0.9, 0.999]"``) so one config key is one MLflow param.
    """
    flat: dict[str, str] = {}
    _flatten(_resolved(cfg), "", flat)
    return flat


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    # Mask `hydra` out before resolving: its ${now:...} / ${hydra:...} interpolations only
    # resolve inside a running Hydra app.
    keys = [k for k in cfg.keys() if k != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True, throw_on_missing=False)


def _flatten(node: Mapping[str, Any], prefix: str, out: dict[str, str]) -> None:
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, name + ".", out)
        else:
            out[name] = str(value)


def config_hash(cfg: DictConfig) -> str:
    """A digest of the resolved config (logger and bookkeeping keys left out): two jobs with
    the same digest train the same model, whatever their output dirs."""
    flat = {k: v for k, v in flatten_config(cfg).items()
            if k not in NOT_HASHED and not k.startswith(("logger.", "hydra."))}
    return hashlib.sha1(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def resolve_tracking_uri(uri: str, base_dir: str | Path) -> str:
    """Make a relative sqlite (or bare-path) store absolute against ``base_dir``.

    ``sqlite:///mlflow.db`` (three slashes: relative) becomes ``sqlite:////<base>/mlflow.db``,
    so every job of a sweep, whatever its working dir, writes to the one store.
    Absolute sqlite paths, in-memory sqlite, ``file:`` and ``http(s):`` URIs are unchanged.
    """
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path.startswith("/") or path.startswith(":memory:") or path == "":
            return uri
        return "sqlite:///" + str(Path(base_dir).resolve() / path)
    if "://" in uri or uri.startswith("file:") or Path(uri).is_absolute():
        return uri
    return str(Path(base_dir).resolve() / uri)  # a bare local directory store


def launch_dir() -> Path:
    """The directory the command was started in (Hydra may have changed the cwd since)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        from hydra.utils import get_original_cwd

        return Path(get_original_cwd())
    return Path(os.getcwd())


def git_commit(path: str | Path | None = None) -> str:
    """Short sha of the git repo holding ``path`` (default: the dpl package), ``-dirty``
    if tracked files have uncommitted changes, ``"unknown"`` outside a repo. Never raises."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    if where.is_file():
        where = where.parent
    sha = _git(where, "rev-parse", "--short", "HEAD")
    if not sha:
        return "unknown"
    changes = _git(where, "status", "--porcelain", "--untracked-files=no")
    return sha + ("-dirty" if changes else "")


def source_tags(entry: str = SOURCE_NAME, path: str | Path | None = None) -> dict[str, str]:
    """MLflow's standard source tags: the UI's Source and Version columns.

    ``mlflow.source.git.commit`` is the full sha of the repo holding ``path`` (default: the dpl
    package); ``git_dirty`` says whether tracked files had uncommitted changes."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    tags = {"mlflow.source.name": entry, "mlflow.source.type": "LOCAL"}
    sha = _git(where, "rev-parse", "HEAD")
    if sha:
        tags["mlflow.source.git.commit"] = sha
        tags["git_dirty"] = str(bool(_git(where, "status", "--porcelain", "--untracked-files=no"))).lower()
        branch = _git(where, "rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
    return tags


def runs_link(tracking_uri: str | None, experiment_id: str | None) -> str | None:
    """The MLflow UI address of an experiment's runs table in dpl's saved column view.

    The ``/runs`` is needed: MLflow 3 opens ``#/experiments/<id>`` on its overview page, where
    the view key is ignored. A local store is shown by ``mlflow ui`` at :data:`UI_URL`; a
    tracking server shows its own. None without a run to point at.
    """
    if tracking_uri is None or experiment_id is None:
        return None
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else UI_URL
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


def link_line(tracking_uri: str | None, experiment_id: str | None) -> str | None:
    """``MLflow: <link>``, and for a local store the command that serves it."""
    link = runs_link(tracking_uri, experiment_id)
    if link is None:
        return None
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow: {link}"
    return f"MLflow: {link} (serve it with: mlflow ui --backend-store-uri {tracking_uri})"


def _git(where: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# ----------------------------------------------------------------------------- loggers


class NullLogger:
    """``logger=none``: accepts every call and records nothing (files in the job dir still are)."""

    def __init__(self, cfg_logger: Any = None) -> None:
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None

    def start(self, cfg: DictConfig, tags: Mapping[str, str], resume_run_id: str | None = None,
              resume_uri: str | None = None) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        pass


def _store_write(method):
    """A store that fails mid-run (a schema damaged by hand, a full disk, a server gone) raises
    :class:`TrackingError` in one line naming it: MLflow's own errors are SQLAlchemy or HTTP
    exceptions over dozens of lines (and it logs them once more)."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (TrackingError, ValueError):  # ours, or a bad status: already one line
            raise
        except Exception as e:  # noqa: BLE001 - sqlalchemy, alembic, requests, MlflowException
            raise TrackingError(f"logger.tracking_uri={self.tracking_uri!r} cannot be written: "
                                f"{_first_line(e)}") from None

    return wrapped


class MlflowLogger:
    """One MLflow run per job, written through ``MlflowClient``.

    The client (not the fluent ``mlflow.start_run``) keeps no process-global "active run",
    so a job that dies without ``finish`` cannot break the next job of a sequential sweep.
    """

    def __init__(self, cfg_logger: Any) -> None:
        self.cfg = cfg_logger
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None
        self._client = None

    @_store_write
    def start(self, cfg: DictConfig, tags: Mapping[str, str], resume_run_id: str | None = None,
              resume_uri: str | None = None, params: Mapping[str, str] | None = None) -> str:
        """Open the run (a new one, or ``resume_run_id`` in the store at ``resume_uri``, where the
        job first ran). A resumed run that is in neither store continues as a new run tagged
        ``resumed_from``: the job dir survives a lost or moved ``mlflow.db``. A new run's params
        are ``params``, by default the flattened config."""
        uri = resolve_tracking_uri(self.cfg.tracking_uri, launch_dir())
        if resume_run_id is not None and resume_uri and _store_exists(resume_uri):
            uri = resume_uri
        self.tracking_uri = uri
        self._client = open_store(uri)
        tags = {**tags, HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
        suggested = tags.pop(RUN_NAME_TAG, None)  # the caller's name for a new run (a config's run_name wins)
        resumed = resume_run_id is not None and _run_exists(self._client, resume_run_id)
        if resumed:
            self._client.update_run(resume_run_id, status="RUNNING")  # as mlflow.start_run(run_id=...)
            self.run_id = resume_run_id
            self.experiment_id = self._client.get_run(resume_run_id).info.experiment_id
            _delete_tag(self._client, resume_run_id, INTERRUPTED_TAG)  # alive again
            _delete_tag(self._client, resume_run_id, FAILURE_TAG)  # why it stopped last time
        else:
            experiment_id = _experiment_id(self._client, self.cfg.experiment, uri)
            name = self.cfg.run_name or suggested or run_name(cfg)
            self.run_id = self._client.create_run(experiment_id, run_name=name).info.run_id
            self.experiment_id = experiment_id
            self._log_params(flatten_config(cfg) if params is None else params)
            if resume_run_id is not None:
                tags[RESUMED_FROM_TAG] = resume_run_id
                log.warning("resume: MLflow run %s is not in %s; continuing as new run %s (tag %s)",
                            resume_run_id, uri, self.run_id, RESUMED_FROM_TAG)
        # A resumed job keeps the first config.yaml; its own (maybe changed) config is kept too.
        config_name = "config.yaml" if not resumed else "config_resumed.yaml"
        self._client.log_text(self.run_id, OmegaConf.to_yaml(_resolved(cfg)), config_name)
        self._set_tags(tags)
        return self.run_id

    @_store_write
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, int(step)) for k, v in _as_floats(metrics).items()]
        self._client.log_batch(self.run_id, metrics=batch)

    @_store_write
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    @_store_write
    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"status={status!r} is invalid: allowed {', '.join(RUN_STATUSES)}")
        if self.run_id is None:
            return
        if reason is not None:
            reason = _truncate(str(reason), _mlflow_limit("MAX_TAG_VAL_LENGTH"))
            self._client.set_tag(self.run_id, FAILURE_TAG, reason)
        self._client.set_terminated(self.run_id, status)

    def _log_params(self, flat: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        limit = _mlflow_limit("MAX_PARAM_VAL_LENGTH")
        params = [Param(_param_key(k), _truncate(v, limit)) for k, v in flat.items()]
        self._client.log_batch(self.run_id, params=params)

    def _set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        limit = _mlflow_limit("MAX_TAG_VAL_LENGTH")
        batch = [RunTag(k, _truncate(str(v), limit)) for k, v in tags.items() if v is not None]
        self._client.log_batch(self.run_id, tags=batch)


LOGGERS: dict[str, type] = {"mlflow": MlflowLogger, "none": NullLogger}


def make_logger(cfg_logger: Any) -> Logger:
    """The logger named by ``cfg_logger.name`` (a file in ``conf/logger/``)."""
    return lookup(LOGGERS, "logger", cfg_logger.name)(cfg_logger)


def mlflow_client(tracking_uri: str, base_dir: str | Path | None = None):
    """An ``MlflowClient`` on ``tracking_uri``; a relative sqlite path resolves against ``base_dir``
    (default: the launch directory), as the jobs that wrote the store resolved it."""
    return _mlflow_client(resolve_tracking_uri(tracking_uri, base_dir if base_dir is not None else launch_dir()))


def _mlflow_client(uri: str):
    _quiet_mlflow()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_store(uri: str, timeout_s: float | None = None):
    """An ``MlflowClient`` on ``uri`` whose store is open and answers, or a one-line TrackingError.

    A new SQLite store is created under an exclusive ``flock`` of ``<db>.lock``: MLflow builds
    the schema on first use, and jobs of a parallel sweep that start together on a fresh store
    would otherwise race (``table ... already exists``). A store that another job is creating
    right now may still fail once; that is retried. ``timeout_s`` bounds a remote server's
    answer (MLflow's own default retries for minutes).
    """
    db = _sqlite_path(uri)
    for attempt in range(5):
        try:
            with _file_lock(db), _http_limits(timeout_s):
                client = _mlflow_client(uri)  # MLflow may open (and create) the store here already
                client.search_experiments(max_results=1)
            return client
        except Exception as e:  # sqlalchemy, alembic and requests errors reach here unwrapped
            text = str(e)
            if attempt < 4 and ("already exists" in text or "database is locked" in text):
                time.sleep(0.2 * (attempt + 1))
                continue
            what = "cannot be opened" if db is not None else "is unreachable"
            raise TrackingError(f"logger.tracking_uri={uri!r} {what}: {_first_line(e)}") from None
    raise AssertionError("unreachable")


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        return Path(uri[len("sqlite:///"):])
    return None


def _store_exists(uri: str) -> bool:
    """A remote store is assumed to exist; a SQLite one exists if its file does."""
    db = _sqlite_path(uri)
    return db is None or db.is_file()


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
        return True
    except MlflowException:
        return False


@contextlib.contextmanager
def _file_lock(db: Path | None):
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    path = db.with_name(db.name + ".lock")
    made = not path.exists()
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        except BaseException:
            if made:  # a store that did not open leaves no lock file of this process's making
                path.unlink(missing_ok=True)
            raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _http_limits(timeout_s: float | None):
    """MLflow reads its HTTP retry and timeout settings from the environment at each request."""
    if timeout_s is None:
        yield
        return
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def end_run_if_running(uri: str, run_id: str, status: str, reason: str) -> bool:
    """For the engine=distributed launcher, whose rank 0 may have died before it could end the run:
    a RUNNING run is ended ``status``; the launcher's ``reason`` (it knows which rank failed)
    replaces rank 0's on any run that did not finish. True if the run was ended here."""
    try:
        client = open_store(uri, timeout_s=PROBE_TIMEOUT_S)
        current = client.get_run(run_id).info.status
        if current == "FINISHED":
            return False
        client.set_tag(run_id, "failure_reason", _truncate(reason, _mlflow_limit("MAX_TAG_VAL_LENGTH")))
        if current != "RUNNING":
            return False
        client.set_terminated(run_id, status)
        return True
    except Exception as e:  # the store is gone: nothing more to do, say so
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, e)
        return False


def tag_filter(key: str, value: str) -> str | None:
    """``tags.<key> = '<value>'`` in MLflow's search syntax, or None when that syntax cannot say it.

    MLflow (3.16) strips a value's outer quotes and keeps the rest verbatim: there is no escape,
    so a ``'`` inside ``'...'`` ends the string early and breaks or alters the query. The value is
    quoted with the quote it does not contain; one with both kinds gets no filter, and the caller
    matches the tag itself (as ``dpl.report.fetch_runs`` does: slower on a big store, but every
    name is found).
    """
    for quote in ("'", '"'):
        if quote not in value:
            return f"tags.{key} = {quote}{value}{quote}"
    return None


def process_gone(tags: Mapping[str, str]) -> bool:
    """The run's process (tags dpl.host / dpl.pid, set when it started) is not alive on this host.
    A run from another host cannot be checked from here and counts as alive."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return False
    try:
        os.kill(int(tags[PID_TAG]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def end_if_dead(client, run) -> bool:
    """End KILLED a RUNNING ``run`` whose process is gone (SIGKILL, power loss, a full disk: nothing
    could end it), tagged :data:`INTERRUPTED_TAG` so a report tells it from a Ctrl-C; True if ended.

    Called by ``dpl.report`` and by a re-run sweep on the runs they read; ``resume=`` of the job
    sets the run RUNNING again and removes the tag. A store that cannot be written is left as it is."""
    if run.info.status != "RUNNING" or not process_gone(run.data.tags):
        return False
    reason = (f"interrupted: its process (pid {run.data.tags.get(PID_TAG)} on {run.data.tags.get(HOST_TAG)}) "
              f"ended without ending the run (SIGKILL, power loss or a full disk); "
              f"{resume_hint(run.data.tags.get(JOB_DIR_TAG))}")
    try:
        client.set_tag(run.info.run_id, "failure_reason", reason)
        client.set_tag(run.info.run_id, INTERRUPTED_TAG, "true")
        client.set_terminated(run.info.run_id, "KILLED")
    except Exception as e:  # a read-only or full store: the caller still knows it is not running
        log.warning("could not mark MLflow run %s KILLED: %s", run.info.run_id, _first_line(e))
        return False
    return True


def _delete_tag(client, run_id: str, key: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_tag(run_id, key)
    except MlflowException:  # not set
        pass


def _first_line(e: BaseException) -> str:
    """The line of an error that says what went wrong: SQLAlchemy's may open with advice
    ("(raised as a result of Query-invoked autoflush ...") before "(sqlite3.OperationalError) ..."."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    cause = next((line for line in lines if re.match(r"\(\w+(\.\w+)*(Error|Exception)\)", line)), lines[0])
    return cause[:200]


def _sweep_runs(cfg_logger: Any, sweep: str | None, digest: str, status: str | None = None) -> tuple[Any, list]:
    """(client, runs) of sweep ``sweep`` (``None``: of a multirun without a sweep name, tag
    :data:`MULTIRUN_TAG`) with config digest ``digest`` (and ``status``), newest first; (None, []) without a store."""
    uri = resolve_tracking_uri(cfg_logger.tracking_uri, launch_dir())
    if not _store_exists(uri):
        return None, []
    client = open_store(uri, timeout_s=PROBE_TIMEOUT_S)
    experiment = client.get_experiment_by_name(cfg_logger.experiment)
    if experiment is None:
        return client, []
    group = f"tags.`{MULTIRUN_TAG}` = 'true'" if sweep is None else tag_filter("sweep", sweep)
    query = " and ".join(q for q in (group, f"tags.`{CONFIG_HASH_TAG}` = '{digest}'",
                                     f"attributes.status = '{status}'" if status else None) if q)
    runs = client.search_runs([experiment.experiment_id], filter_string=query, max_results=1000,
                              order_by=["attributes.start_time DESC"])
    # a sweep name with both quotes has no filter (tag_filter): matched here
    return client, [r for r in runs if sweep is None or r.data.tags.get("sweep") == sweep]


def find_finished_run(cfg_logger: Any, sweep: str | None, digest: str) -> Any:
    """The FINISHED run with config digest ``digest`` of sweep ``sweep`` (as :func:`_sweep_runs`), or None."""
    _, runs = _sweep_runs(cfg_logger, sweep, digest, "FINISHED")
    return runs[0] if runs else None


def find_unfinished_job(cfg_logger: Any, sweep: str | None, digest: str,
                        resumable: Callable[[Path], bool]) -> Path | None:
    """The job dir of this sweep's newest run with config digest ``digest`` (as :func:`_sweep_runs`) that
    was stopped (KILLED, or RUNNING with its process gone: ended KILLED here) and whose dir is
    ``resumable``, or None. A re-run packed sweep resumes such a job where it stopped."""
    client, runs = _sweep_runs(cfg_logger, sweep, digest)
    for run in runs:
        if end_if_dead(client, run) or run.info.status == "KILLED":
            job = run.data.tags.get(JOB_DIR_TAG)
            if job and resumable(Path(job)):
                return Path(job)
    return None


def check_tracking(cfg_logger: Any, resume_uri: str | None = None) -> None:
    """Before training: the tracking store opens (and a remote one answers within PROBE_TIMEOUT_S).
    A resumed job checks the store it first ran in, if that is still there (as ``start`` picks it)."""
    if cfg_logger.name != "mlflow":
        return
    uri = resolve_tracking_uri(cfg_logger.tracking_uri, launch_dir())
    if resume_uri and _store_exists(resume_uri):
        uri = resume_uri
    db = _sqlite_path(uri)
    if db is not None and not db.exists():
        # A new store is made when the run starts (after the data loaded): a run refused before
        # then leaves no empty mlflow.db behind. Here: it can be made.
        check_writable_file("logger.tracking_uri", uri, db)
        return
    if db is not None and not db.is_file():
        raise TrackingError(f"logger.tracking_uri={uri!r} cannot be opened: {db} is not a file")
    open_store(uri, timeout_s=PROBE_TIMEOUT_S)


def check_store_for_launcher(uri: str, launcher: str) -> None:
    """Under Slurm (``hydra/launcher=slurm``; ``launcher``: its class or ``_target_``, ending in
    ``SlurmLauncher``) every job's node must reach the one store: a relative
    ``sqlite:///`` path would be resolved by each job on its own node, where the launch dir may be
    missing or another disk. An absolute path on a shared filesystem, or a server, is asked for."""
    if not launcher.endswith("SlurmLauncher") or not uri.startswith("sqlite:///"):
        return
    path = uri[len("sqlite:///"):]
    if path and not path.startswith("/") and not path.startswith(":memory:"):
        raise ConfigError(f"logger.tracking_uri={uri!r} is invalid under hydra/launcher=slurm: a relative SQLite "
                          f"path is resolved on each job's node, not on a disk they all share; allowed an absolute "
                          f"path on a shared filesystem (sqlite:////shared/dpl/mlflow.db) or an MLflow server "
                          f"(http://<host>:5000)")


def _quiet_mlflow() -> None:
    # Set before the first mlflow import: no telemetry pings (there is no network anyway),
    # no "View run at" URLs, no INFO lines about creating tables or experiments.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # It logs each database error (and each retry of an engine it cannot create) over many lines,
    # then raises it; dpl reports the raised error in one line (open_store, _store_write).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _experiment_id(client, name: str, uri: str) -> str:
    """Get or create the experiment; artifacts of a new one go beside a sqlite store
    (``<db dir>/mlartifacts``) rather than into whatever the cwd is."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        _tag_experiment(client, found.experiment_id, found.tags)
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:////"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=experiment_tags())
    except MlflowException:  # another job of a parallel sweep created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def experiment_tags() -> dict[str, str]:
    """Tags of a dpl experiment: the runs view first, and the saved column view :data:`VIEW_KEY`."""
    view = {"selectedColumns": list(VIEW_COLUMNS), "orderByKey": "attributes.start_time", "orderByAsc": False}
    return {**EXPERIMENT_KIND, f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(view)}


def _tag_experiment(client, experiment_id: str, tags: Mapping[str, str]) -> None:
    """Add the dpl experiment tags an older (or MLflow-created) experiment lacks; never overwrite."""
    for key, value in experiment_tags().items():
        if key not in tags:
            client.set_experiment_tag(experiment_id, key, value)


def _as_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metrics as floats; nan/inf are kept (MLflow stores nan, clips inf), None is dropped."""
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _param_key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . / : and space; Hydra "+"-added keys may not.
    return re.sub(r"[^\w\-./: ]", "_", key)


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: limit - len(_TRUNCATED)] + _TRUNCATED


def _mlflow_limit(name: str) -> int:
    """A value-length limit from ``mlflow.utils.validation`` (6000 in MLflow 2.x / 3.x)."""
    from mlflow.utils import validation

    return getattr(validation, name, _PARAM_LIMIT_FALLBACK)


# ----------------------------------------------------------------------------- results CSV


def append_result_row(path: str | Path, row: Mapping[str, object], key: str = "job_dir") -> None:
    """Append one row to the results CSV, widening the header when the row has new columns.

    Jobs of a parallel sweep serialise on an exclusive ``flock`` of ``<path>.lock``; the
    file is rewritten whole into a temp file and renamed, so readers never see half a row.
    A row with the same ``key`` (the job dir) replaces the old one: a job recorded twice
    (finished again after a resume) is still one row.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            columns, rows = _read_csv(path)
            new = {str(k): _cell(v) for k, v in row.items()}
            if new.get(key):
                rows = [r for r in rows if r.get(key) != new[key]]
            columns += [k for k in new if k not in columns]
            write_csv(path, rows + [new], columns)  # temp file + rename: never half a row
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.exists():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def check_writable_file(key: str, value: str, path: Path) -> None:
    """``path`` can be written the way :func:`append_result_row` writes it, or a one-line ConfigError.

    Tried, not inferred from permission bits: root ignores them, a read-only mount does not.
    Nothing is created: a folder that does not exist yet is tried at its deepest existing parent.
    """

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{key}={value!r} is invalid: {why}")

    if not str(value).strip():
        raise bad("allowed a file path")
    if path.is_dir():
        raise bad(f"{path} is a directory (allowed a file path)")
    if path.suffix == ".lock":
        raise bad("a .lock file is where dpl serialises its writers: allowed another file name")
    base = path.parent
    while not base.exists() and base != base.parent:  # made when first written: tried where it would be
        base = base.parent
    lock = path.with_name(path.name + ".lock")
    try:
        if not base.is_dir():
            raise NotADirectoryError(20, f"{base} is not a directory")
        with tempfile.TemporaryFile(dir=base):  # creates nothing that stays: a refused run leaves no trace
            pass
        if lock.exists():
            with open(lock, "a"):
                pass
    except OSError as e:
        raise bad(f"cannot write in {path.parent} ({e.strerror or type(e).__name__})") from None


def check_results_file(key: str, value: str, path: Path, marker: str = "job_dir") -> None:
    """An existing results file must be one dpl wrote (its header has ``marker``, a column of every
    row): appended to, any other CSV or text file would get its first line taken as the header."""
    check_writable_file(key, value, path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{key}={value!r} is invalid: {path} cannot be read ({type(e).__name__})") from None
    if marker not in header:
        raise ConfigError(f"{key}={value!r} is invalid: {path} is not a dpl results file (its header has no "
                          f"{marker} column); give a new file name")


def check_writable_dir(key: str, path: Path) -> None:

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"{key}={str(path)!r} is invalid: cannot write there "
                          f"({e.strerror or type(e).__name__})") from None


def _cell(value: object) -> str:
    return "" if value is None else str(value)
