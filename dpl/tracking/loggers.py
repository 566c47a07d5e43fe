"""Experiment tracking behind one small interface: the ``logger`` group's options, registered here.

The trainer talks to a :class:`Logger` (``start`` / ``log_metrics`` / ``log_artifact`` / ``finish``)
chosen by the ``logger`` config group; it never imports mlflow itself. A logger with a store also
answers for it: whether it can be written before training starts (``check``), and which runs of a
sweep finished or were stopped (``find_finished_run``, ``find_unfinished_job``), so a re-run sweep
skips or resumes them.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

from omegaconf import MISSING, DictConfig, OmegaConf

from dpl.config.schema import check, key
from dpl.errors import TrackingError
from dpl.registry import Registry
from dpl.run.interrupt import process_start
from dpl.tracking import store
from dpl.tracking.params import _resolved, flatten_config, launch_dir
from dpl.tracking.run_names import run_name
from dpl.tracking.store import (
    FAILURE_TAG,
    HOST_TAG,
    INTERRUPTED_TAG,
    PID_START_TAG,
    PID_TAG,
    RESUMED_FROM_TAG,
    RUN_NAME_TAG,
    RUN_STATUSES,
    _delete_tag,
    _experiment_id,
    _first_line,
    _mlflow_limit,
    _run_exists,
    _truncate,
    open_store,
    resolve_tracking_uri,
)

log = logging.getLogger("dpl")

@dataclass(frozen=True)
class LoggerFacts:
    store: bool = False  # runs are kept in a store (tracking_uri) that sweeps search and jobs must reach


LOGGERS = Registry("logger", "where a run's params, metrics and artifacts are recorded", facts=LoggerFacts())


@dataclass
class LoggerBase:
    name: str = key(MISSING, "the logger (an option of the group)")
    plots: bool = key(True, "PNG figures of the run in its job dir (and as artifacts in the store)")
    # The names a run is grouped and shown under (MLflow's experiment and run name). Every logger
    # has them because sweeps and study rows set them, and `logger=none` must still compose there.
    experiment: str = key("dpl", "the experiment the run is filed under (a sweep's: its name)")
    run_name: Optional[str] = key(None, "the run's name (null: method-K-H-optimizer-seed and what differs)")

    def __post_init__(self) -> None:
        check(bool(str(self.experiment).strip()), "logger.experiment", self.experiment, "a non-empty name")


@dataclass
class MlflowLoggerConfig(LoggerBase):
    tracking_uri: str = key("sqlite:///mlflow.db", "the MLflow store (relative sqlite paths: the launch directory)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(str(self.tracking_uri).strip()), "logger.tracking_uri", self.tracking_uri, "a non-empty URI")


class Logger(Protocol):
    run_id: str | None
    tracking_uri: str | None
    experiment_id: str | None

    def start(self, cfg: DictConfig, tags: Mapping[str, str], resume_run_id: str | None = None) -> str | None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None: ...


@LOGGERS.register("none", LoggerBase, facts=LoggerFacts(store=False))
class NullLogger:
    """``logger=none``: accepts every call and records nothing (files in the job dir still are)."""

    def __init__(self, cfg_logger: Any = None) -> None:
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None

    def start(self, cfg: DictConfig, tags: Mapping[str, str], resume_run_id: str | None = None) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        pass

    def check(self) -> None:
        """Nothing to reach."""

    def find_finished_run(self, sweep: str | None, digest: str) -> Any:
        return None

    def find_unfinished_job(self, sweep: str | None, digest: str, resumable: Callable[[Path], bool]) -> Path | None:
        return None


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


@LOGGERS.register("mlflow", MlflowLoggerConfig, facts=LoggerFacts(store=True))
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
              params: Mapping[str, str] | None = None) -> str:
        """Open the run (a new one, or ``resume_run_id`` continued). A resumed run that is not in the store
        continues as a new run tagged ``resumed_from``: the job dir survives a lost or moved ``mlflow.db``
        (which store a resumed job records to: :func:`dpl.run.job.resumed_config`). A new run's params
        are ``params``, by default the flattened config."""
        uri = resolve_tracking_uri(self.cfg.tracking_uri, launch_dir())
        self.tracking_uri = uri
        self._client = open_store(uri)
        tags = {**process_tags(), **tags}  # (a store process's caller names its own process)
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

    def check(self) -> None:
        """The store opens (a remote one answers within a few seconds), before any data is loaded."""
        store.check_store(self.cfg.tracking_uri)

    def find_finished_run(self, sweep: str | None, digest: str) -> Any:
        """The FINISHED run of sweep ``sweep`` (None: of a multirun without a name) with config digest ``digest``."""
        return store.find_finished_run(self.cfg, sweep, digest)

    def find_unfinished_job(self, sweep: str | None, digest: str, resumable: Callable[[Path], bool]) -> Path | None:
        """The job dir of this sweep's newest stopped run with config digest ``digest`` (see the store's)."""
        return store.find_unfinished_job(self.cfg, sweep, digest, resumable)

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


def process_tags() -> dict[str, str]:
    """The host and process a run is trained in: whether its process is gone (a RUNNING run whose process
    died is ended KILLED by dpl.report and re-run sweeps) is judged by them."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    started = process_start(os.getpid())
    if started is not None:  # with the PID, it names this process: a reused PID is not the run's
        tags[PID_START_TAG] = started
    return tags


def make_logger(cfg_logger: Any) -> Logger:
    """The logger of the ``logger`` config node."""
    return LOGGERS.build(cfg_logger.name, cfg_logger)


def _as_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metrics as floats; nan/inf are kept (MLflow stores nan, clips inf), None is dropped."""
    out = {}
    for name, value in metrics.items():
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _param_key(name: str) -> str:
    # MLflow keys allow alphanumerics, _ - . / : and space; Hydra "+"-added keys may not.
    return re.sub(r"[^\w\-./: ]", "_", name)
