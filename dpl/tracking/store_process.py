"""MLflow's side of a run in a process of its own, beside the training process.

Why: importing MLflow and opening its store cost a run 3-4 s before its first step on a 2-core machine
(``import mlflow`` 2.2 s, its SQLAlchemy store's modules 1.2 s, opening the store 0.4 s), all of it Python
under the import lock, so a thread cannot overlap it with the run's own 3-5 s of importing torch and
building the data and model (measured: both imports in two threads 8-9 s, one after the other 6.5-7.8 s).
A second process can. ``python -m dpl`` forks one (:func:`begin`) as soon as its config is composed,
before torch is imported, when it is still single-threaded; the process imports MLflow and checks the
store while the run imports torch and builds itself.

The training process talks to it through :class:`RemoteLogger`, a :class:`dpl.tracking.loggers.Logger`
whose every call returns once the store process has made it (a run's records are written when its call
returns, as in one process), with the same one-line errors, and the log lines the call gave. The store
process ignores the signals that stop a run (the training process records its own KILLED through it) and
ends when the training process's end of the pipe closes: at its exit, or its death.
``DPL_STORE_PROCESS=0`` keeps MLflow in the training process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from dpl import timeline
from dpl.errors import TrackingError, first_line
from dpl.tracking import loggers
from dpl.tracking.params import _resolved, flatten_config, launch_dir
from dpl.tracking.run_names import run_name
from dpl.tracking.store import RUN_NAME_TAG, check_store, resolve_tracking_uri

log = logging.getLogger("dpl")

_server: Optional["StoreProcess"] = None


def begin(cfg_logger: Any) -> None:
    """Fork the store process for the store of ``cfg_logger`` (a logger with a store: MLflow's), or keep the one
    that serves it (the jobs of a sequential sweep share it). Nothing where a fork is unsafe or pointless:
    another logger, a process with threads or with torch imported (an embedding process, a test), a rank
    of torchrun other than 0, no ``os.fork``, ``DPL_STORE_PROCESS=0``."""
    global _server
    if (not _has_store(cfg_logger) or os.environ.get("DPL_STORE_PROCESS") == "0"
            or not hasattr(os, "fork") or threading.active_count() > 1 or "torch" in sys.modules
            or os.environ.get("RANK", "0") != "0"):  # torchrun's other ranks record nothing
        return
    uri = _store_uri(cfg_logger)
    if _server is not None and _server.uri == uri and _server.alive():
        return
    if _server is not None:
        _server.close()
    _server = StoreProcess(uri)
    timeline.mark("store process forked")


def serving(cfg_logger: Any) -> Optional["StoreProcess"]:
    """The store process that serves ``cfg_logger``'s store, if one runs."""
    if _server is not None and _server.alive() and _server.uri == _store_uri(cfg_logger):
        return _server
    return None


def make_logger(cfg_logger: Any) -> loggers.Logger:
    """The logger of the ``logger`` config node: the store process's where one serves its store, else one
    in this process (:func:`dpl.tracking.loggers.make_logger`)."""
    server = serving(cfg_logger) if _has_store(cfg_logger) else None
    return RemoteLogger(server, cfg_logger) if server is not None else loggers.make_logger(cfg_logger)


def _has_store(cfg_logger: Any) -> bool:
    """The logger keeps its runs in a store (MLflow's): what a store process is for."""
    name = cfg_logger.get("name")
    return name in loggers.LOGGERS and loggers.LOGGERS[name].facts.store


def _store_uri(cfg_logger: Any) -> str:
    return resolve_tracking_uri(str(cfg_logger.tracking_uri), launch_dir())


class StoreProcess:
    """The forked process and the training process's end of their pipe. Requests are numbered: a call
    the training process left (Ctrl-C while it waited) has its late answer skipped by the next."""

    def __init__(self, uri: str) -> None:
        import multiprocessing.connection

        self.uri = uri
        self._handles = 0
        self._seq = 0
        ours, theirs = multiprocessing.Pipe()
        pid = os.fork()
        if pid == 0:  # the store process: never returns
            ours.close()
            _serve(theirs, uri)
        theirs.close()
        self.pid, self._conn = pid, ours
        self._closed = False
        import atexit

        atexit.register(self.close)

    def alive(self) -> bool:
        return not self._closed

    def new_handle(self) -> int:
        self._handles += 1
        return self._handles

    def call(self, handle: int, cfg_logger: Mapping[str, Any], method: str, *args, **kwargs) -> tuple[Any, dict]:
        """``method(*args, **kwargs)`` of the store process's logger ``handle``: its result and the logger's
        state after it; its error raised here as it was raised there."""
        if self._closed:
            raise TrackingError(f"logger.tracking_uri={self.uri!r}: the store process has ended")
        self._seq += 1
        try:
            self._conn.send((self._seq, handle, dict(cfg_logger), method, args, kwargs))
            while True:
                seq, outcome, value, state, records = self._conn.recv()
                if seq == self._seq:
                    break
        except (EOFError, OSError) as e:  # it was killed (the OOM killer, a kill -9 of its own)
            self._closed = True
            raise TrackingError(f"logger.tracking_uri={self.uri!r}: the store process ended "
                                f"({type(e).__name__}); nothing more can be recorded") from None
        for record in records:  # its log lines, in the order given, through this process's handlers
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        if outcome == "error":
            raise value
        return value, state

    def close(self) -> None:
        """End the store process (it ends on its own when this process does): its calls have all returned."""
        if not self._closed:
            self._closed = True
            self._conn.close()
            try:
                os.waitpid(self.pid, 0)
            except (ChildProcessError, OSError):
                pass


class RemoteLogger:
    """An MLflow logger whose calls the store process makes (see the module's docstring). What depends on
    this process, or on Hydra's state for this job, is settled here: the run's name, its params and
    resolved config, the process tags (the PID a run's liveness is judged by), absolute artifact paths."""

    def __init__(self, server: StoreProcess, cfg_logger: Any) -> None:
        self._server = server
        self._handle = server.new_handle()
        self._cfg = OmegaConf.to_container(cfg_logger, resolve=True)
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None

    def _call(self, method: str, *args, **kwargs) -> Any:
        value, state = self._server.call(self._handle, self._cfg, method, *args, **kwargs)
        self.run_id, self.tracking_uri, self.experiment_id = state
        return value

    def start(self, cfg: DictConfig, tags: Mapping[str, str], resume_run_id: str | None = None,
              params: Mapping[str, str] | None = None) -> str | None:
        tags = {**loggers.process_tags(), **tags}
        if RUN_NAME_TAG not in tags:
            tags[RUN_NAME_TAG] = run_name(cfg)
        resolved = OmegaConf.create(_resolved(cfg))
        return self._call("start", resolved, tags, resume_run_id=resume_run_id,
                          params=dict(flatten_config(cfg) if params is None else params))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # floats here: a metric may be a NumPy or torch scalar, which the store process could not unpickle
        self._call("log_metrics", loggers._as_floats(metrics), int(step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", str(Path(path).resolve()), artifact_path)

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> None:
        self._call("finish", status, reason=reason)

    def check(self) -> None:
        """The store opens: the store process's first answer, checked as the run imported torch."""
        self._call("check")

    def find_finished_run(self, sweep: str | None, digest: str) -> Any:
        return self._call("find_finished_run", sweep, digest)

    def find_unfinished_job(self, sweep: str | None, digest: str, resumable: Callable[[Path], bool]) -> Path | None:
        # `resumable` reads this process's files; it cannot cross the pipe, and packed sweeps (its
        # only caller) build their runs in one process without a store process.
        return loggers.make_logger(OmegaConf.create(self._cfg)).find_unfinished_job(sweep, digest, resumable)


# ---- the store process's side ----

class _Records(logging.Handler):
    """The log records of one call, sent back with its answer."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None  # its arguments may not pickle
        record.exc_info = record.stack_info = None
        self.records.append(record)


def _serve(conn, uri: str) -> None:
    """The store process: check the store at once (the answer to the first ``check``), then make the
    calls asked for until the training process's end closes. Never returns."""
    code = 0
    try:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, signal.SIG_IGN)  # the training process stops, and says so through here
        records = _Records()
        root = logging.getLogger()
        for handler in list(root.handlers):  # the training process's (its stdout, its job's dpl.log)
            root.removeHandler(handler)
        for name in list(logging.root.manager.loggerDict):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
        root.addHandler(records)
        first_check = (*_attempt(check_store, uri), records.records)
        _warm(uri)
        served: dict[int, Any] = {}  # a logger per RemoteLogger (the jobs of a sequential sweep)
        while True:
            try:
                seq, handle, cfg_logger, method, args, kwargs = conn.recv()
            except (EOFError, OSError):
                break
            records.records = []
            if method == "check" and first_check is not None:  # made while the run imported torch
                outcome, value, records.records = first_check
                first_check = None
            else:
                first_check = None
                if handle not in served:
                    served[handle] = loggers.make_logger(OmegaConf.create(cfg_logger))
                outcome, value = _attempt(_method(served[handle], method), *args, **kwargs)
            lg = served.get(handle)
            state = (lg.run_id, lg.tracking_uri, lg.experiment_id) if lg is not None else (None, None, None)
            conn.send((seq, outcome, value, state, records.records))
    except BaseException:  # noqa: BLE001 - nothing of this process may run the training process's code
        code = 1
    finally:
        os._exit(code)


def _warm(uri: str) -> None:
    """MLflow's client and SQLAlchemy store modules, which a run's first write needs (the check of a store
    that does not exist yet imports neither)."""
    try:
        import mlflow.tracking  # noqa: F401

        if uri.startswith("sqlite:"):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    except Exception:  # noqa: BLE001 - the call that needs them says why, in its one line
        pass


def _method(logger: Any, name: str) -> Callable:
    if name == "find_finished_run":  # an MLflow Run would need mlflow to unpickle: what a re-run sweep reads
        def found(sweep, digest):
            run = logger.find_finished_run(sweep, digest)
            return None if run is None else SimpleNamespace(info=SimpleNamespace(run_id=run.info.run_id),
                                                            data=SimpleNamespace(metrics=dict(run.data.metrics)))
        return found
    return getattr(logger, name)


def _attempt(fn: Callable, *args, **kwargs) -> tuple[str, Any]:
    """("ok", result), or ("error", the exception to raise in the training process): dpl's and Python's
    own errors as they are, any other (MLflow's, SQLAlchemy's: their classes are not imported there) as
    a one-line TrackingError."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        if type(e).__module__ in ("builtins", "dpl.errors"):
            try:
                import pickle

                pickle.loads(pickle.dumps(e))
                e.__traceback__ = None
                return "error", e
            except Exception:  # noqa: BLE001 - an error whose arguments do not pickle
                pass
        return "error", TrackingError(first_line(e))

