"""``python -m dpl.report``: compare the runs of one MLflow experiment or one sweep.

Reads the local MLflow store (``sqlite:///mlflow.db`` in the current directory unless
``--tracking-uri`` says otherwise; nothing goes over the network) and writes, into
``--out`` (default ``reports/<experiment or sweep>``, the name made one safe folder name):

* ``summary.csv`` and the table of ``report.md``: final metrics grouped by method / K / H /
  dynamic_h / optimizer / batch size / compression / ablation, plus any other parameter that
  varies inside those groups (the slow momentum of a SlowMo grid, the lr of an Optuna search):
  per group n, mean, sample std and the 95 % confidence interval of the mean (Student's t,
  n − 1 df; :mod:`dpl.report.stats`) over the runs of a group, which differ only in their seed.
  Failed (diverged) runs are counted per group and listed with their reason; they never
  enter a mean. ``runs.csv``: the same metrics per run.
* ``comparisons.csv`` and the second table: every group against its baseline (``--baseline``):
  the difference of the means with its 95 % interval, the p-value of a paired (shared
  seeds) or Welch t-test and the p-value adjusted by Holm's method.
* ``budget.csv`` and the third table: the first epoch each run reached a target validation
  accuracy (``--target-acc``), and the samples, syncs, bytes and modelled time spent by then
  (:mod:`dpl.report.budget`), per group with intervals; ``budget_to_target.png`` draws it.
* ``time_vs_bandwidth.csv`` and ``time_vs_bandwidth.png``: the modelled time each group took to that
  target had the network had another bandwidth (``--bandwidths``, default 1, 10, 100 Gbit/s), from
  each epoch's compute, latency and transfer (:func:`dpl.comm.cost.epoch_time_at`): where DiLoCo,
  streaming DiLoCo and data-parallel training of one config cross over.
* ``acc_vs_H.png`` (accuracy against H, a line per K), ``acc_vs_rounds.png`` (accuracy
  against communication rounds), ``learning_curves.png`` (validation accuracy per epoch,
  one curve per group), ``h_over_epochs.png`` (H per epoch of each dynamic strategy),
  ``pareto.png`` (accuracy against bytes sent, a curve per method, or per compressor and error
  feedback in a sweep over compression, the Pareto front marked),
  ``acc_vs_time.png`` (the same against modelled cluster time, :mod:`dpl.comm.clock`) and,
  when lr takes three or more values (an Optuna search), ``acc_vs_lr.png``. Each figure
  has a panel per dataset.

Usage::

    python -m dpl.report          # the latest sweep, or the single runs of experiment "dpl"
    python -m dpl.report --experiment localsgd_grid
    python -m dpl.report --sweep dynamic_h --tracking-uri sqlite:////data/mlflow.db --out reports/dyn
    python -m dpl.report --experiment study_ablation --baseline ablation=none --target-acc 0.3
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from dpl.report import stats
from dpl.report.budget import BUDGETS, final_value, time_to_target_at, to_target
from dpl.comm.cost import RESCALED_FIELDS
from dpl.io import atomic_write_text, write_csv
from dpl.config.upgrade import upgrade
from dpl.run.plots import integer_ticks, legend_outside, log_axis, new_figure, percent_axis, save_figure, short_number
from dpl.tracking.run_names import BOOKKEEPING
from dpl.tracking.sweep import PARENT_TAG
from dpl.tracking import INTERRUPTED_TAG, end_if_dead, process_gone, tag_filter

# Column -> MLflow param; always grouped by when the runs carry the param.
BASE_COLUMNS = {"dataset": "dataset.name", "method": "method.name", "K": "K", "H": "H", "dynamic_h": "dynamic_h.name",
                "optimizer": "optimizer.name", "batch_size": "batch_size", "compression": "compression.name",
                "ablation": "ablation"}
# Base columns shown only when some run has another value than this one (runs without compression
# keep the table they had before the option existed). An ablation is a base column so that the keys
# it sets (scheduler.interval for lr_per_step, ...) follow from it instead of splitting the table.
QUIET_DEFAULTS = {"compression": "none", "ablation": "none"}
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
LOCAL_METHODS = ("localsgd", "slowmo", "diloco", "post_local")
FAILED = ("FAILED", "KILLED")
# A RUNNING run whose process is gone (SIGKILL, a lost node): not a result, shown as such.
INTERRUPTED = "interrupted"
_MIB = 2.0**20
_ACC = ("test_acc", "test_acc_best", "best_val_acc")


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


# ----------------------------------------------------------------------------- reading MLflow


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
                 and (sweep is None or r.data.tags.get("sweep") == sweep)]  # the only test when query is None
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
    return RunRecord(run_id=run.info.run_id, status=status, params=upgrade(run.data.params),
                     metrics=dict(run.data.metrics), reason=run.data.tags.get("failure_reason", ""),
                     history=history)


# ----------------------------------------------------------------------------- grouping


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


def summarise(runs: Sequence[RunRecord], columns: Mapping[str, str],
              metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """One row per group (summary.csv): its column values, ``n`` (finished runs), ``failed``, and per
    metric the mean, the sample std and the 95 % confidence interval of the mean over the seeds
    (:func:`dpl.report.stats.describe`; std and interval empty for n = 1)."""
    rows = []
    for key, members in group_runs(runs, columns).items():
        row: dict[str, Any] = dict(zip(columns, key))
        row["n"] = sum(r.finished for r in members)
        row["failed"] = sum(r.status in FAILED for r in members)
        for m in metrics:
            s = stats.describe(_values(members, m))
            row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_ci95_lo"], row[f"{m}_ci95_hi"] = s.mean, s.std, s.lo, s.hi
        rows.append(row)
    return rows


def run_rows(runs: Sequence[RunRecord], columns: Mapping[str, str], metrics: Sequence[str] = METRICS,
             target: float = math.nan) -> list[dict[str, Any]]:
    """One row per run (runs.csv): its id, status, group columns, seed, final metrics and, for the
    budget table's target, the epoch it first reached it and what it had spent by then (empty when it
    never did): the numbers behind every mean, for a researcher's own analysis."""
    rows = []
    for r in runs:
        spent = to_target(r.history, target) if r.finished and math.isfinite(target) else None
        rows.append({"run_id": r.run_id, "status": r.status, **dict(zip(columns, _key(r, columns))),
                     "seed": r.params.get("seed", ""), **{m: r.metrics.get(m, math.nan) for m in metrics},
                     **{f"to_target_{b}": (spent or {}).get(b, math.nan) for b in ("epoch", *BUDGETS)}})
    return rows


# ----------------------------------------------------------------------------- differences to a baseline


class BaselineError(ValueError):
    """A --baseline that names no column or matches no group."""


def parse_baseline(text: str, columns: Mapping[str, str]) -> dict[str, str]:
    """``KEY=VALUE[,KEY=VALUE]`` -> {column: value}; a key is a table column (``method``, ``K``) or
    the param behind it (``method.name``)."""
    by_param = {p: c for c, p in columns.items()}
    spec = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        column = key if key in columns else by_param.get(key)
        if not sep or column is None:
            raise BaselineError(f"--baseline {text!r}: {key or part!r} is not a KEY=VALUE of a column of this report "
                             f"(columns: {', '.join(columns)})")
        spec[column] = value.strip()
    return spec


def default_baseline(groups: Mapping[tuple[str, ...], Sequence[RunRecord]], columns: Sequence[str]) -> dict[str, str]:
    """The reference the runs mark themselves (``ablation=none`` in an ablation), else the first group
    with a finished run."""
    if "ablation" in columns and any(dict(zip(columns, k))["ablation"] == "none" for k in groups):
        return {"ablation": "none"}
    first = next((k for k, members in groups.items() if any(r.finished for r in members)), None)
    return dict(zip(columns, first)) if first is not None else {}


def baseline_of(groups: Sequence[tuple[str, ...]], columns: Sequence[str],
                spec: Mapping[str, str]) -> dict[tuple[str, ...], Optional[tuple[str, ...]]]:
    """Each group's baseline: the group that matches ``spec`` and agrees with it on every other column
    (``ablation=none`` of its own study row); else the one group that matches ``spec``, when there is
    one; else none (the group is not compared). A baseline is not compared with itself."""
    index = [list(columns).index(c) for c in spec]
    matching = [k for k in groups if all(k[i] == v for i, v in zip(index, spec.values()))]
    rest = [i for i in range(len(columns)) if i not in index]
    found: dict[tuple[str, ...], Optional[tuple[str, ...]]] = {}
    for key in groups:
        if key in matching:
            continue
        same = [b for b in matching if all(b[i] == key[i] for i in rest)]
        found[key] = same[0] if len(same) == 1 else matching[0] if len(matching) == 1 else None
    return found


def _by_seed(runs: Iterable[RunRecord], metric: str) -> list[tuple[str, float]]:
    """(seed, value) of a final metric over the finished runs where it is finite."""
    return [(r.params.get("seed", ""), r.metrics[metric]) for r in runs
            if r.finished and math.isfinite(r.metrics.get(metric, math.nan))]


def compare_groups(runs: Sequence[RunRecord], columns: Mapping[str, str], spec: Mapping[str, str],
                   metrics: Sequence[str] = COMPARED) -> list[dict[str, Any]]:
    """comparisons.csv: for every group with a baseline and every metric, the difference of the means
    with its 95 % interval and p-value (:func:`dpl.report.stats.compare`: paired over shared seeds, Welch
    otherwise), and the p-value adjusted by Holm's method over the comparisons of that metric (one
    family per metric: the rows of one column of the report's table); ``exact`` rows had no spread to
    test (their p is 1 for no difference, 0 for one)."""
    names = list(columns)
    groups = group_runs(runs, columns)
    pairs = [(k, b) for k, b in baseline_of(list(groups), names, spec).items() if b is not None]
    rows = []
    for metric in metrics:
        family = []
        for key, base in pairs:
            d = stats.compare(_by_seed(groups[key], metric), _by_seed(groups[base], metric))
            if d.n and d.n_baseline:
                family.append({"group": _group_label(key, names), "baseline": _group_label(base, names),
                               "metric": metric, "delta_mean": d.delta, "delta_ci95_lo": d.lo, "delta_ci95_hi": d.hi,
                               "p_value": d.p, "p_holm": d.p if d.exact else math.nan, "test": d.test, "n": d.n,
                               "n_baseline": d.n_baseline, "exact": d.exact})
        # Only real tests count in Holm's family: an exact difference (a departure that leaves the
        # metric unchanged on every seed) makes no error to guard against.
        tested = [r for r in family if not r["exact"]]
        for row, adjusted in zip(tested, stats.holm([r["p_value"] for r in tested])):
            row["p_holm"] = adjusted
        rows += family
    return rows


# ----------------------------------------------------------------------------- equal budgets


def default_target(runs: Sequence[RunRecord], columns: Mapping[str, str]) -> float:
    """The lowest of the groups' mean final validation accuracies: a target every group reaches on average."""
    means = []
    for members in group_runs(runs, columns).values():
        finals = [v for v in (final_value(r.history) for r in members if r.finished) if math.isfinite(v)]
        if finals:
            means.append(statistics.fmean(finals))
    return min(means) if means else math.nan


def budget_rows(runs: Sequence[RunRecord], columns: Mapping[str, str], target: float) -> list[dict[str, Any]]:
    """budget.csv: per group, how many finished runs reached ``target`` validation accuracy, and over
    those the mean and 95 % interval of the first epoch that did and of each budget spent by its end."""
    rows = []
    for key, members in group_runs(runs, columns).items():
        done = [r for r in members if r.finished and r.history.get("val_acc")]
        if not done:
            continue
        spent = [s for s in (to_target(r.history, target) for r in done) if s is not None]
        row: dict[str, Any] = {**dict(zip(columns, key)), "target_val_acc": target, "n": len(done),
                               "reached": len(spent)}
        for budget in ("epoch", *BUDGETS):
            s = stats.describe([x[budget] for x in spent if math.isfinite(x[budget])])
            row[f"{budget}_mean"], row[f"{budget}_ci95_lo"], row[f"{budget}_ci95_hi"] = s.mean, s.lo, s.hi
        rows.append(row)
    return rows


BANDWIDTHS_GBPS = (1.0, 10.0, 100.0)


def bandwidth_rows(runs: Sequence[RunRecord], columns: Mapping[str, str], target: float,
                   bandwidths: Sequence[float] = BANDWIDTHS_GBPS) -> list[dict[str, Any]]:
    """time_vs_bandwidth.csv: per group and bandwidth, how many finished runs reached ``target``
    validation accuracy and the mean and 95 % interval of their modelled time to it at that bandwidth
    (:func:`dpl.report.budget.time_to_target_at`; each run's own ``network.bandwidth_gbps`` is what its
    records were logged at). Groups whose runs lack the per-epoch fields (logged before them) are left out."""
    rows = []
    for key, members in group_runs(runs, columns).items():
        done = [r for r in members if r.finished and r.history.get("val_acc")]
        for gbps in bandwidths:
            times = [time_to_target_at(r.history, target, gbps, _float(r.params.get("network.bandwidth_gbps", "10")))
                     for r in done]
            if not times or any(t is not None and math.isnan(t) for t in times):
                break
            s = stats.describe([t for t in times if t is not None])
            rows.append({**dict(zip(columns, key)), "target_val_acc": target, "bandwidth_gbps": gbps, "n": len(done),
                         "reached": sum(t is not None for t in times), "time_s_mean": s.mean,
                         "time_s_ci95_lo": s.lo, "time_s_ci95_hi": s.hi})
    return rows


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, value) that no other point beats: none costs at most as much
    with at least as high a value (one strictly better). Ordered by increasing cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


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


def ci_curve(histories: Iterable[Sequence[tuple[int, float]]]) -> tuple[list[float], list[float]]:
    """The per-step 95 % interval of the mean (nan where fewer than two runs logged the step)."""
    summaries = [stats.describe(v) for v in _by_step(histories).values()]
    return [s.lo for s in summaries], [s.hi for s in summaries]


# ----------------------------------------------------------------------------- tables


_MD_PUNCT = re.compile(r"[\\`*\[\]|#~]|(?<![^\W_])_|_(?![^\W_])")  # `_` inside a word never formats
_NEWLINE = re.compile(r"\r\n|[\r\n\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def md_escape(value: Any) -> str:
    """``value`` as literal text in a Markdown table cell or heading of report.md.

    Names, tags and params come from the store, where anyone who logged a run chose them: a ``|``
    or newline would split a row, a backtick, ``[x](javascript:…)`` or ``<script>`` would format,
    link or inject. ``& < >`` become entities, Markdown punctuation gets a backslash, a newline
    becomes ``<br>`` (the row stays one line) and other control characters a space.
    """
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_PUNCT.sub(lambda m: "\\" + m.group(0), text)
    return _CONTROL.sub(" ", _NEWLINE.sub("<br>", text))


def _md_row(cells: Sequence[Any], bold: Iterable[int] = ()) -> str:
    """One table row, each cell escaped; the cells at the indices in ``bold`` set in bold."""
    bold = set(bold)
    return "| " + " | ".join(f"**{md_escape(c)}**" if i in bold else md_escape(c) for i, c in enumerate(cells)) + " |"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def write_csv_table(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    write_csv(path, [{k: _cell(v) for k, v in row.items()} for row in rows])
    return path


# metric -> (column header, scale, decimals) of the Markdown table
_SHOWN = {"test_acc": ("test acc %", 100.0, 2), "test_acc_best": ("best-model test acc %", 100.0, 2),
          "best_val_acc": ("best val acc %", 100.0, 2), "test_loss": ("test loss", 1.0, 3),
          "sync_rounds_total": ("sync rounds", 1.0, 0), "comm_bytes_total": ("MiB sent / worker", 1 / _MIB, 1),
          "samples_total": ("samples seen", 1.0, 0), "modelled_time_s": ("modelled time s", 1.0, 1),
          "epochs_run": ("epochs run", 1.0, 0), "H_mean": ("mean H", 1.0, 1), "epoch": ("epoch", 1.0, 1),
          "test_bpb": ("test bits/byte", 1.0, 3)}
_TABLE = ("test_acc", "test_acc_best", "best_val_acc", "test_loss", "sync_rounds_total", "comm_bytes_total",
          "modelled_time_s", "epochs_run", "H_mean")  # the main table's columns (summary.csv has every metric)
_H_SUMMARY = ("H_first", "H_last", "H_mean")  # the H trained with (dpl.run.recorder.h_summary)


def _number(value: float, metric: str, signed: bool = False) -> str:
    _, scale, digits = _SHOWN.get(metric, (metric, 1.0, 4))
    return f"{value * scale:{'+' if signed else ''}.{digits}f}"


def _fmt(row: Mapping[str, Any], metric: str, n_key: str = "n") -> str:
    """``mean ± half-width (n)`` of the 95 % interval; ``mean ± ? (1)`` where one run leaves it undefined."""
    mean, lo, hi = row[f"{metric}_mean"], row[f"{metric}_ci95_lo"], row[f"{metric}_ci95_hi"]
    if math.isnan(mean):
        return "diverged" if row.get("failed") and not row[n_key] else "–"
    half = "?" if math.isnan(lo) else _number((hi - lo) / 2, metric)
    return f"{_number(mean, metric)} ± {half} ({row[n_key]})"


def _param_text(value: Any) -> str:
    """A parameter value as a table shows it: 3 significant digits for a fraction (an Optuna lr)."""
    number = _float(value)
    if math.isnan(number) or number == int(number) and "e" not in str(value).lower():
        return str(value)
    return short_number(number)


def _h_cell(row: Mapping[str, Any]) -> str:
    """The H a group trained with: the configured H when it is constant, ``first→last`` when dynamic."""
    if row.get("dynamic_h", "constant") == "constant" or math.isnan(row.get("H_first_mean", math.nan)):
        return str(row["H"])
    return f"{short_number(row['H_first_mean'])}→{short_number(row['H_last_mean'])}"


def markdown(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str], runs: Sequence[RunRecord],
             title: str, metrics: Sequence[str] = _TABLE, comparisons: Sequence[Mapping[str, Any]] = (),
             budget: Sequence[Mapping[str, Any]] = (), baseline: Mapping[str, str] | None = None) -> str:
    params, columns = columns, list(columns)
    local = any(r.params.get("method.name") in LOCAL_METHODS for r in runs)
    shown = [m for m in metrics if m not in _H_SUMMARY or (m == "H_mean" and local)]
    head = [*columns, "failed", *(_SHOWN.get(m, (m,))[0] for m in shown)]
    lines = [f"# {md_escape(title)}", "",
             f"{sum(r.finished for r in runs)} finished, {sum(r.status in FAILED for r in runs)} failed, "
             f"{sum(r.status == INTERRUPTED for r in runs)} interrupted (not counted), "
             f"{sum(r.status not in ('FINISHED', INTERRUPTED, *FAILED) for r in runs)} other runs. "
             f"Each cell: mean ± half-width of the {stats.INTERVAL} over the finished runs of a group, which "
             "differ only in their seed, and (n) those runs; ± ?: one run, no interval."
             + (" H of a dynamic_h group: first→last epoch." if "dynamic_h" in columns else ""), "",
             _md_row(head), "|" + "---|" * len(head)]
    for row in rows:
        cells = [_h_cell(row) if c == "H" else _param_text(row[c]) for c in columns]
        lines.append(_md_row([*cells, row["failed"], *(_fmt(row, m) for m in shown)]))
    if comparisons:
        lines += ["", *_comparison_lines(comparisons, baseline or {})]
    if budget:
        lines += ["", *_budget_lines(budget, columns)]
    failed = [r for r in runs if r.status in (*FAILED, INTERRUPTED)]
    if failed:
        lines += ["", "## Failed runs", "", "| run | group | status | reason |", "|---|---|---|---|"]
        lines += [_md_row([r.run_id, _group_label(_key(r, params), columns), r.status, r.reason or "–"])
                  for r in failed]
    return "\n".join(lines) + "\n"


ALPHA = 0.05  # family-wise error rate of the marked differences (Holm)


def _p_text(p: float) -> str:
    return "–" if math.isnan(p) else f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _comparison_lines(comparisons: Sequence[Mapping[str, Any]], baseline: Mapping[str, str]) -> list[str]:
    """The differences to the baseline, one row per group and metric; ``**`` marks those that survive
    Holm's adjustment at 5 %, the rest say that the seeds cannot tell them apart."""
    spec = ", ".join(f"{k}={v}" for k, v in baseline.items())
    # Labels name groups in full (comparisons.csv); the table leaves out what every group shares.
    common = set.intersection(*(set(c[k].split()) for c in comparisons for k in ("group", "baseline")))
    short = lambda label: " ".join(w for w in label.split() if w not in common) or "all runs"  # noqa: E731
    lines = [f"## Differences to the baseline ({md_escape(spec)})", "",
             "Δ = group mean − baseline mean, in the metric's unit, with its 95 % CI; p: two-sided, from a "
             "paired t-test over the seeds both groups ran when every seed is paired, Welch's t-test otherwise; "
             f"p (Holm): adjusted over the comparisons of that metric. **Bold**: distinguishable at "
             f"{ALPHA:g} after adjustment.", "",
             _md_row(["group", "baseline", "metric", "Δ (95 % CI)", "p", "p (Holm)", "test", "n / n baseline",
                      "verdict"]), "|" + "---|" * 9]
    for c in comparisons:
        m = c["metric"]
        interval = ("" if math.isnan(c["delta_ci95_lo"]) else
                    f" ({_number(c['delta_ci95_lo'], m, True)} to {_number(c['delta_ci95_hi'], m, True)})")
        told = not math.isnan(c["p_holm"]) and c["p_holm"] < ALPHA
        verdict = ("too few runs to test" if not c["test"] else
                   "identical on every seed" if c["exact"] and c["delta_mean"] == 0 else
                   "distinguishable" if told else "not distinguishable")
        lines.append(_md_row([short(c["group"]), short(c["baseline"]), _SHOWN.get(m, (m,))[0],
                              _number(c["delta_mean"], m, True) + interval, _p_text(c["p_value"]),
                              _p_text(c["p_holm"]), c["test"] or "–", f"{c['n']} / {c['n_baseline']}", verdict],
                             bold=(3, 8) if told else ()))
    return lines


def _budget_lines(budget: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    target = budget[0]["target_val_acc"]
    shown = ("epoch", "samples_total", "sync_rounds_total", "comm_bytes_total", "modelled_time_s")
    lines = [f"## Budget to reach {100 * target:.2f} % validation accuracy", "",
             "Per group, over the runs that reached the target: the first epoch whose validation accuracy "
             "did, and what was spent by the end of it; mean ± half-width of the 95 % CI (n runs that reached "
             "it). Reached: how many of the finished runs did; a group none of whose runs reached it shows –.",
             "", _md_row([*columns, "reached", *(_SHOWN[b][0] for b in shown)]), "|" + "---|" * (len(columns) + 6)]
    for row in budget:
        cells = [_param_text(row[c]) for c in columns]
        lines.append(_md_row([*cells, f"{row['reached']} of {row['n']}",
                              *(_fmt(row, b, "reached") for b in shown)]))
    return lines


# ----------------------------------------------------------------------------- figures
#
# Every figure has one panel per dataset (runs on different data are never on one axis), a
# legend right of the panels, short labels (only the columns that tell the groups apart),
# and 1-2-5 log ticks or integer epoch ticks; tests/test_report.py checks that no tick labels
# overlap and no legend covers a panel.

_CI_NOTE = "\nbars: 95 % CI over seeds"  # what every error bar and band of the report is (a line of its own)
_NAMED = ("method", "dynamic_h", "optimizer", "compression", "ablation")  # columns whose values are names: shown bare in labels
_METRIC_LABEL = {"test_acc": "test accuracy", "test_acc_best": "best-model test accuracy",
                 "best_val_acc": "best val accuracy", "test_bpb": "test bits per byte (lower is better)"}
LOWER_IS_BETTER = ("test_bpb", "test_loss")


def mpl_escape(text: str) -> str:
    """``text`` shown literally by matplotlib: a ``$`` pair in a name would be parsed as mathtext
    (``$\\frac{a}{b}$`` drawn as a fraction, an unknown ``$\\cmd$`` fails the whole figure), and a
    legend hides labels that start with ``_`` (a zero-width space keeps them)."""
    text = text.replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def _short(column: str, value: str) -> str:
    if column in _NAMED:
        return value
    number = _float(value)
    return f"{column}={value if math.isnan(number) else short_number(number)}"


def _label_of(key: Sequence[str], columns: Sequence[str], skip: Sequence[str] = ()) -> str:
    """``localsgd K=4 H=8``: the columns that tell the groups apart (those in ``skip`` left out)."""
    return mpl_escape(" ".join(_short(c, v) for c, v in zip(columns, key) if c not in skip and v != "") or "all runs")


def _group_label(key: Sequence[str], columns: Sequence[str]) -> str:
    """``method=localsgd K=4``: a group named in full (the failed-runs list of report.md)."""
    return " ".join(f"{c}={v}" for c, v in zip(columns, key) if v != "") or "all runs"


def _n_text(ns: Sequence[int]) -> str:
    """``n=5``, or ``n=3-5`` when the points of one line rest on different numbers of runs."""
    return f"n={min(ns)}" if min(ns) == max(ns) else f"n={min(ns)}-{max(ns)}"


def _varying(groups: Mapping[tuple[str, ...], Any], columns: Sequence[str]) -> list[str]:
    """The columns whose value differs between groups: the only ones worth a label."""
    return [c for i, c in enumerate(columns) if len({key[i] for key in groups}) > 1]


def _float(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _by_dataset(groups: Mapping[tuple[str, ...], list[RunRecord]], columns: Sequence[str]) -> dict[str, dict]:
    """The groups split by dataset (one panel each); one unnamed facet without a dataset column."""
    i = list(columns).index("dataset") if "dataset" in columns else None
    facets: dict[str, dict] = {}
    for key, members in groups.items():
        facets.setdefault(key[i] if i is not None else "", {})[key] = members
    return facets


def _panels(facets: Mapping[str, Any], title: str):
    fig, axes = new_figure(len(facets), width=4.6)
    fig.suptitle(title)
    for ax, name in zip(axes, facets):
        ax.set_title(mpl_escape(name or ""))
        ax.grid(alpha=0.3)
    return fig, axes


def metric_axis(ax, metric: str) -> None:
    """An accuracy axis in percent (:func:`dpl.run.plots.percent_axis`); bits per byte or a loss as they are."""
    if metric in LOWER_IS_BETTER:
        ax.autoscale(axis="y")
        ax.margins(y=0.08)
    else:
        percent_axis(ax)


def _metric_label(metric: str) -> str:
    return _METRIC_LABEL.get(metric, metric.replace("_", " "))


def fig_acc_vs_h(groups, columns: Sequence[str], metric: str):
    """Accuracy against constant H (log2 axis), a line per K (and any other varying column), per dataset."""
    if "H" not in columns:
        return None
    kept = {k: m for k, m in groups.items() if dict(zip(columns, k)).get("method") in LOCAL_METHODS
            and dict(zip(columns, k)).get("dynamic_h", "constant") == "constant"}
    skip = ["H", "dataset"] + [c for c in columns if c not in _varying(kept, columns)]
    facets = {}
    for name, sub in _by_dataset(kept, columns).items():
        series: dict[str, list[tuple[float, float, float]]] = {}
        for key, members in sub.items():
            row = dict(zip(columns, key))
            s = stats.describe(_values(members, metric))
            if not math.isnan(s.mean):
                series.setdefault(_label_of(key, columns, skip), []).append((_float(row["H"]), s.mean, s.half_width,
                                                                              s.n))
        if series:
            facets[name] = series
    if not facets:
        return None
    fig, axes = _panels(facets, f"{_metric_label(metric)} against local steps H{_CI_NOTE}")
    for ax, series in zip(axes, facets.values()):
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[0 if math.isnan(p[2]) else p[2] for p in pts],
                        marker="o", capsize=3, label=f"{label} ({_n_text([p[3] for p in pts])})")
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for pts in series.values() for p in pts})
        ax.set_xticks(ticks, [f"{h:g}" for h in ticks])
        ax.minorticks_off()
        ax.set_xlabel("local steps H")
        ax.set_ylabel(_metric_label(metric))
        metric_axis(ax, metric)
    legend_outside(fig)
    return fig


def fig_acc_vs_rounds(groups, columns: Sequence[str], metric: str):
    """Each group's mean accuracy against its mean number of sync rounds: a colour per method, a
    legend entry per group (per method when there are many groups), a panel per dataset."""
    skip = ["dataset"] + [c for c in columns if c not in _varying(groups, columns)]
    methods = sorted({dict(zip(columns, k)).get("method", "runs") for k in groups})
    facets = {}
    for name, sub in _by_dataset(groups, columns).items():
        pts = []
        for key, members in sub.items():
            done = [r for r in members if r.finished and metric in r.metrics and "sync_rounds_total" in r.metrics]
            if done:
                s = stats.describe([r.metrics[metric] for r in done])
                pts.append((statistics.fmean(r.metrics["sync_rounds_total"] for r in done), s.mean, key,
                            s.half_width, s.n))
        if pts:
            facets[name] = pts
    if not facets:
        return None
    per_group = len(groups) <= 16
    markers = "osD^v<>pPX*h"
    fig, axes = _panels(facets, f"{_metric_label(metric)} against communication rounds{_CI_NOTE}")
    for ax, pts in zip(axes, facets.values()):
        for n, (x, y, key, half, runs) in enumerate(sorted(pts, key=lambda p: p[2])):
            method = dict(zip(columns, key)).get("method", "runs")
            label = f"{_label_of(key, columns, skip)} (n={runs})" if per_group else mpl_escape(method)
            ax.errorbar([x], [y], yerr=[0 if math.isnan(half) else half], color=f"C{methods.index(method) % 10}",
                        label=label, marker=markers[n % len(markers)] if per_group else "o", linestyle="none",
                        capsize=3)
        xs = [p[0] for p in pts]
        if min(xs) > 0:
            log_axis(ax, "x", min(xs), max(xs))
        ax.set_xlabel("sync rounds")
        ax.set_ylabel(_metric_label(metric))
        metric_axis(ax, metric)
    legend_outside(fig)
    return fig


def _curves_fig(groups, columns: Sequence[str], history_key: str, ylabel: str, title: str,
                keep=lambda row: True, skip: Sequence[str] = ()):
    """Mean curve per group over the epochs (markers so that one epoch shows) with its 95 % interval
    over the seeds as a band, per dataset."""
    kept = {k: m for k, m in groups.items() if keep(dict(zip(columns, k)))}
    skip = ["dataset", *skip] + [c for c in columns if c not in _varying(kept, columns)]
    facets = {}
    for name, sub in _by_dataset(kept, columns).items():
        curves = []
        for key, members in sub.items():
            done = [r.history.get(history_key, []) for r in members if r.finished]
            steps, values = mean_curve(done)
            if steps:
                lo, hi = ci_curve(done)
                curves.append((steps, values, f"{_label_of(key, columns, skip)} (n={sum(bool(h) for h in done)})",
                               lo, hi))
        if curves:
            facets[name] = curves
    if not facets:
        return None
    fig, axes = _panels(facets, title)
    for ax, curves in zip(axes, facets.values()):
        for xs, ys, label, lo, hi in curves:
            line, = ax.plot(xs, ys, marker="o", markersize=3, label=label)
            if any(math.isfinite(v) for v in lo):
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        integer_ticks(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
    legend_outside(fig)
    return fig


def fig_learning_curves(groups, columns: Sequence[str]):
    fig = _curves_fig(groups, columns, "val_acc", "val accuracy",
                      "Validation accuracy, mean over seeds\nband: 95 % CI over seeds")
    for ax in fig.axes if fig is not None else ():
        percent_axis(ax)
    return fig


def fig_h_over_epochs(groups, columns: Sequence[str]):
    """H per epoch of each dynamic strategy. The H column is only where a strategy starts (and is
    clamped to its bounds), so it is left out of the labels: the curve shows the H trained with."""
    fig = _curves_fig(groups, columns, "H", "local steps H", "H per epoch of each dynamic strategy",
                      keep=lambda row: row.get("dynamic_h", "constant") != "constant", skip=["H"])
    if fig is not None:
        for ax in fig.axes:
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_locator(LogLocator(base=2, numticks=8))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
    return fig


def _fig_against_cost(runs: Sequence[RunRecord], columns: Sequence[str], metric: str, cost: str, scale: float,
                      xlabel: str, title: str):
    """Every finished run's accuracy against a cost (bytes sent, modelled time), per dataset: one
    curve per method, or per compressor when the runs were compressed differently (its runs joined
    in order of cost), and the Pareto front over all of them."""
    facets: dict[str, list[tuple[float, float, str]]] = {}
    curve = _curve_of(runs)
    for r in runs:
        if r.finished and metric in r.metrics and cost in r.metrics:
            name = r.params.get("dataset.name", "") if "dataset" in columns else ""
            facets.setdefault(name, []).append((r.metrics[cost] / scale, r.metrics[metric], curve(r)))
    if not facets:
        return None
    facets = dict(sorted(facets.items()))
    methods = sorted({m for points in facets.values() for _, _, m in points})
    fig, axes = _panels(facets, title)
    for ax, points in zip(axes, facets.values()):
        for i, method in enumerate(methods):
            mine = sorted((x, y) for x, y, m in points if m == method)
            if mine:
                ax.plot([x for x, _ in mine], [y for _, y in mine], marker="o", alpha=0.7, color=f"C{i % 10}",
                        label=mpl_escape(method or "runs"))
        xy = [(x, y) for x, y, _ in points]
        front = pareto_front([(x, -y) if metric in LOWER_IS_BETTER else (x, y) for x, y in xy])
        ax.step([xy[i][0] for i in front], [xy[i][1] for i in front], where="post", color="black",
                linestyle="--", marker="*", markersize=10, label="Pareto front")
        xs = [x for x, _ in xy]
        if min(xs) > 0:
            log_axis(ax, "x", min(xs), max(xs))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_metric_label(metric))
        metric_axis(ax, metric)
    legend_outside(fig)
    return fig


def _curve_of(runs: Sequence[RunRecord]):
    """The curve a run belongs to in the figures against cost: its method; with compressors that
    differ between the runs, its compressor too (``+EF`` with error feedback), the method only
    where methods differ. A curve then joins one compressor's ratios (and Hs)."""
    def compression(r: RunRecord) -> str:
        name = r.params.get("compression.name", "none")
        return name + ("+EF" if name != "none" and r.params.get("compression.error_feedback") in ("True", "true")
                       else "")

    if len({compression(r) for r in runs}) <= 1:
        return lambda r: r.params.get("method.name", "")
    methods = len({r.params.get("method.name", "") for r in runs}) > 1
    return lambda r: f"{r.params.get('method.name', '')} {compression(r)}" if methods else compression(r)


def fig_pareto(runs: Sequence[RunRecord], columns: Sequence[str], metric: str):
    """Accuracy against MiB sent per worker: a curve per method (per compressor in a sweep over
    compression), the Pareto front marked."""
    return _fig_against_cost(runs, columns, metric, "comm_bytes_total", _MIB, "MiB sent per worker",
                             f"{_metric_label(metric)} against bytes sent")


def fig_acc_vs_time(runs: Sequence[RunRecord], columns: Sequence[str], metric: str):
    """Accuracy against modelled cluster time (dpl.comm.clock): a curve per method, the Pareto front marked."""
    return _fig_against_cost(runs, columns, metric, "modelled_time_s", 1.0, "modelled time (s)",
                             f"{_metric_label(metric)} against modelled time")


def fig_acc_vs_lr(runs: Sequence[RunRecord], columns: Sequence[str], metric: str, min_values: int = 3):
    """Accuracy of every run against its learning rate (log axis), a colour per optimizer, diverged
    runs as crosses at the bottom: the picture of an Optuna search (drawn when lr takes at least
    ``min_values`` values)."""
    with_lr = [r for r in runs if not math.isnan(_float(r.params.get("lr")))]
    if len({r.params["lr"] for r in with_lr}) < min_values:
        return None
    facets: dict[str, list[RunRecord]] = {}
    for r in with_lr:
        facets.setdefault(r.params.get("dataset.name", "") if "dataset" in columns else "", []).append(r)
    facets = dict(sorted(facets.items()))
    optimizers = sorted({r.params.get("optimizer.name", "") for r in with_lr})
    fig, axes = _panels(facets, f"{_metric_label(metric)} against learning rate")
    for ax, members in zip(axes, facets.values()):
        for i, opt in enumerate(optimizers):
            done = [r for r in members if r.params.get("optimizer.name", "") == opt and r.finished
                    and math.isfinite(r.metrics.get(metric, math.nan))]
            failed = [r for r in members if r.params.get("optimizer.name", "") == opt and r.status in FAILED]
            if done:
                ax.scatter([_float(r.params["lr"]) for r in done], [r.metrics[metric] for r in done],
                           color=f"C{i % 10}", label=mpl_escape(opt or "runs"))
            if failed:
                ax.scatter([_float(r.params["lr"]) for r in failed], [0.0] * len(failed), color=f"C{i % 10}",
                           marker="x", label=mpl_escape(f"{opt} diverged".strip()))
        lrs = [_float(r.params["lr"]) for r in members]
        log_axis(ax, "x", min(lrs), max(lrs))
        ax.set_xlabel("learning rate")
        ax.set_ylabel(_metric_label(metric))
        metric_axis(ax, metric)
    legend_outside(fig)
    return fig


_BUDGET_PANELS = {"samples_total": ("samples seen", 1.0), "comm_bytes_total": ("MiB sent per worker", _MIB),
                  "modelled_time_s": ("modelled time (s)", 1.0)}


def fig_budget(budget: Sequence[Mapping[str, Any]], columns: Sequence[str]):
    """Budget to the target accuracy per group: a horizontal bar per group in each panel (samples,
    bytes, modelled time) with its 95 % interval; a group whose runs never reached it is named
    with ``reached 0 of n`` and has no bar."""
    if not budget:
        return None
    panels = {b: v for b, v in _BUDGET_PANELS.items() if any(math.isfinite(r[f"{b}_mean"]) for r in budget)}
    if not panels:
        return None
    keys = [tuple(r[c] for c in columns) for r in budget]
    varying = _varying(dict.fromkeys(keys), columns)
    labels = [f"{_label_of(k, columns, [c for c in columns if c not in varying])} "
              f"(reached {r['reached']} of {r['n']})" for k, r in zip(keys, budget)]
    # 3 inches more across for the group labels left of the first panel, a line of height per group
    fig, axes = new_figure(len(panels), width=4.2 + 3.0 / len(panels), height=1.4 + 0.35 * len(budget), sharey=True)
    fig.suptitle(f"Budget to reach {100 * budget[0]['target_val_acc']:.2f} % validation accuracy{_CI_NOTE}")
    ys = list(range(len(budget)))
    for ax, (name, (xlabel, scale)) in zip(axes, panels.items()):
        means = [r[f"{name}_mean"] / scale for r in budget]
        err = [[(r[f"{name}_mean"] - r[f"{name}_ci95_lo"]) / scale for r in budget],
               [(r[f"{name}_ci95_hi"] - r[f"{name}_mean"]) / scale for r in budget]]
        err = [[0.0 if not math.isfinite(e) else e for e in side] for side in err]
        ax.barh(ys, [m if math.isfinite(m) else 0.0 for m in means], xerr=err, capsize=3,
                color=[f"C{i % 10}" for i in ys], alpha=0.8)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_formatter(FuncFormatter(short_number))
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(ys, labels)
    axes[0].invert_yaxis()
    return fig


def fig_time_vs_bandwidth(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]):
    """Modelled time to the target accuracy against the network's bandwidth, both axes logarithmic:
    a line per group (its 95 % interval as error bars, over the runs that reached the target), a
    panel per dataset; a group with a run that never reached it is marked ``reached r of n``."""
    rows = [r for r in rows if r["reached"] and math.isfinite(r["time_s_mean"])]
    if not rows:
        return None
    keys = list(dict.fromkeys(tuple(r[c] for c in columns) for r in rows))
    skip = ["dataset", *(c for c in columns if c not in _varying(dict.fromkeys(keys), columns))]
    facets: dict[str, list] = {}
    for key in keys:
        mine = [r for r in rows if tuple(r[c] for c in columns) == key]
        name = dict(zip(columns, key)).get("dataset", "")
        reached, n = min(r["reached"] for r in mine), mine[0]["n"]
        label = _label_of(key, columns, skip) + (f" (reached {reached} of {n})" if reached < n else f" (n={n})")
        facets.setdefault(name, []).append((mine, label))
    fig, axes = _panels(facets, f"Modelled time to {100 * rows[0]['target_val_acc']:.2f} % validation accuracy "
                                f"against bandwidth{_CI_NOTE}")
    for ax, lines in zip(axes, facets.values()):
        for mine, label in lines:
            xs, ys = [r["bandwidth_gbps"] for r in mine], [r["time_s_mean"] for r in mine]
            err = [[0.0 if not math.isfinite(r["time_s_ci95_lo"]) else r["time_s_mean"] - r["time_s_ci95_lo"]
                    for r in mine],
                   [0.0 if not math.isfinite(r["time_s_ci95_hi"]) else r["time_s_ci95_hi"] - r["time_s_mean"]
                    for r in mine]]
            ax.errorbar(xs, ys, yerr=err, marker="o", markersize=3, capsize=3, label=label)
        every = [r["bandwidth_gbps"] for mine, _ in lines for r in mine]
        log_axis(ax, "x", min(every), max(every))
        ax.set_yscale("log")
        # an interval reaching 0 (few seeds, wide spread) runs off the bottom instead of squashing the lines
        low = [r["time_s_ci95_lo"] for mine, _ in lines for r in mine if r["time_s_ci95_lo"] > 0]
        ax.set_ylim(bottom=0.5 * min([*low, *(r["time_s_mean"] for mine, _ in lines for r in mine)]))
        ax.set_xlabel("bandwidth (Gbit/s)")
        ax.set_ylabel("modelled time to target (s)")
    legend_outside(fig)
    return fig


def build_figures(runs: Sequence[RunRecord], columns: Mapping[str, str], metric: str = "test_acc",
                  budget: Sequence[Mapping[str, Any]] = (), bandwidth: Sequence[Mapping[str, Any]] = ()) -> dict:
    """File name -> matplotlib Figure, for the figures these runs have data for."""
    groups = group_runs(runs, columns)
    names = list(columns)
    figures = {"acc_vs_H.png": fig_acc_vs_h(groups, names, metric),
               "acc_vs_rounds.png": fig_acc_vs_rounds(groups, names, metric),
               "learning_curves.png": fig_learning_curves(groups, names),
               "h_over_epochs.png": fig_h_over_epochs(groups, names),
               "pareto.png": fig_pareto(runs, names, metric),
               "acc_vs_time.png": fig_acc_vs_time(runs, names, metric),
               "acc_vs_lr.png": fig_acc_vs_lr(runs, names, metric),
               "budget_to_target.png": fig_budget(budget, names),
               "time_vs_bandwidth.png": fig_time_vs_bandwidth(bandwidth, names)}
    return {name: fig for name, fig in figures.items() if fig is not None}


def write_figures(runs: Sequence[RunRecord], columns: Mapping[str, str], out_dir: Path,
                  metric: str = "test_acc", budget: Sequence[Mapping[str, Any]] = (),
                  bandwidth: Sequence[Mapping[str, Any]] = ()) -> list[Path]:
    return [save_figure(fig, out_dir / name)
            for name, fig in build_figures(runs, columns, metric, budget, bandwidth).items()]


# ----------------------------------------------------------------------------- entry point


def write_report(runs: Sequence[RunRecord], out_dir: str | Path, title: str, metric: str = "test_acc",
                 baseline: Optional[str] = None, target_acc: Optional[float] = None,
                 bandwidths: Sequence[float] = BANDWIDTHS_GBPS) -> list[Path]:
    """Write summary.csv, comparisons.csv, budget.csv, runs.csv, report.md and the figures for ``runs``;
    return the paths written. ``baseline`` is ``KEY=VALUE[,KEY=VALUE]`` (default: ``ablation=none``
    where there is one, else the first group); ``target_acc`` the validation accuracy of the budget
    table (default: the lowest of the groups' mean final validation accuracies); ``bandwidths`` (Gbit/s)
    those of time_vs_bandwidth.csv."""
    out_dir = Path(out_dir)
    columns = group_columns(runs)
    # language models (dataset=text): bits per byte beside the loss (lower is better), where the runs have it
    text = any(TEXT_METRIC in r.metrics for r in runs)
    metrics, table = (METRICS + (TEXT_METRIC,), _TABLE + (TEXT_METRIC,)) if text else (METRICS, _TABLE)
    rows = summarise(runs, columns, metrics)
    groups = group_runs(runs, columns)
    spec = parse_baseline(baseline, columns) if baseline else default_baseline(groups, list(columns))
    if baseline and not any(all(dict(zip(columns, k))[c] == v for c, v in spec.items()) for k in groups):
        raise BaselineError(f"--baseline {baseline!r} matches no group of this report")
    comparisons = compare_groups(runs, columns, spec)
    target = default_target(runs, columns) if target_acc is None else target_acc
    budget = budget_rows(runs, columns, target) if math.isfinite(target) else []
    bandwidth = bandwidth_rows(runs, columns, target, bandwidths) if math.isfinite(target) else []
    written = [write_csv_table(rows, out_dir / "summary.csv"),
               write_csv_table(comparisons, out_dir / "comparisons.csv") if comparisons else None,
               write_csv_table(budget, out_dir / "budget.csv") if budget else None,
               write_csv_table(bandwidth, out_dir / "time_vs_bandwidth.csv") if bandwidth else None,
               write_csv_table(run_rows(runs, columns, metrics, target=target), out_dir / "runs.csv")]
    atomic_write_text(out_dir / "report.md", markdown(rows, columns, runs, title, table, comparisons=comparisons,
                                                      budget=budget, baseline=spec))
    written.append(out_dir / "report.md")
    return [p for p in written if p is not None] + write_figures(runs, columns, out_dir, metric, budget, bandwidth)


_FOLDER_MAX_BYTES = 100  # well under the 255-byte file name limit of common file systems


def safe_folder_name(name: str) -> str:
    """``name`` as one folder name: never a path, never hidden, never empty.

    Experiment and sweep names come from the store, so ``../../x``, ``a/b`` or ``</script>`` in
    one would put the report above or below ``reports/``. Anything but letters, digits and
    ``._+=-`` becomes ``_``, runs of dots become one and leading or trailing dots go (no ``..``);
    a name cut to length ends in a hash of the whole, so two long names keep two folders.
    """
    safe = re.sub(r"\.{2,}", ".", re.sub(r"[^\w.+=-]", "_", name)).strip(".")
    if len(safe.encode()) > _FOLDER_MAX_BYTES:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        safe = safe.encode()[:_FOLDER_MAX_BYTES - 9].decode(errors="ignore").rstrip(".") + "-" + digest
    return safe or "unnamed"


def default_out_dir(kind: str, name: str) -> Path:
    """``reports/<name>`` under the current directory, said in one line when the name had to change."""
    folder = safe_folder_name(name)
    if folder != name:
        print(f"writing to reports/{folder}: {kind}={name!r} is not a safe folder name")
    return Path("reports") / folder


DEFAULT_EXPERIMENT = "dpl"  # logger.experiment of a single run (conf/logger/mlflow.yaml)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (its default prints the whole usage first)."""

    def error(self, message: str):
        print(f"error: {message} (see python -m dpl.report --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = _Parser(prog="python -m dpl.report", description=__doc__.split("\n\n")[0],
                                epilog="With neither --experiment nor --sweep: the most recent of the latest sweep "
                                       f"and the single runs of experiment {DEFAULT_EXPERIMENT!r}.")
    p.add_argument("--experiment", help="MLflow experiment name (a sweep's runs are in the experiment it names)")
    p.add_argument("--sweep", help="only runs with this sweep tag (across experiments unless --experiment)")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                   help="MLflow store; a relative sqlite path is relative to the current directory")
    p.add_argument("--out", help="output folder, used as given (default reports/<experiment or sweep>, made one "
                                 "safe folder name)")
    p.add_argument("--metric", default=None, choices=(*_ACC, TEXT_METRIC),
                   help="what the figures plot (default: test_bpb for language-model runs, which have it, "
                        "else test_acc)")
    p.add_argument("--baseline", metavar="KEY=VALUE[,KEY=VALUE]",
                   help="the group every other is compared with (comparisons.csv); a group's baseline also agrees "
                        "with it on the other columns (default: ablation=none where the runs have it, else the "
                        "first group)")
    p.add_argument("--target-acc", type=_fraction, metavar="ACC",
                   help="validation accuracy (0-1) of the budget-to-target table (default: the lowest of the groups' "
                        "mean final validation accuracies, which every group reaches on average)")
    p.add_argument("--bandwidths", type=_bandwidths, default=BANDWIDTHS_GBPS, metavar="GBPS[,GBPS]",
                   help="network bandwidths (Gbit/s) of the time-to-target figure (default: 1,10,100)")
    return p.parse_args(argv)


def _bandwidths(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of bandwidths in Gbit/s") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every bandwidth must be a finite number > 0")
    return tuple(sorted(set(values)))


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not an accuracy between 0 and 1")
    return value


def latest(client) -> tuple[Optional[str], Optional[str], str]:
    """(experiment, sweep, why) to report when none is named: the newer of the latest sweep (by its
    parent run) and the latest run of the default experiment."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return DEFAULT_EXPERIMENT, None, "the default experiment (the store holds no runs)"
    newest = lambda query: next(iter(client.search_runs(experiments, filter_string=query, max_results=1,  # noqa: E731
                                                          order_by=["attributes.start_time DESC"])), None)
    sweep = newest(f"tags.{PARENT_TAG} LIKE '%'")
    single = None
    default = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    if default is not None:
        single = next(iter(client.search_runs([default.experiment_id], max_results=1,
                                              order_by=["attributes.start_time DESC"])), None)
    if sweep is not None and (single is None or sweep.info.start_time >= single.info.start_time):
        return None, sweep.data.tags[PARENT_TAG], "the latest sweep"
    return DEFAULT_EXPERIMENT, None, "the default experiment of single runs (newer than any sweep)" \
        if sweep is not None else "the default experiment of single runs (no sweep in the store)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dpl.tracking import mlflow_client

    args = parse_args(argv)
    client = mlflow_client(args.tracking_uri, Path.cwd())
    if args.experiment is None and args.sweep is None:
        args.experiment, args.sweep, why = latest(client)
        what = f"sweep={args.sweep!r}" if args.sweep else f"experiment={args.experiment!r}"
        print(f"reporting {what}: {why} in {args.tracking_uri} (choose with --sweep / --experiment)")
    kind = "sweep" if args.sweep is not None else "experiment"
    name = args.sweep if args.sweep is not None else args.experiment
    try:
        runs = fetch_runs(client, args.experiment, args.sweep)
    except LookupError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no runs found for {kind}={name!r} in {args.tracking_uri}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_out_dir(kind, name)
    metric = args.metric or (TEXT_METRIC if any(TEXT_METRIC in r.metrics for r in runs) else "test_acc")
    try:
        paths = write_report(runs, out, title=f"dpl report: {name}", metric=metric, baseline=args.baseline,
                             target_acc=args.target_acc, bandwidths=args.bandwidths)
    except BaselineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0

