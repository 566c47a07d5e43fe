"""Per-run figures from the epoch history: loss, accuracy, lr, communication, H.

Figures are built with the object-oriented ``matplotlib.figure.Figure`` and rendered by
the Agg canvas, never through pyplot: no display is needed, no global figure list grows
over the many calls of a sweep, and a user's interactive backend is left alone.
Each PNG is written atomically (a run killed mid-save leaves the old file or none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from dpl.io import atomic_temp_path

History = Sequence[Mapping[str, float]]
_MIB = 2.0**20


def plot_history(history: History, out_dir: str | Path) -> list[Path]:
    """Write loss.png, accuracy.png, lr.png, comm.png and h.png for the keys present; return their paths."""
    out_dir = Path(out_dir)
    written = []
    for name, draw in _FIGURES.items():
        fig = draw(history)
        if fig is not None:
            written.append(save_figure(fig, out_dir / name))
    return written


def _series(history: History, key: str, x_key: str = "epoch") -> tuple[list[float], list[float]]:
    """(x, y) over the epochs that have ``key``; x is the epoch counted from 1 (the row number if absent)."""
    xs, ys = [], []
    for i, row in enumerate(history):
        if row.get(key) is None:
            continue
        x = row.get(x_key, i if x_key == "epoch" else None)
        if x is not None:
            xs.append(float(x) + 1 if x_key == "epoch" else float(x))
            ys.append(float(row[key]))
    return xs, ys


def _curves(history: History, keys: Sequence[str], ylabel: str, title: str) -> Figure | None:
    """One axes with a curve per key present; None when no key is."""
    series = {k: _series(history, k) for k in keys}
    series = {k: xy for k, xy in series.items() if xy[0]}
    if not series:
        return None
    fig, ax = new_figure(1)
    for key, (xs, ys) in series.items():
        ax[0].plot(xs, ys, marker="o", markersize=3, label=key.replace("_", " "))  # markers: 1 epoch is a point
    label_axes(ax[0], "epoch", ylabel, title)
    integer_ticks(ax[0])
    if len(series) > 1:
        legend_outside(fig)
    return fig


def _loss(history: History) -> Figure | None:
    return _curves(history, ("train_loss", "val_loss"), "loss", "Loss")


def _accuracy(history: History) -> Figure | None:
    return _curves(history, ("train_acc", "val_acc"), "accuracy", "Accuracy")


def _lr(history: History) -> Figure | None:
    return _curves(history, ("lr",), "learning rate", "Learning rate")


def _h(history: History) -> Figure | None:
    return _curves(history, ("H",), "local steps H", "Local steps between syncs")


def _comm(history: History) -> Figure | None:
    """Validation accuracy against communication: MiB sent per worker, modelled time."""
    panels = []
    xs, ys = _series(history, "val_acc", "comm_bytes_total")
    if xs:
        panels.append(([x / _MIB for x in xs], ys, "MiB sent per worker (cumulative)", "Accuracy vs bytes sent"))
    xs, ys = _series(history, "val_acc", "modelled_time_s")
    if xs:
        panels.append((xs, ys, "modelled time (s)", "Accuracy vs modelled time"))
    if not panels:
        return None
    fig, axes = new_figure(len(panels))
    for ax, (xs, ys, xlabel, title) in zip(axes, panels):
        ax.plot(xs, ys, marker=".")
        label_axes(ax, xlabel, "val accuracy", title)
    return fig


_FIGURES = {"loss.png": _loss, "accuracy.png": _accuracy, "lr.png": _lr, "comm.png": _comm, "h.png": _h}


def new_figure(panels: int, width: float = 5.0) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * panels, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def short_number(value: float, _pos=None) -> str:
    """A tick or table number in at most 3 significant digits: 0.0003, 120, 2k, 1.5M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def integer_ticks(ax, which: str = "x") -> None:
    """Ticks at whole numbers only (epochs): no 0.5-epoch ticks on a 2-epoch run. Call after plotting:
    a view narrower than one unit (a 1-epoch run) is widened to one unit around its whole number."""
    getattr(ax, f"{which}axis").set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    lo, hi = getattr(ax, f"get_{which}lim")()
    if hi - lo < 1:
        mid = round((lo + hi) / 2)
        getattr(ax, f"set_{which}lim")(mid - 0.5, mid + 0.5)


def log_axis(ax, which: str = "x", lo: float | None = None, hi: float | None = None) -> None:
    """A log axis labelled with plain short numbers at 1-2-5 (or decade) steps and no minor labels,
    so labels never run together ("3040506080100")."""
    axis = getattr(ax, f"{which}axis")
    getattr(ax, f"set_{which}scale")("log")
    decades = math.log10(hi / lo) if lo and hi and lo > 0 and hi > lo else 1.0
    subs = (1.0, 2.0, 3.0, 5.0) if decades < 1 else (1.0, 2.0, 5.0) if decades <= 2 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=8))
    axis.set_major_formatter(FuncFormatter(short_number))
    axis.set_minor_formatter(NullFormatter())


def legend_outside(fig: Figure, max_entries: int = 20, title: str | None = None) -> None:
    """One legend for the whole figure, right of the axes (never over the data); left out when it
    would list more than ``max_entries`` entries."""
    entries: dict[str, object] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if 0 < len(entries) <= max_entries:
        fig.legend(list(entries.values()), list(entries), loc="outside right upper", fontsize="small",
                   title=title, title_fontsize="small")


def label_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def save_figure(fig: Figure, path: Path) -> Path:
    with atomic_temp_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    fig.clear()  # drop the artists now rather than waiting for the collector
    return path
