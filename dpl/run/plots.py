"""Per-run figures from the epoch history: loss, accuracy, lr, communication, H.

Figures are built with the object-oriented ``matplotlib.figure.Figure`` and rendered by
the Agg canvas, never through pyplot: no display is needed, no global figure list grows
over the many calls of a sweep, and a user's interactive backend is left alone.
Each PNG is written atomically (a run killed mid-save leaves the old file or none).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, PercentFormatter

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
    """(x, y) over the epochs that have ``key``; x is the epoch, counted from 1 as history.csv
    counts it (the row number from 1 where a row has none)."""
    xs, ys = [], []
    for i, row in enumerate(history):
        if row.get(key) is None:
            continue
        x = row.get(x_key, i + 1 if x_key == "epoch" else None)
        if x is not None:
            xs.append(float(x))
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
    return _curves(history, ("train_loss", "val_loss"), "cross-entropy", "Loss")


def _accuracy(history: History) -> Figure | None:
    fig = _curves(history, ("train_acc", "val_acc"), "accuracy", "Accuracy")
    if fig is not None:
        percent_axis(fig.axes[0])
    return fig


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
        percent_axis(ax)
    return fig


_FIGURES = {"loss.png": _loss, "accuracy.png": _accuracy, "lr.png": _lr, "comm.png": _comm, "h.png": _h}


_DPI = 120  # drawn at the dpi it is saved at, so what a test measures is what the PNG shows


def new_figure(panels: int, width: float = 5.0, height: float = 3.6, sharey: bool = False) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * panels, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, panels, squeeze=False, sharey=sharey)[0])


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


# Between the legend and the panels, and between the legend and the figure's edge (inches).
_LEGEND_PAD = 0.1


def legend_outside(fig: Figure, max_entries: int = 20, title: str | None = None) -> None:
    """One legend for the whole figure in a column right of the panels, its top below the figure's
    title; left out when it would list more than ``max_entries`` entries.

    The figure grows by the legend's measured size (wider by its width, taller when it has more
    rows than the panels are high) and the panels keep their own size. Leaving the space to
    constrained layout's "outside" legend does neither: a wide legend squeezes the panels until
    the layout gives up and the legend lands on the data, a tall one runs off the figure, and it
    is put at the very top, over the suptitle.
    """
    entries: dict[str, object] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if not 0 < len(entries) <= max_entries:
        return
    legend = fig.legend(list(entries.values()), list(entries), loc="upper left", borderaxespad=0,
                        fontsize="small", title=title, title_fontsize="small")
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    leg_w, leg_h = box.width / fig.dpi, box.height / fig.dpi
    engine = fig.get_layout_engine()
    pad = engine.get()["h_pad"] if engine is not None else 0.04
    top = _LEGEND_PAD
    suptitle = fig._suptitle  # no public getter for the artist; its height is where the legend starts
    if suptitle is not None and suptitle.get_text():
        top = suptitle.get_window_extent(renderer).height / fig.dpi + 2 * pad + _LEGEND_PAD
    width, height = fig.get_size_inches()
    new_w = width + leg_w + 2 * _LEGEND_PAD
    new_h = max(height, top + leg_h + _LEGEND_PAD)
    fig.set_size_inches(new_w, new_h)
    if engine is not None:
        engine.set(rect=(0, 0, width / new_w, 1))  # the panels lay out left of the legend's column
    legend.set_bbox_to_anchor(((width + _LEGEND_PAD) / new_w, 1 - top / new_h), transform=fig.transFigure)


def percent_axis(ax, lo: float | None = None, hi: float | None = None, which: str = "y") -> None:
    """An accuracy axis in percent (as the tables show it) from a round floor to a round ceiling.

    ``lo``/``hi`` are the lowest and highest values drawn, fractions in [0, 1], error bars included
    (the axes' data limits when not given). The view runs from the multiple of 10 points below the
    lowest value to the one above the highest, so it always spans at least 10 points: autoscaling
    to 0.190-0.200 makes one point look like the whole range. It does not always start at 0, as
    that would flatten the few points that tell runs at 90% apart.
    """
    if lo is None or hi is None:
        data_lo, data_hi = (ax.dataLim.y0, ax.dataLim.y1) if which == "y" else (ax.dataLim.x0, ax.dataLim.x1)
        lo = data_lo if lo is None else lo
        hi = data_hi if hi is None else hi
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    floor = max(0.0, math.floor(lo * 10 - 1e-9) / 10)  # strictly below: no point sits on the bottom spine
    ceil = min(1.0, math.ceil(hi * 10 + 1e-9) / 10)
    ceil = max(ceil, floor + 0.1)
    margin = 0.02 * (ceil - floor)  # a marker at 0% or 100% is drawn whole
    getattr(ax, f"set_{which}lim")(floor - margin, ceil + margin)
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))
    axis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))


def label_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def save_figure(fig: Figure, path: Path) -> Path:
    with atomic_temp_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    fig.clear()  # drop the artists now rather than waiting for the collector
    return path
