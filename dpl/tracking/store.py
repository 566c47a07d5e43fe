"""The MLflow store: opened safely by many jobs at once, probed before training, searched for the runs
of a sweep, and mended where a process died without ending its run. ``mlflow`` is imported here only
when a store is opened: the import is slow, and a run with ``logger=none`` never needs it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from dpl.errors import ConfigError, TrackingError
from dpl.run.interrupt import resume_hint
from dpl.tracking import store_file
from dpl.tracking.params import VIEW_METRICS, VIEW_PARAMS, launch_dir
from dpl.tracking.results import check_writable_file

log = logging.getLogger("dpl")

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
RUN_NAME_TAG = "mlflow.runName"  # MLflow's own tag for the run name
HOST_TAG, PID_TAG = "dpl.host", "dpl.pid"  # where a run's process lives: dpl.report tells a dead RUNNING run
PID_START_TAG = "dpl.pid_start"  # when that process started (clock ticks since boot): a reused PID is another
JOB_DIR_TAG = "dpl.job_dir"  # where its checkpoint is: what resume= of a run found dead is given
MULTIRUN_TAG = "dpl.multirun"  # a job of a multirun without a sweep name: a re-run skips what finished
FAILURE_TAG = "failure_reason"  # why a run ended FAILED or KILLED (removed when it is resumed)
INTERRUPTED_TAG = "dpl.interrupted"  # set on a run ended KILLED because its process had died (end_if_dead)
CONFIG_HASH_TAG = "dpl.config_hash"  # the resolved config's digest: a re-run sweep skips what finished
RESUMED_FROM_TAG = "resumed_from"
PROBE_TIMEOUT_S = 5  # a remote tracking server gets this long to answer before training starts

# MLflow 3's UI opens an experiment on its GenAI "Traces" tab unless the experiment's kind says
# it holds model-training runs (the tag the UI itself sets when one picks "Machine learning").
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A saved runs-table view (the UI's "Share" state, an experiment tag): open the experiment's runs
# table with ``?viewStateShareKey=dpl`` to see these columns without adding them by hand.
VIEW_KEY = "dpl"
UI_URL = "http://127.0.0.1:5000"  # where ``mlflow ui`` serves a local store by default
VIEW_COLUMNS = ("params.`dataset.name`", "params.`method.name`", "params.`K`", "params.`H`",
                "params.`dynamic_h.name`", "params.`optimizer.name`", "params.`lr`", "params.`seed`",
                *(f"params.`{k}`" for k in VIEW_PARAMS),  # runs that differ only there must not look alike
                "metrics.`test_acc`", "metrics.`best_val_acc`", "metrics.`H_mean`",
                *(f"metrics.`{m}`" for m in VIEW_METRICS))
_PARAM_LIMIT_FALLBACK = 6000  # MLflow's MAX_PARAM_VAL_LENGTH in 2.x / 3.x
_TRUNCATED = "...[truncated]"


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


def mlflow_client(tracking_uri: str, base_dir: str | Path | None = None):
    """An ``MlflowClient`` on ``tracking_uri``; a relative sqlite path resolves against ``base_dir``
    (default: the launch directory), as the jobs that wrote the store resolved it. A SQLite store
    that does not exist yet is made whole, as :func:`open_store` makes it."""
    uri = resolve_tracking_uri(tracking_uri, base_dir if base_dir is not None else launch_dir())
    if not _store_exists(uri):
        return open_store(uri)
    return _mlflow_client(uri)


def _mlflow_client(uri: str):
    _quiet_mlflow()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_store(uri: str, timeout_s: float | None = None):
    """An ``MlflowClient`` on ``uri`` whose store is open and answers, or a one-line TrackingError.

    A SQLite store is made whole or not at all, under an exclusive ``flock`` of ``<db>.lock`` that
    the jobs of a parallel sweep starting together on a fresh store wait on; one found half-made
    is rebuilt if it holds no runs, and named otherwise (:mod:`dpl.tracking.store_file`).
    ``timeout_s`` bounds a remote server's answer (MLflow's own default retries for minutes).
    """
    db = sqlite_path(uri)
    for attempt in range(5):
        try:
            with _file_lock(db), _http_limits(timeout_s):
                if db is not None:
                    _quiet_mlflow()
                    store_file.prepare(db)
                client = _mlflow_client(uri)
                client.search_experiments(max_results=1)
            return client
        except TrackingError as e:  # store_file's: one line naming the file
            raise TrackingError(f"logger.tracking_uri={uri!r}: {e}") from None
        except Exception as e:  # sqlalchemy, alembic and requests errors reach here unwrapped
            if attempt < 4 and "database is locked" in str(e):
                time.sleep(0.2 * (attempt + 1))
                continue
            raise TrackingError(_open_error(f"logger.tracking_uri={uri!r}", db, e)) from None
    raise AssertionError("unreachable")


def read_store(uri: str, name: str, timeout_s: float | None = PROBE_TIMEOUT_S):
    """An ``MlflowClient`` on the existing store ``uri``, for reading: a missing SQLite file is not
    made, a half-made one is not touched; a one-line TrackingError that names the store as ``name``
    (``--tracking-uri='...'``) where it cannot be read, or a server does not answer within ``timeout_s``."""
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        what = "is not a file" if db.exists() else "does not exist"
        raise TrackingError(f"{name} cannot be opened: {db} {what}")
    try:
        state = store_file.inspect(db) if db is not None else None
        if state is not None and state.kind == "half":
            raise TrackingError(f"{name}: {store_file.half_made_message(db, state)}")
        if state is not None and state.kind == "empty":  # MLflow would build its schema in it: a write
            raise TrackingError(f"no runs here: {db} is an empty file, not an MLflow store yet")
        with _http_limits(timeout_s):
            client = _mlflow_client(uri)
            client.search_experiments(max_results=1)
        return client
    except TrackingError:
        raise
    except Exception as e:  # sqlite3, sqlalchemy, requests and MLflow errors, each over many lines
        raise TrackingError(_open_error(name, db, e)) from None


def _open_error(name: str, db: Path | None, e: BaseException) -> str:
    """One line: why the store ``name`` did not open, and what to do where that is known."""
    if db is None:  # requests' message nests the cause (refused, timed out, no such host) deep inside
        cause = re.search(r"\[Errno -?\d+\] [^'\")\]]+|[\w ]*timed out", str(e))
        return f"{name} is unreachable: {cause.group(0).strip() if cause else _first_line(e)}"
    if isinstance(e, sqlite3.DatabaseError) and "not a database" in str(e):
        return f"{name} cannot be opened: {db} is not an SQLite file (move it aside, or name another store)"
    line = f"{name} cannot be opened: {_first_line(e)}"
    with contextlib.suppress(Exception):  # what the store holds says whether it is worth more words
        state = store_file.inspect(db)
        if state.kind == "behind":  # an upgrade MLflow could not make (or stopped half-way)
            line += (f"; {db} is {state.why}: move it aside (mv {db} {db}.broken) to start a new store "
                     f"there, or restore it from a backup")
    return line


def sqlite_path(uri: str) -> Path | None:
    """The file of a SQLite store URI (``sqlite:////abs/mlflow.db``); None for any other store."""
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        return Path(uri[len("sqlite:///"):])
    return None


def _store_exists(uri: str) -> bool:
    """A remote store is assumed to exist; a SQLite one exists if its file does."""
    db = sqlite_path(uri)
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


def tag_filter(key: str, value: str) -> str:
    """A search filter that selects every run whose tag ``key`` is ``value``, and may select more: the
    caller compares the tag itself.

    MLflow (3.16) keeps a quoted value verbatim, with no escape, and its tokenizer reads a backslash
    and the character after it as one: a ``'`` inside ``'...'`` ends the string early, and a
    backslash before the closing quote runs it on ("Invalid clause(s) in filter string"). A value
    with neither a backslash nor both quotes is quoted with the quote it lacks and found exactly; any
    other is searched by its part before the first quote or backslash (``LIKE 'a%'``: ``%`` and ``_``
    in that part only widen the search).
    """
    name = f"tags.`{key}`"
    if "\\" not in value:
        for quote in ("'", '"'):
            if quote not in value:
                return f"{name} = {quote}{value}{quote}"
    prefix = re.split(r"['\"\\]", value, maxsplit=1)[0]
    return f"{name} LIKE '{prefix}%'"


def process_gone(tags: Mapping[str, str]) -> bool:
    """The run's process (tags dpl.host / dpl.pid / dpl.pid_start, set when it started) is not alive on this
    host: no process has its PID, or the one that has it started at another time (the PID was reused, by
    any process, after the run's died). A run without dpl.pid_start (older dpl) is checked by its PID alone;
    a run from another host cannot be checked from here and counts as alive."""
    from dpl.run.interrupt import process_start

    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return False
    try:
        os.kill(int(tags[PID_TAG]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's: its start time tells whether it is the run's
        pass
    started = tags.get(PID_START_TAG)
    now = process_start(tags[PID_TAG]) if started else None
    return now is not None and now != started


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
    # tag_filter may select more than the sweep (a name with a backslash or both quotes): matched here
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


def check_store(tracking_uri: str) -> None:
    """Before training: the tracking store opens (and a remote one answers within PROBE_TIMEOUT_S).
    (A resumed job's store is its command's: :func:`dpl.run.job.resumed_config`.)"""
    uri = resolve_tracking_uri(tracking_uri, launch_dir())
    db = sqlite_path(uri)
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


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: limit - len(_TRUNCATED)] + _TRUNCATED


def _mlflow_limit(name: str) -> int:
    """A value-length limit from ``mlflow.utils.validation`` (6000 in MLflow 2.x / 3.x)."""
    from mlflow.utils import validation

    return getattr(validation, name, _PARAM_LIMIT_FALLBACK)
