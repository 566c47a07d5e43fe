"""A report's numbers: each group's summary with intervals, its comparison with a baseline, what it spent to
reach a target, its time at other bandwidths; as CSV rows and as the Markdown tables of report.md."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from dpl.config.store import default_options
from dpl.io import write_csv
from dpl.report import stats
from dpl.report.budget import ACCURACY, BUDGETS, LOWER_IS_BETTER, target_text, time_to_target_at, to_target
from dpl.report.fetch import (
    COMPARED,
    FAILED,
    INTERRUPTED,
    METRICS,
    QUIET_DEFAULTS,
    RunRecord,
    _by_seed,
    _changes_h,
    _key,
    _local,
    _sort_value,
    _values,
    group_runs,
    mean_curve,
)
from dpl.run.plots import short_number
from dpl.tracking.results import csv_cell

_MIB = 2.0**20


_ACC = ("test_acc", "test_acc_best", "best_val_acc")


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
             target: float = math.nan, key: str = ACCURACY) -> list[dict[str, Any]]:
    """One row per run (runs.csv): its id, status, group columns, seed, final metrics and, for the
    budget table's target, the epoch it first reached it and what it had spent by then (empty when it
    never did): the numbers behind every mean, for a researcher's own analysis."""
    rows = []
    for r in runs:
        spent = to_target(r.history, target, key) if r.finished and math.isfinite(target) else None
        rows.append({"run_id": r.run_id, "status": r.status, **dict(zip(columns, _key(r, columns))),
                     "seed": r.params.get("seed", ""), **{m: r.metrics.get(m, math.nan) for m in metrics},
                     **{f"to_target_{b}": (spent or {}).get(b, math.nan) for b in ("epoch", *BUDGETS)}})
    return rows


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


# The reference value a sweep's axis marks itself, and what it means; applied, in this order, to each such
# axis whose value differs between the groups (none of them is a method: see natural_baseline).
_REFERENCES = (("ablation", QUIET_DEFAULTS["ablation"], "the study row as it is"),
               ("dynamic_h", default_options()["dynamic_h"], "H not adapted"),  # (constant: H as given)
               ("compression", QUIET_DEFAULTS["compression"], "syncs not compressed"))


def _synchronous(method: str) -> bool:
    """The method all-reduces the gradients at every step (its facts: centralized)."""
    from dpl.core.methods import METHODS

    return method in METHODS and METHODS[method].facts.synchronous


def natural_baseline(groups: Mapping[tuple[str, ...], Sequence[RunRecord]],
                     columns: Sequence[str]) -> tuple[dict[str, str], str]:
    """(spec, why): the baseline the sweep's own axes make natural, and the rule that chose it, in words.

    The axes are the columns whose value differs between the groups with a finished run (dataset
    aside: each group is compared within its dataset). The spec sets, in turn, every axis that
    has a reference value among the groups still matching: ``ablation=none``, ``dynamic_h=constant``,
    ``compression=none``; then ``H`` at its smallest value among those (the most synchronous
    setting of a sweep over H). Without any of these, ``method=centralized`` where a method axis
    has it (synchronous data parallelism); else the first numeric axis at its smallest value (the
    fewest workers, the smallest batch), else the first axis at its first value. The groups come
    from the report's runs only, so the baseline is always a group of the sweep; every group is
    compared with the baseline group that agrees with it on every other column
    (:func:`baseline_of`).
    """
    names = list(columns)
    candidates = [dict(zip(names, k)) for k, members in groups.items() if any(r.finished for r in members)]
    axes = [c for c in names if c != "dataset" and len({row[c] for row in candidates}) > 1]
    spec: dict[str, str] = {}
    why: list[str] = []

    def choose(column: str, value: str, meaning: str) -> None:
        nonlocal candidates
        spec[column] = value
        why.append(f"{column}={value}: {meaning}")
        candidates = [row for row in candidates if row[column] == value]

    for column, value, meaning in _REFERENCES:
        if column in axes and any(row[column] == value for row in candidates):
            choose(column, value, meaning)
    if "H" in axes:
        choose("H", min((row["H"] for row in candidates), key=_sort_value),
               "the smallest H of the sweep, its most synchronous setting")
    synchronous = [row["method"] for row in candidates if "method" in axes and _synchronous(row["method"])]
    if not spec and synchronous:  # (centralized)
        choose("method", synchronous[0], "synchronous data-parallel training")
    if not spec and axes:
        numeric = [c for c in axes if all(not math.isnan(_float(row[c])) for row in candidates)]
        column = (numeric or axes)[0]
        choose(column, min((row[column] for row in candidates), key=_sort_value),
               f"the first {'numeric ' if numeric else ''}axis of the sweep at its smallest value")
    if not spec:
        return {}, "one group: nothing to compare"
    return spec, "; ".join(why)


def default_baseline(groups: Mapping[tuple[str, ...], Sequence[RunRecord]], columns: Sequence[str]) -> dict[str, str]:
    """The baseline spec of :func:`natural_baseline`."""
    return natural_baseline(groups, columns)[0]


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


def natural_target(runs: Sequence[RunRecord], columns: Mapping[str, str], metric: str = ACCURACY) -> tuple[float, str]:
    """(target, why): the budget table's default target of ``metric`` (the validation accuracy, or a language
    model's validation bits per byte or loss) and the rule, in words.

    Each group's mean curve of ``metric`` over its finished runs (the per-epoch mean over the seeds,
    :func:`dpl.report.fetch.mean_curve`) has a best epoch; the target is the worst of these best means (the
    lowest accuracy, the highest bits per byte). Every group's mean curve reaches it, so every group has a
    budget to compare, and it comes from the groups' own curves (a group that never learned does not set it
    from outside: a report's runs are one sweep's finished ones). nan without a logged ``metric``."""
    names = list(columns)
    groups = group_runs(runs, columns)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0  # compared as "higher is better"
    best = []
    for key, members in groups.items():
        steps, means = mean_curve(r.history.get(metric) or [] for r in members if r.finished)
        finite = [(sign * m, -step) for step, m in zip(steps, means) if math.isfinite(m)]
        if finite:
            value, step = max(finite)  # the best mean, at its first epoch
            best.append((value, -step, key))
    words = {"val_acc": "validation accuracies", "val_bpb": "validation bits per byte",
             "val_loss": "validation losses"}.get(metric, metric)
    if not best:
        return math.nan, f"no finished run logged its {words}"
    value, epoch, key = min(best, key=lambda b: b[0])
    varying = [c for i, c in enumerate(names) if len({k[i] for k in groups}) > 1]
    label = " ".join(f"{c}={v}" for c, v in zip(names, key) if c in varying) or "the one group"
    worst = "highest" if sign < 0 else "lowest"
    return sign * value, (f"the {worst} of the groups' best mean {words}, that of {label} at epoch {epoch}; "
                          "every group's mean curve reaches it")


def default_target(runs: Sequence[RunRecord], columns: Mapping[str, str]) -> float:
    """The target of :func:`natural_target`."""
    return natural_target(runs, columns)[0]


def budget_rows(runs: Sequence[RunRecord], columns: Mapping[str, str], target: float,
                metric: str = ACCURACY) -> list[dict[str, Any]]:
    """budget.csv: per group, how many finished runs reached ``target`` of ``metric`` (validation accuracy by
    default), and over those the mean and 95 % interval of the first epoch that did and of each budget
    spent by its end."""
    rows = []
    for key, members in group_runs(runs, columns).items():
        done = [r for r in members if r.finished and r.history.get(metric)]
        if not done:
            continue
        spent = [s for s in (to_target(r.history, target, metric) for r in done) if s is not None]
        row: dict[str, Any] = {**dict(zip(columns, key)), "target_metric": metric, f"target_{metric}": target,
                               "n": len(done), "reached": len(spent)}
        for budget in ("epoch", *BUDGETS):
            s = stats.describe([x[budget] for x in spent if math.isfinite(x[budget])])
            row[f"{budget}_mean"], row[f"{budget}_ci95_lo"], row[f"{budget}_ci95_hi"] = s.mean, s.lo, s.hi
        rows.append(row)
    return rows


BANDWIDTHS_GBPS = (1.0, 10.0, 100.0)


def bandwidth_rows(runs: Sequence[RunRecord], columns: Mapping[str, str], target: float,
                   bandwidths: Sequence[float] = BANDWIDTHS_GBPS, metric: str = ACCURACY) -> list[dict[str, Any]]:
    """time_vs_bandwidth.csv: per group and bandwidth, how many finished runs reached ``target``
    validation accuracy and the mean and 95 % interval of their modelled time to it at that bandwidth
    (:func:`dpl.report.budget.time_to_target_at`; each run's own ``network.bandwidth_gbps`` is what its
    records were logged at). Groups whose runs lack the per-epoch fields (logged before them) are left out."""
    rows = []
    for key, members in group_runs(runs, columns).items():
        done = [r for r in members if r.finished and r.history.get(metric)]
        for gbps in bandwidths:
            times = [time_to_target_at(r.history, target, gbps, _float(r.params.get("network.bandwidth_gbps", "10")),
                                       metric) for r in done]
            if not times or any(t is not None and math.isnan(t) for t in times):
                break
            s = stats.describe([t for t in times if t is not None])
            rows.append({**dict(zip(columns, key)), "target_metric": metric, f"target_{metric}": target,
                         "bandwidth_gbps": gbps, "n": len(done),
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
    return csv_cell(value)  # a group's label holds users' names (sweep, experiment, run): never a live formula


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
    if not _changes_h(row.get("dynamic_h")) or math.isnan(row.get("H_first_mean", math.nan)):
        return str(row["H"])
    return f"{short_number(row['H_first_mean'])}→{short_number(row['H_last_mean'])}"


def markdown(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str], runs: Sequence[RunRecord],
             title: str, metrics: Sequence[str] = _TABLE, comparisons: Sequence[Mapping[str, Any]] = (),
             budget: Sequence[Mapping[str, Any]] = (), baseline: Mapping[str, str] | None = None,
             why: Mapping[str, str] | None = None) -> str:
    """report.md; ``why`` ({"baseline": ..., "target": ...}) says how the baseline and the budget's target
    were chosen, a sentence under each table."""
    params, columns, why = columns, list(columns), why or {}
    local = any(_local(r.params.get("method.name")) for r in runs)
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
        if why.get("baseline"):
            lines += ["", f"Baseline: {md_escape(why['baseline'])}."]
    if budget:
        lines += ["", *_budget_lines(budget, columns)]
        if why.get("target"):
            lines += ["", f"Target: {md_escape(why['target'])}."]
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
    metric = budget[0]["target_metric"]
    shown = ("epoch", "samples_total", "sync_rounds_total", "comm_bytes_total", "modelled_time_s")
    lines = [f"## Budget to reach {target_of(budget[0])}", "",
             "Per group, over the runs that reached the target: the first epoch whose "
             f"{target_text(0.0, metric).split(' ', 1)[1].lstrip('% ')} did, and what was spent by the end of it; mean ± half-width of the 95 % CI (n runs that reached "
             "it). Reached: how many of the finished runs did; a group none of whose runs reached it shows –.",
             "", _md_row([*columns, "reached", *(_SHOWN[b][0] for b in shown)]), "|" + "---|" * (len(columns) + 6)]
    for row in budget:
        cells = [_param_text(row[c]) for c in columns]
        lines.append(_md_row([*cells, f"{row['reached']} of {row['n']}",
                              *(_fmt(row, b, "reached") for b in shown)]))
    return lines


def target_of(row: Mapping[str, Any]) -> str:
    """A budget row's target in words (:func:`dpl.report.budget.target_text`)."""
    return target_text(row[f"target_{row['target_metric']}"], row["target_metric"])


def _group_label(key: Sequence[str], columns: Sequence[str]) -> str:
    """``method=localsgd K=4``: a group named in full (the failed-runs list of report.md)."""
    return " ".join(f"{c}={v}" for c, v in zip(columns, key) if v != "") or "all runs"


def _float(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
