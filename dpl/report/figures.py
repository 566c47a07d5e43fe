"""A report's figures: accuracy against H, rounds, bytes, modelled time and lr, learning curves, H per
epoch, budgets to a target and time against bandwidth; a panel per dataset, 95 % intervals over seeds.

What no figure may do: draw an accuracy's interval outside 0-100 % (it is the logit interval,
:func:`dpl.report.stats.describe_bounded`, said in the title), join by a line two groups that differ
in more than the setting the line runs along (a line is every other varying setting held fixed:
method, K, batch size, ...), give two lines one colour, or come out wider than 3:1 or taller than 1:2."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from dpl.report import stats
from dpl.report.fetch import (
    FAILED,
    RunRecord,
    _changes_h,
    _local,
    _values,
    ci_curve,
    group_runs,
    mean_curve,
)
from dpl.report.tables import _MIB, _float, pareto_front, target_of
from dpl.run.plots import (
    _DPI,
    integer_ticks,
    legend_outside,
    log_axis,
    new_figure,
    percent_axis,
    save_figure,
    short_number,
)

_CI_NOTE = "\nbars: 95 % CI over seeds"  # what every error bar and band of the report is (a line of its own)


BOUNDED = ("test_acc", "test_acc_best", "best_val_acc", "val_acc")  # accuracies: fractions in [0, 1]


MAX_WIDE, MAX_TALL = 3.0, 2.0  # a figure's width / height at most 3, its height / width at most 2


def _ci_note(metric: str, what: str = "bars") -> str:
    """The title's line on the intervals: an accuracy's are the logit interval (they stay in 0-100 %)."""
    return f"\n{what}: {stats.BOUNDED_INTERVAL}" if metric in BOUNDED else f"\n{what}: 95 % CI over seeds"


def _describe(values, metric: str) -> stats.Summary:
    """Mean and 95 % interval over seeds; an accuracy's interval on the logit scale, so it stays in [0, 1]."""
    return stats.describe_bounded(values) if metric in BOUNDED else stats.describe(values)


def _yerr(summaries: Sequence[stats.Summary]) -> list[list[float]]:
    """matplotlib's asymmetric error bars [below, above] of the intervals; none (0) where undefined."""
    return [[0.0 if math.isnan(s.lo) else s.mean - s.lo for s in summaries],
            [0.0 if math.isnan(s.hi) else s.hi - s.mean for s in summaries]]


def palette(labels) -> dict[str, Any]:
    """A colour per label, all distinct: matplotlib's ten default colours, tab20 up to 20 (the dark
    shades first), beyond that evenly spaced hues. The same label gets the same colour in every panel."""
    labels = sorted(set(labels))
    n = len(labels)
    if n <= 10:
        return {label: f"C{i}" for i, label in enumerate(labels)}
    if n <= 20:
        tab = colormaps["tab20"]
        return {label: tab((2 * i) % 20 + (2 * i) // 20) for i, label in enumerate(labels)}
    hues = colormaps["gist_rainbow"]
    return {label: hues(i / n) for i, label in enumerate(labels)}


def _series(key: Sequence[str], columns: Sequence[str], skip: Sequence[str]) -> tuple[str, ...]:
    """The line a group belongs to: its values of every column not in ``skip`` (the axis the line runs
    along, the dataset of the panel, what no group differs in). Two groups on one line differ only
    in a skipped column."""
    return tuple(v for c, v in zip(columns, key) if c not in skip)


def sensible_aspect(fig) -> None:
    """Grow the figure's height (or width) until it is at most MAX_WIDE wide to 1 high and MAX_TALL
    high to 1 wide: a strip 6 times as wide as high (three panels of one bar row) is unreadable
    when shown at a page's width. Growing keeps the legend where :func:`legend_outside` put it
    (it is anchored in figure fractions, below the title and inside the figure either way)."""
    width, height = fig.get_size_inches()
    if width > MAX_WIDE * height:
        fig.set_size_inches(width, width / MAX_WIDE)
    elif height > MAX_TALL * width:
        fig.set_size_inches(height / MAX_TALL, height)


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


def _n_text(ns: Sequence[int]) -> str:
    """``n=5``, or ``n=3-5`` when the points of one line rest on different numbers of runs."""
    return f"n={min(ns)}" if min(ns) == max(ns) else f"n={min(ns)}-{max(ns)}"


def _varying(groups: Mapping[tuple[str, ...], Any], columns: Sequence[str]) -> list[str]:
    """The columns whose value differs between groups: the only ones worth a label."""
    return [c for i, c in enumerate(columns) if len({key[i] for key in groups}) > 1]


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
    kept = {k: m for k, m in groups.items() if _local(dict(zip(columns, k)).get("method"))
            and not _changes_h(dict(zip(columns, k)).get("dynamic_h"))}
    skip = ["H", "dataset"] + [c for c in columns if c not in _varying(kept, columns)]
    facets = {}
    for name, sub in _by_dataset(kept, columns).items():
        series: dict[str, list[tuple[float, stats.Summary]]] = {}
        for key, members in sub.items():
            row = dict(zip(columns, key))
            s = _describe(_values(members, metric), metric)
            if not math.isnan(s.mean):
                series.setdefault(_label_of(key, columns, skip), []).append((_float(row["H"]), s))
        if series:
            facets[name] = series
    if not facets:
        return None
    colours = palette(label for series in facets.values() for label in series)
    fig, axes = _panels(facets, f"{_metric_label(metric)} against local steps H{_ci_note(metric)}")
    for ax, series in zip(axes, facets.values()):
        for label, pts in sorted(series.items()):
            pts.sort(key=lambda p: p[0])
            xs, summaries = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, [s.mean for s in summaries], marker="o", color=colours[label],
                    label=f"{label} ({_n_text([s.n for s in summaries])})")
            ax.errorbar(xs, [s.mean for s in summaries], yerr=_yerr(summaries), fmt="none", capsize=3,
                        ecolor=colours[label])
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
    """Each group's mean accuracy (95 % interval) against its mean number of sync rounds, a panel per
    dataset. A line joins the groups that differ only in H (the setting that sets the rounds): one
    line, colour and legend entry per setting of every other varying column (method, K, batch size, ...)."""
    skip = ["dataset", "H"] + [c for c in columns if c not in _varying(groups, columns)]
    facets = {}
    for name, sub in _by_dataset(groups, columns).items():
        lines: dict[str, list[tuple[float, stats.Summary]]] = {}
        for key, members in sub.items():
            done = [r for r in members if r.finished and metric in r.metrics and "sync_rounds_total" in r.metrics]
            if done:
                s = _describe([r.metrics[metric] for r in done], metric)
                x = statistics.fmean(r.metrics["sync_rounds_total"] for r in done)
                lines.setdefault(_label_of(key, columns, skip), []).append((x, s))
        if lines:
            facets[name] = lines
    if not facets:
        return None
    colours = palette(label for lines in facets.values() for label in lines)
    markers = "osD^v<>pPX*h"
    fig, axes = _panels(facets, f"{_metric_label(metric)} against communication rounds{_ci_note(metric)}")
    for ax, lines in zip(axes, facets.values()):
        for label, pts in lines.items():
            pts.sort(key=lambda p: p[0])
            xs, summaries = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, [s.mean for s in summaries], color=colours[label],
                    marker=markers[sorted(colours).index(label) % len(markers)],
                    label=f"{label} ({_n_text([s.n for s in summaries])})")
            ax.errorbar(xs, [s.mean for s in summaries], yerr=_yerr(summaries), fmt="none", capsize=3,
                        ecolor=colours[label])
        xs = [x for pts in lines.values() for x, _ in pts]
        if min(xs) > 0:
            log_axis(ax, "x", min(xs), max(xs))
        ax.set_xlabel("sync rounds")
        ax.set_ylabel(_metric_label(metric))
        metric_axis(ax, metric)
    legend_outside(fig)
    return fig


def _curves_fig(groups, columns: Sequence[str], history_key: str, ylabel: str, title: str,
                keep=lambda row: True, skip: Sequence[str] = (), bounds=None):
    """Mean curve per group over the epochs (markers so that one epoch shows) with its 95 % interval
    over the seeds as a band (with ``bounds``, the logit interval that stays inside them), a colour
    per group, per dataset."""
    kept = {k: m for k, m in groups.items() if keep(dict(zip(columns, k)))}
    skip = ["dataset", *skip] + [c for c in columns if c not in _varying(kept, columns)]
    facets = {}
    for name, sub in _by_dataset(kept, columns).items():
        curves = []
        for key, members in sub.items():
            done = [r.history.get(history_key, []) for r in members if r.finished]
            steps, values = mean_curve(done)
            if steps:
                lo, hi = ci_curve(done, bounds)
                curves.append((steps, values, _label_of(key, columns, skip), sum(bool(h) for h in done), lo, hi))
        if curves:
            facets[name] = curves
    if not facets:
        return None
    colours = palette(c[2] for curves in facets.values() for c in curves)
    fig, axes = _panels(facets, title)
    for ax, curves in zip(axes, facets.values()):
        for xs, ys, label, n, lo, hi in curves:
            ax.plot(xs, ys, marker="o", markersize=3, color=colours[label], label=f"{label} (n={n})")
            if any(math.isfinite(v) for v in lo):
                ax.fill_between(xs, lo, hi, color=colours[label], alpha=0.2, linewidth=0)
        integer_ticks(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
    legend_outside(fig)
    return fig


def fig_learning_curves(groups, columns: Sequence[str]):
    fig = _curves_fig(groups, columns, "val_acc", "val accuracy",
                      "Validation accuracy, mean over seeds" + _ci_note("val_acc", "band"), bounds=(0.0, 1.0))
    for ax in fig.axes if fig is not None else ():
        percent_axis(ax)
    return fig


def fig_h_over_epochs(groups, columns: Sequence[str]):
    """H per epoch of each dynamic strategy. The H column is only where a strategy starts (and is
    clamped to its bounds), so it is left out of the labels: the curve shows the H trained with."""
    fig = _curves_fig(groups, columns, "H", "local steps H", "H per epoch of each dynamic strategy",
                      keep=lambda row: _changes_h(row.get("dynamic_h")), skip=["H"])
    if fig is not None:
        for ax in fig.axes:
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_locator(LogLocator(base=2, numticks=8))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
    return fig


# The settings a curve against cost runs along: each trades accuracy for communication (the local
# steps H, the share of a tensor a sparsifier keeps); every other varying setting makes its own curve.
COST_AXES = ("H", "compression.ratio")


def _cost_label(key: Sequence[str], columns: Sequence[str], skip: Sequence[str]) -> str:
    """A curve's legend label: error feedback as ``+EF`` on its compressor (``topk+EF``), not a column of its own."""
    ef = "compression.error_feedback"
    if ef in columns and ef not in skip:
        row = dict(zip(columns, key))
        skip = [c for c in skip if c != "compression"] + [ef]  # the compressor is named where EF varies
        key = tuple(v + "+EF" if c == "compression" and row[ef] in ("True", "true") else v
                    for c, v in zip(columns, key))
    return _label_of(key, columns, skip)


def _fig_against_cost(runs: Sequence[RunRecord], columns: Mapping[str, str], metric: str, cost: str, scale: float,
                      xlabel: str, title: str):
    """Each group's mean accuracy (95 % interval) against its mean cost (bytes sent, modelled time), per
    dataset. A curve joins the groups that differ only in H or a compression ratio (COST_AXES), in
    order of cost: one curve, colour and legend entry per setting of every other varying column
    (method, K, batch size, compressor and error feedback, ...), so no curve runs from one K or
    batch size to another. The Pareto front over the groups' means is marked."""
    groups = group_runs(runs, columns)
    columns = list(columns)
    skip = ["dataset", *COST_AXES] + [c for c in columns if c not in _varying(groups, columns)]
    facets: dict[str, dict[str, list[tuple[float, stats.Summary]]]] = {}
    for name, sub in _by_dataset(groups, columns).items():
        curves: dict[str, list[tuple[float, stats.Summary]]] = {}
        for key, members in sub.items():
            done = [r for r in members if r.finished and math.isfinite(r.metrics.get(metric, math.nan))
                    and math.isfinite(r.metrics.get(cost, math.nan))]
            if done:
                x = statistics.fmean(r.metrics[cost] for r in done) / scale
                curves.setdefault(_cost_label(key, columns, skip), []).append(
                    (x, _describe([r.metrics[metric] for r in done], metric)))
        if curves:
            facets[name] = curves
    if not facets:
        return None
    facets = dict(sorted(facets.items()))
    colours = palette(label for curves in facets.values() for label in curves)
    fig, axes = _panels(facets, title + _ci_note(metric))
    for ax, curves in zip(axes, facets.values()):
        for label, pts in sorted(curves.items()):
            pts.sort(key=lambda p: p[0])
            xs, summaries = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, [s.mean for s in summaries], marker="o", alpha=0.8, color=colours[label],
                    label=f"{label or 'runs'} ({_n_text([s.n for s in summaries])})")
            ax.errorbar(xs, [s.mean for s in summaries], yerr=_yerr(summaries), fmt="none", capsize=3,
                        ecolor=colours[label], alpha=0.8)
        xy = [(x, s.mean) for pts in curves.values() for x, s in pts]
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


def fig_pareto(runs: Sequence[RunRecord], columns: Mapping[str, str], metric: str):
    """Accuracy against MiB sent per worker: a curve through H (or a compression ratio) per setting of
    everything else, the Pareto front marked."""
    return _fig_against_cost(runs, columns, metric, "comm_bytes_total", _MIB, "MiB sent per worker",
                             f"{_metric_label(metric)} against bytes sent")


def fig_acc_vs_time(runs: Sequence[RunRecord], columns: Mapping[str, str], metric: str):
    """Accuracy against modelled cluster time (dpl.comm.clock): the curves of :func:`fig_pareto`."""
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
    """Budget to the target accuracy per group: a panel per budget (samples, bytes, modelled time),
    one under the other, each a horizontal bar per group with its 95 % interval; a group whose runs
    never reached it is named with ``reached 0 of n`` and has no bar. Panels are stacked, not side
    by side: three panels of a few bars in a row made a strip 6 times as wide as high."""
    if not budget:
        return None
    panels = {b: v for b, v in _BUDGET_PANELS.items() if any(math.isfinite(r[f"{b}_mean"]) for r in budget)}
    if not panels:
        return None
    keys = [tuple(r[c] for c in columns) for r in budget]
    varying = _varying(dict.fromkeys(keys), columns)
    labels = [f"{_label_of(k, columns, [c for c in columns if c not in varying])} "
              f"(reached {r['reached']} of {r['n']})" for k, r in zip(keys, budget)]
    colours = palette(labels)
    # 7.5 inches across (the group labels, then the bars); per panel a line of height per group and
    # room for its axis label, plus the title
    fig = Figure(figsize=(7.5, 0.9 + len(panels) * (0.9 + 0.3 * len(budget))), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(len(panels), 1, squeeze=False, sharey=True)[:, 0])
    fig.suptitle(f"Budget to reach {target_of(budget[0])}{_CI_NOTE}")
    ys = list(range(len(budget)))
    for ax, (name, (xlabel, scale)) in zip(axes, panels.items()):
        means = [r[f"{name}_mean"] / scale for r in budget]
        err = [[(r[f"{name}_mean"] - r[f"{name}_ci95_lo"]) / scale for r in budget],
               [(r[f"{name}_ci95_hi"] - r[f"{name}_mean"]) / scale for r in budget]]
        err = [[0.0 if not math.isfinite(e) else e for e in side] for side in err]
        ax.barh(ys, [m if math.isfinite(m) else 0.0 for m in means], xerr=err, capsize=3,
                color=[colours[label] for label in labels], alpha=0.8)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_formatter(FuncFormatter(short_number))
        ax.grid(alpha=0.3, axis="x")
        ax.set_yticks(ys, labels)
    axes[0].invert_yaxis()  # shared: the first group on top in every panel
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
    fig, axes = _panels(facets, f"Modelled time to {target_of(rows[0])} against bandwidth{_CI_NOTE}")
    colours = palette(label for lines in facets.values() for _, label in lines)
    for ax, lines in zip(axes, facets.values()):
        for mine, label in lines:
            xs, ys = [r["bandwidth_gbps"] for r in mine], [r["time_s_mean"] for r in mine]
            err = [[0.0 if not math.isfinite(r["time_s_ci95_lo"]) else r["time_s_mean"] - r["time_s_ci95_lo"]
                    for r in mine],
                   [0.0 if not math.isfinite(r["time_s_ci95_hi"]) else r["time_s_ci95_hi"] - r["time_s_mean"]
                    for r in mine]]
            ax.errorbar(xs, ys, yerr=err, marker="o", markersize=3, capsize=3, label=label, color=colours[label])
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
    """File name -> matplotlib Figure, for the figures these runs have data for, each of a sensible aspect."""
    groups = group_runs(runs, columns)
    names = list(columns)
    figures = {"acc_vs_H.png": fig_acc_vs_h(groups, names, metric),
               "acc_vs_rounds.png": fig_acc_vs_rounds(groups, names, metric),
               "learning_curves.png": fig_learning_curves(groups, names),
               "h_over_epochs.png": fig_h_over_epochs(groups, names),
               "pareto.png": fig_pareto(runs, columns, metric),
               "acc_vs_time.png": fig_acc_vs_time(runs, columns, metric),
               "acc_vs_lr.png": fig_acc_vs_lr(runs, names, metric),
               "budget_to_target.png": fig_budget(budget, names),
               "time_vs_bandwidth.png": fig_time_vs_bandwidth(bandwidth, names)}
    figures = {name: fig for name, fig in figures.items() if fig is not None}
    for fig in figures.values():
        sensible_aspect(fig)
    return figures


def write_figures(runs: Sequence[RunRecord], columns: Mapping[str, str], out_dir: Path,
                  metric: str = "test_acc", budget: Sequence[Mapping[str, Any]] = (),
                  bandwidth: Sequence[Mapping[str, Any]] = ()) -> list[Path]:
    return [save_figure(fig, out_dir / name)
            for name, fig in build_figures(runs, columns, metric, budget, bandwidth).items()]
