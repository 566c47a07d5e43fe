"""``python -m dpl.report``: compare the runs of one MLflow experiment or one sweep.

Reads the local MLflow store (``sqlite:///mlflow.db`` in the current directory unless
``--tracking-uri`` says otherwise; nothing goes over the network) and writes, into
``--out`` (default ``reports/<experiment or sweep>``, the name made one safe folder name):

* ``report.md`` and ``report.csv``: final metrics grouped by method / K / H / dynamic_h /
  optimizer / batch size, plus any other parameter that varies inside those groups (the
  slow momentum of a SlowMo grid, the lr of an Optuna search), as mean ± sample std over
  the runs of a group, which differ only in their seed. Failed (diverged) runs are
  counted per group and listed with their reason; they never enter a mean.
* ``acc_vs_H.png`` (accuracy against H, a line per K), ``acc_vs_rounds.png`` (accuracy
  against communication rounds), ``learning_curves.png`` (validation accuracy per epoch,
  one curve per group), ``h_over_epochs.png`` (H per epoch of each dynamic strategy),
  ``pareto.png`` (accuracy against bytes sent, a curve per method, or per compressor and error
  feedback in a sweep over compression, the Pareto front marked),
  ``acc_vs_time.png`` (the same against modelled cluster time, :mod:`dpl.clock`) and,
  when lr takes three or more values (an Optuna search), ``acc_vs_lr.png``. Each figure
  has a panel per dataset.

Usage::

    python -m dpl.report          # the latest sweep, or the single runs of experiment "dpl"
    python -m dpl.report --experiment localsgd_grid
    python -m dpl.report --sweep dynamic_h --tracking-uri sqlite:////data/mlflow.db --out reports/dyn
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

from dpl.io import atomic_write_text, write_csv
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from dpl.plots import integer_ticks, legend_outside, log_axis, new_figure, percent_axis, save_figure, short_number
from dpl.sweep import PARENT_TAG
from dpl.tracking import INTERRUPTED_TAG, end_if_dead, process_gone, tag_filter

# Column -> MLflow param; always grouped by when the runs carry the param.
BASE_COLUMNS = {"dataset": "dataset.name", "method": "method.name", "K": "K", "H": "H", "dynamic_h": "dynamic_h.name",
                "optimizer": "optimizer.name", "batch_size": "batch_size", "compression": "compression.name"}
# Base columns shown only when some run has another value than this one (runs without compression
# keep the table they had before the option existed).
QUIET_DEFAULTS = {"compression": "none"}
# Final metrics summarised per group (the last logged value of each).
METRICS = ("test_acc", "test_acc_best", "best_val_acc", "test_loss", "sync_rounds_total", "comm_bytes_total",
           "modelled_time_s", "epochs_run", "H_first", "H_last", "H_mean")
# Params that never split a group: the seed (what a group averages over) and bookkeeping.
NOT_GROUPED = ("seed", "sweep", "results_csv", "progress", "resume", "checkpoint", "checkpoint_every", "test_only",
               "pretrained", "device", "dataset.root", "dataset.download", "engine.master_addr",
               "engine.master_port", "engine.timeout_s", "engine.spawn", "engine.backend", "engine.simulate",
               "engine.compile", "engine.eval_batch_size")
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
               history_keys: Sequence[str] = ("val_acc", "H")) -> list[RunRecord]:
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
    return RunRecord(run_id=run.info.run_id, status=status, params=dict(run.data.params),
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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std is nan for fewer than two values, both nan for none."""
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def summarise(runs: Sequence[RunRecord], columns: Mapping[str, str],
              metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """One row per group: its column values, ``runs`` (finished), ``failed``, and mean/std per metric."""
    rows = []
    for key, members in group_runs(runs, columns).items():
        row: dict[str, Any] = dict(zip(columns, key))
        row["runs"] = sum(r.finished for r in members)
        row["failed"] = sum(r.status in FAILED for r in members)
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std(_values(members, m))
        rows.append(row)
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
    return [r.metrics[metric] for r in runs if r.finished and math.isfinite(r.metrics.get(metric, math.nan))]


def mean_curve(histories: Iterable[Sequence[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """The per-step mean over the runs that logged that step."""
    by_step: dict[int, list[float]] = {}
    for h in histories:
        for step, value in h:
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


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


def _md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(md_escape(c) for c in cells) + " |"


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
          "modelled_time_s": ("modelled time s", 1.0, 1), "epochs_run": ("epochs run", 1.0, 0),
          "H_mean": ("mean H", 1.0, 1)}
_H_SUMMARY = ("H_first", "H_last", "H_mean")  # the H trained with (dpl.app.h_summary)


def _fmt(row: Mapping[str, Any], metric: str) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if math.isnan(mean):
        return "diverged" if row["failed"] and not row["runs"] else "–"
    _, scale, digits = _SHOWN.get(metric, (metric, 1.0, 4))
    text = f"{mean * scale:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std * scale:.{digits}f}"


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
             title: str, metrics: Sequence[str] = METRICS) -> str:
    params, columns = columns, list(columns)
    local = any(r.params.get("method.name") in LOCAL_METHODS for r in runs)
    shown = [m for m in metrics if m not in _H_SUMMARY or (m == "H_mean" and local)]
    head = [*columns, "runs", "failed", *(_SHOWN.get(m, (m,))[0] for m in shown)]
    lines = [f"# {md_escape(title)}", "",
             f"{sum(r.finished for r in runs)} finished, {sum(r.status in FAILED for r in runs)} failed, "
             f"{sum(r.status == INTERRUPTED for r in runs)} interrupted (not counted), "
             f"{sum(r.status not in ('FINISHED', INTERRUPTED, *FAILED) for r in runs)} other runs; "
             "mean ± sample std over the finished runs of a group (seeds)."
             + (" H of a dynamic_h group: first→last epoch." if "dynamic_h" in columns else ""), "",
             _md_row(head), "|" + "---|" * len(head)]
    for row in rows:
        cells = [_h_cell(row) if c == "H" else _param_text(row[c]) for c in columns]
        lines.append(_md_row([*cells, row["runs"], row["failed"], *(_fmt(row, m) for m in shown)]))
    failed = [r for r in runs if r.status in (*FAILED, INTERRUPTED)]
    if failed:
        lines += ["", "## Failed runs", "", "| run | group | status | reason |", "|---|---|---|---|"]
        lines += [_md_row([r.run_id, _group_label(_key(r, params), columns), r.status, r.reason or "–"])
                  for r in failed]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures
#
# Every figure has one panel per dataset (runs on different data are never on one axis), a
# legend right of the panels, short labels (only the columns that tell the groups apart),
# and 1-2-5 log ticks or integer epoch ticks; tests/test_report.py checks that no tick labels
# overlap and no legend covers a panel.

_NAMED = ("method", "dynamic_h", "optimizer", "compression")  # columns whose values are names: shown bare in labels
_METRIC_LABEL = {"test_acc": "test accuracy", "test_acc_best": "best-model test accuracy",
                 "best_val_acc": "best val accuracy"}


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
            mean, std = mean_std(_values(members, metric))
            if not math.isnan(mean):
                series.setdefault(_label_of(key, columns, skip), []).append((_float(row["H"]), mean, std))
        if series:
            facets[name] = series
    if not facets:
        return None
    fig, axes = _panels(facets, f"{_metric_label(metric)} against local steps H")
    for ax, series in zip(axes, facets.values()):
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[0 if math.isnan(p[2]) else p[2] for p in pts],
                        marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for pts in series.values() for p in pts})
        ax.set_xticks(ticks, [f"{h:g}" for h in ticks])
        ax.minorticks_off()
        ax.set_xlabel("local steps H")
        ax.set_ylabel(_metric_label(metric))
        percent_axis(ax)
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
                pts.append((statistics.fmean(r.metrics["sync_rounds_total"] for r in done),
                            statistics.fmean(r.metrics[metric] for r in done), key))
        if pts:
            facets[name] = pts
    if not facets:
        return None
    per_group = len(groups) <= 16
    markers = "osD^v<>pPX*h"
    fig, axes = _panels(facets, f"{_metric_label(metric)} against communication rounds")
    for ax, pts in zip(axes, facets.values()):
        for n, (x, y, key) in enumerate(sorted(pts, key=lambda p: p[2])):
            method = dict(zip(columns, key)).get("method", "runs")
            label = _label_of(key, columns, skip) if per_group else mpl_escape(method)
            ax.scatter([x], [y], color=f"C{methods.index(method) % 10}", label=label,
                       marker=markers[n % len(markers)] if per_group else "o")
        xs = [p[0] for p in pts]
        if min(xs) > 0:
            log_axis(ax, "x", min(xs), max(xs))
        ax.set_xlabel("sync rounds")
        ax.set_ylabel(_metric_label(metric))
        percent_axis(ax)
    legend_outside(fig)
    return fig


def _curves_fig(groups, columns: Sequence[str], history_key: str, ylabel: str, title: str,
                keep=lambda row: True, skip: Sequence[str] = ()):
    """Mean curve per group over the epochs (counted from 1, markers so that one epoch shows), per dataset."""
    kept = {k: m for k, m in groups.items() if keep(dict(zip(columns, k)))}
    skip = ["dataset", *skip] + [c for c in columns if c not in _varying(kept, columns)]
    facets = {}
    for name, sub in _by_dataset(kept, columns).items():
        curves = []
        for key, members in sub.items():
            steps, values = mean_curve(r.history.get(history_key, []) for r in members if r.finished)
            if steps:
                curves.append((steps, values, _label_of(key, columns, skip)))
        if curves:
            facets[name] = curves
    if not facets:
        return None
    fig, axes = _panels(facets, title)
    for ax, curves in zip(axes, facets.values()):
        for xs, ys, label in curves:
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        integer_ticks(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
    legend_outside(fig)
    return fig


def fig_learning_curves(groups, columns: Sequence[str]):
    fig = _curves_fig(groups, columns, "val_acc", "val accuracy", "Validation accuracy (mean over seeds)")
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
        front = pareto_front(xy)
        ax.step([xy[i][0] for i in front], [xy[i][1] for i in front], where="post", color="black",
                linestyle="--", marker="*", markersize=10, label="Pareto front")
        xs = [x for x, _ in xy]
        if min(xs) > 0:
            log_axis(ax, "x", min(xs), max(xs))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_metric_label(metric))
        percent_axis(ax)
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
    """Accuracy against modelled cluster time (dpl.clock): a curve per method, the Pareto front marked."""
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
        percent_axis(ax)
    legend_outside(fig)
    return fig


def build_figures(runs: Sequence[RunRecord], columns: Mapping[str, str], metric: str = "test_acc") -> dict:
    """File name -> matplotlib Figure, for the figures these runs have data for."""
    groups = group_runs(runs, columns)
    names = list(columns)
    figures = {"acc_vs_H.png": fig_acc_vs_h(groups, names, metric),
               "acc_vs_rounds.png": fig_acc_vs_rounds(groups, names, metric),
               "learning_curves.png": fig_learning_curves(groups, names),
               "h_over_epochs.png": fig_h_over_epochs(groups, names),
               "pareto.png": fig_pareto(runs, names, metric),
               "acc_vs_time.png": fig_acc_vs_time(runs, names, metric),
               "acc_vs_lr.png": fig_acc_vs_lr(runs, names, metric)}
    return {name: fig for name, fig in figures.items() if fig is not None}


def write_figures(runs: Sequence[RunRecord], columns: Mapping[str, str], out_dir: Path,
                  metric: str = "test_acc") -> list[Path]:
    return [save_figure(fig, out_dir / name) for name, fig in build_figures(runs, columns, metric).items()]


# ----------------------------------------------------------------------------- entry point


def write_report(runs: Sequence[RunRecord], out_dir: str | Path, title: str, metric: str = "test_acc") -> list[Path]:
    """Write report.md, report.csv and the figures for ``runs``; return the paths written."""
    out_dir = Path(out_dir)
    columns = group_columns(runs)
    rows = summarise(runs, columns)
    written = [write_csv_table(rows, out_dir / "report.csv")]
    atomic_write_text(out_dir / "report.md", markdown(rows, columns, runs, title))
    written.append(out_dir / "report.md")
    return written + write_figures(runs, columns, out_dir, metric)


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


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dpl.report", description=__doc__.split("\n\n")[0],
                                epilog="With neither --experiment nor --sweep: the most recent of the latest sweep "
                                       f"and the single runs of experiment {DEFAULT_EXPERIMENT!r}.")
    p.add_argument("--experiment", help="MLflow experiment name (a sweep's runs are in the experiment it names)")
    p.add_argument("--sweep", help="only runs with this sweep tag (across experiments unless --experiment)")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                   help="MLflow store; a relative sqlite path is relative to the current directory")
    p.add_argument("--out", help="output folder, used as given (default reports/<experiment or sweep>, made one "
                                 "safe folder name)")
    p.add_argument("--metric", default="test_acc", choices=_ACC, help="accuracy used in the figures")
    return p.parse_args(argv)


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
    for path in write_report(runs, out, title=f"dpl report: {name}", metric=args.metric):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
