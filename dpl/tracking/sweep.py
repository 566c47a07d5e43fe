"""One MLflow parent run per sweep, with the sweep's jobs nested under it as child runs.

A sweep YAML in ``sweeps/`` registers the callback through ``sweeps/_sweep.yaml``, which every
sweep config lists::

    hydra:
      callbacks:
        mlflow_parent:
          _target_: dpl.tracking.sweep.MlflowParentRun

A ``-m`` command line without a sweep config gets the same settings (:func:`command_line_sweep`:
``_sweep.yaml``'s keys as overrides, and a ``sweep=`` name derived from the swept keys when none is
given), so it has the same parent run, experiment and ``multirun/<sweep>/`` folder.

Hydra calls :meth:`MlflowParentRun.on_multirun_start` in the launching process before
the sweeper starts any job. The parent run's id reaches the jobs through the
environment variable ``DPL_SWEEP_PARENT_RUN_ID``: jobs of the basic launcher run in
this process, joblib workers and SLURM jobs are started later and inherit it. Each
job's Recorder then tags its run ``mlflow.parentRunId``, which the MLflow UI nests.

The parent carries the tag ``sweep_parent`` (not ``sweep``), so ``tags.sweep = '<name>'``
selects exactly the jobs. When the sweep ends the parent gets a summary: how many jobs
finished or failed, the best ``best_val_acc``, and Hydra's ``multirun.yaml`` (plus the
Optuna sweeper's ``optimization_results.yaml``) as artifacts. A sweep stopped by Ctrl-C
or SIGTERM ends its parent KILLED (at interpreter exit); only SIGKILL leaves it RUNNING.

``hydra_plugins.dpl_sweepers.OptunaSweeper`` is Hydra's Optuna sweeper with two failure paths made explicit:
an interrupted trial is marked FAIL in the study (not left RUNNING), and a search whose
every trial failed or diverged says so instead of ending in Optuna's "No trials are
completed yet" traceback. With ``hydra.sweeper.seeds=[0,1,2]`` each trial runs once per seed,
as ordinary jobs of the sweep, and Optuna is told the mean (:func:`check_seeds`).
"""

from __future__ import annotations

import atexit
import copy
import datetime
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from dpl.errors import ConfigError
from dpl.tracking.run_names import NAME_KEYS, SWEPT_KEYS_ENV, derived_sweep_name, swept_keys

log = logging.getLogger("dpl")

PARENT_RUN_ENV = "DPL_SWEEP_PARENT_RUN_ID"
PARENT_TAG = "sweep_parent"
_SWEEP_FILES = ("multirun.yaml", "optimization_results.yaml")


_active: Optional["MlflowParentRun"] = None  # this process's open parent run (discard_unused_parent)


def parent_run_id() -> Optional[str]:
    """The MLflow run id of the sweep this job belongs to, or None outside a sweep."""
    return os.environ.get(PARENT_RUN_ENV) or None


class MlflowParentRun(Callback):
    """Hydra callback: open the sweep's parent run before the jobs, summarise and close it after."""

    def __init__(self) -> None:
        self.logger = None
        self.made_store: Optional[Path] = None  # the SQLite file this sweep's parent run created

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        plain_optuna_logs()
        # Before any job starts, so each names its run by the keys the sweep varies (dpl.tracking.run_names).
        os.environ[SWEPT_KEYS_ENV] = " ".join(swept_keys(config.hydra.sweeper.get("params"),
                                                         config.hydra.overrides.task))
        from dpl.tracking.loggers import LOGGERS, MlflowLogger

        if not LOGGERS.facts(config.logger).store:
            return
        from dpl.tracking.params import source_tags
        from dpl.tracking.store import check_store_for_launcher

        # before the parent run is made in a store the jobs could not reach (hydra/launcher=slurm)
        check_store_for_launcher(str(config.logger.tracking_uri), str(config.hydra.launcher.get("_target_", "")))

        name = str(config.sweep or config.logger.experiment)
        # The jobs' run_name may interpolate ${hydra:job...}, which has no value before a job starts.
        base = copy.deepcopy(config)
        with open_dict(base):
            base.logger.run_name = name
        self.logger = MlflowLogger(base.logger)
        tags = {PARENT_TAG: name, "sweep_dir": str(_sweep_dir(config)), **source_tags(),
                "sweeper": str(config.hydra.sweeper.get("_target_", "")),
                "sweep_params": _sweep_params(config)}
        from dpl.tracking.params import launch_dir
        from dpl.tracking.store import resolve_tracking_uri, sqlite_path

        db = sqlite_path(resolve_tracking_uri(str(config.logger.tracking_uri), launch_dir()))
        self.made_store = db if db is not None and not db.exists() else None
        earlier = _unfinished_parent(config, name, tags["sweep_params"])
        # The parent's params are the sweep's own settings, not a job's config (K=4 H=4 of the base
        # config would make it read as one more run in the table). A re-run of a sweep that was
        # stopped goes on in its parent run, so the parent ends (FINISHED) when the re-run completes it.
        run_id = self.logger.start(base, tags, resume_run_id=earlier, params=sweep_settings(config, name))
        if earlier:
            log.info("sweep %s: continuing the parent run %s of the stopped sweep", name, earlier)
        os.environ[PARENT_RUN_ENV] = run_id
        global _active
        _active = self
        atexit.register(self._interrupted)  # Hydra skips on_multirun_end when a job's Ctrl-C ends the sweep
        log.info("sweep %s: MLflow parent run %s", name, run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.logger is None:
            return
        try:
            self.logger.log_metrics(self._summary(config), step=0)
            for name in _SWEEP_FILES:
                path = _sweep_dir(config) / name
                if path.is_file():
                    self.logger.log_artifact(path)
        finally:
            self.logger.finish("FINISHED")
            self._close()

    def _close(self, say: bool = True) -> None:
        """Say where the sweep's runs are; forget the parent run."""
        from dpl.tracking.store import link_line

        global _active
        line = link_line(self.logger.tracking_uri, self.logger.experiment_id) if say else None
        if line is not None:
            log.info("%s", line)
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(SWEPT_KEYS_ENV, None)
        self.logger = None
        if _active is self:
            _active = None

    def discard(self) -> bool:
        """Remove the parent run of a sweep none of whose jobs made a run, and the SQLite store if this
        sweep made it (its file, lock and the parent's artifacts): True if it was removed. A sweep refused
        before any job ran leaves no trace, as a refused run leaves none."""
        import shutil
        from urllib.parse import urlparse

        from dpl.tracking.store import mlflow_client

        if self.logger is None:
            return False
        client = mlflow_client(self.logger.tracking_uri)
        parent = client.get_run(self.logger.run_id)
        if client.search_runs([parent.info.experiment_id], max_results=1,
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"):
            return False  # a job recorded a run: the sweep ends as any other (KILLED at exit)
        client.delete_run(parent.info.run_id)
        if self.made_store is not None:
            artifacts = urlparse(parent.info.artifact_uri)
            if artifacts.scheme in ("", "file"):
                shutil.rmtree(Path(artifacts.path).parent, ignore_errors=True)  # <root>/<run id>/artifacts
                root = Path(artifacts.path).parent.parent
                if root.is_dir() and not any(root.iterdir()):
                    root.rmdir()
            for path in (self.made_store, self.made_store.with_name(self.made_store.name + ".lock")):
                path.unlink(missing_ok=True)
        self._close(say=False)
        return True

    def _interrupted(self) -> None:
        if self.logger is None:
            return  # ended normally
        try:
            self.logger.finish("KILLED", reason="the sweep was interrupted; run the same command to resume it")
        finally:
            self._close()

    def _summary(self, config: DictConfig) -> dict[str, float]:
        """Counts of the child runs by status and the best objective among the finished ones."""
        from dpl.tracking.store import mlflow_client

        client = mlflow_client(config.logger.tracking_uri)
        parent = client.get_run(self.logger.run_id)
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                      max_results=50_000)
        statuses = [r.info.status for r in children]
        best = [r.data.metrics["best_val_acc"] for r in children
                if r.info.status == "FINISHED" and "best_val_acc" in r.data.metrics]
        best = [v for v in best if math.isfinite(v)]
        summary = {"jobs": len(children), "jobs_finished": statuses.count("FINISHED"),
                   "jobs_failed": statuses.count("FAILED") + statuses.count("KILLED")}
        if best:
            summary["best_val_acc"] = max(best)
        return summary


def discard_unused_parent() -> bool:
    """:meth:`MlflowParentRun.discard` of this process's open parent run, if any (a launcher whose jobs
    could not start calls it before it exits)."""
    try:
        return _active.discard() if _active is not None else False
    except Exception as e:  # noqa: BLE001 - the launcher's error line matters more; the atexit hook ends the run
        log.warning("sweep: could not remove its unused parent run: %s", e)
        return False


def _unfinished_parent(config: DictConfig, name: str, params: str) -> Optional[str]:
    """The parent run of an earlier, stopped run of this sweep (same name and swept values, not
    FINISHED), or None. Its children that a kill left RUNNING with their process gone are ended
    KILLED here: the re-run runs those jobs again."""
    from dpl.tracking.store import end_if_dead, mlflow_client, tag_filter

    client = mlflow_client(config.logger.tracking_uri)
    experiment = client.get_experiment_by_name(str(config.logger.experiment))
    if experiment is None:
        return None
    # tag_filter may select other sweeps' parents too (a name with a backslash or both quotes): compared here
    parents = [r for r in client.search_runs([experiment.experiment_id], filter_string=tag_filter(PARENT_TAG, name),
                                             order_by=["attributes.start_time DESC"], max_results=1000)
               if r.data.tags.get("sweep_params") == params and r.data.tags.get(PARENT_TAG) == name]
    if not parents or parents[0].info.status == "FINISHED":
        return None
    parent = parents[0]
    if parent.info.status == "RUNNING" and not end_if_dead(client, parent):
        return None  # alive: another process is running this sweep now
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                                "and attributes.status = 'RUNNING'", max_results=50_000)
    for child in children:
        end_if_dead(client, child)
    return parent.info.run_id


def plain_optuna_logs() -> None:
    """Send Optuna's log lines through Hydra's handlers (plain text in multirun.log and on the
    console) instead of Optuna's own colorlog handler, whose ANSI colour codes end up in files."""
    try:
        import optuna
    except ImportError:
        return
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def command_line_sweep(overrides: Sequence[str], shared: Path) -> list[str]:
    """The overrides that run a ``-m`` command line without a sweep config as a sweep config runs:
    the settings of ``shared`` (``sweeps/_sweep.yaml``, which every sweep config lists: the callback that
    opens the parent run, job dirs in ``multirun/${sweep}/<time>/``, the experiment named by the sweep)
    where the command line does not set them, and ``sweep=<name>`` when it gives none
    (:func:`dpl.tracking.run_names.derived_sweep_name` of the swept keys). One way in for both kinds of
    sweep: a change to ``_sweep.yaml`` reaches command-line sweeps too."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    given = {o.key_or_group: o for o in parsed}
    extra = []
    named = given.get("sweep")
    if named is not None and named.is_sweep_override():  # one sweep, one experiment and one folder
        raise ConfigError(f"{named.input_line} is invalid under -m: allowed one name (it names the sweep's "
                          f"MLflow experiment, parent run and folder, multirun/<sweep>/)")
    if named is None:
        extra.append(f"sweep={derived_sweep_name([o.key_or_group for o in parsed if o.is_sweep_override()])}")
    for key, value in _leaves(OmegaConf.to_container(OmegaConf.load(shared), resolve=False)):
        if key == "hydra.mode" or key in given:  # -m says it already; the command line wins
            continue
        # the callback is a new key of hydra.callbacks (++: added, or set where a config has it already)
        extra.append(f"{'++' if key.startswith('hydra.callbacks.') else ''}{key}={_override_value(value)}")
    return extra


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    return [(prefix[:-1], node)]


def _override_value(value: Any) -> str:
    """``value`` as Hydra's override grammar reads it back: interpolations stay (quoted, so ``:`` and
    ``%`` are text), quotes escaped."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + str(value).replace("'", "\\'") + "'"


def sweep_settings(config: DictConfig, name: str) -> dict[str, str]:
    """The parent run's params: sweep name, sweeper, each swept key's values (``swept.K``: ``2,4,8``),
    the fixed command-line overrides every job shares, and the number of jobs planned."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    by_key = {str(k): f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()}
    fixed = []
    for override in config.hydra.overrides.task:  # the command line wins over the YAML's grid
        key = override.split("=", 1)[0].lstrip("+~")
        if key in NAME_KEYS:  # names, not settings: the sweep's is the param "sweep"
            continue
        if "," in override or "(" in override or key in by_key:
            by_key[key] = override
        else:
            fixed.append(override)
    parsed = OverridesParser.create().parse_overrides(list(by_key.values()))
    settings = {"sweep": name, "sweeper": str(sweeper.get("_target_", "")).rsplit(".", 1)[-1]}
    settings.update({f"swept.{o.key_or_group}": text.split("=", 1)[1] for o, text in zip(parsed, by_key.values())
                     if o.is_sweep_override()})
    if fixed:
        settings["overrides"] = " ".join(fixed)
    jobs = sweeper.get("n_trials")  # a search: as many trials as asked for, each once per seed
    if jobs is not None and sweeper.get("seeds"):
        jobs *= len(sweeper.get("seeds"))
    if jobs is None:
        jobs = math.prod(len(list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override())
    settings["jobs"] = str(jobs)
    return settings


def _sweep_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir))


def _sweep_params(config: DictConfig) -> str:
    """The swept keys and their values as ``K=2,4 H=4,8`` (sweeper params, then command-line sweeps)."""
    swept = {str(k): f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()}
    for override in config.hydra.overrides.task:  # the command line wins over the YAML's grid
        if "," in override or "(" in override:
            swept[override.split("=", 1)[0]] = override
    return " ".join(swept.values())



def fail_running_trials(study, since: datetime.datetime) -> None:
    """Mark FAIL the trials started since ``since`` that are still RUNNING (their job was interrupted)."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.datetime_start is not None and t.datetime_start >= since:
            try:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                log.warning("optuna: trial %d was interrupted; marked FAIL", t.number)
            except Exception as e:  # another process ended it meanwhile
                log.warning("optuna: could not mark trial %d FAIL: %s", t.number, e)


SEED_RANGE = 2**63  # Config.seed's bound


def check_seeds(seeds: Any, line: Optional[str] = None) -> Optional[list[int]]:
    """``hydra.sweeper.seeds`` as a list of ints, or None (one job per trial, with the config's
    seed). ConfigError in one line otherwise: an empty list would run no job, and a seed listed
    twice would train the same model twice and count it twice in the mean."""
    if seeds is None:
        return None
    line = line or f"hydra.sweeper.seeds={seeds}"
    items = list(seeds) if isinstance(seeds, (list, tuple, ListConfig)) else []
    valid = all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < SEED_RANGE for s in items)
    if not items or not valid or len(set(items)) != len(items):
        raise ConfigError(f"{line} is invalid: allowed null or a list of distinct seeds in [0, 2**63), "
                          f"e.g. hydra.sweeper.seeds='[0,1,2]'")
    return items
