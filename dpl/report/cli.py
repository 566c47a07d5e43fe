"""``python -m dpl.report``: its command line, and the report written from it (see :mod:`dpl.report`)."""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence

from dpl.comm.cost import RESCALED_FIELDS
from dpl.errors import TrackingError
from dpl.io import atomic_write_text
from dpl.report.budget import ACCURACY, BUDGETS, TARGET_METRICS, target_text
from dpl.report.fetch import (
    DEFAULT_EXPERIMENT,
    METRICS,
    TEXT_METRIC,
    RunRecord,
    fetch_runs,
    group_columns,
    group_runs,
    latest,
    report_store,
)
from dpl.report.figures import write_figures
from dpl.report.tables import (
    _ACC,
    _TABLE,
    BANDWIDTHS_GBPS,
    BaselineError,
    bandwidth_rows,
    budget_rows,
    compare_groups,
    markdown,
    natural_baseline,
    natural_target,
    parse_baseline,
    run_rows,
    summarise,
    write_csv_table,
)


def write_report(runs: Sequence[RunRecord], out_dir: str | Path, title: str, metric: str = "test_acc",
                 baseline: Optional[str] = None, target_acc: Optional[float] = None,
                 bandwidths: Sequence[float] = BANDWIDTHS_GBPS, say: Callable[[str], None] = lambda line: None,
                 target_metric: str = ACCURACY) -> list[Path]:
    """Write summary.csv, comparisons.csv, budget.csv, runs.csv, report.md and the figures for ``runs``;
    return the paths written. ``baseline`` is ``KEY=VALUE[,KEY=VALUE]`` (default: the one the runs'
    own axes make natural, :func:`dpl.report.tables.natural_baseline`); ``target_acc`` the budget table's
    target of ``target_metric`` (the validation accuracy, or val_bpb / val_loss, lower is better; default:
    the worst of the groups' best means, :func:`dpl.report.tables.natural_target`); ``bandwidths`` (Gbit/s) those of
    time_vs_bandwidth.csv. ``say`` gets one line each on the baseline and the target, and why."""
    out_dir = Path(out_dir)
    columns = group_columns(runs)
    # language models (dataset=text): bits per byte beside the loss (lower is better), where the runs have it
    text = any(TEXT_METRIC in r.metrics for r in runs)
    metrics, table = (METRICS + (TEXT_METRIC,), _TABLE + (TEXT_METRIC,)) if text else (METRICS, _TABLE)
    rows = summarise(runs, columns, metrics)
    groups = group_runs(runs, columns)
    spec, why = (parse_baseline(baseline, columns), "--baseline") if baseline else \
        natural_baseline(groups, list(columns))
    if baseline and not any(all(dict(zip(columns, k))[c] == v for c, v in spec.items()) for k in groups):
        raise BaselineError(f"--baseline {baseline!r} matches no group of this report")
    if spec:
        say(f"baseline {' '.join(f'{c}={v}' for c, v in spec.items())} ({why}): each group is compared with "
            f"the baseline group that agrees with it on every other column (choose with --baseline)")
    comparisons = compare_groups(runs, columns, spec)
    target, target_why = natural_target(runs, columns, target_metric) if target_acc is None else \
        (target_acc, "--target")
    if math.isfinite(target):
        say(f"budget target {target_text(target, target_metric)} ({target_why}; choose with --target-metric, "
            f"--target)")
    budget = budget_rows(runs, columns, target, target_metric) if math.isfinite(target) else []
    bandwidth = bandwidth_rows(runs, columns, target, bandwidths, target_metric) if math.isfinite(target) else []
    written = [write_csv_table(rows, out_dir / "summary.csv"),
               write_csv_table(comparisons, out_dir / "comparisons.csv") if comparisons else None,
               write_csv_table(budget, out_dir / "budget.csv") if budget else None,
               write_csv_table(bandwidth, out_dir / "time_vs_bandwidth.csv") if bandwidth else None,
               write_csv_table(run_rows(runs, columns, metrics, target=target, key=target_metric), out_dir / "runs.csv")]
    atomic_write_text(out_dir / "report.md", markdown(rows, columns, runs, title, table, comparisons=comparisons,
                                                      budget=budget, baseline=spec,
                                                      why={"baseline": why, "target": target_why}))
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


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (its default prints the whole usage first)."""

    def error(self, message: str):
        print(f"error: {message} (see python -m dpl.report --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = _Parser(prog="python -m dpl.report", description=__doc__.split("\n\n")[0],
                                epilog="With neither --experiment nor --sweep: the latest sweep in the store (the "
                                       "one whose newest run started last), or the single runs of experiment "
                                       f"{DEFAULT_EXPERIMENT!r} where the store holds no sweep.")
    p.add_argument("--experiment", help="MLflow experiment name (a sweep's runs are in the experiment it names)")
    p.add_argument("--sweep", help="only runs with this sweep tag (across experiments unless --experiment)")
    p.add_argument("--include-failed", action="store_true",
                   help="a sweep's report (--sweep, or no argument) also counts and lists its runs that did not "
                        "finish (failed, killed, interrupted, still running); by default it is its FINISHED runs "
                        "only, as a re-run of a stopped sweep leaves the killed attempts under the same tag. An "
                        "--experiment's report always lists them")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                   help="MLflow store; a relative sqlite path is relative to the current directory")
    p.add_argument("--out", help="output folder, used as given (default reports/<experiment or sweep>, made one "
                                 "safe folder name)")
    p.add_argument("--metric", default=None, choices=(*_ACC, TEXT_METRIC),
                   help="what the figures plot (default: test_bpb for language-model runs, which have it, "
                        "else test_acc)")
    p.add_argument("--baseline", metavar="KEY=VALUE[,KEY=VALUE]",
                   help="the group every other is compared with (comparisons.csv); a group's baseline also agrees "
                        "with it on the other columns (default: the sweep's reference settings: ablation=none, "
                        "dynamic_h=constant, compression=none, the smallest H, where those vary; docs/reports.md)")
    p.add_argument("--target-acc", type=_fraction, metavar="ACC",
                   help="validation accuracy (0-1) of the budget-to-target table (default: the lowest of the groups' "
                        "best mean validation accuracies, which every group's mean curve reaches)")
    p.add_argument("--target-metric", default=ACCURACY, choices=TARGET_METRICS,
                   help="what the budget-to-target table's target is on: val_acc (default), or a language model's "
                        "val_bpb / val_loss (lower is better; the default target is then the highest of the groups' "
                        "best means)")
    p.add_argument("--target", type=_finite, metavar="VALUE",
                   help="the target of --target-metric (val_acc: as --target-acc)")
    p.add_argument("--bandwidths", type=_bandwidths, default=BANDWIDTHS_GBPS, metavar="GBPS[,GBPS]",
                   help="network bandwidths (Gbit/s) of the time-to-target figure (default: 1,10,100)")
    return p.parse_args(argv)


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


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


class ReportError(ValueError):
    """A report's destination that cannot be written; the message is one line."""


def check_out_dir(out: Path, name: str) -> None:
    """``out`` (named ``name`` in the error) can be made a folder and written in, or a one-line
    ReportError. Tried, not inferred from permission bits (root ignores them), at its deepest
    existing part; nothing is created."""
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        if not base.is_dir():
            raise NotADirectoryError(20, f"{base} is not a folder")
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise ReportError(f"{name} cannot be written: cannot write in {base} ({e.strerror or type(e).__name__}); "
                          f"choose another --out") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The report of ``argv``'s runs; 0, or 2 with one ``error:`` line (no store, no runs, an
    unreadable store, an unwritable ``--out``), in which case nothing is written."""
    args = parse_args(argv)
    try:
        if args.out:  # before fetching: a report must not be read for minutes and then not be written
            check_out_dir(Path(args.out), f"--out={args.out!r}")
        client = report_store(args.tracking_uri)
    except (TrackingError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.experiment is None and args.sweep is None:
        args.experiment, args.sweep, why = latest(client)
        what = f"sweep={args.sweep!r}" if args.sweep is not None else f"experiment={args.experiment!r}"
        print(f"reporting {what}: {why}, in {args.tracking_uri} (choose with --sweep / --experiment)")
    kind = "sweep" if args.sweep is not None else "experiment"
    name = args.sweep if args.sweep is not None else args.experiment
    try:
        out = Path(args.out) if args.out else default_out_dir(kind, name)
        if not args.out:
            check_out_dir(out, f"the report folder {out}")
        # the curves the report reads: validation accuracy (its figures), and the budget target's metric
        target_curve = () if args.target_metric == ACCURACY else (args.target_metric,)
        runs = fetch_runs(client, args.experiment, args.sweep,
                          history_keys=(ACCURACY, *target_curve, "H", *BUDGETS, *RESCALED_FIELDS))
    except (LookupError, ReportError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    left = [] if args.sweep is None or args.include_failed else [r for r in runs if not r.finished]
    if left:  # a sweep's tag is shared by every attempt of it: a stopped one's killed jobs are not results
        runs = [r for r in runs if r.finished]
        counts = ", ".join(f"{n} {status.lower()}" for status, n in sorted(Counter(r.status for r in left).items()))
        if runs:
            print(f"left out {len(left)} run{'s' * (len(left) > 1)} of the sweep that did not finish ({counts}); "
                  "--include-failed counts and lists them")
        else:
            print(f"error: no finished runs for sweep={name!r} in {args.tracking_uri} ({counts}; --include-failed "
                  f"reports them)", file=sys.stderr)
            return 2
    if not runs:
        print(f"error: no runs found for {kind}={name!r} in {args.tracking_uri}", file=sys.stderr)
        return 2
    metric = args.metric or (TEXT_METRIC if any(TEXT_METRIC in r.metrics for r in runs) else "test_acc")
    try:
        paths = write_report(runs, out, title=f"dpl report: {name}", metric=metric, baseline=args.baseline,
                             target_acc=args.target if args.target is not None else args.target_acc,
                             bandwidths=args.bandwidths, say=print, target_metric=args.target_metric)
    except BaselineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk that filled (or went read-only) while the report was written
        print(f"error: the report cannot be written to {out}: {e.strerror or e} (free some space there, or "
              f"choose another --out)", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
