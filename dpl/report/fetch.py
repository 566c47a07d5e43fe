"""The runs of a report: read from the MLflow store (their params upgraded to today's keys) and grouped by
what differs between them (the seed aside, which a group averages over)."""

from __future__ import annotations

import datetime
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from dpl.comm.cost import RESCALED_FIELDS
from dpl.config.store import default_options
from dpl.config.upgrade import upgrade_params
from dpl.core.dynamic_h import STRATEGIES
from dpl.core.methods import METHODS
from dpl.errors import TrackingError
from dpl.report import stats
from dpl.report.budget import BUDGETS
from dpl.tracking.run_names import BOOKKEEPING
from dpl.tracking.store import (
    INTERRUPTED_TAG,
    end_if_dead,
    process_gone,
    read_store,
    resolve_tracking_uri,
    sqlite_path,
    tag_filter,
)
from dpl.tracking.sweep import PARENT_TAG

# Column -> MLflow param; always grouped by when the runs carry the param.


BASE_COLUMNS = {"dataset": "dataset.name", "method": "method.name", "K": "K", "H": "H", "dynamic_h": "dynamic_h.name",
                "optimizer": "optimizer.name", "batch_size": "batch_size", "compression": "compression.name",
                "ablation": "ablation"}

# Base columns shown only when some run has another value than this one (runs without compression
# keep the table they had before the option existed). An ablation is a base column so that the keys
# it sets (scheduler.interval for lr_per_step, ...) follow from it instead of splitting the table.


QUIET_DEFAULTS = {group: default_options()[group] for group in ("compression", "ablation")}

# Final metrics summarised per group (the last logged value of each).


METRICS = ("test_acc", "test_acc_best", "best_val_acc", "test_loss", "sync_rounds_total", "comm_bytes_total",
           "samples_total", "modelled_time_s", "epochs_run", "H_first", "H_last", "H_mean")


TEXT_METRIC = "test_bpb"  # a language model's test bits per byte (dataset=text): added where runs have it

# Metrics whose difference to the baseline group is tested (comparisons.csv).


COMPARED = ("test_acc", "test_acc_best", "best_val_acc")

# Params that never split a group: the seed (what a group averages over), the sweep tag, the
# keys that never change what a run computes (dpl.tracking.run_names: the same list never names a run),
# engine.backend (gloo and NCCL compute the same sums) and pretrained (kept out, as before).


NOT_GROUPED = ("seed", "sweep", "pretrained", "engine.backend", *BOOKKEEPING)


NOT_GROUPED_PREFIXES = ("logger.", "hydra.")


FAILED = ("FAILED", "KILLED")

# A RUNNING run whose process is gone (SIGKILL, a lost node): not a result, shown as such.


INTERRUPTED = "interrupted"


def _local(method: Optional[str]) -> bool:
    """Runs of a method with local steps (a method no longer registered: not)."""
    return method in METHODS and METHODS[method].facts.local_steps


def _changes_h(strategy: Optional[str]) -> bool:
    """Runs whose H changes from epoch to epoch (no strategy, or one no longer registered: not)."""
    return strategy in STRATEGIES and STRATEGIES[strategy].facts.changes_h


@dataclass


class RunRecord:
    """What the report needs of one MLflow run."""

    run_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    reason: str = ""
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> [(epoch, value)]

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"


def report_store(tracking_uri: str):
    """An ``MlflowClient`` on the store a report reads (a relative SQLite path is relative to the
    current directory), or a one-line TrackingError. Reading creates nothing: where there is no
    store file, there are no runs to report."""
    uri = resolve_tracking_uri(tracking_uri, Path.cwd())
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise TrackingError(f"no runs here: there is no MLflow store at {db} (run python -m dpl here first, "
                            f"or name a store with --tracking-uri)")
    return read_store(uri, f"--tracking-uri={tracking_uri!r}")


def fetch_runs(client, experiment: Optional[str] = None, sweep: Optional[str] = None,
               history_keys: Sequence[str] = ("val_acc", "H", *BUDGETS, *RESCALED_FIELDS)) -> list[RunRecord]:
    """The job runs of ``experiment`` (by name) and/or with tag ``sweep``; sweep parent runs are left out."""
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise LookupError(f"experiment={experiment!r} is not in the MLflow store")
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    query = tag_filter("sweep", sweep) if sweep is not None else ""
    runs, token = [], None
    while True:
        page = client.search_runs(ids, filter_string=query or "", max_results=1000, page_token=token)
        runs += [r for r in page if PARENT_TAG not in r.data.tags
                 and (sweep is None or r.data.tags.get("sweep") == sweep)]  # tag_filter may select more
        token = page.token
        if not token:
            break
    return [_record(client, r, history_keys) for r in runs]


def _record(client, run, history_keys: Sequence[str]) -> RunRecord:
    history = {}
    if run.info.status == "FINISHED":
        for key in history_keys:
            points = client.get_metric_history(run.info.run_id, key)
            history[key] = sorted((int(m.step), float(m.value)) for m in points)
            if history[key] and history[key][0][0] == 0:
                # Logged before epochs were counted from 1 (step 0 was the first epoch): shifted,
                # so old and new runs share an x axis. A run now logs no per-epoch step 0.
                history[key] = [(step + 1, value) for step, value in history[key]]
    # A RUNNING run whose process is gone is ended KILLED in the store here (it would stay RUNNING
    # for good); one a report ended before still reads as interrupted, not as a failure of its config.
    dead = run.info.status == "RUNNING" and process_gone(run.data.tags)
    if dead:
        end_if_dead(client, run)
    interrupted = dead or run.info.status == "KILLED" and run.data.tags.get(INTERRUPTED_TAG) == "true"
    status = INTERRUPTED if interrupted else run.info.status
    # runs logged before method.outer: their method.beta etc. under the new names, to group with new runs
    return RunRecord(run_id=run.info.run_id, status=status, params=upgrade_params(run.data.params),
                     metrics=dict(run.data.metrics), reason=run.data.tags.get("failure_reason", ""),
                     history=history)


def group_columns(runs: Sequence[RunRecord]) -> dict[str, str]:
    """Column name -> param: the base columns present, then every other param that varies inside
    the groups they make (a swept lr or slow momentum); params that follow from the base columns,
    like each optimizer's own lr in a sweep over optimizers, do not split groups."""
    keys = set().union(*(r.params for r in runs)) if runs else set()
    base = {name: p for name, p in BASE_COLUMNS.items() if p in keys
            and (name not in QUIET_DEFAULTS or any(r.params.get(p, QUIET_DEFAULTS[name]) != QUIET_DEFAULTS[name]
                                                   for r in runs))}
    extra = {}
    for key in sorted(keys - set(base.values())):
        if key in NOT_GROUPED or key.startswith(NOT_GROUPED_PREFIXES):
            continue
        groups: dict[tuple, set] = {}
        for r in runs:
            groups.setdefault(_key(r, base), set()).add(r.params.get(key, ""))
        if any(len(values) > 1 for values in groups.values()):
            extra[key] = key
    return {**base, **extra}


def _key(run: RunRecord, columns: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(run.params.get(p, "") for p in columns.values())


def _sort_value(value: str) -> tuple[int, Any]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def group_runs(runs: Sequence[RunRecord], columns: Mapping[str, str]) -> dict[tuple[str, ...], list[RunRecord]]:
    groups: dict[tuple[str, ...], list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(_key(r, columns), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: tuple(_sort_value(v) for v in kv[0])))


def _values(runs: Iterable[RunRecord], metric: str) -> list[float]:
    """The finite values of a final metric over the finished runs."""
    return [value for _, value in _by_seed(runs, metric)]


def _by_step(histories: Iterable[Sequence[tuple[int, float]]]) -> dict[int, list[float]]:
    by_step: dict[int, list[float]] = {}
    for h in histories:
        for step, value in h:
            by_step.setdefault(step, []).append(value)
    return dict(sorted(by_step.items()))


def mean_curve(histories: Iterable[Sequence[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """The per-step mean over the runs that logged that step."""
    by_step = _by_step(histories)
    return list(by_step), [statistics.fmean(v) for v in by_step.values()]


def ci_curve(histories: Iterable[Sequence[tuple[int, float]]],
             bounds: Optional[tuple[float, float]] = None) -> tuple[list[float], list[float]]:
    """The per-step 95 % interval of the mean (nan where fewer than two runs logged the step): Student's
    t, or with ``bounds`` (an accuracy's (0, 1)) the logit interval that stays inside them
    (:func:`dpl.report.stats.describe_bounded`)."""
    describe = stats.describe if bounds is None else lambda v: stats.describe_bounded(v, *bounds)
    summaries = [describe(v) for v in _by_step(histories).values()]
    return [s.lo for s in summaries], [s.hi for s in summaries]


def latest(client) -> tuple[Optional[str], Optional[str], str]:
    """(experiment, sweep, why) to report when none is named: the latest sweep in the store, the one
    whose newest run (a job tagged ``sweep``, or the parent run of a sweep YAML) started last, in
    whichever experiment it is (``-m`` sweeps logged before they had parent runs share experiment
    "dpl" with single runs: their jobs' tag finds them); the single runs of the default experiment
    only where the store holds no sweep, even when single runs came after the sweep (a smoke run is
    not what a researcher means by "the latest results"). ``why`` says which and why, in words."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return DEFAULT_EXPERIMENT, None, "the store holds no runs"
    newest = [run for tag in ("sweep", PARENT_TAG)
              for run in client.search_runs(experiments, filter_string=f"tags.`{tag}` LIKE '%'", max_results=1,
                                            order_by=["attributes.start_time DESC"])]
    if not newest:
        return DEFAULT_EXPERIMENT, None, "the store holds no sweep, so the single runs of the default experiment"
    run = max(newest, key=lambda r: r.info.start_time or 0)
    started = datetime.datetime.fromtimestamp((run.info.start_time or 0) / 1000, datetime.timezone.utc)
    return None, run.data.tags.get("sweep", run.data.tags.get(PARENT_TAG)), \
        f"the latest sweep in the store (its newest run started {started:%Y-%m-%d %H:%M} UTC)"


def _by_seed(runs: Iterable[RunRecord], metric: str) -> list[tuple[str, float]]:
    """(seed, value) of a final metric over the finished runs where it is finite."""
    return [(r.params.get("seed", ""), r.metrics[metric]) for r in runs
            if r.finished and math.isfinite(r.metrics.get(metric, math.nan))]


DEFAULT_EXPERIMENT = "dpl"  # logger.experiment of a single run (conf/logger/mlflow.yaml)
